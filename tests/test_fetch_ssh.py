"""`devft fetch` over real ssh: an sshd on 127.0.0.1 (started by the test, key login only) plays
the coordinator, and rsync and scp each copy a finished run from it."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_fetch import OUTPUTS, _fetch, finished  # noqa: F401  (the finished run fixture)

from devft.files import file_digests

SSHD = shutil.which("sshd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
pytestmark = pytest.mark.skipif(
    SSHD is None or not all(shutil.which(t) for t in ("ssh", "scp", "ssh-keygen")),
    reason="sshd (openssh-server) or the ssh client is not installed; the ssh path is covered "
           "by the rsync/scp stand-ins of tests/test_fetch.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """An sshd on loopback and an ssh_config for it; yields the config's path."""
    if os.geteuid() == 0:  # sshd run by root needs its privilege separation directory
        try:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        except OSError as err:
            pytest.skip(f"sshd as root needs /run/sshd, which cannot be made here ({err})")
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)],
                       check=True)
    shutil.copy(root / "user.pub", root / "authorized_keys")
    port = _free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\n"
        f"UsePAM no\nPidFile {root / 'sshd.pid'}\nSubsystem sftp internal-sftp\n")
    config = root / "ssh_config"
    config.write_text(
        f"Host coord\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
        f"  IdentityFile {root / 'user'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    log = (root / "sshd.log").open("w")
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["ssh", "-F", str(config), "coord", "true"],
                             capture_output=True).returncode != 0:
            if sshd.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"sshd did not accept a login: {(root / 'sshd.log').read_text()}")
            time.sleep(0.2)
        yield config
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)
        log.close()


@pytest.mark.parametrize("tool", ["rsync", "scp"])
def test_fetch_over_ssh(tool, coordinator, finished, tmp_path, capsys):  # noqa: F811
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    dest = tmp_path / "lab-1"
    lines = _fetch(capsys, f"coord:{finished}", str(dest), "--transfer", tool,
                   "--ssh-config", str(coordinator), "--checkpoints")
    assert lines[0].startswith(f"fetched coord:{finished} into {dest} ({tool})")
    assert {p.name for p in dest.iterdir()} == OUTPUTS | {"checkpoints", ".devft.lock"}
    assert file_digests(dest / "adapter") == file_digests(finished / "adapter")
    assert file_digests(dest / "checkpoints") == file_digests(finished / "checkpoints")
    assert not [ln for ln in lines if ln.startswith("note:")]


def test_an_unreachable_coordinator_names_ssh_s_reason(coordinator, tmp_path, capsys):
    config = tmp_path / "ssh_config"  # the same coordinator on a port nothing listens on
    config.write_text(re.sub(r"Port \d+", f"Port {_free_port()}", coordinator.read_text()))
    line = _fetch(capsys, "coord:/srv/run", str(tmp_path / "d"), "--ssh-config", str(config),
                  code=2)[0]
    assert "copying coord:/srv/run failed (" in line and "ssh: connect to host" in line


@pytest.mark.parametrize("tool", ["rsync", "scp"])
def test_a_missing_run_dir_on_the_coordinator_is_one_line(tool, coordinator, tmp_path, capsys):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    line = _fetch(capsys, "coord:/no/such/run", str(tmp_path / "d"), "--transfer", tool,
                  "--ssh-config", str(coordinator), code=2)[0]
    assert f"copying coord:/no/such/run failed ({tool}: " in line
    assert "No such file or directory" in line
    assert not (tmp_path / "d").exists()

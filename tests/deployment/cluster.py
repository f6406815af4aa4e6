"""A real Flower deployment on 127.0.0.1: one `flower-superlink`, N `flower-supernode`s.

Each process gets its own FLWR_HOME (as if it ran on its own machine), its own log file and
its own process group, so teardown can kill it together with the SuperExec and
`flwr-serverapp` / `flwr-clientapp` children it spawns. The `flwr` CLI is driven through
a SuperLink connection written into a separate FLWR_HOME/config.toml.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from deployment.pki import NodeKeys, ServerCerts

VENV_BIN = Path(sys.executable).parent
CONNECTION = "devft-test"


class DeploymentError(AssertionError):
    """A deployment process failed, exited early or timed out (message carries its log)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path, bin_dir: Path = VENV_BIN) -> dict[str, str]:
    """Environment for a Flower process: this venv first on PATH (SuperLink/SuperNode
    spawn `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name), its own
    FLWR_HOME, no update check, no telemetry, no per-run `uv sync` of the app's deps."""
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
        NO_COLOR="1",
        COLUMNS="200",
        OMP_NUM_THREADS="1",  # 2-core machines: ServerApp + 2 ClientApps share the CPU
    )
    return env


@dataclass
class Service:
    """One long-running Flower process with its log file."""

    name: str
    args: list[str]
    home: Path
    log_path: Path
    bin_dir: Path = VENV_BIN
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=flower_env(self.home, self.bin_dir),
                cwd=self.home,
                start_new_session=True,  # own process group: killpg reaches its children
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until `pattern` (regex) appears in the log; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if match := re.search(pattern, self.log()):
                return match
            if self.returncode() is not None:
                raise DeploymentError(
                    f"{self.name} exited ({self.returncode()}) before logging {pattern!r}:\n"
                    + self.tail()
                )
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{self.name}: no {pattern!r} within {timeout:.0f}s:\n" + self.tail()
                )
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(
                f"{self.name} still running after {timeout:.0f}s:\n" + self.tail()
            ) from None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process, its group and its descendants (the SuperLink's SuperExec runs
        in a session of its own); SIGKILL whatever is left after `grace` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: pgid == pid
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        _signal_group(pgid, signal.SIGTERM)
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        _, alive = psutil.wait_procs(family, timeout=max(0.5, deadline - time.monotonic()))
        _signal_group(pgid, signal.SIGKILL)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Cluster:
    """A SuperLink with TLS and SuperNode authentication, plus SuperNodes and a CLI home."""

    root: Path
    certs: ServerCerts
    port: int = field(default_factory=free_port)
    services: list[Service] = field(default_factory=list)
    superlink: Service | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def cli_home(self) -> Path:
        return self.root / "cli"

    # ---- processes ---------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0, log_name: str = "superlink") -> Service:
        """`flower-superlink` serving the Fleet, Control and Runtime APIs on one TLS port;
        its state (registered keys, runs) persists in superlink/state.db across restarts."""
        home = self.root / "superlink"
        service = Service(
            "superlink",
            [
                str(VENV_BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(home / "state.db"),
            ],
            home,
            self.root / f"{log_name}.log",
        )
        self.services.append(service.start())
        service.wait_for_log(r"Uvicorn running on https://", timeout)
        self._write_cli_config()
        self.superlink = service
        return service

    def restart_superlink(self, timeout: float = 60.0) -> Service:
        """Kill the SuperLink with its SuperExec and ServerApp (as a machine restart would),
        then start it again on the same port and database."""
        assert self.superlink is not None
        self.superlink.stop(grace=0.5)
        return self.start_superlink(timeout, log_name=f"superlink-{len(self.services)}")

    def start_supernode(
        self,
        name: str,
        node_config: str,
        keys: NodeKeys | None,
        *,
        max_retries: int | None = None,
        extra_args: tuple[str, ...] = (),
        bin_dir: Path = VENV_BIN,
    ) -> Service:
        """`flower-supernode` (from `bin_dir`'s environment) with its own Runtime API port,
        node config and auth key."""
        args = [
            str(bin_dir / "flower-supernode"),
            "--superlink",
            self.address,
            "--root-certificates",
            str(self.certs.ca_cert),
            "--node-config",
            node_config,
            "--port",
            str(free_port()),  # its local Runtime API (ClientApp <-> SuperNode)
        ]
        if keys is not None:
            args += ["--auth-supernode-private-key", str(keys.private_key)]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        args += extra_args
        service = Service(name, args, self.root / name, self.root / f"{name}.log", bin_dir)
        self.services.append(service.start())
        return service

    def stop(self) -> None:
        """Stop SuperNodes first (they deactivate cleanly), the SuperLink last."""
        for service in reversed(self.services):
            service.stop()

    # ---- flwr CLI ----------------------------------------------------------------------------
    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{self.address}"\n'
            f'root-certificates = "{self.certs.ca_cert}"\n'
        )

    def flwr(self, *args: str, timeout: float = 60.0,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against this cluster's connection; fail loudly on error
        (unless `check` is false)."""
        cmd = [str(VENV_BIN / "flwr"), *args]
        try:
            res = subprocess.run(
                cmd,
                env=flower_env(self.cli_home),
                cwd=self.root,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from err
        if check and res.returncode != 0:
            raise DeploymentError(
                f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res

    def flwr_json(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        out = self.flwr(*args, "--format", "json", timeout=timeout).stdout
        return json.loads(out[out.index("{") :])

    def register(self, keys: NodeKeys) -> int:
        """`flwr supernode register <public key>`: returns the node id the SuperLink assigned."""
        res = self.flwr_json("supernode", "register", str(keys.public_key), CONNECTION)
        assert res["success"], res
        return int(res["node-id"])


def write_app(directory: Path, run_config: dict[str, Any], name: str = "devft-app") -> Path:
    """A minimal Flower App whose components are devft's ServerApp and ClientApp.

    Only this pyproject.toml goes into the FAB: the code comes from the devft package
    installed in the environment of every SuperLink and SuperNode. `run_config` becomes
    `[tool.flwr.app.config]`; only keys declared there can be overridden with
    `flwr run --run-config`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{name}"',
        'version = "0.1.0"',
        'description = "DevFT as a Flower App (deployment test)"',
        'license = "Apache-2.0"',
        'dependencies = ["flwr[simulation]==1.42.0"]',
        "",
        "[tool.flwr.app]",
        'publisher = "devft"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "devft.federation.server_app:app"',
        'clientapp = "devft.federation.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml_value(value)}" for key, value in run_config.items()),
    ]
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return directory


def run_config_arg(values: dict[str, Any]) -> str:
    """`--run-config` string: space-separated `key=value`, values TOML-typed."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"unsupported characters in run config value: {text!r}")
    return f'"{text}"'

"""`devft fetch`: a finished run's outputs copied from a local path or over ssh (rsync or scp),
checked against the digests summary.json recorded, and kept only when they check out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devft.cli import main
from devft.fetch import Source, parse_source, transfer_command
from devft.files import file_digests
from devft.rundir_check import safetensors_problem

OUTPUTS = {"adapter", "summary.json", "metrics.jsonl", "config.json", "loss.png"}


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tiny_data_file, tmp_path_factory) -> Path:
    """A finished 2-round FedIT run of the tiny model (with checkpoints/)."""
    out = tmp_path_factory.mktemp("fetch") / "run"
    sets = [f"model.path={tiny_model_dir}", f"data.name={tiny_data_file}",
            "federation.num_clients=2", "federation.rounds=2", "train.local_steps=1",
            "data.eval_examples=4", "output.progress=false"]
    assert main(["run", "--method", "fedit", *[a for s in sets for a in ("--set", s)],
                 "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run that a test may damage."""
    return Path(shutil.copytree(finished, tmp_path / "coord" / "run"))


def _fetch(capsys, *argv: str, code: int = 0) -> list[str]:
    """`devft fetch ARGV`: its stdout lines, or (code 2) its one error line."""
    assert main(["fetch", *argv]) == code
    out, err = capsys.readouterr()
    if code == 0:
        return out.splitlines()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("devft: error:")]
    assert len(lines) == 1, err
    return lines


def _record_digests(run: Path) -> None:
    """What the ServerApp would have written after the adapter changed (so a test can alter
    the adapter and still have a consistent run)."""
    summary = json.loads((run / "summary.json").read_text())
    summary["adapter_sha256"] = file_digests(run / "adapter")
    (run / "summary.json").write_text(json.dumps(summary))


# ---- SOURCE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, host, path", [
    ("coord:/srv/runs/lab-1", "coord", "/srv/runs/lab-1"),
    ("ana@coord.example.org:runs/lab-1", "ana@coord.example.org", "runs/lab-1"),
    ("ana@[::1]:/srv/x", "ana@[::1]", "/srv/x"),
    ("/mnt/coord/runs/lab-1", None, "/mnt/coord/runs/lab-1"),
    ("runs/lab-1", None, "runs/lab-1"),
    ("./a:b", None, "./a:b"),
    ("runs/a:b", None, "runs/a:b"),
])
def test_source_is_read_as_scp_reads_it(text, host, path):
    assert parse_source(text) == Source(host, path)


def test_a_host_without_a_run_dir_is_refused(capsys):
    line = _fetch(capsys, "coord:", "x", code=2)[0]
    assert "SOURCE = 'coord:'" in line and "RUN_DIR" in line


def test_the_copy_commands_take_only_the_outputs():
    names = ["adapter", "summary.json"]
    rsync = transfer_command("rsync", Source("ana@coord", "/srv/r/"), names, Path("/t/s"),
                             "/k/my config")
    assert rsync == ["rsync", "-a", "-e", "ssh -F '/k/my config'", "--include=/adapter/***",
                     "--include=/summary.json", "--exclude=*", "ana@coord:/srv/r/", "/t/s/"]
    scp = transfer_command("scp", Source("coord", "/srv/r"), names, Path("/t/s"))
    assert scp == ["scp", "-r", "-p", "coord:/srv/r/adapter", "coord:/srv/r/summary.json",
                   "/t/s/"]


# ---- a local SOURCE -----------------------------------------------------------------------------


def test_fetch_copies_the_outputs_checks_them_and_the_printed_command_works(
        finished, tmp_path, capsys):
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["adapter_sha256"] == file_digests(finished / "adapter")
    dest = tmp_path / "here" / "lab-1"
    lines = _fetch(capsys, str(finished), str(dest))
    assert {p.name for p in dest.iterdir()} == OUTPUTS | {".devft.lock"}  # no checkpoints/
    assert file_digests(dest / "adapter") == file_digests(finished / "adapter")
    assert not list(dest.parent.glob(".*fetch*"))  # no staging folder left
    text = "\n".join(lines)
    assert "checked: adapter/ complete: its 3 files have the SHA-256" in text
    assert "run: fedit, 2 rounds, held-out loss" in text
    use = [ln for ln in lines if ln.startswith("use it: ")]
    assert use == [f"use it: devft generate --adapter {dest}/adapter --prompt \"...\""]
    # the printed command answers with the fetched adapter
    assert main(["generate", "--adapter", f"{dest}/adapter", "--prompt", "Say a color.",
                 "--max-new-tokens", "2"]) == 0


def test_checkpoints_only_when_asked(finished, tmp_path, capsys):
    _fetch(capsys, str(finished), str(tmp_path / "d"), "--checkpoints")
    assert (tmp_path / "d" / "checkpoints" / "latest.json").is_file()


def test_a_base_that_exists_only_on_the_coordinator_needs_model(run, tmp_path, capsys):
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/srv/models/tiny"
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    run_config = json.loads((run / "config.json").read_text())
    run_config["model"]["path"] = "/srv/models/tiny"
    (run / "config.json").write_text(json.dumps(run_config))
    _record_digests(run)
    lines = _fetch(capsys, str(run), str(tmp_path / "d"))
    assert any("--model BASE" in ln for ln in lines if ln.startswith("use it: "))
    assert any("/srv/models/tiny exists only on the machine that ran" in ln for ln in lines)


def test_a_damaged_adapter_is_refused_and_dest_keeps_its_good_copy(run, tmp_path, capsys):
    dest = tmp_path / "d"
    _fetch(capsys, str(run), str(dest))
    good = file_digests(dest / "adapter")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    line = _fetch(capsys, str(run), str(dest), code=2)[0]
    assert "adapter/adapter_model.safetensors is not the file summary.json recorded" in line
    assert file_digests(dest / "adapter") == good
    assert not list(tmp_path.glob(".*fetch*"))


def test_an_adapter_of_another_run_is_refused(run, finished, tmp_path, capsys):
    config = run / "adapter" / "adapter_config.json"  # as another run's adapter would differ
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_dropout": 0.5}))
    line = _fetch(capsys, str(run), str(tmp_path / "d"), code=2)[0]
    assert "adapter/adapter_config.json is not the file summary.json recorded" in line
    assert not (tmp_path / "d").exists()


def test_an_unfinished_run_is_refused_with_its_last_round(run, tmp_path, capsys):
    (run / "summary.json").unlink()
    line = _fetch(capsys, str(run), str(tmp_path / "d"), code=2)[0]
    assert "has not finished" in line and "reaches round 2" in line
    assert not (tmp_path / "d").exists()


def test_a_folder_that_is_no_run_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _fetch(capsys, str(tmp_path / "empty"), str(tmp_path / "d"), code=2)[0]
    assert "holds no run outputs" in line
    line = _fetch(capsys, str(tmp_path / "nowhere"), str(tmp_path / "d"), code=2)[0]
    assert "SOURCE = " in line and "an existing run directory" in line


def test_a_live_run_folder_is_never_written_into(run, tmp_path, capsys):
    dest = tmp_path / "live"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom devft.lock import output_lock\n"
         "with output_lock(sys.argv[1], 'devft run'):\n    print('held', flush=True)\n"
         "    time.sleep(120)\n", str(dest)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        line = _fetch(capsys, str(run), str(dest), code=2)[0]
    finally:
        holder.kill()
        holder.wait()
    assert f"DEST = '{dest}'" in line and "no live devft run writes to" in line
    assert {p.name for p in dest.iterdir()} == {".devft.lock"}


def test_a_summary_without_digests_still_gets_whole_weights_checked(run, tmp_path, capsys):
    summary = json.loads((run / "summary.json").read_text())
    del summary["adapter_sha256"]  # written before devft recorded digests
    (run / "summary.json").write_text(json.dumps(summary))
    lines = _fetch(capsys, str(run), str(tmp_path / "d"))
    assert any("predates adapter digests" in ln for ln in lines)
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    line = _fetch(capsys, str(run), str(tmp_path / "e"), code=2)[0]
    assert "adapter_model.safetensors is damaged: its tensors span" in line


def test_safetensors_check_finds_cut_and_padded_files(finished, tmp_path):
    whole = (finished / "adapter" / "adapter_model.safetensors").read_bytes()
    path = tmp_path / "w.safetensors"
    for data, problem in [(whole, None), (whole[:-1], "span"), (whole + b"x", "span"),
                          (whole[:20], "header needs"), (whole[:5], "shorter than a header")]:
        path.write_bytes(data)
        found = safetensors_problem(path)
        assert (found is None) if problem is None else (problem in found), (problem, found)


# ---- a remote SOURCE, with rsync and scp stand-ins on PATH ------------------------------------

# They log their argv and copy from the local path after "host:", as rsync and scp would over
# ssh. FAKE_RSYNC_EXIT=127 plays a coordinator without rsync.
_RSYNC = """import os, shutil, sys
from pathlib import Path
open(os.environ["FAKE_LOG"], "a").write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_RSYNC_EXIT"):
    sys.stderr.write("bash: rsync: command not found\\n")
    sys.exit(int(os.environ["FAKE_RSYNC_EXIT"]))
src, dest = Path(sys.argv[-2].split(":", 1)[1]), Path(sys.argv[-1])
for arg in sys.argv[1:]:
    if arg.startswith("--include=/"):
        name = arg[len("--include=/"):].removesuffix("/***")
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)
        elif (src / name).is_file():
            shutil.copy2(src / name, dest / name)
"""
_SCP = """import os, shutil, sys
from pathlib import Path
open(os.environ["FAKE_LOG"], "a").write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_SCP_DOWN"):
    sys.stderr.write("ssh: connect to host coord port 22: Connection refused\\n")
    sys.exit(255)
code = 0
for item in [a for a in sys.argv[1:-1] if ":" in a]:
    src = Path(item.split(":", 1)[1])
    if src.is_dir():
        shutil.copytree(src, Path(sys.argv[-1]) / src.name)
    elif src.is_file():
        shutil.copy2(src, Path(sys.argv[-1]) / src.name)
    else:
        sys.stderr.write(f"scp: {src}: No such file or directory\\n")
        code = 1
sys.exit(code)
"""


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A PATH holding only the stand-ins asked for; returns (make, log file)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "tools.log"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("FAKE_LOG", str(log))

    def make(*tools: str) -> None:
        for tool in tools:
            script = bin_dir / tool
            script.write_text(f"#!{sys.executable}\n" + {"rsync": _RSYNC, "scp": _SCP}[tool])
            script.chmod(0o755)
    return make, log


def test_remote_fetch_uses_rsync_with_the_ssh_config(run, tmp_path, fake_bin, capsys):
    make, log = fake_bin
    make("rsync", "scp")
    config = tmp_path / "ssh_config"
    config.write_text("Host coord\n  Port 2222\n")
    lines = _fetch(capsys, f"ana@coord:{run}", str(tmp_path / "d"), "--ssh-config", str(config))
    assert {p.name for p in (tmp_path / "d").iterdir()} == OUTPUTS | {".devft.lock"}
    assert f"-e ssh -F {config} --include=/adapter/***" in log.read_text()
    assert lines[0].startswith(f"fetched ana@coord:{run} into {tmp_path / 'd'} (rsync)")


def test_a_coordinator_without_rsync_falls_back_to_scp(run, tmp_path, fake_bin, capsys,
                                                        monkeypatch):
    make, log = fake_bin
    make("rsync", "scp")
    monkeypatch.setenv("FAKE_RSYNC_EXIT", "127")
    (run / "loss.png").unlink()  # scp fails on it, yet the rest arrives and checks out
    lines = _fetch(capsys, f"coord:{run}", str(tmp_path / "d"))
    assert [ln.split()[0] for ln in log.read_text().splitlines()] == ["-a", "-r"]
    assert "(scp)" in lines[0]
    assert "note: coord has no rsync; copied with scp" in lines
    assert any(ln.startswith("note: not copied: loss.png (scp: scp: ") for ln in lines)


def test_an_unreachable_coordinator_is_one_line(run, tmp_path, fake_bin, capsys, monkeypatch):
    make, _ = fake_bin
    make("scp")
    monkeypatch.setenv("FAKE_SCP_DOWN", "1")
    line = _fetch(capsys, f"coord:{run}", str(tmp_path / "d"), code=2)[0]
    assert f"copying coord:{run} failed (scp: ssh: connect to host coord port 22: " in line


def test_no_copy_tool_is_one_line(run, tmp_path, fake_bin, capsys):
    line = _fetch(capsys, f"coord:{run}", str(tmp_path / "d"), code=2)[0]
    assert "needs rsync or scp" in line and "mount" in line
    line = _fetch(capsys, f"coord:{run}", str(tmp_path / "d"), "--transfer", "rsync",
                  code=2)[0]
    assert "--transfer = 'rsync'" in line and "not installed" in line

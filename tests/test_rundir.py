"""Run directories: atomic files that survive a kill, clear messages for damaged files, and a
lock against two live runs in one directory that a killed run never leaves behind."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from devft.cli import main
from devft.errors import RunFileError
from devft.files import atomic_path, atomic_write_json, read_json, read_jsonl
from devft.lock import LOCK_FILE

# ---- devft.files -----------------------------------------------------------------------------


def test_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert read_json(target) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"x": ')
        raise RuntimeError("killed")
    assert read_json(target) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


_WRITER = """
import sys
from devft.files import atomic_write_json
big = {"rows": [list(range(200)) for _ in range(200)]}
print("go", flush=True)
i = 0
while True:
    i += 1
    atomic_write_json(sys.argv[1], {**big, "i": i})
"""


def test_a_file_written_atomically_survives_kill_9_at_any_moment(tmp_path):
    target = tmp_path / "state.json"
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"go\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            assert read_json(target)["i"] >= 1  # never truncated


def test_reading_names_the_truncated_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text('{"rounds": 3, "final')
    with pytest.raises(RunFileError, match=r"summary.json is unreadable: truncated"):
        read_json(target)


def test_jsonl_tolerates_a_truncated_last_line_only(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"rou')
    with caplog.at_level(logging.WARNING, logger="devft.files"):
        assert read_jsonl(path) == [{"round": 0}, {"round": 1}]
    assert "truncated last line 3" in caplog.text
    path.write_text('{"round": 0}\n{"rou\n{"round": 2}\n')
    with pytest.raises(RunFileError, match=r"metrics.jsonl is unreadable: line 2"):
        read_jsonl(path)


# ---- a finished run and a finished comparison, copied per test -------------------------------


def _sets(tiny_model_dir, tiny_data_file):
    sets = [f"model.path={tiny_model_dir}", f"data.name={tiny_data_file}",
            "federation.num_clients=2", "federation.rounds=2", "devft.stages=2,4",
            "train.local_steps=1", "data.eval_examples=4", "output.progress=false"]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tiny_data_file, tmp_path_factory):
    """DIR/ of `devft compare --methods fedit` (so DIR/fedit/ is a finished run)."""
    out = tmp_path_factory.mktemp("finished") / "cmp"
    args = _sets(tiny_model_dir, tiny_data_file)
    assert main(["compare", "--methods", "fedit", *args, "--out", str(out)]) == 0
    return out, args


@pytest.fixture
def copy(finished, tmp_path):
    out, args = finished
    shutil.copytree(out, tmp_path / "cmp")
    return tmp_path / "cmp", args


def _error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("devft: error:")]
    assert lines, err
    return lines[0]


def test_the_run_writes_no_temporary_files_and_a_self_describing_adapter(finished):
    out, _ = finished
    run = out / "fedit"
    names = {p.name for p in run.iterdir()}
    assert names == {"adapter", "checkpoints", "config.json", "loss.png", "metrics.jsonl",
                     "summary.json", LOCK_FILE}
    assert {p.name for p in out.iterdir()} == {"fedit", "comparison.json", "comparison.png",
                                                LOCK_FILE}
    card = (run / "adapter" / "README.md").read_text()
    summary = read_json(run / "summary.json")
    config = read_json(run / "config.json")
    assert f"`{config['model']['path']}`" in card and "`fedit`" in card
    assert f"`{config['data']['name']}`" in card
    assert f"final held-out loss | {summary['final_eval_loss']:.4f}" in card


@pytest.mark.parametrize("name", ["fedit/config.json", "fedit/summary.json"])
def test_compare_names_a_truncated_file(capsys, copy, name):
    out, args = copy
    path = out / name
    path.write_text(path.read_text()[:25])
    line = _error(capsys, ["compare", "--methods", "fedit", *args, "--out", str(out)])
    assert str(path) in line and "truncated" in line


def test_compare_names_metrics_that_end_before_the_summary(capsys, copy):
    out, args = copy
    path = out / "fedit" / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rfind("\n") + 10])  # last line cut short
    line = _error(capsys, ["compare", "--methods", "fedit", *args, "--out", str(out)])
    assert str(path) in line and "ends before round 2" in line


def test_resume_names_a_damaged_checkpoint_file(capsys, copy):
    run = copy[0] / "fedit"
    latest = read_json(run / "checkpoints" / "latest.json")["dir"]
    state = run / "checkpoints" / latest / "state.json"
    state.write_text(state.read_text()[:40])
    line = _error(capsys, ["run", "--resume", str(run)])
    assert str(state) in line and "truncated" in line


def test_resume_names_a_truncated_tensor_file(capsys, finished, tmp_path):
    shutil.copytree(finished[0] / "fedit", tmp_path / "run")
    run = tmp_path / "run"
    latest = read_json(run / "checkpoints" / "latest.json")["dir"]
    tensors = sorted((run / "checkpoints" / latest).glob("*.safetensors"))[0]
    tensors.write_bytes(tensors.read_bytes()[:30])
    line = _error(capsys, ["run", "--resume", str(run)])
    assert str(tensors) in line and "unreadable" in line


@pytest.mark.parametrize("name", ["config.json", "adapter/adapter_config.json",
                                  "adapter/adapter_model.safetensors"])
def test_eval_names_a_truncated_file(capsys, finished, tmp_path, name):
    shutil.copytree(finished[0] / "fedit", tmp_path / "run")
    path = tmp_path / "run" / name
    path.write_bytes(path.read_bytes()[:40])
    line = _error(capsys, ["eval", "--adapter", str(tmp_path / "run" / "adapter"),
                           "--tasks", "copa", "--limit", "2", "--device", "cpu"])
    assert str(path) in line and ("truncated" in line or "unreadable" in line)


# ---- the output-directory lock ---------------------------------------------------------------

_HOLDER = """
import sys, time
from devft.lock import output_lock
with output_lock(sys.argv[1], "devft run (test holder)"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_live_run_locks_its_directory_and_a_killed_one_does_not(capsys, copy):
    out, args = copy
    run = out / "fedit"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        line = _error(capsys, ["run", *args, "--method", "fedit", "--out", str(run)])
        assert str(run) in line and "in use" in line and f"pid {holder.pid}" in line
        line = _error(capsys, ["run", "--resume", str(run)])
        assert "in use" in line
        line = _error(capsys, ["compare", "--methods", "fedit", *args, "--out", str(out)])
        assert "in use" in line and f"pid {holder.pid}" in line  # compare's run into fedit/
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_FILE).is_file()  # the killed holder's lock file stays: stale, not held
    assert main(["run", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2


def test_compare_locks_its_own_directory(capsys, copy):
    out, args = copy
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        line = _error(capsys, ["compare", "--methods", "fedit", *args, "--out", str(out)])
        assert str(out) in line and "in use" in line
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()

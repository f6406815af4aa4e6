"""Checkpoint and resume: a run killed with SIGKILL mid-run resumes to the identical result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from devft.cli import main
from devft.reporting.recorder import read_metrics

TIMING = ("wall_time_s", "eval_time_s", "client_time_sum_s", "client_time_max_s",
          "client_peak_mem_bytes", "client_mem_delta_bytes", "process_rss_bytes")


def _args(model_dir, data_file, method):
    sets = [f"model.path={model_dir}", f"data.name={data_file}", f"method={method}",
            "federation.num_clients=2", "federation.rounds=6", "devft.stages=2,4",
            "train.local_steps=2", "train.lr=0.01", "data.eval_examples=6",
            "train.threads=1", "output.progress=false"]
    return [a for s in sets for a in ("--set", s)]


def _devft(*argv):
    return [sys.executable, "-m", "devft.cli", *argv]


def _assert_same_metrics(out, ref):
    """Everything equal but timings; byte counts within a few bytes per message: a message's
    metadata (ids, timestamps) can serialize a byte longer or shorter from run to run."""
    got, want = read_metrics(out), read_metrics(ref)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in g:
            if key in TIMING:
                continue
            if "bytes" in key:
                assert abs(g[key] - w[key]) <= 8 * (w["round"] + 1) * 4, (key, g, w)
            else:
                assert g[key] == w[key], (key, g["round"])


@pytest.mark.parametrize("method", ["devft", "fedsa", "devft-adaptive"])  # fedsa: client
# state restored; devft-adaptive: stage lengths decided from the restored records
def test_resume_after_kill_9_matches_an_uninterrupted_run(tiny_model_dir, tiny_data_file,
                                                          tmp_path, method):
    _kill_resume_and_compare(_args(tiny_model_dir, tiny_data_file, method), tmp_path)


OPEN_ENDED = {  # issue 13: the last stage's length is decided from the restored records
    "fedit": ["stop.rule=plateau", "stop.min_rounds=2", "stop.max_rounds=6", "stop.window=2",
              "stop.rel_improvement=0.001"],
    "devft": ["stop.rule=target", "devft.rounds_per_stage=2", "stop.min_rounds=1",
              "stop.max_rounds=6", "stop.target_loss=0.001"],
}


@pytest.mark.parametrize("method", list(OPEN_ENDED))
def test_open_ended_runs_resume_after_kill_9_and_stop_alike(tiny_model_dir, tiny_data_file,
                                                            tmp_path, method):
    extra = [a for s in OPEN_ENDED[method] for a in ("--set", s)]
    ref, killed = _kill_resume_and_compare(
        [*_args(tiny_model_dir, tiny_data_file, method), *extra], tmp_path)
    want = json.loads((ref / "summary.json").read_text())["stop"]
    assert json.loads((killed / "summary.json").read_text())["stop"] == want
    assert want["reason"] in ("plateau", "max_rounds") and want["round"] >= 4


def _kill_resume_and_compare(args, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_devft("run", *args, "--out", str(ref)), check=True, capture_output=True)
    proc = subprocess.Popen(_devft("run", *args, "--out", str(killed)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:  # rounds 0..3
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "summary.json").exists()
    done = json.loads((killed / "checkpoints" / "latest.json").read_text())["dir"]
    assert 2 <= int(done.split("-")[1]) < 6  # round 3 may be recorded but not yet saved

    assert main(["run", "--resume", str(killed)]) == 0

    _assert_same_metrics(killed, ref)
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical
    return ref, killed


def test_resume_errors_are_clear(capsys, tmp_path, tiny_model_dir, tiny_data_file):
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "--resume" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", *_args(tiny_model_dir, tiny_data_file, "devft"), "--set",
                 "federation.rounds=2", "--out", str(out)]) == 0
    (out / "checkpoints" / "latest.json").write_text("{not json")
    assert main(["run", "--resume", str(out)]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert main(["run", "--resume", str(out), "--set", "seed=3"]) == 2
    assert "own config.json" in capsys.readouterr().err

"""benchmarks/study_keep.py: a cut run's latest checkpoint and an unscored adapter are staged
for a commit, so the next checkout resumes and scores them; nothing else that is ignored."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from study_keep import main  # noqa: E402

from devft.errors import ConfigError  # noqa: E402


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, text=True,
                          capture_output=True).stdout


def _write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _checkpoint(run: Path, round_: int) -> None:
    root = run / "checkpoints"
    shutil.rmtree(root, ignore_errors=True)
    _write(root / f"round-{round_:05d}" / "state.json", "{}")
    _write(root / f"round-{round_:05d}" / "t000.safetensors", "w")
    _write(root / "latest.json", json.dumps({"dir": f"round-{round_:05d}"}))


@pytest.fixture
def study(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    seed = repo / "results" / "equal-cost" / "m" / "seed-0"
    cut, scored, unscored = seed / "devft", seed / "fedit", seed / "progfed"
    for run in (cut, scored, unscored):
        _write(run / "config.json", "{}")
        _write(run / "metrics.jsonl", "{}\n")
    for run in (scored, unscored):
        _write(run / "summary.json", "{}")
        _write(run / "adapter" / "adapter_model.safetensors", "w")
        _checkpoint(run, 9)
    _write(scored / "mc_eval.json", "{}")
    _checkpoint(cut, 3)
    _write(cut / "checkpoints" / ".round-00004.tmp" / "t000.safetensors", "half")
    _write(cut / ".devft.lock", "")
    return repo, seed


def _tracked(repo: Path, seed: Path) -> set[str]:
    prefix = str(seed.relative_to(repo)) + "/"
    return {f[len(prefix):] for f in _git(repo, "ls-files").split()}


def test_keeps_cut_checkpoints_and_unscored_adapters_only(study):
    repo, seed = study
    main(["--out", str(repo / "results" / "equal-cost")])
    assert _tracked(repo, seed) == {
        "devft/config.json", "devft/metrics.jsonl",
        "devft/checkpoints/latest.json", "devft/checkpoints/round-00003/state.json",
        "devft/checkpoints/round-00003/t000.safetensors",
        "fedit/config.json", "fedit/metrics.jsonl", "fedit/summary.json", "fedit/mc_eval.json",
        "progfed/config.json", "progfed/metrics.jsonl", "progfed/summary.json",
        "progfed/adapter/adapter_model.safetensors"}


def test_a_later_keep_replaces_the_old_round_and_drops_what_is_done(study):
    repo, seed = study
    main(["--out", str(repo / "results" / "equal-cost")])
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "keep")
    _checkpoint(seed / "devft", 5)  # the run went on
    _write(seed / "progfed" / "mc_eval.json", "{}")  # and progfed was scored
    main(["--out", str(repo / "results" / "equal-cost")])
    tracked = _tracked(repo, seed)
    assert "devft/checkpoints/round-00005/t000.safetensors" in tracked
    assert not any("round-00003" in f for f in tracked)
    assert "progfed/adapter/adapter_model.safetensors" not in tracked
    assert "progfed/mc_eval.json" in tracked


def test_a_second_keep_before_any_commit_restages_a_run_that_went_on(study):
    """Two keeps in one session (two lanes ending): the index holds the first keep's
    checkpoint, and the files changed since; the second keep must still replace it."""
    repo, seed = study
    main(["--out", str(repo / "results" / "equal-cost")])
    _checkpoint(seed / "devft", 6)
    _write(seed / "devft" / "metrics.jsonl", "{}\n{}\n")
    main(["--out", str(repo / "results" / "equal-cost")])
    tracked = _tracked(repo, seed)
    assert "devft/checkpoints/round-00006/state.json" in tracked
    assert not any("round-00003" in f for f in tracked)
    staged = _git(repo, "show", f":{(seed / 'devft' / 'metrics.jsonl').relative_to(repo)}")
    assert staged == "{}\n{}\n"


def test_keep_waits_out_another_git_process_holding_the_index(study, monkeypatch):
    """Two lanes ending together: one keep holds .git/index.lock while the other stages."""
    import threading

    import study_keep

    repo, seed = study
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    threading.Timer(0.6, lock.unlink).start()
    monkeypatch.setattr(study_keep, "RETRY_PAUSE_S", 0.3)
    main(["--out", str(repo / "results" / "equal-cost")])
    assert "devft/checkpoints/round-00003/state.json" in _tracked(repo, seed)


def test_dry_run_stages_nothing_and_a_finished_run_drops_its_checkpoint(study):
    repo, seed = study
    main(["--out", str(repo / "results" / "equal-cost"), "--dry-run"])
    assert _tracked(repo, seed) == set()
    main(["--out", str(repo / "results" / "equal-cost")])
    _write(seed / "devft" / "summary.json", "{}")  # the cut run finished
    main(["--out", str(repo / "results" / "equal-cost")])
    assert not any(f.startswith("devft/checkpoints") for f in _tracked(repo, seed))


def test_out_must_be_a_folder_in_a_checkout(tmp_path):
    with pytest.raises(ConfigError, match="--out"):
        main(["--out", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="git checkout"):
        main(["--out", str(tmp_path)])


def test_only_keeps_the_named_runs_and_leaves_another_lanes_live_run_alone(study):
    """A lane keeps its own runs; the cut `devft` stands for another lane's live run, whose
    checkpoint a later commit of this lane's work must not sweep in."""
    repo, seed = study
    main(["--out", str(repo / "results" / "equal-cost"), "--only", "m/seed-0/progfed",
          "m/seed-0/fedit", "m/seed-0/never-started"])
    tracked = _tracked(repo, seed)
    assert not any(f.startswith("devft/") for f in tracked)
    assert "progfed/adapter/adapter_model.safetensors" in tracked
    assert "fedit/mc_eval.json" in tracked


def test_a_run_set_aside_in_a_replaced_folder_is_not_a_run_of_the_study(tmp_path):
    from study_keep import run_dirs

    for run in ("a/fedit", "a/fedit/replaced-20261206T000000-1", "replaced-x/devft"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "config.json").write_text("{}")
    assert run_dirs(tmp_path) == [tmp_path / "a/fedit"]
    assert run_dirs(tmp_path / "replaced-x") == [tmp_path / "replaced-x/devft"]


def test_keep_checkpoints_keeps_a_finished_runs_checkpoint_not_its_adapter_too(study):
    """--keep-checkpoints (the equal-budget study): a finished run keeps its latest
    checkpoint, to be extended later, which holds its LoRA: its adapter weights stay out."""
    repo, seed = study
    main(["--out", str(repo / "results" / "equal-cost"), "--keep-checkpoints"])
    tracked = _tracked(repo, seed)
    assert {"progfed/checkpoints/latest.json",
            "progfed/checkpoints/round-00009/t000.safetensors"} <= tracked
    assert "progfed/adapter/adapter_model.safetensors" not in tracked
    assert "devft/checkpoints/round-00003/t000.safetensors" in tracked  # cut: as before

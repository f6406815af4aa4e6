"""Keep the equal-cost study's work across checkouts: stage it for a commit.

A session's checkout does not outlive it, and weights are ignored (.gitignore), so without
this a run cut at the session's end starts again from scratch on the next checkout, and a
finished run's adapter is gone before its MC accuracy is scored. Per run under --out:
- every run: its records (metrics.jsonl, summary.json, config.json, mc_eval.json, loss.png);
- a cut run (no summary.json): its latest checkpoint (`checkpoints/latest.json` and the round
  directory it names; older rounds leave the index), so the next checkout resumes it;
- a finished run: its checkpoints leave the index (with --keep-checkpoints its latest
  stays, so a larger budget extends it, and its adapter weights are not kept as well: the
  checkpoint holds the same LoRA); otherwise its adapter weights are kept while it has no
  mc_eval.json and leave the index once it has one.

With --only, just the named runs (paths under --out, e.g. `m/seed-2/devft`): a lane keeps
its own runs, never another lane's live one, whose checkpoint a later commit would sweep in.

    python benchmarks/study_keep.py [--out results/equal-cost] [--only RUN ...] [--dry-run]
    git commit -m "Equal-cost study: ..."
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import run_script

from devft.comparison import REPLACED
from devft.errors import ConfigError
from devft.evaluation.adapters import SAFE_WEIGHTS
from devft.federation.checkpoint import CHECKPOINTS

ATTEMPTS, RETRY_PAUSE_S = 5, 2.0
RECORDS = ("metrics.jsonl", "summary.json", "config.json", "mc_eval.json", "loss.png")


@dataclass
class Plan:
    """What to stage: plain adds, forced adds of ignored files, and removals from the index."""

    add: list[Path] = field(default_factory=list)
    force: list[Path] = field(default_factory=list)
    drop: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_dirs(out: Path) -> list[Path]:
    """Every run directory under out (one holding a config.json), sorted; not the runs of
    another config set aside in a run's replaced-* folder (devft.comparison)."""
    return sorted(p.parent for p in out.rglob("config.json") if CHECKPOINTS not in p.parts
                  and not any(part.startswith(REPLACED) for part in p.relative_to(out).parts))


def latest_checkpoint(run: Path) -> list[Path]:
    """latest.json and the files of the round directory it names ([] when none is complete)."""
    root = run / CHECKPOINTS
    try:
        name = json.loads((root / "latest.json").read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    files = sorted(p for p in (root / str(name)).glob("*") if p.is_file())
    return [root / "latest.json", *files] if files else []


def plan_run(run: Path, keep_checkpoints: bool = False) -> Plan:
    """The staging of one run directory (see the module docstring); with keep_checkpoints a
    finished run keeps its latest checkpoint too, so it can be extended (equal_budget.py)."""
    plan = Plan(add=[run / f for f in RECORDS if (run / f).is_file()])
    weights = run / "adapter" / SAFE_WEIGHTS
    if (run / "summary.json").is_file():
        plan.drop.append(run / CHECKPOINTS)
        checkpoint = latest_checkpoint(run) if keep_checkpoints else []
        plan.force.extend(checkpoint)
        if (run / "mc_eval.json").is_file() or checkpoint:  # scored, or its LoRA is kept
            plan.drop.append(weights)
        elif weights.is_file():
            plan.force.append(weights)
            plan.notes.append(f"{run}: finished, adapter kept for its MC accuracy")
        return plan
    checkpoint = latest_checkpoint(run)
    if checkpoint:
        plan.drop.append(run / CHECKPOINTS)
        plan.force.extend(checkpoint)
        plan.notes.append(f"{run}: cut, checkpoint {checkpoint[1].parent.name} kept")
    else:
        plan.notes.append(f"{run}: cut before its first checkpoint; it will start again")
    return plan


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True)


def stage(plan: Plan, root: Path) -> None:
    """Apply a plan to the git index of the repository at root (drops first, then adds)."""
    if plan.drop:
        # -f: the index may hold an earlier keep's copy that differs from both the file
        # and HEAD (the run went on); --cached leaves the working files alone.
        _git(root, "rm", "-r", "-q", "--cached", "-f", "--ignore-unmatch", "--",
             *map(str, plan.drop))
    if plan.add:
        _git(root, "add", "--", *map(str, plan.add))
    if plan.force:
        _git(root, "add", "-f", "--", *map(str, plan.force))


def main(argv: list[str] | None = None) -> list[Plan]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/equal-cost", help="the study's output folder")
    ap.add_argument("--only", nargs="+", metavar="RUN",
                    help="keep just these runs (paths under --out); default every run")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, stage nothing")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="finished runs keep their latest checkpoint (to be extended later) "
                         "instead of their adapter weights")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if not out.is_dir():
        raise ConfigError("--out", args.out, "the study's output folder (results/equal-cost)")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=out, text=True,
                         capture_output=True)
    if top.returncode != 0:
        raise ConfigError("--out", args.out, "a folder inside a git checkout")
    root, plans = Path(top.stdout.strip()), []
    runs = run_dirs(out)
    if args.only is not None:
        wanted = {(out / r).resolve() for r in args.only}
        runs = [r for r in runs if r in wanted]
    for run in runs:
        # A live run may replace its checkpoint meanwhile, and another git process (a
        # second lane's keep) may hold the index lock: plan again after a pause.
        for attempt in range(ATTEMPTS):
            plan = plan_run(run, args.keep_checkpoints)
            try:
                if not args.dry_run:
                    stage(plan, root)
                break
            except subprocess.CalledProcessError:
                if attempt == ATTEMPTS - 1:
                    raise
                time.sleep(RETRY_PAUSE_S)
        plans.append(plan)
        for note in plan.notes:
            print(note)
    return plans


if __name__ == "__main__":
    run_script(main)

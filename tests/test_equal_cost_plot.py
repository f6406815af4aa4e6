"""benchmarks/equal_cost_plot.py: the per-seed panels put each method against its own seed's
FedIT, in units of FedIT's cost to its plateau loss."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from equal_cost_plot import plot_by_seed, seed_panels  # noqa: E402


def _run(losses, flops_per_round):
    return [{"round": i, "eval_loss": v, "cum_client_flops": flops_per_round * i}
            for i, v in enumerate(losses)]


# FedIT of seed 0 first reaches its final loss 2.0 at round 2 (20 FLOPs), seed 1 at round 3.
CURVES = {"m": {
    "fedit": [(0, _run([4.0, 3.0, 1.9, 2.1, 2.0], 10), True),
              (1, _run([4.0, 3.0, 2.6, 2.5, 2.5], 10), False)],
    "devft": [(1, _run([4.0, 3.5, 2.4], 20), True)],
}}


def test_each_panel_measures_a_method_against_fedit_of_its_own_seed():
    panels = seed_panels(CURVES)
    assert [(p["model"], p["seed"]) for p in panels] == [("m", 0), ("m", 1)]
    seed0, seed1 = panels
    assert seed0["target"] == 2.0 and seed0["target_final"] and set(seed0["lines"]) == {"fedit"}
    assert seed0["lines"]["fedit"]["x"] == [0.0, 0.5, 1.0, 1.5, 2.0]
    # seed 1's target is its own FedIT's (2.5, first at round 3 = 30 FLOPs), still provisional
    assert seed1["target"] == 2.5 and not seed1["target_final"]
    assert seed1["lines"]["devft"]["x"] == [0.0, 20 / 30, 40 / 30]
    assert seed1["lines"]["devft"]["y"] == [4.0, 3.5, 2.4]


def test_plot_by_seed_writes_one_figure_or_none(tmp_path):
    path = plot_by_seed(CURVES, tmp_path)
    assert path == tmp_path / "equal_cost_by_seed.png" and path.stat().st_size > 0
    assert plot_by_seed({"m": {"devft": CURVES["m"]["devft"]}}, tmp_path / "none") is None

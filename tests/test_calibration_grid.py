"""benchmarks/calibration_grid.py on the tiny model: the server's (β, γ) search, scored."""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import calibration_grid  # noqa: E402


def test_grid_is_searched_on_calibration_rows_and_the_residual_scale_changes_the_submodel(
        tiny_model_dir, tiny_data_file, tmp_path):
    sets = [f"model.path={tiny_model_dir}", f"data.name={tiny_data_file}",
            "federation.num_clients=2", "devft.stages=2,4", "data.eval_examples=6",
            "data.max_seq_len=64"]
    report = calibration_grid.main(["--betas", "0,0.3", "--residuals", "0,1", "--out",
                                    str(tmp_path), *[a for s in sets for a in ("--set", s)]])
    (stage,) = report["stages"]  # the 2-layer stage; the full model has nothing to fuse
    points = stage["points"]
    assert [(p["beta"], p["residual"]) for p in points] == [(0, 0), (0, 1), (0.3, 0), (0.3, 1)]
    best = min(points, key=lambda p: p["calib_loss"])
    assert stage["chosen"] == {"beta": best["beta"], "residual": best["residual"]}
    assert all(math.isfinite(p["eval_loss"]) for p in points)
    by_point = {(p["beta"], p["residual"]): p["eval_loss"] for p in points}
    assert by_point[0, 0] != by_point[0, 1] and by_point[0.3, 0] != by_point[0.3, 1]
    saved = json.loads((tmp_path / "calibration_grid.json").read_text())
    assert saved["stages"][0]["chosen"] == stage["chosen"]
    assert (tmp_path / "calibration_grid.png").stat().st_size > 1000

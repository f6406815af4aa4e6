"""Calibrated fusion: the server picks the fusion β that minimizes the fused submodel's loss
(with its initial LoRA) on the server's calibration rows, from a small grid (calibrate.betas).

The calibration rows are held-out rows disjoint from the evaluation rows
(FederatedData.calibration_indices). Every grid point costs one submodel build and one
forward pass over the calibration rows on the server. Ties go to the first grid point. The
chosen β travels in the stage plan (StagePlan.beta), so every client builds the same
submodel; nothing on the client changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any


def pick_best(points: Sequence[float], loss: Callable[[float], float]
              ) -> tuple[float, list[dict[str, Any]]]:
    """(the point of lowest finite loss, first on ties; every point with its loss).

    A non-finite loss never wins; if no point has a finite loss, the first point is chosen."""
    if not points:
        raise ValueError("empty calibration grid")
    tried: list[dict[str, Any]] = []
    best, best_loss = points[0], math.inf
    for point in points:
        value = float(loss(point))
        tried.append({"beta": float(point), "calib_loss": value})
        if math.isfinite(value) and value < best_loss:
            best, best_loss = point, value
    return float(best), tried

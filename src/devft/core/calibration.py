"""Calibrated fusion: the server picks the fusion β (and, optionally, the residual scale's
exponent γ) that minimize the fused submodel's loss (with its initial LoRA) on the server's
calibration rows, from a small grid (every pair of calibrate.betas × residual_exponents).

The calibration rows are held-out rows disjoint from the evaluation rows
(FederatedData.calibration_indices). Every grid point costs one submodel build and one
forward pass over the calibration rows on the server. Ties go to the first grid point. The
chosen values travel in the stage plan (StagePlan.beta, .residual), so every client builds
the same submodel; nothing on the client changes. β is chosen per stage, not per group.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Point = Mapping[str, float]


def fusion_grid(betas: Sequence[float], residuals: Sequence[float]) -> list[dict[str, float]]:
    """Every (β, γ) pair, β-major: [{"beta", "residual"}]."""
    return [{"beta": float(b), "residual": float(g)}
            for b, g in itertools.product(betas, residuals)]


def pick_best(points: Sequence[Point], loss: Callable[[Point], float]
              ) -> tuple[Point, list[dict[str, Any]]]:
    """(the point of lowest finite loss, first on ties; every point with its loss).

    A non-finite loss never wins; if no point has a finite loss, the first point is chosen."""
    if not points:
        raise ValueError("empty calibration grid")
    tried: list[dict[str, Any]] = []
    best, best_loss = points[0], math.inf
    for point in points:
        value = float(loss(point))
        tried.append({**point, "calib_loss": value})
        if math.isfinite(value) and value < best_loss:
            best, best_loss = point, value
    return best, tried

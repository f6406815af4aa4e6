"""Adaptive stage length: a stage ends when its submodel's calibration loss stops improving.

`losses[0]` is the submodel's calibration loss at the stage's start (its initial LoRA),
`losses[i]` the loss after the stage's i-th round. After r = len(losses) − 1 rounds the
stage advances when
- r ≥ max_rounds (the cap: adaptive.max_rounds, or what the budget leaves), or
- r ≥ min_rounds, r ≥ window and losses[r − window] − losses[r] < threshold.
A nan loss (nothing to measure) never counts as an improvement. The budget stays
federation.rounds: every later stage keeps at least min_rounds, the last gets what is left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from devft.errors import ConfigError


def should_advance(losses: Sequence[float], window: int, threshold: float, min_rounds: int,
                   max_rounds: int) -> bool:
    """True when the stage that produced `losses` should end now (see the module docstring)."""
    rounds = len(losses) - 1
    if rounds >= max_rounds:
        return True
    if rounds < max(min_rounds, window):
        return False
    gain = losses[rounds - window] - losses[rounds]
    return not (math.isfinite(gain) and gain >= threshold)


def stage_cap(total_rounds: int, used: int, stages_after: int, min_rounds: int,
              max_rounds: int) -> int:
    """Most rounds the current stage may run: its own cap (0 = none), and what the budget
    leaves after `used` rounds when each of the `stages_after` later stages gets min_rounds."""
    left = total_rounds - used - stages_after * min_rounds
    return max(1, min(left, max_rounds) if max_rounds else left)


def check_budget(total_rounds: int, num_stages: int, min_rounds: int) -> None:
    """Refuse a budget that cannot give every stage adaptive.min_rounds."""
    if total_rounds < num_stages * min_rounds:
        raise ConfigError("adaptive.min_rounds", min_rounds,
                          f"at most federation.rounds / stages = {total_rounds} / {num_stages}"
                          " (every stage runs at least min_rounds)")


def adaptive_rounds(losses_of: Sequence[Sequence[float]], total_rounds: int, window: int,
                    threshold: float, min_rounds: int, max_rounds: int) -> list[int]:
    """Rounds each stage runs when stage s would see the losses `losses_of[s]` (a scripted
    replay of the server's loop; the last stage gets what is left)."""
    out, used, n = [], 0, len(losses_of)
    for s, losses in enumerate(losses_of):
        if s == n - 1:
            out.append(total_rounds - used)
            break
        cap = stage_cap(total_rounds, used, n - 1 - s, min_rounds, max_rounds)
        r = 1
        while not should_advance(list(losses[: r + 1]), window, threshold, min_rounds, cap):
            r += 1
        out.append(r)
        used += r
    return out

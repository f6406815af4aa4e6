"""Open-ended last stage: when a run stops (config section `stop`).

`stop.rule` decides the length of the run's last stage (for a full-model method such as
FedIT, its only stage); earlier stages keep their configured rounds.
- `rounds` (default): the schedule's rounds, as configured.
- `plateau`: stop after round r when r >= max_rounds, or when r >= min_rounds, r >= window
  and the held-out loss improved by less than `rel_improvement` relative over the last
  `window` rounds: (loss[r − window] − loss[r]) / loss[r − window] < rel_improvement.
  A nan loss never counts as an improvement.
- `target`: stop after the last stage's first round on which the held-out loss is at or
  below `target_loss` (0 = no target), or the run's cumulative client FLOPs reach
  `flops_budget` (0 = no budget), or the run reaches max_rounds rounds.
`losses[i]` is the run's held-out loss after global round i (losses[0]: before training).
The decision reads only the run's records, so a resumed run decides exactly as the
original would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config section lives with the others (devft.config)
    from devft.config import StopConfig


def plateau_reason(losses: Sequence[float], window: int, rel_improvement: float,
                   min_rounds: int, max_rounds: int) -> str | None:
    """"plateau" or "max_rounds" when the run should stop now, else None."""
    rounds = len(losses) - 1
    if rounds >= max_rounds:
        return "max_rounds"
    if rounds < max(min_rounds, window):
        return None
    before, now = losses[rounds - window], losses[rounds]
    gain = (before - now) / abs(before) if before else math.nan
    return None if math.isfinite(gain) and gain >= rel_improvement else "plateau"


def target_reason(loss: float, cum_flops: float, rounds: int, target_loss: float,
                  flops_budget: float, max_rounds: int) -> str | None:
    """"target_loss", "flops_budget" or "max_rounds" when the run should stop after
    `rounds` rounds with held-out loss `loss` and `cum_flops` client FLOPs, else None."""
    if target_loss > 0 and math.isfinite(loss) and loss <= target_loss:
        return "target_loss"
    if flops_budget > 0 and cum_flops >= flops_budget:
        return "flops_budget"
    return "max_rounds" if rounds >= max_rounds else None


def stop_reason(cfg: StopConfig, losses: Sequence[float], cum_flops: float,
                stage_rounds: int) -> str | None:
    """Why the open-ended last stage ends now (None: run another round). `stage_rounds`:
    rounds done in the last stage; it always runs at least one."""
    if cfg.rule == "rounds":
        raise ValueError("stop.rule=rounds has no open-ended stage")
    if stage_rounds < 1:
        return None
    if cfg.rule == "plateau":
        return plateau_reason(losses, cfg.window, cfg.rel_improvement, cfg.min_rounds,
                              cfg.max_rounds)
    return target_reason(losses[-1], cum_flops, len(losses) - 1, cfg.target_loss,
                         cfg.flops_budget, cfg.max_rounds)


def stop_summary(cfg: StopConfig, reason: str | None, rounds: int) -> dict[str, object]:
    """summary.json's `stop` entry: the rule, why the run stopped and after which round."""
    entry: dict[str, object] = {"rule": cfg.rule, "reason": reason or "schedule",
                                "round": rounds}
    if cfg.rule == "plateau":
        entry.update(window=cfg.window, rel_improvement=cfg.rel_improvement,
                     min_rounds=cfg.min_rounds, max_rounds=cfg.max_rounds)
    elif cfg.rule == "target":
        entry.update(target_loss=cfg.target_loss, flops_budget=cfg.flops_budget,
                     max_rounds=cfg.max_rounds)
    return entry

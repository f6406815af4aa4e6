"""How many rounds the server runs next in the current stage: fixed or adaptive length.

Fixed: the schedule's rounds. Adaptive (`devft-adaptive`): one round at a time until
`devft.core.adaptive.should_advance` says the stage is over, on the stage's calibration
losses read back from the run's records (so a resumed run decides exactly as the original
would); the last stage gets what is left of federation.rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from devft.config import RunConfig
from devft.core.adaptive import should_advance, stage_cap
from devft.core.schedule import Stage
from devft.methods import MethodSpec


def stage_losses(records: Sequence[dict[str, Any]], stage: int) -> list[float]:
    """[the stage's start calibration loss, its loss after each of its rounds so far]."""
    start, after = math.nan, []
    for r in records:
        if r.get("stage") != stage:
            continue
        if "stage_start" in r:
            start = float(r["stage_start"].get("start_calib_loss", math.nan))
        if r.get("stage_round", 0) > 0:
            value = r.get("sub_calib_loss")
            after.append(math.nan if value is None else float(value))
    return [start, *after]


class StagePacer:
    """Rounds to run next; 0 = the stage is over."""

    def __init__(self, cfg: RunConfig, method: MethodSpec, schedule: list[Stage]) -> None:
        self.cfg, self.schedule = cfg, schedule
        self.adaptive = method.stage_length == "adaptive"

    def next_rounds(self, stage: Stage, offset: int, done: int,
                    records: Sequence[dict[str, Any]]) -> int:
        """`offset`: rounds the run has done; `done`: rounds of them in this stage."""
        if not self.adaptive:
            return stage.rounds - done
        total, last = self.cfg.federation.rounds, self.schedule[-1].index
        if stage.index == last:
            return total - offset
        if done == 0:
            return 1
        a = self.cfg.adaptive
        cap = stage_cap(total, offset - done, last - stage.index, a.min_rounds, a.max_rounds)
        losses = stage_losses(records, stage.index)[: done + 1]
        return 0 if should_advance(losses, a.window, a.threshold, a.min_rounds, cap) else 1

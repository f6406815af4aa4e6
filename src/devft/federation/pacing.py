"""How many rounds the server runs next in the current stage: fixed or adaptive length.

Fixed: the schedule's rounds. Adaptive (`devft-adaptive`): one round at a time until
`devft.core.adaptive.should_advance` says the stage is over, on the stage's calibration
losses read back from the run's records (so a resumed run decides exactly as the original
would); the last stage gets what is left of federation.rounds.
Open-ended last stage (`stop.rule` plateau or target): its length is decided by
`devft.core.stopping.stop_reason` on the run's records, whatever the schedule says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from devft.config import RunConfig
from devft.core.adaptive import should_advance, stage_cap
from devft.core.schedule import Stage
from devft.core.stopping import stop_reason
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
        self.stop_reason: str | None = None
        """Why the open-ended last stage ended (None: it followed the schedule)."""

    def next_rounds(self, stage: Stage, offset: int, done: int,
                    records: Sequence[dict[str, Any]]) -> int:
        """`offset`: rounds the run has done; `done`: rounds of them in this stage."""
        if self.cfg.stop.rule != "rounds" and stage.index == self.schedule[-1].index:
            return self._open_ended(offset, done, records)
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

    def _open_ended(self, offset: int, done: int, records: Sequence[dict[str, Any]]) -> int:
        """0 when `stop_reason` ends the last stage; else the rounds it surely still runs
        (up to stop.min_rounds of the run for plateau, else one)."""
        losses = [math.nan if r.get("eval_loss") is None else float(r["eval_loss"])
                  for r in records]
        flops = float(records[-1].get("cum_client_flops", 0)) if records else 0.0
        self.stop_reason = stop_reason(self.cfg.stop, losses, flops, done)
        if self.stop_reason is not None:
            return 0
        stop = self.cfg.stop
        if stop.rule == "plateau":
            return max(1, stop.min_rounds - offset)
        return 1

"""Stage schedule: how many layers each developmental stage trains, and for how many rounds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from devft.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    index: int
    num_layers: int
    rounds: int


def doubling_stages(num_layers: int, num_stages: int) -> list[int]:
    """Layer counts doubling up to `num_layers` (30, 4 -> [4, 8, 15, 30]; 32, 4 -> [4, 8, 16, 32]).

    Counts that would repeat on a shallow model are dropped, so a 4-layer model with 4 stages
    gets [1, 2, 4].
    """
    counts = [math.ceil(num_layers / 2 ** (num_stages - 1 - i)) for i in range(num_stages)]
    return sorted(set(counts))


def split_rounds(total_rounds: int, num_stages: int) -> list[int]:
    """Split rounds evenly over stages; the remainder goes to the last stages (our reading)."""
    if total_rounds < num_stages:
        raise ConfigError(
            "federation.rounds", total_rounds, f"at least one round per stage ({num_stages} stages)"
        )
    base, extra = divmod(total_rounds, num_stages)
    return [base + (1 if i >= num_stages - extra else 0) for i in range(num_stages)]


def build_schedule(
    num_layers: int,
    stages: list[int],
    num_stages: int,
    rounds_per_stage: list[int],
    total_rounds: int,
) -> list[Stage]:
    """Validate and build the stage list for a model of `num_layers` layers.

    Args:
        num_layers: depth L of the full model.
        stages: explicit layer counts, or [] for `doubling_stages(L, num_stages)`.
        num_stages: number of stages when `stages` is empty.
        rounds_per_stage: rounds of each stage ([n] = n for every stage), or [] to split
            `total_rounds` evenly.
        total_rounds: federation.rounds.
    """
    if not stages and num_stages < 1:
        raise ConfigError("devft.num_stages", num_stages, "a positive integer")
    counts = list(stages) or doubling_stages(num_layers, num_stages)
    allowed = f"strictly increasing layer counts ending at the model's depth ({num_layers})"
    if any(c > num_layers for c in counts):
        raise ConfigError(
            "devft.stages",
            counts,
            f"at most {num_layers} layers per stage (the model has {num_layers}); "
            "a stage cannot have more groups than layers",
        )
    if any(c < 1 for c in counts) or any(b <= a for a, b in zip(counts, counts[1:])):
        raise ConfigError("devft.stages", counts, allowed)
    if counts[-1] != num_layers:
        raise ConfigError("devft.stages", counts, allowed)
    if not rounds_per_stage:
        rounds = split_rounds(total_rounds, len(counts))
    elif len(rounds_per_stage) == 1:
        rounds = rounds_per_stage * len(counts)
    elif len(rounds_per_stage) == len(counts):
        rounds = list(rounds_per_stage)
    else:
        raise ConfigError(
            "devft.rounds_per_stage",
            rounds_per_stage,
            f"one number, or one per stage ({len(counts)} stages)",
        )
    return [Stage(i, c, r) for i, (c, r) in enumerate(zip(counts, rounds))]


def full_model_schedule(num_layers: int, total_rounds: int) -> list[Stage]:
    """The one-stage schedule of non-staged methods (FedIT & co.): the full model throughout."""
    return [Stage(0, num_layers, total_rounds)]

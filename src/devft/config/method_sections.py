"""The run config's method-specific sections: DoFIT, C2A, Offsite-tuning, adaptive stages,
calibrated fusion, and the open-ended last stage (`stop`). Each checks its own values like
the general sections do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from devft.config.sections import _check


@dataclass
class DoFITConfig:
    domains: int = 2
    """Pseudo-domains the clients are split into (our reading for one data pool)."""
    topk: int = 15
    """Tensors per domain considered important (the official code's hard-coded 15)."""
    scale: float = 1.0
    """Proximal perturbation scale s."""

    def __post_init__(self) -> None:
        _check(self.domains >= 1, "dofit.domains", self.domains, "a positive integer")
        _check(self.topk >= 1, "dofit.topk", self.topk, "a positive integer")
        _check(self.scale >= 0, "dofit.scale", self.scale, "a number >= 0")


@dataclass
class C2AConfig:
    embed_dim: int = 8
    """Size t of the client/layer/module embeddings fed to the hypernetwork."""
    hidden_dim: int = 32
    """Width c of the factorized generator (L @ H)."""

    def __post_init__(self) -> None:
        _check(self.embed_dim >= 1, "c2a.embed_dim", self.embed_dim, "a positive integer")
        _check(self.hidden_dim >= 1, "c2a.hidden_dim", self.hidden_dim, "a positive integer")


@dataclass
class OffsiteConfig:
    """Offsite-tuning (`offsite`, `devft+offsite`): real adapter layers around an emulator."""

    k_bottom: int = 1
    """First layers trained as the bottom adapter (the full model's own)."""
    k_top: int = 1
    """Last layers trained as the top adapter."""
    emulator_fraction: float = 0.5
    """`offsite`: share of the middle layers the emulator keeps, evenly spaced (0.5 = every
    other layer, Offsite-tuning's default)."""
    emulator_layers: int = 0
    """`offsite`: middle layers the emulator keeps; 0 = use emulator_fraction."""

    def __post_init__(self) -> None:
        _check(self.k_bottom >= 0, "offsite.k_bottom", self.k_bottom, "an integer >= 0")
        _check(self.k_top >= 0, "offsite.k_top", self.k_top, "an integer >= 0")
        _check(self.k_bottom + self.k_top >= 1, "offsite.k_top", self.k_top,
               "at least one adapter layer in all (offsite.k_bottom + offsite.k_top >= 1)")
        _check(0.0 <= self.emulator_fraction <= 1.0, "offsite.emulator_fraction",
               self.emulator_fraction, "a number in [0, 1]")
        _check(self.emulator_layers >= 0, "offsite.emulator_layers", self.emulator_layers,
               "an integer >= 0 (0 = use offsite.emulator_fraction)")


@dataclass
class AdaptiveConfig:
    """`devft-adaptive`: a stage ends when its submodel's calibration loss stops improving."""

    window: int = 2
    """Rounds over which the improvement is measured."""
    threshold: float = 0.01
    """Advance when the calibration loss fell by less than this (nats) over the window."""
    min_rounds: int = 1
    """Rounds every stage runs at least."""
    max_rounds: int = 0
    """Rounds a stage runs at most; 0 = no cap but the budget (federation.rounds)."""

    def __post_init__(self) -> None:
        _check(self.window >= 1, "adaptive.window", self.window, "a positive integer")
        _check(self.threshold >= 0, "adaptive.threshold", self.threshold, "a number >= 0")
        _check(self.min_rounds >= 1, "adaptive.min_rounds", self.min_rounds,
               "a positive integer")
        _check(self.max_rounds == 0 or self.max_rounds >= self.min_rounds,
               "adaptive.max_rounds", self.max_rounds,
               f"0 (no cap) or at least adaptive.min_rounds={self.min_rounds}")


def _check_grid(values: list[float], low: float, high: float, field_name: str) -> None:
    _check(bool(values) and all(low <= v <= high for v in values), field_name, values,
           f"a non-empty list of numbers in [{low:g}, {high:g}]")


@dataclass
class CalibrateConfig:
    """`devft-calibrated`: the server picks β per stage on its calibration rows."""

    betas: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])
    """Candidate β values (each in [0, 1]; a β a group's size clamps is clamped per group)."""
    residual_exponents: list[float] = field(default_factory=lambda: [0.0])
    """Candidate γ: fused layers' output projections scaled by |g|^γ (0 = the paper's fusion).
    The grid is every (β, γ) pair."""

    def __post_init__(self) -> None:
        _check_grid(self.betas, 0.0, 1.0, "calibrate.betas")
        _check_grid(self.residual_exponents, 0.0, 2.0, "calibrate.residual_exponents")


@dataclass
class StopConfig:
    """How long the last stage runs (`stop.rule`; devft.core.stopping decides)."""

    rule: Literal["rounds", "plateau", "target"] = "rounds"
    """Length of the run's last stage (earlier stages keep their rounds): rounds = as
    scheduled; plateau = until the held-out loss improves by less than rel_improvement over
    window rounds (between min_rounds and max_rounds); target = until the held-out loss is at
    most target_loss or the client FLOPs reach flops_budget (at most max_rounds). summary.json's
    `stop` says which ended the run."""
    window: int = 4
    """plateau: rounds over which the relative improvement is measured."""
    rel_improvement: float = 0.01
    """plateau: stop when the loss fell by less than this fraction over the window."""
    min_rounds: int = 24
    """plateau: rounds of the run before the plateau test applies."""
    max_rounds: int = 64
    """plateau and target: most rounds of the run (all stages together)."""
    target_loss: float = 0.0
    """target: held-out loss that ends the run; 0 = none."""
    flops_budget: float = 0.0
    """target: cumulative client FLOPs that end the run; 0 = none."""

    def __post_init__(self) -> None:
        _check(self.window >= 1, "stop.window", self.window, "a positive integer")
        _check(0.0 <= self.rel_improvement < 1.0, "stop.rel_improvement",
               self.rel_improvement, "a number in [0, 1)")
        _check(self.min_rounds >= 1, "stop.min_rounds", self.min_rounds, "a positive integer")
        _check(self.max_rounds >= self.min_rounds, "stop.max_rounds", self.max_rounds,
               f"an integer >= stop.min_rounds={self.min_rounds}")
        _check(self.target_loss >= 0, "stop.target_loss", self.target_loss,
               "a number >= 0 (0 = no target)")
        _check(self.flops_budget >= 0, "stop.flops_budget", self.flops_budget,
               "a number >= 0 (0 = no budget)")
        _check(self.rule != "target" or self.target_loss > 0 or self.flops_budget > 0,
               "stop.rule", self.rule, "target only with stop.target_loss > 0 or "
               "stop.flops_budget > 0 (else use plateau or rounds)")

"""A client's work under its memory budget (issue 34): the levers, the depth, or sitting out.

Every round, a client with a budget plans its own work before it builds anything
(`plan_work`): its round's submodel as configured; then, lever by lever in
`federation.budget_levers` order, nf4 base weights (`quantize`), gradient checkpointing
(`checkpoint`), and the deepest shorter submodel that fits (`shrink`, only under
`budget_policy=shrink`). A client that cannot hold its round's submodel under `exclude`
sits the round out. Peaks are predicted by `devft.models.memory_plan` from the client
process's own floor (its RSS at its first round); clients of the in-process grid share the
server's process, so they plan with the nominal floor of a client process instead, and
their budgets are modelled, not enforced. The server refuses, before training, a configured
budget that fits no submodel (`check_budgets_fit`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from devft.config import RunConfig
from devft.config.budgets import NODE_BUDGET_KEY, node_budget, parse_budgets, parse_levers
from devft.core.grouping import Groups
from devft.core.shrink import shrink_groups, union_groups
from devft.errors import ConfigError
from devft.models.submodel import StagePlan

MIB = 2**20
log = logging.getLogger(__name__)
SHARED_PROCESS_KEY = "devft-shared-process"
"""Node-config flag of the in-process grid's clients: they run in the server's process."""


@dataclass(frozen=True)
class RoundWork:
    """What one client trains this round under its budget."""

    budget_mb: int
    stage_layers: int
    depth: int
    """Layers it trains: the stage's, fewer when shrunken, 0 when it sits out."""
    groups: Groups | None
    """Its layers as groups of stage layers, when shrunken (None: the whole stage)."""
    quantization: str
    checkpointing: bool
    levers: tuple[str, ...]
    predicted_bytes: int
    floor_bytes: int

    @property
    def sat_out(self) -> bool:
        return self.depth == 0

    @property
    def shrunk(self) -> bool:
        return 0 < self.depth < self.stage_layers

    def plan(self, stage: StagePlan) -> StagePlan:
        """The submodel this client builds: the stage's, or its shrunken layers' unions."""
        if not self.shrunk:
            return stage
        assert self.groups is not None
        groups = union_groups(stage.group_lists(), self.groups)
        return dataclasses.replace(stage, groups=tuple(tuple(g) for g in groups), frozen=())

    def record(self, partition: int, stage: StagePlan) -> dict[str, Any]:
        """The reply's `budget` ConfigRecord values (what the server logs and aggregates by)."""
        covered = sorted(j for g in self.plan(stage).groups for j in g) if self.depth else []
        out: dict[str, Any] = {
            "partition": partition, "budget-mb": self.budget_mb, "depth": self.depth,
            "levers": "+".join(self.levers), "predicted-peak-mb": self.predicted_bytes / MIB,
            "floor-mb": self.floor_bytes / MIB}
        if covered:
            out["covered-layers"] = covered
        if self.shrunk:
            assert self.groups is not None
            out["groups"] = [i for g in self.groups for i in g]
            out["group-sizes"] = [len(g) for g in self.groups]
        return out


def client_budget_mb(cfg: RunConfig, partition: int, node_config: dict[str, Any]) -> int:
    """This client's budget in MiB (0 = no limit): from the run config, or its node's."""
    budgets = parse_budgets(cfg.federation.client_memory_mb, cfg.federation.num_clients)
    if budgets is None:
        return node_budget(node_config.get(NODE_BUDGET_KEY), partition)
    return budgets[partition] if budgets else 0


SEQ_GRID, FRACTION_GRID = 64, 4
"""A round's batch shape is rounded up to these steps (tokens; quarters of response) before
it is planned, so a process probes a few shapes once each instead of one per round."""


def round_shape(batches: list[dict[str, Any]], max_seq_len: int) -> tuple[int, int, float]:
    """(rows, padded tokens, response share) bounding every batch of a round: rows and width
    of the largest, and the largest share of response tokens (labels that count), rounded up
    to SEQ_GRID tokens (at most `max_seq_len`) and to quarters."""
    rows = max(int(b["labels"].shape[0]) for b in batches)
    width = max(int(b["labels"].shape[1]) for b in batches)
    share = max(float((b["labels"] != -100).sum()) / b["labels"].numel() for b in batches)
    seq = min(max(max_seq_len, width), -(-width // SEQ_GRID) * SEQ_GRID)
    return rows, max(seq, 2), min(1.0, max(1, -(-share * FRACTION_GRID // 1)) / FRACTION_GRID)


def plan_work(cfg: RunConfig, stage: StagePlan, partition: int, round_: int,
              node_config: dict[str, Any], spectral: dict[int, Groups] | None = None,
              shape: tuple[int, int, float] | None = None) -> RoundWork:
    """This client's work for the round (see the module docstring); `shape`: the round's
    batches (`round_shape`), else the bound train.batch_size x data.max_seq_len, all
    response."""
    from devft.models.memory_plan import NOMINAL_FLOOR_BYTES, client_floor_bytes

    budget = client_budget_mb(cfg, partition, node_config)
    layers = stage.num_layers
    quant, ckpt = cfg.model.quantization, cfg.train.gradient_checkpointing
    if budget == 0:
        return RoundWork(0, layers, layers, None, quant, ckpt, (), 0, 0)
    shared = bool(node_config.get(SHARED_PROCESS_KEY))
    floor = NOMINAL_FLOOR_BYTES if shared else client_floor_bytes()
    planner = _planner(cfg, shape)
    fed = cfg.federation
    may_shrink = fed.shrinks  # policy shrink, with the shrink lever
    used: list[str] = []
    shrinking = False

    def depth() -> int:
        if planner.predict(layers, quant, ckpt, floor).total <= budget * MIB:
            return layers
        if shrinking and layers > 1:
            return planner.deepest_fit(budget * MIB, layers - 1, quant, ckpt, floor)
        return 0

    d = depth()
    for lever in parse_levers(fed.budget_levers):
        if d:
            break
        if lever == "quantize" and quant == "none":
            quant = "nf4"
        elif lever == "checkpoint" and not ckpt:
            ckpt = True
        elif lever == "shrink" and may_shrink:
            shrinking = True
        else:
            continue
        used.append(lever)
        d = depth()
    if d == 0 and may_shrink:
        need = planner.predict(1, quant, ckpt, floor).total
        raise ConfigError(
            f"federation.client_memory_mb (client {partition})", budget,
            f"at least {-(-need // MIB)} MiB: the smallest submodel (1 layer, levers "
            f"{'+'.join(used) or 'none'}) needs that in this process (floor "
            f"{floor // MIB} MiB)")
    if 0 < d < layers:
        groups = shrink_groups(fed.shrink_recipe, layers, d, spectral,
                               (cfg.seed, partition, round_))
    else:
        groups = None
        if "shrink" in used:
            used.remove("shrink")
    predicted = planner.predict(d or layers, quant, ckpt, floor).total
    return RoundWork(budget, layers, d, groups, quant, ckpt, tuple(used), predicted, floor)


def _planner(cfg: RunConfig, shape: tuple[int, int, float] | None = None) -> Any:
    from devft.models.memory_plan import planner_for

    rows, seq, share = shape or (cfg.train.batch_size, cfg.data.max_seq_len, 1.0)
    return planner_for(cfg.model, cfg.lora, rows, seq, cfg.train.precision, share)


def check_budgets_fit(cfg: RunConfig, stage_depths: list[int]) -> None:
    """Refuse, before training, a configured budget that fits no submodel of the run (with
    the nominal floor of a client process): one line naming the client, its budget and the
    smallest budget that would work. Under `exclude` such a client only sits out (a warning):
    that is the baseline the policy stands for."""
    from devft.models.memory_plan import NOMINAL_FLOOR_BYTES

    fed = cfg.federation
    budgets = parse_budgets(fed.client_memory_mb, fed.num_clients)
    if not budgets or not any(budgets):
        return
    levers = parse_levers(fed.budget_levers)
    quant = "nf4" if "quantize" in levers and cfg.model.quantization == "none" \
        else cfg.model.quantization
    ckpt = cfg.train.gradient_checkpointing or "checkpoint" in levers
    smallest = 1 if fed.shrinks else min(stage_depths)
    need = _planner(cfg).predict(smallest, quant, ckpt, NOMINAL_FLOOR_BYTES).total
    need_mb = -(-need // MIB)
    for partition, budget in enumerate(budgets):
        if 0 < budget < need_mb and not fed.shrinks:  # `exclude`: today's baseline
            log.warning("client %d (federation.client_memory_mb %d MiB) fits no submodel of "
                        "this run (the smallest needs %d MiB): it sits out every round",
                        partition, budget, need_mb)
        elif 0 < budget < need_mb:
            raise ConfigError(
                f"federation.client_memory_mb (client {partition})", budget,
                f"0 (no limit) or at least {need_mb} MiB: the smallest submodel this run can "
                f"give it ({smallest} layer{'s' if smallest > 1 else ''}, "
                f"{quant} weights, checkpointing {'on' if ckpt else 'off'}) needs that, with "
                f"a client process's floor of {NOMINAL_FLOOR_BYTES // MIB} MiB")

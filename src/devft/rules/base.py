"""The aggregation-rule interface: one class holds a rule's server half and its client half.

Server half (one instance per run, inside the strategy):
  start_stage -> message(node) per sampled node -> aggregate(uploads) -> eval_lora()
Client half (one instance per client process, stateless; per-client state lives in the
node's Flower `context.state` through `ClientStore`):
  prepare -> lora_settings -> begin (what to load) -> trainable(key) -> end (what to upload)

The base class is FedIT (FedAvg of A and B); every other rule overrides only what differs.
Tensors are PEFT LoRA state dicts of the *stage submodel* (`StateDict`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from devft.config import LoraSettings, RunConfig
from devft.core.aggregation import weighted_mean
from devft.core.layerstate import StateDict


@dataclass(frozen=True)
class NodeSlot:
    """A node as the server sees it: its id and its position among the run's nodes."""

    node_id: int
    index: int
    num_nodes: int


class ClientStore:
    """Per-client tensors kept between rounds in the node's `context.state` (never sent)."""

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def get(self, name: str) -> StateDict | None:
        if name not in self.state:
            return None
        return {k: v.clone() for k, v in self.state[name].to_torch_state_dict().items()}

    def put(self, name: str, tensors: StateDict) -> None:
        self.state[name] = ArrayRecord(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()})


@dataclass
class ClientEnv:
    """What a client-side hook may use."""

    cfg: RunConfig
    plan: Any  # devft.models.submodel.StagePlan
    prefix: str
    """Per-layer key prefix of LoRA states (family-specific)."""
    partition: int
    round: int
    config: dict[str, Any]
    store: ClientStore
    data: Any = None
    """The client's own data (`devft.data.ClientShard`)."""
    extra: dict[str, Any] = field(default_factory=dict)


class Rule:
    """FedIT: clients train A and B; the server takes the weighted mean of each."""

    name = "fedavg"
    personalized = False
    """True: the global model is incomplete without client state; evaluation runs on clients."""
    private_base = False
    """True: the rule changes the frozen base (FLoRA merges); the run gets its own copy."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.global_lora: StateDict = {}
        self.plan: Any = None

    def base_model(self) -> Any:
        """The frozen base this run trains on (a private copy for rules that change it)."""
        from devft.models.loading import load_base_model, private_base_model

        if self.private_base:
            return private_base_model(self.cfg.model, key=self.cfg.output.dir)
        return load_base_model(self.cfg.model)

    # ---- server half ---------------------------------------------------------------------
    def start_stage(self, sub_lora: StateDict, plan: Any) -> None:
        """A new stage begins from the submodel adapter fused from the global model."""
        self.global_lora, self.plan = dict(sub_lora), plan

    def message(self, node: NodeSlot) -> tuple[StateDict, dict[str, Any]]:
        """Tensors and extra config values to send to `node` this round."""
        return self.global_lora, {}

    def aggregate(self, uploads: list[StateDict], nodes: list[NodeSlot],
                  weights: list[float]) -> None:
        self.global_lora = weighted_mean(uploads, weights)

    def trainable_count(self) -> int:
        """Parameters the clients train this stage (for the metrics)."""
        return sum(v.numel() for v in self.global_lora.values())

    def expected_upload(self, node: NodeSlot) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a valid reply from `node` carries (checked before aggregation)."""
        return {k: tuple(v.shape) for k, v in self.global_lora.items()}

    def eval_lora(self) -> StateDict:
        """The submodel adapter the server evaluates and transfers into the full model."""
        return self.global_lora

    def state_dict(self) -> tuple[dict[str, StateDict], dict[str, Any]]:
        """Server state for a checkpoint: named tensor groups and JSON-able metadata."""
        return {"global": self.global_lora}, {}

    def load_state_dict(self, tensors: dict[str, StateDict], meta: dict[str, Any],
                        plan: Any, global_model: Any) -> None:
        """Restore `state_dict()`'s output (on resume, in a fresh process)."""
        self.global_lora, self.plan = tensors["global"], plan

    def after_aggregate(self, global_model: Any) -> None:
        """Server-side work after each aggregation (e.g. FLoRA merges into the base)."""

    def export(self, path: Any, global_model: Any) -> bool:
        """Write the final adapter in a rule-specific way; False = the default export."""
        return False

    # ---- client half ---------------------------------------------------------------------
    def prepare(self, received: StateDict, env: ClientEnv, base: Any) -> None:
        """Runs before the client builds its stage model (e.g. merge into the base)."""

    def lora_settings(self, env: ClientEnv) -> LoraSettings:
        return self.cfg.lora

    def begin(self, received: StateDict, env: ClientEnv, template: StateDict) -> StateDict:
        """The full adapter the client loads before training (`template`: its keys/shapes)."""
        return received

    def trainable(self, key: str) -> bool:
        return True

    def end(self, trained: StateDict, env: ClientEnv) -> StateDict:
        """What the client sends up after training."""
        return trained

    def local_update(self, model: Any, batches: Any, env: ClientEnv,
                     default: Callable[[], Any]) -> Any:
        """Run local training; `default()` is the standard LoRA loop (returns a LocalResult).
        Rules with another trainable parameterization (C2A's hypernetwork) replace it."""
        return default()


def only(state: StateDict, part: str) -> StateDict:
    """The entries of `state` whose key contains `part` (e.g. "lora_A")."""
    return {k: v for k, v in state.items() if part in k}

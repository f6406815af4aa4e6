"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a shared seeded init, only B trained and sent.

ΔW = B·A₀ is linear in B, so the weighted mean of B is exact. A₀ crosses the wire once per
stage per client (it changes only when a DevFT stage re-fuses it); every round sends only B.
"""

from __future__ import annotations

from typing import Any

from devft.core.aggregation import weighted_mean
from devft.core.layerstate import StateDict
from devft.rules.base import ClientEnv, NodeSlot, Rule, only


class FFALoRA(Rule):
    name = "ffa"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.has_a: dict[int, int] = {}  # node id -> stage whose A it holds (confirmed)
        self.sending_a: set[int] = set()

    def message(self, node: NodeSlot) -> tuple[StateDict, dict[str, Any]]:
        arrays = only(self.global_lora, "lora_B")
        if self.has_a.get(node.node_id) != self.plan.stage:
            arrays = {**arrays, **only(self.global_lora, "lora_A")}
            self.sending_a.add(node.node_id)
        return arrays, {}

    def aggregate(self, uploads: list[StateDict], nodes: list[NodeSlot],
                  weights: list[float]) -> None:
        for node in nodes:  # only a client that replied surely holds this stage's A
            if node.node_id in self.sending_a:
                self.has_a[node.node_id] = self.plan.stage
        self.sending_a.clear()
        self.global_lora = {**only(self.global_lora, "lora_A"), **weighted_mean(uploads, weights)}

    def state_dict(self) -> tuple[dict[str, StateDict], dict[str, Any]]:
        tensors, _ = super().state_dict()
        return tensors, {"has_a": {str(k): v for k, v in self.has_a.items()}}

    def load_state_dict(self, tensors: dict[str, StateDict], meta: dict[str, Any],
                        plan: Any, global_model: Any) -> None:
        super().load_state_dict(tensors, meta, plan, global_model)
        self.has_a = {int(k): int(v) for k, v in meta["has_a"].items()}

    def expected_upload(self, node: NodeSlot) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in only(self.global_lora, "lora_B").items()}

    def begin(self, received: StateDict, env: ClientEnv, template: StateDict) -> StateDict:
        name = f"ffa-A-stage{env.plan.stage}"
        a = only(received, "lora_A")
        if a:
            env.store.put(name, a)
        else:
            a = env.store.get(name)
            if a is None:
                raise RuntimeError(f"FFA-LoRA client has no frozen A for stage {env.plan.stage}")
        return {**a, **only(received, "lora_B")}

    def trainable(self, key: str) -> bool:
        return "lora_B" in key

    def end(self, trained: StateDict, env: ClientEnv) -> StateDict:
        return only(trained, "lora_B")

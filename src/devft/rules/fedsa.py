"""FedSA-LoRA (Guo et al., ICLR 2025): A is aggregated and shared; each client's B stays local.

B never leaves the client: it lives in the node's `context.state`, kept in full-model layer
space so that DevFT stages can fuse it (stage start) and transfer it back (after training)
exactly as the server does with the shared A. The global model is incomplete without B, so
evaluation is personalized: each client scores global A + its own B, and the server reports
the unweighted mean over clients.
"""

from __future__ import annotations

import torch

from devft.core.aggregation import weighted_mean
from devft.core.frozen import transfer_groups
from devft.core.layerstate import StateDict
from devft.core.stagemaps import fuse_state, transfer_state
from devft.methods import get_method
from devft.rules.base import ClientEnv, NodeSlot, Rule, only

B_STATE = "fedsa-B"


class FedSALoRA(Rule):
    name = "fedsa"
    personalized = True

    def message(self, node: NodeSlot) -> tuple[StateDict, dict]:
        return only(self.global_lora, "lora_A"), {}

    def aggregate(self, uploads: list[StateDict], nodes: list[NodeSlot],
                  weights: list[float]) -> None:
        # the server's B stays at its (zero) init: it never sees a client's B
        self.global_lora = {**self.global_lora, **weighted_mean(uploads, weights)}

    def expected_upload(self, node: NodeSlot) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in only(self.global_lora, "lora_A").items()}

    def begin(self, received: StateDict, env: ClientEnv, template: StateDict) -> StateDict:
        zeros = {k: torch.zeros_like(v) for k, v in only(template, "lora_B").items()}
        full_b = env.store.get(B_STATE)
        if full_b is None:
            sub_b = zeros
        else:
            plan = env.plan
            sub_b = fuse_state(full_b, plan.group_lists(), plan.beta, plan.fusion, env.prefix,
                               missing=zeros)
        return {**only(received, "lora_A"), **sub_b}

    def trainable(self, key: str) -> bool:
        return True

    def end(self, trained: StateDict, env: ClientEnv) -> StateDict:
        depth = int(env.extra["depth"])
        transfer = env.plan.transfer_for(get_method(self.cfg.method).transfer, depth)
        groups = transfer_groups(env.plan.group_lists(), env.plan.frozen)  # emulator: none
        full_b = transfer_state(only(trained, "lora_B"), groups, transfer,
                                env.prefix, into=env.store.get(B_STATE))
        env.store.put(B_STATE, full_b)
        return only(trained, "lora_A")

    def personal_lora(self, full_a: StateDict, env: ClientEnv, template: StateDict) -> StateDict:
        """Global A (full model) + this client's own B, for personalized evaluation."""
        full_b = env.store.get(B_STATE) or {}
        return {**only(full_a, "lora_A"),
                **{k: full_b.get(k, torch.zeros_like(v))
                   for k, v in only(template, "lora_B").items()}}

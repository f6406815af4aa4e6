"""DoFIT (Xu et al., NeurIPS 2024), as released in its official code (baselines_dofit_c2a.md §1).

Clients form D pseudo-domains (our reading for a single data pool, as DevFT's setting has:
the sorted nodes are cut into D equal blocks). Each round: FedAvg within each domain; then,
per domain, the top-k LoRA tensors by squared Frobenius norm; for keys in every domain's
top-k, each domain's tensor gets the proximal perturbation W_d += s·|W_d − c| / ‖W_d − c‖_F
with c the mean over domains (skipped where the norm is 0: the code would divide by zero).
Each domain's clients receive their domain's LoRA. The server evaluates the mean of the
domain LoRAs (our reading; the paper evaluates per domain).
"""

from __future__ import annotations

from typing import Any

import torch

from devft.core.aggregation import weighted_mean
from devft.core.layerstate import StateDict
from devft.rules.base import NodeSlot, Rule


def domain_of(node: NodeSlot, domains: int) -> int:
    return min(node.index * domains // max(node.num_nodes, 1), domains - 1)


def top_keys(state: StateDict, k: int) -> set[str]:
    """The k keys of largest squared Frobenius norm."""
    ranked = sorted(state, key=lambda key: float(state[key].float().pow(2).sum()), reverse=True)
    return set(ranked[:k])


def perturb_shared(domains: list[StateDict], topk: int, scale: float) -> list[StateDict]:
    """DoFIT's inter-domain step on the tensors that are in every domain's top-k."""
    if len(domains) < 2:
        return domains
    shared = set.intersection(*(top_keys(d, topk) for d in domains))
    out = [dict(d) for d in domains]
    for key in shared:
        center = torch.stack([d[key].float() for d in domains]).mean(0)
        for d in out:
            diff = d[key].float() - center
            norm = float(torch.linalg.vector_norm(diff))
            if norm > 0:
                d[key] = (d[key].float() + scale * diff.abs() / norm).to(d[key].dtype)
    return out


class DoFIT(Rule):
    name = "dofit"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.domains: list[StateDict] = []

    def start_stage(self, sub_lora: StateDict, plan: Any) -> None:
        super().start_stage(sub_lora, plan)
        self.domains = [dict(sub_lora) for _ in range(self.cfg.dofit.domains)]

    def message(self, node: NodeSlot) -> tuple[StateDict, dict[str, Any]]:
        d = domain_of(node, len(self.domains))
        return self.domains[d], {"domain": d}

    def aggregate(self, uploads: list[StateDict], nodes: list[NodeSlot],
                  weights: list[float]) -> None:
        by_domain: dict[int, list[int]] = {}
        for i, node in enumerate(nodes):
            by_domain.setdefault(domain_of(node, len(self.domains)), []).append(i)
        for d, members in by_domain.items():
            self.domains[d] = weighted_mean([uploads[i] for i in members],
                                            [weights[i] for i in members])
        self.domains = perturb_shared(self.domains, self.cfg.dofit.topk, self.cfg.dofit.scale)
        self.global_lora = weighted_mean(self.domains, [1.0] * len(self.domains))

    def state_dict(self) -> tuple[dict[str, StateDict], dict[str, Any]]:
        tensors = {f"domain{d}": state for d, state in enumerate(self.domains)}
        return {"global": self.global_lora, **tensors}, {"domains": len(self.domains)}

    def load_state_dict(self, tensors: dict[str, StateDict], meta: dict[str, Any],
                        plan: Any, global_model: Any) -> None:
        super().load_state_dict(tensors, meta, plan, global_model)
        self.domains = [tensors[f"domain{d}"] for d in range(meta["domains"])]

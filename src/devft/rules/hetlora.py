"""HetLoRA (Cho et al., EMNLP 2024): heterogeneous client ranks.

The server keeps the global LoRA at the maximum rank r. Client k gets rank r_k: it receives
the truncation A[:r_k], B[:, :r_k] and trains a rank-r_k LoRA with alpha scaled by r_k / r so
every client applies the same scaling alpha / r. The server zero-pads each update to rank r
and averages with sparsity weights w_k = ‖B_k A_k‖_F / Σ_j ‖B_j A_j‖_F, per adapted module.
Not implemented: the paper's local rank self-pruning (ranks stay fixed per client).
"""

from __future__ import annotations

from typing import Any

import torch

from devft.config import LoraSettings
from devft.core.layerstate import StateDict
from devft.rules.base import ClientEnv, NodeSlot, Rule


def client_rank(ranks: list[int], r: int, index: int, default_spread: bool) -> int:
    """Rank of the node at `index`: `ranks` cycled, else r (or r/4, r/2, 3r/4, r cycled)."""
    if ranks:
        return min(ranks[index % len(ranks)], r)
    if default_spread:
        return max(1, r * (index % 4 + 1) // 4)
    return r


def truncate(state: StateDict, rank: int) -> StateDict:
    """Keep the first `rank` components: rows of A (r, d_in), columns of B (d_out, r)."""
    return {k: (v[:rank] if "lora_A" in k else v[:, :rank]).clone() for k, v in state.items()}


def pad(value: torch.Tensor, key: str, rank: int) -> torch.Tensor:
    """Zero-pad a rank-r_k factor to rank `rank`."""
    if "lora_A" in key:
        return torch.cat([value, value.new_zeros(rank - value.shape[0], value.shape[1])])
    return torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1])], dim=1)


def norm_weighted_pad_mean(uploads: list[StateDict], rank: int,
                           fallback: list[float]) -> StateDict:
    """Per module: Σ_k w_k pad(A_k), Σ_k w_k pad(B_k) with w_k ∝ ‖B_k A_k‖_F."""
    out: StateDict = {}
    for a_key in (k for k in uploads[0] if "lora_A" in k):
        b_key = a_key.replace("lora_A", "lora_B")
        norms = [float(torch.linalg.matrix_norm(u[b_key].float() @ u[a_key].float()))
                 for u in uploads]
        total = sum(norms)
        weights = [n / total for n in norms] if total > 0 else fallback
        for key in (a_key, b_key):
            out[key] = sum(w * pad(u[key].float(), key, rank) for w, u in zip(weights, uploads))
    return out


class HetLoRA(Rule):
    name = "hetlora"
    default_spread = True

    def rank_of(self, node: NodeSlot) -> int:
        return client_rank(self.cfg.lora.client_ranks, self.cfg.lora.r, node.index,
                           self.default_spread)

    def message(self, node: NodeSlot) -> tuple[StateDict, dict[str, Any]]:
        rank = self.rank_of(node)
        return truncate(self.global_lora, rank), {"rank": rank}

    def expected_upload(self, node: NodeSlot) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in truncate(self.global_lora,
                                                       self.rank_of(node)).items()}

    def aggregate(self, uploads: list[StateDict], nodes: list[NodeSlot],
                  weights: list[float]) -> None:
        total = sum(weights)
        self.global_lora = norm_weighted_pad_mean(uploads, self.cfg.lora.r,
                                                  [w / total for w in weights])

    def lora_settings(self, env: ClientEnv) -> LoraSettings:
        return rank_settings(self.cfg.lora, int(env.config["rank"]))


def rank_settings(lora: LoraSettings, rank: int) -> LoraSettings:
    """LoRA settings at `rank` with the same scaling alpha / r as the configured rank."""
    return LoraSettings(r=rank, alpha=lora.alpha * rank / lora.r, dropout=lora.dropout,
                        target_modules=list(lora.target_modules))

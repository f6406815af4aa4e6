"""FLoRA (Wang et al., NeurIPS 2024): stack client LoRAs so the product is the exact sum.

Each round the server stacks the clients' factors along the rank axis,
A = [p_1 s A_1; …; p_K s A_K], B = [B_1 … B_K], so B·A = Σ_k p_k s B_k A_k exactly
(s = alpha / r; heterogeneous ranks allowed via lora.client_ranks). The stack is merged into
the frozen base weights and every client re-initializes a fresh LoRA next round. A client
receives every stack it has not merged yet (usually the last round's), so the downlink is
K times a client's LoRA. Merges change the base, so a FLoRA run works on its own base copy;
a process-wide ledger on that copy makes sure each stack is merged once per process.
The final adapter is the exact sum of all stacks, saved as one PEFT LoRA of rank Σ r_k·T.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from devft.config import LoraSettings
from devft.core.aggregation import normalized_weights
from devft.core.initial_adapter import standard_lora_a
from devft.core.layerstate import StateDict, split_by_layer
from devft.core.transfer import transfer_layers
from devft.methods import get_method
from devft.rules.base import ClientEnv, NodeSlot, Rule
from devft.rules.hetlora import client_rank, rank_settings, truncate

STACK = "flora"


def stack(uploads: list[StateDict], weights: list[float], scaling: float) -> StateDict:
    """Rank-axis concatenation: A rows scaled by p_k·s, B columns as they are."""
    p = normalized_weights(weights)
    out: StateDict = {}
    for a_key in (k for k in uploads[0] if "lora_A" in k):
        b_key = a_key.replace("lora_A", "lora_B")
        out[a_key] = torch.cat([pk * scaling * u[a_key].float() for pk, u in zip(p, uploads)])
        out[b_key] = torch.cat([u[b_key].float() for u in uploads], dim=1)
    return out


def _flat_groups(groups: tuple) -> tuple[list[int], list[int]]:
    return [i for g in groups for i in g], [len(g) for g in groups]


def _unflatten(flat: list[int], sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for size in sizes:
        out.append([int(i) for i in flat[start:start + size]])
        start += size
    return out


class FLoRA(Rule):
    """FLoRA's server and client halves. Its clients need the full base: they merge every
    stack into it, so unlike the other rules they load the whole base model (not only their
    stage; `private_base`), and `model.ship_layers` is refused for it."""

    name = "flora"
    private_base = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.stacks: list[tuple[list[list[int]], StateDict]] = []
        self.delivered: dict[int, int] = {}
        self.sending: dict[int, int] = {}

    # ---- server --------------------------------------------------------------------------
    def start_stage(self, sub_lora: StateDict, plan: Any) -> None:
        zero_b = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in sub_lora.items()}
        super().start_stage(zero_b, plan)  # evaluated model: merged base + a zero LoRA

    def message(self, node: NodeSlot) -> tuple[StateDict, dict[str, Any]]:
        start = self.delivered.get(node.node_id, 0)
        arrays: StateDict = {}
        config: dict[str, Any] = {"rank": self.rank_of(node),
                                  "flora-pending": list(range(start, len(self.stacks)))}
        for i in range(start, len(self.stacks)):
            groups, tensors = self.stacks[i]
            arrays.update({f"{STACK}.{i}.{k}": v for k, v in tensors.items()})
            config[f"flora-groups-{i}"], config[f"flora-sizes-{i}"] = _flat_groups(groups)
        self.sending[node.node_id] = len(self.stacks)
        return arrays, config

    def expected_upload(self, node: NodeSlot) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in truncate(self.global_lora,
                                                       self.rank_of(node)).items()}

    def rank_of(self, node: NodeSlot) -> int:
        """r for every client unless lora.client_ranks sets heterogeneous ranks."""
        return client_rank(self.cfg.lora.client_ranks, self.cfg.lora.r, node.index, False)

    def aggregate(self, uploads: list[StateDict], nodes: list[NodeSlot],
                  weights: list[float]) -> None:
        for node in nodes:
            self.delivered[node.node_id] = self.sending.get(node.node_id, 0)
        scaling = self.cfg.lora.alpha / self.cfg.lora.r
        self.stacks.append((self.plan.group_lists(), stack(uploads, weights, scaling)))

    def after_aggregate(self, global_model: Any) -> None:
        """The server merges the new stack into its own copy of the base."""
        groups, tensors = self.stacks[-1]
        merge_stack(global_model.base, len(self.stacks) - 1, groups, tensors,
                    global_model.prefix, self.cfg.method)

    def state_dict(self) -> tuple[dict[str, StateDict], dict[str, Any]]:
        tensors = {f"stack{i}": t for i, (_, t) in enumerate(self.stacks)}
        return {"global": self.global_lora, **tensors}, {"groups": [g for g, _ in self.stacks]}

    def load_state_dict(self, tensors: dict[str, StateDict], meta: dict[str, Any],
                        plan: Any, global_model: Any) -> None:
        """Restore the stacks and re-merge them into this process's fresh base copy. Clients
        are new processes too (in-process they share the re-merged base), so every stack
        counts as undelivered: the first round after a resume re-sends them."""
        super().load_state_dict(tensors, meta, plan, global_model)
        self.stacks = [(groups, tensors[f"stack{i}"]) for i, groups in enumerate(meta["groups"])]
        self.delivered, self.sending = {}, {}
        for i, (groups, stacked) in enumerate(self.stacks):
            merge_stack(global_model.base, i, groups, stacked, global_model.prefix,
                        self.cfg.method)

    def export(self, path: Path, global_model: Any) -> bool:
        """Save Σ of all stacks (full-model layers) as one exact PEFT adapter."""
        transfer = get_method(self.cfg.method).transfer
        per_layer: dict[int, dict[str, list[torch.Tensor]]] = {}
        for groups, tensors in self.stacks:
            layers, _ = split_by_layer(tensors, global_model.prefix)
            for j, state in transfer_layers(layers, groups, transfer).items():
                for key, value in state.items():
                    per_layer.setdefault(j, {}).setdefault(key, []).append(value)
        if not per_layer:
            return False
        out = {}
        for j, state in per_layer.items():
            for key, parts in state.items():
                dim = 0 if "lora_A" in key else 1
                out[f"{global_model.prefix}{j}.{key}"] = torch.cat(parts, dim=dim).contiguous()
        rank = next(v.shape[0] for k, v in out.items() if "lora_A" in k)
        path.mkdir(parents=True, exist_ok=True)
        save_file(out, str(path / "adapter_model.safetensors"))
        config = global_model.full.peft_config["default"].to_dict()
        config.update(r=rank, lora_alpha=rank, lora_dropout=0.0,  # scaling 1: s is folded in
                      base_model_name_or_path=global_model.base.path)
        config["target_modules"] = sorted(config["target_modules"])
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
        return True

    # ---- client --------------------------------------------------------------------------
    def prepare(self, received: StateDict, env: ClientEnv, base: Any) -> None:
        for i in env.config.get("flora-pending", []):
            groups = _unflatten(env.config[f"flora-groups-{i}"], env.config[f"flora-sizes-{i}"])
            head = f"{STACK}.{i}."
            tensors = {k[len(head):]: v for k, v in received.items() if k.startswith(head)}
            merge_stack(base, int(i), groups, tensors, env.prefix, self.cfg.method)

    def lora_settings(self, env: ClientEnv) -> LoraSettings:
        return rank_settings(self.cfg.lora, int(env.config["rank"]))

    def begin(self, received: StateDict, env: ClientEnv, template: StateDict) -> StateDict:
        """A fresh LoRA every round (A kaiming-uniform from a per-client seed, B = 0)."""
        gen = torch.Generator().manual_seed(hash((self.cfg.seed, env.round, env.partition))
                                            & 0x7FFFFFFF)
        fresh = {}
        for key, value in template.items():
            if "lora_A" in key:
                fresh[key] = standard_lora_a(tuple(value.shape), gen)
            else:
                fresh[key] = torch.zeros_like(value)
        return fresh

    def end(self, trained: StateDict, env: ClientEnv) -> StateDict:
        return trained


def merge_stack(base: Any, stack_id: int, groups: list[list[int]], tensors: StateDict,
                prefix: str, method: str) -> None:
    """Merge one stack into `base` unless this process already did (ledger on the base)."""
    from devft.models.merge import merge_layers
    from devft.models.submodel import invalidate_stage_models

    if stack_id in base.merged:
        return
    layers, _ = split_by_layer(tensors, prefix)
    full = transfer_layers(layers, groups, get_method(method).transfer)  # copy for devft+flora
    merge_layers(base.model, base.family, full)
    base.merged.add(stack_id)
    invalidate_stage_models()  # fused submodel layers must be rebuilt from the merged base




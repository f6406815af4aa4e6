"""Merging LoRA factors into a model's frozen base weights (FLoRA's per-round merge)."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from devft.core.layerstate import LayerStates
from devft.models.families import Family, get_attr


@torch.no_grad()
def merge_layers(model: torch.nn.Module, family: Family, layers: LayerStates) -> None:
    """W += B @ A for every adapted module of every layer in `layers` (scaling pre-folded).

    `layers` maps a layer index to PEFT-style suffixes, e.g. "self_attn.q_proj.lora_A.weight".
    Conv1D weights (GPT-2) are stored transposed, so they get (B @ A)ᵀ.
    """
    decoder = family.layers(model)
    for index, state in layers.items():
        for a_key in (k for k in state if ".lora_A." in k):
            module = get_attr(decoder[index], a_key.split(".lora_A.")[0])
            b, a = state[a_key.replace(".lora_A.", ".lora_B.")], state[a_key]
            delta = b.to(module.weight.device).float() @ a.to(module.weight.device).float()
            if isinstance(module, Conv1D):
                delta = delta.T
            module.weight.add_(delta.to(module.weight.device, module.weight.dtype))

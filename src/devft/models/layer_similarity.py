"""Layer-similarity matrices for DevFT's grouping, measured on the current global model.

- `weights`: cosine between layers' flattened effective weights W0 + (alpha/r)·B·A over the
  LoRA-targeted linear modules (the paper's description; norms excluded, devft_paper.md §7.1).
- `hidden`: cosine between layers' output hidden states on a calibration batch, per token and
  averaged over the batch's real (non-padding) tokens; needs only text the server may see.
  Per-token rather than one flattened vector: a few "massive activation" tokens (e.g. the
  first token, whose hidden state is orders of magnitude larger from early layers on) would
  otherwise dominate every dot product and make most layers look identical.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from devft.core.similarity import cosine_from_gram, per_token_cosine
from devft.models.families import Family
from devft.models.quantize import dense_weight


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """W0 + ΔW of a LoRA-wrapped linear (PEFT's own delta, so scaling/fan-in are right); a
    quantized W0 is dequantized."""
    weight = dense_weight(module.get_base_layer()).float()
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).detach().float().reshape(
                weight.shape
            )
    return weight


@torch.no_grad()
def weight_similarity(model: PeftModel, family: Family) -> torch.Tensor:
    """(L, L) cosine similarity of the layers' effective weights (accumulated Gram matrix)."""
    layers = family.layers(model.base_model.model)
    per_layer = [
        {name: m for name, m in layer.named_modules() if isinstance(m, LoraLayer)}
        for layer in layers
    ]
    gram = torch.zeros(len(layers), len(layers), dtype=torch.float64)
    for name in per_layer[0]:
        flat = torch.stack([_effective_weight(mods[name]).flatten() for mods in per_layer])
        gram += (flat @ flat.T).double()
    return cosine_from_gram(gram)


@torch.no_grad()
def hidden_similarity(
    model: PeftModel, family: Family, batch: dict[str, torch.Tensor], precision: str = "fp32"
) -> torch.Tensor:
    """(L, L) cosine similarity of each layer's output hidden states on `batch`."""
    layers = family.layers(model.base_model.model)
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(layers)
    mask = batch["attention_mask"].bool()

    def hook(index: int):
        def capture(_module: nn.Module, _inputs: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index] = hidden.detach().float()[mask].cpu()  # (N, d) real tokens

        return capture

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                logits_to_keep=1,
            )
    finally:
        for h in handles:
            h.remove()
    return per_token_cosine(torch.stack(outputs))

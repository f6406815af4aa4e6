"""Where each decoder family keeps its layers: one small adapter per family, no if-chains.

A `Family` answers the few questions the rest of the package asks about a model: the dotted
path of its decoder-layer list, the config attribute holding the layer count, the attributes
inside a layer that store its position (re-indexed when layers are dropped or fused), per-layer
config lists, and the default LoRA targets (all attention and MLP projections).
Families not listed fall back to `detect_family`, which finds the layer list by shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from devft.core.fusion import residual_scale
from devft.errors import ModelError


@dataclass(frozen=True)
class Family:
    name: str
    layers_path: str
    """Dotted path of the nn.ModuleList of decoder layers, e.g. "model.layers"."""
    num_layers_attr: str = "num_hidden_layers"
    layer_index_attrs: tuple[str, ...] = ("self_attn.layer_idx",)
    """Dotted attributes inside one layer that hold its index (KV-cache slot)."""
    per_layer_config: tuple[str, ...] = ("layer_types",)
    """Config lists with one entry per layer (sliced/reordered with the layers)."""
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    output_projections: tuple[str, ...] = ("o_proj", "down_proj")
    """Modules (last name, or a dotted suffix) that write a layer's blocks into the residual
    stream; scaled by the residual scale of a fused layer (core/fusion.residual_scale)."""

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_attr(model, self.layers_path)

    def output_scale(self, name: str, group_size: int, exponent: float) -> float:
        """The factor for layer-relative parameter `name` (e.g. "mlp.down_proj.weight") of a
        fused layer of `group_size` layers: the residual scale on output projections, else 1.
        ModelError if a scale is asked of a family whose output projections are unknown."""
        if exponent != 0.0 and not self.output_projections:
            raise ModelError(f"model type '{self.name}': its output projections are unknown, so "
                             "calibrate.residual_exponents must be [0.0]")
        module = "." + name.rsplit(".", 1)[0]
        if any(module.endswith("." + out) for out in self.output_projections):
            return residual_scale(group_size, exponent)
        return 1.0

    def lora_prefix(self) -> str:
        """Prefix of per-layer keys in a PEFT LoRA state dict of this family."""
        return f"base_model.model.{self.layers_path}."


_LLAMA_LIKE = Family("llama", "model.layers")

FAMILIES: dict[str, Family] = {
    **{
        t: _LLAMA_LIKE
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
        )
    },
    "phi3": Family(
        "phi3", "model.layers", target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    ),
    "gpt2": Family(
        "gpt2",
        "transformer.h",
        num_layers_attr="n_layer",
        layer_index_attrs=("attn.layer_idx",),
        target_modules=("c_attn", "c_proj", "c_fc"),
        output_projections=("c_proj",),
    ),
    "gpt_neox": Family(
        "gpt_neox",
        "gpt_neox.layers",
        layer_index_attrs=("attention.layer_idx",),
        target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        output_projections=("attention.dense", "dense_4h_to_h"),
    ),
}


_KNOWN_OUTPUTS = frozenset({"o_proj", "down_proj", "out_proj", "c_proj", "fc2", "dense_4h_to_h"})
"""Output-projection names that `detect_family` recognizes in an unregistered family."""


def get_attr(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(obj: object, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def family_of(model: PreTrainedModel) -> Family:
    """The family adapter of `model` (registered by model_type, else detected by shape)."""
    family = FAMILIES.get(model.config.model_type)
    return family if family is not None else detect_family(model)


def detect_family(model: PreTrainedModel) -> Family:
    """Generic adapter: the ModuleList whose length is the config's layer count.

    LoRA targets default to every nn.Linear inside the first layer.
    """
    num_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name:
            first = module[0]
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, m in first.named_modules() if isinstance(m, nn.Linear)}
            )
            index_attrs = tuple(
                f"{n}.layer_idx" for n, m in first.named_modules() if n and hasattr(m, "layer_idx")
            )
            return Family(
                model.config.model_type,
                name,
                layer_index_attrs=index_attrs,
                target_modules=tuple(linear),
                output_projections=tuple(n for n in linear if n in _KNOWN_OUTPUTS),
            )
    raise ModelError(
        f"model type '{model.config.model_type}' is not a supported decoder: no list of "
        f"{num_layers} decoder layers found; supported families: {', '.join(sorted(FAMILIES))}"
    )

"""The stage submodel as a real HF model with one decoder layer per group.

`stage_model` is the submodel of a base this process has loaded (the server's, and the
clients' of rules that change the base), built by the one stage builder
(`devft.models.stage_builder`) from the base's own tensors: embeddings, final norm, LM head and
every one-layer group's weights are the base's tensors (not copied) unless `model.quantization`
stores the layers' linear weights quantized; multi-layer groups get new, fused weights. The
config's layer count and per-layer config lists are the stage's, so forward, loss and
`generate` work as on any HF model. `build_submodel`, an independent path that deep-copies the
base's modules, is the reference the builder is tested against. Clients build their stage with
`devft.models.client_stage`, which never loads the whole base.
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from devft.config import LoraSettings
from devft.core.fusion import FusionVariant, fuse_group, fusion_coefficients
from devft.core.grouping import Groups
from devft.models.families import Family, get_attr, set_attr
from devft.models.loading import BaseModel
from devft.models.lora import attach_lora

UNFUSED: tuple[float, str, float] = (0.0, "differential", 0.0)
"""(β, fusion, residual) of a plan without multi-layer groups: every layer is its own."""


@dataclass(frozen=True)
class StagePlan:
    """What a client needs to build a stage's submodel (sent in every train message)."""

    stage: int
    groups: tuple[tuple[int, ...], ...]
    beta: float
    fusion: str = "differential"
    frozen: tuple[int, ...] = ()
    """Submodel layers whose LoRA is neither trained nor sent (an emulator; core/frozen.py)."""
    residual: float = 0.0
    """γ: fused layers' output projections are scaled by |g|^γ (core/fusion.residual_scale)."""

    @property
    def num_layers(self) -> int:
        return len(self.groups)

    def is_full(self, depth: int) -> bool:
        return self.groups == tuple((i,) for i in range(depth))

    @staticmethod
    def full(depth: int, stage: int = 0) -> StagePlan:
        return StagePlan(stage, tuple((i,) for i in range(depth)), 0.0)

    def transfer_for(self, variant: str, depth: int) -> str:
        """The transfer variant to use after this plan: the last (full, unfused) stage's LoRA
        *is* the full model's, whatever the ablation says about transfer between stages."""
        return "copy" if self.is_full(depth) else variant

    def group_lists(self) -> Groups:
        return [list(g) for g in self.groups]

    def fusion_key(self) -> tuple[float, str, float]:
        """(β, fusion, residual) that build this plan's layers; the identity for an unfused
        plan (its β and fusion change nothing), so equal submodels share one cache entry."""
        if any(len(g) > 1 for g in self.groups):
            return self.beta, self.fusion, self.residual
        return UNFUSED


def _shared_copy(module: nn.Module, shared: dict[int, object]) -> nn.Module:
    """Deep copy of the module structure whose tensors are the original's (not copied)."""
    return copy.deepcopy(module, memo=dict(shared))


def build_submodel(
    model: PreTrainedModel,
    family: Family,
    groups: Groups,
    beta: float,
    fusion: FusionVariant = "differential",
    residual: float = 0.0,
) -> PreTrainedModel:
    """An L_s-layer model: layer n is group n's fusion (or the layer itself if |g| = 1), its
    output projections scaled by |g|^residual."""
    layers = family.layers(model)
    config = sub_config(model.config, family, groups, len(layers))
    shared: dict[int, object] = {
        id(t): t for t in itertools.chain(model.parameters(), model.buffers())
    }
    # every module that holds the base config (the inner decoder reads its own `config` for
    # the layer count and per-layer attention types) gets the submodel's config instead
    shared[id(model.config)] = config
    new_layers = []
    for n, group in enumerate(groups):
        layer = _shared_copy(layers[group[0]], shared)
        if len(group) > 1:
            states = [dict(layers[i].named_parameters()) for i in group]
            fused = fuse_group(states, fusion_coefficients(len(group), beta, fusion))
            for name, tensor in fused.items():
                scale = family.output_scale(name, len(group), residual)
                if scale != 1.0:
                    tensor.mul_(scale)
                set_attr(layer, name, nn.Parameter(tensor, requires_grad=False))
        for attr in family.layer_index_attrs:
            set_attr(layer, attr, n)
        new_layers.append(layer)
    # copy everything but the layer list (temporarily detached so it is not copied)
    set_attr(model, family.layers_path, nn.ModuleList())
    try:
        sub = _shared_copy(model, shared)
    finally:
        set_attr(model, family.layers_path, layers)
    set_attr(sub, family.layers_path, nn.ModuleList(new_layers))
    sub.config = config
    sub.requires_grad_(False)
    return sub


def sub_config(
    base_config: PreTrainedConfig, family: Family, groups: Groups, depth: int
) -> PreTrainedConfig:
    """The base config with the submodel's layer count and per-layer lists (anchor's entry)."""
    config = copy.deepcopy(base_config)
    setattr(config, family.num_layers_attr, len(groups))
    for name in family.per_layer_config:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == depth:
            setattr(config, name, [values[g[0]] for g in groups])
    return config


def base_stage(base: BaseModel, groups: Groups, beta: float, fusion: FusionVariant,
               residual: float = 0.0, quantization: str = "none") -> PreTrainedModel:
    """The stage submodel of a loaded base, by the stage builder from the base's tensors."""
    from devft.models.stage_builder import build_stage, loaded_layout
    from devft.models.tensor_source import module_source

    dtype = base.model.get_input_embeddings().weight.dtype
    return build_stage(module_source(base.model, f"the loaded base {base.path}"),
                       loaded_layout(base.model, base.family, base.path), groups, beta, fusion,
                       dtype, base.device, residual, quantization)


@functools.lru_cache(maxsize=3)  # the server's full model, its current stage, one spare
def _cached_stage_model(
    base: BaseModel, groups: tuple, fusion_key: tuple, lora_key: tuple, quantization: str
) -> PeftModel:
    r, alpha, dropout, targets = lora_key
    settings = LoraSettings(r=r, alpha=alpha, dropout=dropout, target_modules=list(targets))
    beta, fusion, residual = fusion_key
    sub = base_stage(base, [list(g) for g in groups], beta, fusion, residual, quantization)
    return attach_lora(sub, settings, base.family)


def stage_model(base: BaseModel, plan: StagePlan, settings: LoraSettings,
                quantization: str = "none") -> PeftModel:
    """The LoRA-wrapped submodel of `plan` on `base`, built once per process and reused.

    Callers load the adapter they need with `set_lora_state` before each use.
    """
    lora_key = (settings.r, settings.alpha, settings.dropout, tuple(settings.target_modules))
    return _cached_stage_model(base, plan.groups, plan.fusion_key(), lora_key, quantization)


def invalidate_stage_models() -> None:
    """Forget cached submodels (after the base weights changed, e.g. a FLoRA merge)."""
    _cached_stage_model.cache_clear()


def layer_count(model: nn.Module, family: Family) -> int:
    return len(get_attr(model, family.layers_path))


def frozen_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the distinct frozen tensors a client holds for this model."""
    seen: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        if not p.requires_grad:
            seen.setdefault(p.data_ptr(), p)
    return sum(t.numel() * t.element_size() for t in seen.values())

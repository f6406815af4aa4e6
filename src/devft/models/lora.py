"""LoRA through `peft`: attach, seeded init, and get/set the adapter as a state dict.

The wire and storage format is PEFT's own state dict (`get_peft_model_state_dict` keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), in float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
)
from torch import nn
from transformers import PreTrainedModel

from devft.config import LoraSettings
from devft.core.initial_adapter import standard_lora_a
from devft.core.layerstate import StateDict
from devft.errors import ConfigError
from devft.models.families import Family


def target_modules(settings: LoraSettings, family: Family, model: nn.Module) -> list[str]:
    """The configured targets (or the family default), checked against the model's modules."""
    targets = list(settings.target_modules) or list(family.target_modules)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in present]
    if unknown:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in family.layers(model)[0].named_modules()
                if n and not list(m.children())
            }
        )
        raise ConfigError(
            "lora.target_modules", unknown, f"module names of this model, e.g. {', '.join(linear)}"
        )
    return targets


def peft_config(settings: LoraSettings, family: Family, model: nn.Module) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules(settings, family, model),
        task_type="CAUSAL_LM",
        bias="none",
    )


def attach_lora(model: PreTrainedModel, settings: LoraSettings, family: Family) -> PeftModel:
    """Wrap `model` (modified in place) with LoRA; base weights frozen."""
    cfg = peft_config(settings, family, model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, cfg)
    return peft_model


_KEY_TO_PARAM = "_devft_lora_key_to_param"


def _lora_parameters(model: PeftModel) -> dict[str, nn.Parameter]:
    """PEFT state-dict key -> the live adapter parameter it names.

    PEFT's key drops the adapter name (`...lora_A.weight` for the parameter
    `...lora_A.default.weight`). The key-to-name map is computed once per model (walking PEFT's
    state dict costs tens of ms per call on a 30-layer model); the parameters are looked up
    afresh on every call, so a replaced parameter is never stale.
    """
    names = getattr(model, _KEY_TO_PARAM, None)
    params = dict(model.named_parameters())
    if names is None or not all(n in params for n in names.values()):
        adapter = model.active_adapter
        names = {}
        for key in get_peft_model_state_dict(model):
            head, leaf = key.rsplit(".", 1)
            names[key] = f"{head}.{adapter}.{leaf}"
        if not all(n in params for n in names.values()):
            raise RuntimeError("PEFT adapter keys do not name this model's parameters")
        setattr(model, _KEY_TO_PARAM, names)
    return {key: params[name] for key, name in names.items()}


def get_lora_state(model: PeftModel) -> StateDict:
    """A detached float32 copy of the adapter tensors."""
    return {k: p.detach().float().cpu().clone() for k, p in _lora_parameters(model).items()}


def set_lora_state(model: PeftModel, state: StateDict) -> None:
    """Load adapter tensors; every key must exist in the model and every adapter tensor be set."""
    params = _lora_parameters(model)
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(
            f"LoRA state does not match the model: missing {missing[:3]}, "
            f"extra {extra[:3]} ({len(missing)} missing, {len(extra)} extra)"
        )
    with torch.no_grad():
        for key, param in params.items():
            value = state[key]
            if value.shape != param.shape:
                raise ValueError(f"LoRA tensor {key} has shape {tuple(value.shape)}, "
                                 f"the model's is {tuple(param.shape)}")
            param.copy_(value)


def set_trainable(model: PeftModel, trainable: Callable[[str], bool]) -> None:
    """requires_grad on each LoRA parameter by `trainable(name)` (e.g. only lora_B for FFA)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(trainable(name))


def seeded_lora_init(model: PeftModel, seed: int) -> StateDict:
    """PEFT's default init (A ~ kaiming-uniform(a=√5), B = 0) from a private seeded generator.

    Gives the same initial adapter for every method of a comparison, independent of the
    global torch RNG.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in get_lora_state(model).items():
        if ".lora_A." in key:
            state[key] = standard_lora_a(tuple(value.shape), gen)
        else:
            state[key] = torch.zeros_like(value)
    return state


def lora_parameter_count(state: StateDict) -> int:
    return sum(v.numel() for v in state.values())

"""Quantized base weights (`model.quantization`: none | nf4 | int8) through bitsandbytes.

What is quantized: every linear weight inside the decoder layers (nn.Linear, and GPT-2's
Conv1D, transposed to a linear first). Embeddings, norms and the LM head keep `model.dtype`;
LoRA weights and optimizer state stay in fp32 (peft's bitsandbytes layers add fp32 LoRA).
`devft.models.stage_builder` quantizes each linear weight right after it is read or fused in
full precision, so a stage never holds its layers' full-precision weights all at once. Fusion
is defined on full-precision weights: a fused layer is `quantize(fuse(layers))`.

A quantized weight travels (`model.ship_layers`) as plain tensors: `<name>` (the packed bytes)
plus its statistics under `<name>.<key>`, bitsandbytes' own state-dict keys.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from devft.config.sections import QUANTIZATIONS
from devft.errors import ConfigError, ModelError
from devft.library_logs import quiet_bitsandbytes

NF4_MARK = "quant_state.bitsandbytes__nf4"
"""The statistics key that marks a packed NF4 weight (bitsandbytes' state-dict name)."""
INT8_SCALES = "SCB"
"""The per-row scales of an int8 weight."""
NF4_BLOCK = 64
"""Weights per NF4 absmax block (bitsandbytes' default)."""


@functools.lru_cache(maxsize=1)
def _bnb() -> Any:
    quiet_bitsandbytes()
    import bitsandbytes

    return bitsandbytes


def require_bitsandbytes(quantization: str) -> None:
    """ConfigError (field, value, allowed) when `quantization` is unknown or needs
    bitsandbytes and it cannot be imported here."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError("model.quantization", quantization, f"one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return
    try:
        _bnb()
    except Exception as err:  # ImportError, or a broken native library
        raise ConfigError("model.quantization", quantization,
                          f"none: bitsandbytes cannot be imported here ({type(err).__name__}: "
                          f"{err}); install bitsandbytes==0.50.2") from None


def is_quantizable(module: nn.Module) -> bool:
    """A linear layer whose weight `quantize_weight` can take (nn.Linear or Conv1D)."""
    return type(module) in (nn.Linear, Conv1D)


def linear_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` of `module` as an (out, in) linear weight (Conv1D stores it transposed)."""
    return weight.t().contiguous() if isinstance(module, Conv1D) else weight


def quantize_weight(weight: torch.Tensor, quantization: str,
                    device: torch.device) -> nn.Parameter:
    """The (out, in) full-precision `weight` quantized on `device` (frozen)."""
    bnb = _bnb()
    if quantization == "nf4" and device.type == "cpu" and weight.shape[-1] % NF4_BLOCK:
        raise ModelError(
            f"model.quantization = 'nf4' on CPU needs linear layers whose input size is a "
            f"multiple of {NF4_BLOCK} (this model has {weight.shape[-1]}): bitsandbytes "
            "0.50.2's CPU kernel dequantizes other shapes wrongly; use int8 or none")
    if quantization == "nf4":
        param = bnb.nn.Params4bit(weight.detach(), requires_grad=False, quant_type="nf4")
        return param.to(device)  # quantizes (the full-precision copy is not kept)
    if quantization == "int8":
        return bnb.nn.Int8Params(weight.detach(), requires_grad=False,
                                 has_fp16_weights=False).to(device)
    raise ValueError(f"not a quantization: {quantization!r}")


def weight_parts(param: nn.Parameter, name: str) -> dict[str, torch.Tensor]:
    """The plain tensors that carry a quantized weight `name` (packed bytes + statistics)."""
    if hasattr(param, "quant_state"):
        stats = param.quant_state.as_dict(packed=True)
        return {name: param.data, **{f"{name}.{k}": v for k, v in stats.items()}}
    return {name: param.data, f"{name}.{INT8_SCALES}": param.SCB}


def packed_quantization(keys: Mapping[str, Any] | set[str], name: str) -> str | None:
    """nf4 / int8 when `keys` hold weight `name` already quantized, else None."""
    if f"{name}.{NF4_MARK}" in keys:
        return "nf4"
    if f"{name}.{INT8_SCALES}" in keys:
        return "int8"
    return None


def weight_from_parts(parts: Mapping[str, torch.Tensor], name: str, quantization: str,
                      device: torch.device) -> nn.Parameter:
    """The quantized weight `name` rebuilt from `weight_parts` (no requantization)."""
    bnb, data = _bnb(), parts[name]
    if quantization == "nf4":
        stats = {k[len(name) + 1:]: v for k, v in parts.items() if k.startswith(f"{name}.")}
        return bnb.nn.Params4bit.from_prequantized(data=data, quantized_stats=stats,
                                                   requires_grad=False, device=device)
    scales = parts[f"{name}.{INT8_SCALES}"].to(device)
    data = data.to(device)
    return bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data,
                             SCB=scales)


class _FrozenInt8Matmul(torch.autograd.Function):
    """An int8 linear with a frozen weight: bitsandbytes' own forward, and its own input
    gradient (the input-gradient formula of both its MatMul8bitFp and MatMul8bitLt), but
    nothing kept on the context. Both bitsandbytes functions keep their input there (outside
    save_for_backward), so every int8 linear held its input until the whole graph was freed,
    although a frozen weight's backward never reads it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        out = _bnb().nn.Linear8bitLt.forward(layer, x)  # grad mode is off here: no graph
        ctx.state, ctx.dtype_x, ctx.shape_x = layer.state, x.dtype, x.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        if grad_out.dim() == 3:
            grad_out = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        state = ctx.state
        weight = state.CB.to(ctx.dtype_x, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
        return torch.matmul(grad_out.to(ctx.dtype_x), weight).view(ctx.shape_x), None


@functools.lru_cache(maxsize=1)
def _int8_linear() -> type:
    """bitsandbytes' Linear8bitLt, training through `_FrozenInt8Matmul` while its weight and
    bias are frozen (made on first use: bitsandbytes is imported only where int8 is asked for)."""
    bnb = _bnb()

    class Int8Linear(bnb.nn.Linear8bitLt):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            frozen = not self.weight.requires_grad and (
                self.bias is None or not self.bias.requires_grad)
            if self.training and frozen and torch.is_grad_enabled():
                return _FrozenInt8Matmul.apply(x, self)
            return super().forward(x)

    return Int8Linear


def quantized_linear(module: nn.Module, weight: nn.Parameter, quantization: str,
                     compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes linear that replaces `module` (its bias left on the meta device for the
    caller to load), with the quantized `weight`."""
    bnb = _bnb()
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
    else:
        in_features, out_features = module.in_features, module.out_features
    bias = module.bias is not None
    if quantization == "nf4":
        new = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                quant_type="nf4", device="meta")
    else:
        new = _int8_linear()(in_features, out_features, bias=bias, has_fp16_weights=False,
                             device="meta")
    new.weight = weight
    # bitsandbytes repacks a 4-bit weight for AVX512-BF16 CPUs at its first no-grad eval
    # forward, after which training would backprop through a kernel without autograd, and eval
    # and training would compute differently: keep one layout and one kernel path
    new.support_avx512bf16_for_cpu = False
    return new


def mark_quantized(model: nn.Module, quantization: str) -> None:
    """Mark `model` as transformers marks a bitsandbytes-loaded model, so peft wraps its
    quantized linears with its bitsandbytes LoRA layers (as it does for a plain peft load)."""
    model.is_loaded_in_4bit = quantization == "nf4"
    model.is_loaded_in_8bit = quantization == "int8"


def is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (dequantized) weight of a linear layer, as the layer computes with it."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)
    if type(weight).__name__ == "Int8Params":
        return weight.CB.float() * weight.SCB.float().unsqueeze(1) / 127.0
    return weight.detach()


def tensor_bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes of the distinct tensors (parameters and buffers) `model` holds, per dtype,
    quantization statistics included."""
    seen: dict[int, torch.Tensor] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(id(tensor), tensor)
        state = getattr(tensor, "quant_state", None)
        for extra in _state_tensors(state) + [getattr(tensor, "SCB", None)]:
            if extra is not None:
                seen.setdefault(id(extra), extra)
    out: dict[str, int] = {}
    for tensor in seen.values():
        if not tensor.is_meta:
            key = str(tensor.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + tensor.numel() * tensor.element_size()
    return out


def _state_tensors(state: Any) -> list[torch.Tensor]:
    if state is None:
        return []
    out = [state.absmax, state.code]
    if getattr(state, "state2", None) is not None:
        out += [state.state2.absmax, state.state2.code]
    return out

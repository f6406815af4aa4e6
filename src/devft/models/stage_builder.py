"""Build a stage's submodel tensor by tensor from a `TensorSource`, never the whole base.

The submodel's skeleton is built from the stage's config with its parameters on the meta
device (accelerate's `init_empty_weights`; buffers such as rotary frequencies are real).
Each parameter is then filled from the source: embeddings, final norm and LM head by name;
layer n's tensors from group n's layers, fused with `devft.core.fusion`. A fused tensor is
accumulated one source layer at a time, so building needs about one tensor of extra memory
beyond the stage itself. The same code builds a client's stage from the base's safetensors
files, from a base already in memory, or from dense layers the server shipped.

With `model.quantization` (nf4, int8) each decoder-layer linear weight is quantized as soon as
it is read or fused (`devft.models.quantize`), before the next one is read: the stage never
holds its layers' full-precision weights all at once. A source that already holds a weight
quantized (layers the server shipped quantized) gives its packed bytes, used as they are.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from devft.core.fusion import FusionVariant, fuse_group, fusion_coefficients
from devft.core.grouping import Groups
from devft.errors import ModelError
from devft.models.families import FAMILIES, Family, family_of, get_attr, set_attr
from devft.models.quantize import (
    is_quantizable,
    linear_weight,
    mark_quantized,
    packed_quantization,
    quantize_weight,
    quantized_linear,
    require_bitsandbytes,
    weight_from_parts,
)
from devft.models.submodel import sub_config
from devft.models.tensor_source import SafetensorsSource, TensorSource, first_missing


def meta_model(config: PreTrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """A model of `config` whose parameters are on the meta device (no memory); a tied LM
    head is the embedding's parameter, as in a loaded model."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


@dataclass(frozen=True)
class BaseLayout:
    """What a client knows about the base without loading it: config, family, tensor names."""

    path: str
    config: PreTrainedConfig
    family: Family
    depth: int
    param_names: tuple[str, ...]
    """Distinct parameters of the full model, in module order (a tied head appears once)."""
    renamings: tuple[Any, ...] = ()
    """transformers' checkpoint-to-module renamings for this model (WeightRenaming)."""
    base_prefix: str | None = None
    """The model class's `base_model_prefix` (a checkpoint of the bare decoder lacks it)."""
    needs_conversion: bool = False
    """True when transformers also merges or splits checkpoint tensors at load time (e.g.
    Mixtral's per-expert weights): files and modules then differ in more than names."""

    def layer_prefix(self) -> str:
        return f"{self.family.layers_path}."

    def module_name(self, file_key: str) -> str:
        """The module's name for checkpoint tensor `file_key` (transformers' own rules)."""
        from transformers.core_model_loading import rename_source_key

        known = dict.fromkeys(self.param_names, True)
        return rename_source_key(file_key, list(self.renamings), [], self.base_prefix or None,
                                 known)[0]

    def open_files(self) -> SafetensorsSource:
        """The base's safetensors files, memory-mapped, checked against config.json."""
        source = SafetensorsSource(self.path, rename=self.module_name)
        check_source(source, self)
        return source


@functools.lru_cache(maxsize=4)
def base_layout(path: str) -> BaseLayout:
    """The layout of the model directory `path` (config.json only; no weights are read)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    config = AutoConfig.from_pretrained(path)
    meta = meta_model(config, torch.float32)
    family = FAMILIES.get(config.model_type) or family_of(meta)
    names = tuple(name for name, _ in meta.named_parameters())
    transforms = get_model_conversion_mapping(meta)
    return BaseLayout(path, config, family, len(family.layers(meta)), names,
                      tuple(t for t in transforms if isinstance(t, WeightRenaming)),
                      meta.base_model_prefix,
                      any(isinstance(t, WeightConverter) for t in transforms))


def loaded_layout(model: PreTrainedModel, family: Family, path: str) -> BaseLayout:
    """The layout of a base already loaded (its tensors carry the modules' names)."""
    return BaseLayout(path, model.config, family, len(family.layers(model)),
                      tuple(name for name, _ in model.named_parameters()))


def check_source(source: TensorSource, layout: BaseLayout) -> None:
    """Refuse files that do not match config.json, naming the first missing tensor."""
    missing = first_missing(source, layout.param_names)
    if missing is not None:
        raise ModelError(
            f"{source.name}: tensor {missing!r} is missing from the weights, which do not match "
            f"config.json ({layout.config.model_type}, {layout.depth} layers)")


class _LazyTensor(Mapping[str, torch.Tensor]):
    """A one-key state dict whose tensor is read when `fuse_group` asks for it."""

    def __init__(self, source: TensorSource, key: str, name: str, dtype: torch.dtype) -> None:
        self.source, self.key, self.name, self.dtype = source, key, name, dtype
        self._last: weakref.ref[torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name != self.name:
            raise KeyError(name)
        tensor = self._last() if self._last is not None else None
        if tensor is None:  # not kept: a tensor is read again only if nobody holds it
            tensor = self.source.get(self.key, self.dtype)
            self._last = weakref.ref(tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter((self.name,))

    def __len__(self) -> int:
        return 1


def stage_tensor(source: TensorSource, layout: BaseLayout, name: str, groups: Groups,
                 beta: float, fusion: FusionVariant, dtype: torch.dtype,
                 residual: float = 0.0) -> torch.Tensor:
    """Submodel tensor `name`: group n's fusion for layer n's tensors (output projections
    scaled by |g|^residual), else the base's own."""
    prefix = layout.layer_prefix()
    if not name.startswith(prefix):
        return source.get(name, dtype)
    index, rest = name[len(prefix):].split(".", 1)
    group = groups[int(index)]
    keys = [f"{prefix}{i}.{rest}" for i in group]
    if len(group) == 1:
        return source.get(keys[0], dtype)
    states = [_LazyTensor(source, key, rest, dtype) for key in keys]
    fused = fuse_group(states, fusion_coefficients(len(group), beta, fusion))[rest]
    scale = layout.family.output_scale(rest, len(group), residual)
    return fused.mul_(scale) if scale != 1.0 else fused


def stage_names(layout: BaseLayout, num_layers: int) -> list[str]:
    """The submodel's distinct parameter names, in order (layers renumbered 0..n-1)."""
    prefix, out = layout.layer_prefix(), []
    for name in layout.param_names:
        if not name.startswith(prefix):
            out.append(name)
        elif name.startswith(f"{prefix}0."):
            out.extend(f"{prefix}{n}.{name[len(prefix) + 2:]}" for n in range(num_layers))
    return out


def quantized_modules(model: torch.nn.Module, layout: BaseLayout,
                      quantization: str) -> dict[str, str]:
    """Weight name -> module path of the decoder layers' linears that `quantization` stores
    quantized (none: no module)."""
    if quantization == "none":
        return {}
    prefix = layout.layer_prefix()
    return {f"{path}.weight": path for path, module in model.named_modules()
            if path.startswith(prefix) and is_quantizable(module)}


def quantized_stage_weight(source: TensorSource, keys: set[str], layout: BaseLayout,
                           module: torch.nn.Module, name: str, groups: Groups, beta: float,
                           fusion: FusionVariant, dtype: torch.dtype, residual: float,
                           quantization: str, device: torch.device) -> torch.nn.Parameter:
    """Linear weight `name` of the stage, quantized: fused (or read) in full precision, then
    quantized; or, when `source` holds it already quantized, rebuilt from its packed parts."""
    packed = packed_quantization(keys, name)
    if packed is None:
        dense = stage_tensor(source, layout, name, groups, beta, fusion, dtype, residual)
        return quantize_weight(linear_weight(module, dense), quantization, device)
    if packed != quantization:
        raise ModelError(f"{source.name}: weight {name!r} is stored {packed}, not "
                         f"model.quantization = {quantization!r}")
    parts = {k: source.get(k, torch.float32) for k in keys if k == name or
             k.startswith(f"{name}.")}  # statistics stay fp32, packed bytes are integers
    return weight_from_parts(parts, name, quantization, device)


def build_stage(source: TensorSource, layout: BaseLayout, groups: Groups, beta: float,
                fusion: FusionVariant, dtype: torch.dtype, device: torch.device,
                residual: float = 0.0, quantization: str = "none") -> PreTrainedModel:
    """The frozen len(groups)-layer submodel, its tensors read (and fused) from `source`;
    its decoder layers' linear weights stored as `quantization` says (see module docstring)."""
    require_bitsandbytes(quantization)
    config = sub_config(layout.config, layout.family, groups, layout.depth)
    sub = meta_model(config, dtype)
    linears = quantized_modules(sub, layout, quantization)
    keys = set(source.keys()) if linears else set()
    state = {}
    for name in [name for name, _ in sub.named_parameters()]:
        if name in linears:  # replaced by its quantized module; its bias is loaded below
            path = linears[name]
            module = get_attr(sub, path)
            weight = quantized_stage_weight(source, keys, layout, module, name, groups, beta,
                                            fusion, dtype, residual, quantization, device)
            set_attr(sub, path, quantized_linear(module, weight, quantization, dtype))
            continue
        state[name] = stage_tensor(source, layout, name, groups, beta, fusion, dtype,
                                   residual).to(device)
    try:
        sub.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise ModelError(f"{source.name}: its tensors do not fit config.json: {err}") from None
    del state
    sub.tie_weights()
    on_meta = next((n for n, p in sub.named_parameters() if p.is_meta), None)
    if on_meta is not None:
        raise ModelError(f"{source.name}: no tensor for the submodel's parameter {on_meta!r}")
    sub.to(device)  # buffers (rotary frequencies, embedding scales); parameters are there
    sub.requires_grad_(False)
    if linears:
        mark_quantized(sub, quantization)
    return sub.eval()

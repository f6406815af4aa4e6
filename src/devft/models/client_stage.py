"""A stage client's model: only its stage, one stage at a time, the same code in every runtime.

`client_stage_model` builds the LoRA-wrapped submodel of a stage plan with
`devft.models.stage_builder` (the builder the server uses too), from one of three sources:
- the base model's safetensors files, memory-mapped (a SuperNode's or Ray worker's process,
  which never loads the whole base);
- the base this process already holds (the in-process grid, whose server loaded it): the
  same builder, sharing the base's tensors instead of reading the files again;
- the dense layers the server shipped (`federation.ship_layers`, for devices without the
  base's weights; quantized when `model.quantization` is).
With `model.quantization` the builder quantizes the stage's decoder linear weights one by one
as it reads or fuses them; no caller here branches on it.
The process holds one stage: building another first releases the previous stage's model, its
LoRA and everything that referenced them (the optimizer lives only inside a round).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from devft.config import LoraSettings, ModelConfig
from devft.models.loading import (
    DTYPES,
    load_base_model,
    load_tokenizer,
    loaded_base_model,
    local_model_dir,
    resolve_device,
)
from devft.models.lora import attach_lora
from devft.models.stage_builder import (
    BaseLayout,
    base_layout,
    build_stage,
)
from devft.models.submodel import UNFUSED, StagePlan
from devft.models.tensor_source import TensorSource, module_source

log = logging.getLogger(__name__)


class StageHolder:
    """At most one stage model per process; a new key releases the old model first."""

    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.model: PeftModel | None = None

    def get(self, key: Hashable, build: Callable[[], PeftModel]) -> PeftModel:
        if key != self.key or self.model is None:
            self.release()
            self.model = build()
            self.key = key
        return self.model

    def release(self) -> None:
        """Drop the held stage and collect it (its tensors are freed if nothing else holds
        them)."""
        self.key = self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


HOLDER = StageHolder()


def client_layout(cfg: ModelConfig) -> BaseLayout:
    """The base's config, family and tensor names, from its directory (no weights read)."""
    return base_layout(str(local_model_dir(cfg.path)))


def client_tokenizer(cfg: ModelConfig) -> Any:
    return load_tokenizer(str(local_model_dir(cfg.path)))


TOKENIZER_FILE_MARKS = ("token", "vocab", "merges", "chat_template", "spiece", ".model")
"""A model directory's files that define its tokenizer (by name)."""


@functools.lru_cache(maxsize=4)
def _digest_of(directory: str) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and any(m in path.name for m in TOKENIZER_FILE_MARKS):
            h.update(path.name.encode() + b"\0")
            with path.open("rb") as f:  # in chunks: Gemma 3's tokenizer.json is 33 MB
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            h.update(b"\0")
    return h.hexdigest()


def tokenizer_digest(cfg: ModelConfig) -> str:
    """SHA-256 of the model's tokenizer files, without loading the tokenizer (a shard's
    token ids are used only by clients whose tokenizer files are the ones it was cut with)."""
    return _digest_of(str(local_model_dir(cfg.path)))


def _base_source(cfg: ModelConfig, layout: BaseLayout) -> tuple[Callable[[], TensorSource],
                                                                 Hashable]:
    """(opener, key) of the base's tensors: the base this process holds (the in-process grid)
    or must load (a family whose files transformers converts at load, e.g. Mixtral's
    per-expert tensors: memory then does not follow the stage), else the memory-mapped files
    (checked against config.json)."""
    shared = loaded_base_model(cfg)
    if shared is None and layout.needs_conversion:
        shared = load_base_model(cfg)
        log.warning("%s: transformers converts this family's checkpoint tensors at load time; "
                    "the client builds its stage from the fully loaded base", shared.path)
    if shared is not None:
        return lambda: module_source(shared.model, f"the loaded base {shared.path}"), id(shared)
    return layout.open_files, "files"


def _build(cfg: ModelConfig, layout: BaseLayout, source: TensorSource, groups: list[list[int]],
           fusion: tuple[float, str, float]) -> Any:
    """The stage builder with `cfg`'s dtype, device and quantization."""
    beta, variant, residual = fusion
    return build_stage(source, layout, groups, beta, variant, DTYPES[cfg.dtype],  # type: ignore[arg-type]
                       resolve_device(cfg.device), residual, cfg.quantization)


def client_stage_model(cfg: ModelConfig, plan: StagePlan, settings: LoraSettings,
                       shipped: tuple[TensorSource, Hashable] | None = None) -> PeftModel:
    """The LoRA-wrapped submodel of `plan`, held until the next stage (see module docstring).

    `shipped`: (source, key) of dense layers the server sent, already fused, named as the
    submodel's; `key` identifies their stage. Callers load the adapter they need with
    `set_lora_state` before each use.
    """
    layout = client_layout(cfg)
    if shipped is not None:  # the shipped layers are the stage's, already fused
        source, source_key = shipped
        open_source: Callable[[], TensorSource] = lambda: source  # noqa: E731
        groups, fusion = [[n] for n in range(plan.num_layers)], UNFUSED
    else:
        open_source, source_key = _base_source(cfg, layout)
        groups, fusion = plan.group_lists(), plan.fusion_key()
    lora_key = (settings.r, settings.alpha, settings.dropout, tuple(settings.target_modules))
    key = ("stage", layout.path, cfg.dtype, cfg.quantization, str(resolve_device(cfg.device)),
           plan.groups, plan.fusion_key(), lora_key, source_key)

    def build() -> PeftModel:
        sub = _build(cfg, layout, open_source(), groups, fusion)
        return attach_lora(sub, settings, layout.family)

    return HOLDER.get(key, build)


def built_base_model(cfg: ModelConfig) -> Any:
    """The whole base, no LoRA, built like a full-model stage: from its memory-mapped files
    with `cfg.quantization` (a quantized base never holds its full-precision layers)."""
    layout = client_layout(cfg)
    open_source, _ = _base_source(cfg, layout)
    return _build(cfg, layout, open_source(), [[n] for n in range(layout.depth)], UNFUSED)


def set_gradient_checkpointing(model: PeftModel, enabled: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant, so the
    inputs need no gradient), or stop doing so."""
    inner = model.base_model.model
    if enabled and not inner.is_activation_checkpointing:
        inner.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    elif not enabled and inner.is_activation_checkpointing:
        inner.activation_checkpointing_disable()

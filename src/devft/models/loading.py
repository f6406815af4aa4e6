"""Load a base decoder model and its tokenizer: bundled name, local directory or hub id.

Models are cached per process (one frozen copy shared by the server and every in-process
client); submodels share its tensors (see `devft.models.submodel`).
"""

from __future__ import annotations

import copy
import functools
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from devft.config import ModelConfig
from devft.errors import ConfigError, ModelError
from devft.models.bundled import BUNDLED, bundled_model_dir
from devft.models.families import Family, family_of

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(eq=False)  # hashed by identity: caches key on the model object
class BaseModel:
    """A frozen base model with what the rest of the package needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: Family
    path: str
    device: torch.device
    merged: set[int] = field(default_factory=set)
    """Ids of LoRA stacks merged into these weights in this process (FLoRA's ledger)."""

    @property
    def num_layers(self) -> int:
        return len(self.family.layers(self.model))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device", device, "cpu or auto (no CUDA device is available)")
    return torch.device(device)


def resolve_model_path(path: str) -> str:
    """A local directory for bundled names and directories; hub ids are returned unchanged."""
    if path in BUNDLED:
        return str(bundled_model_dir(path))
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError("model.path", path, "a directory with a Hugging Face config.json")
        return str(local)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ConfigError(
            "model.path",
            path,
            f"a bundled model ({', '.join(BUNDLED)}), an existing local directory, "
            "or a hub id like org/name",
        )
    return path


def check_model_config(path: str) -> AutoConfig:
    """Load only the model's config (cheap), with a clear error if it cannot be found."""
    resolved = resolve_model_path(path)
    try:
        return AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise ConfigError(
            "model.path", path, f"a model that can be loaded (loading its config failed: {err})"
        ) from None


@functools.lru_cache(maxsize=4)
def load_tokenizer(resolved: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer (pad = eos when it has no pad token), once per process."""
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_LOADED: weakref.WeakValueDictionary[tuple[str, str, str], BaseModel] = (
    weakref.WeakValueDictionary())


@functools.lru_cache(maxsize=2)
def _load(resolved: str, dtype: str, device: str) -> BaseModel:
    tokenizer = load_tokenizer(resolved)
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=DTYPES[dtype])
    model.to(device).eval()
    model.requires_grad_(False)
    base = BaseModel(model, tokenizer, family_of(model), resolved, torch.device(device))
    _LOADED[(resolved, dtype, device)] = base
    return base


def loaded_base_model(cfg: ModelConfig) -> BaseModel | None:
    """The base of `cfg` if this process has already loaded it (never loads it)."""
    key = (resolve_model_path(cfg.path), cfg.dtype, str(resolve_device(cfg.device)))
    return _LOADED.get(key)


def local_model_dir(path: str) -> Path:
    """A local directory holding the model's files (a hub id: its config, tokenizer and
    safetensors files fetched into the hub cache, never pickled weights)."""
    resolved = resolve_model_path(path)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors",
                                                                 "*.model", "*.txt"]))
    except Exception as err:  # network, auth or a missing repo: one clear message
        raise ModelError(f"model.path = {path!r} could not be fetched: {err}") from None


def load_base_model(cfg: ModelConfig) -> BaseModel:
    """The frozen base model of `cfg`, loaded once per process."""
    resolved = resolve_model_path(cfg.path)
    device = resolve_device(cfg.device)
    try:
        return _load(resolved, cfg.dtype, str(device))
    except (OSError, ValueError) as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"model.path = {cfg.path!r} could not be loaded: {err}") from None


_PRIVATE: dict[str, BaseModel] = {}


def private_base_model(cfg: ModelConfig, key: str) -> BaseModel:
    """A per-run copy of the base model (for rules that change the base, e.g. FLoRA's merges).

    Every caller in this process with the same `key` (the run) gets the same copy, so the
    server and in-process clients share one merged model; other runs keep the pristine one.
    """
    if key not in _PRIVATE:
        shared = load_base_model(cfg)
        _PRIVATE[key] = BaseModel(copy.deepcopy(shared.model), shared.tokenizer, shared.family,
                                  shared.path, shared.device)
    return _PRIVATE[key]


def release_private_base(key: str) -> None:
    _PRIVATE.pop(key, None)

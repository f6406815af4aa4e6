"""Where a client's frozen tensors come from, one tensor at a time.

- `SafetensorsSource`: the base model's safetensors files (one file, or the shards of
  `model.safetensors.index.json`), opened memory-mapped with `safetensors.safe_open`. Only
  the tensors asked for are read. Each read opens its own mapping, so a tensor that is dropped
  (a fused group's source layers) leaves the process's resident memory with it; a tensor that
  is kept in its stored dtype stays a zero-copy, file-backed view.
- `MemorySource`: tensors already in memory: the base model this process loaded (the
  in-process grid shares it with the server), or the dense layers the server shipped.

Pickled weights (`*.bin`) are refused, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from devft.errors import ModelError

INDEX_FILE = "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


class TensorSource(Protocol):
    """Named tensors a stage can be built from."""

    name: str
    """Where the tensors are (for error messages)."""

    def keys(self) -> Iterable[str]: ...

    def get(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `key`; floating-point tensors cast to `dtype`."""
        ...


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a model directory.

    Raises ModelError for a directory with only pickled weights, none at all, or an index that
    names a missing shard.
    """
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = {name: directory / shard for name, shard in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if absent:
            raise ModelError(f"{directory}: {INDEX_FILE} names shard {absent[0]}, which is not "
                             "in the directory")
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for pattern in PICKLED for p in directory.glob(pattern))
        if pickled:
            raise ModelError(
                f"{directory} holds only pickled weights ({', '.join(pickled[:3])}): safetensors "
                "is required (devft's clients never unpickle a file); convert the model once "
                "with save_pretrained(..., safe_serialization=True) where you trust it")
        raise ModelError(f"{directory} holds no model weights: safetensors files are required")
    files: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), shard))
    return files


class SafetensorsSource:
    """The tensors of a model directory's safetensors files, read memory-mapped on demand."""

    def __init__(self, directory: str | Path,
                 rename: Callable[[str], str] | None = None) -> None:
        """`rename`: checkpoint tensor name -> the module's name for it (transformers' own
        renamings, e.g. GPT-NeoX's `embed_out` -> `lm_head`); identity by default."""
        self.directory = Path(directory)
        self.name = str(self.directory)
        rename = rename or (lambda key: key)
        self.files = {rename(key): (path, key) for key, path in
                      weight_files(self.directory).items()}

    def keys(self) -> Iterable[str]:
        return self.files.keys()

    def get(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        if key not in self.files:
            raise ModelError(f"{self.name}: tensor {key!r} is not in its safetensors files")
        path, stored = self.files[key]
        # a mapping per read: when the returned tensor is freed, its pages leave the process
        with safe_open(str(path), framework="pt") as handle:
            tensor = handle.get_tensor(stored)
        return _cast(tensor, dtype)


class MemorySource:
    """Tensors already in memory (returned as they are when their dtype already matches)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str) -> None:
        self.tensors, self.name = tensors, name

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def get(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        if key not in self.tensors:
            raise ModelError(f"{self.name}: tensor {key!r} is missing")
        return _cast(self.tensors[key], dtype)


def module_source(model: torch.nn.Module, name: str) -> MemorySource:
    """A loaded model's own tensors (parameters and persistent buffers), shared, not copied."""
    return MemorySource(model.state_dict(keep_vars=False), name)


def first_missing(source: TensorSource, needed: Iterable[str]) -> str | None:
    """The first of `needed` (in order) that `source` lacks, or None."""
    present = set(source.keys())
    return next((key for key in needed if key not in present), None)

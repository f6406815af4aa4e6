"""Checkpoints after every round: safetensors + JSON only (loading never executes code).

Layout under the run directory:
    checkpoints/round-00007/state.json        counters, stage plan, recorder, RNG, config
    checkpoints/round-00007/<group>.safetensors   global LoRA, the rule's server tensors,
                                                  and (in process) each client's state
    checkpoints/latest.json                   {"dir": "round-00007"}, replaced atomically
A round directory is complete before `latest.json` points to it, so a kill -9 at any moment
leaves the previous checkpoint valid.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from devft.core.layerstate import StateDict
from devft.errors import DevFTError, RunFileError
from devft.files import atomic_write_json, fsync_dir, fsync_file, read_json_object

CHECKPOINTS = "checkpoints"
_STATE_KEYS = ("tensor_files", "round", "stage", "stage_round", "plan", "rule", "recorder",
               "rng", "config")


@dataclass
class Checkpoint:
    state: dict[str, Any]
    tensors: dict[str, StateDict] = field(default_factory=dict)
    """Named tensor groups, e.g. "global-lora", "rule.global", "client.1001.fedsa-B"."""


def save_checkpoint(out_dir: Path, round_: int, ckpt: Checkpoint) -> Path:
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_:05d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index = {}
    for i, (group, tensors) in enumerate(ckpt.tensors.items()):
        file = f"t{i:03d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / file))
        fsync_file(tmp / file)
        index[group] = file
    atomic_write_json(tmp / "state.json", {**ckpt.state, "tensor_files": index}, indent=1)
    fsync_dir(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_json(root / "latest.json", {"dir": name}, indent=1)
    for old in root.iterdir():  # keep only the latest round
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """The latest checkpoint of a run directory, with a clear error naming a bad file."""
    root = out_dir / CHECKPOINTS
    if not (root / "latest.json").is_file():
        raise DevFTError(f"--resume {out_dir}: no checkpoint found ({root / 'latest.json'}); "
                         "expected a run directory written by `devft run`")
    try:
        latest = str(read_json_object(root / "latest.json", ("dir",))["dir"])
        state = read_json_object(root / latest / "state.json", _STATE_KEYS)
        tensors = {group: _load_tensors(root / latest / file)
                   for group, file in state.pop("tensor_files").items()}
    except RunFileError as err:
        raise DevFTError(f"--resume {out_dir}: {err}") from None
    return Checkpoint(state, tensors)


def _load_tensors(path: Path) -> StateDict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RunFileError(f"{path} is unreadable ({err})") from None


def rng_state() -> tuple[dict[str, Any], StateDict]:
    """Global RNG states (our own sampling is derived from (seed, round), but third-party
    code may draw from the global generators)."""
    np_state = np.random.get_state()
    meta = {"numpy": [np_state[0], np_state[2], np_state[3], np_state[4]]}
    return meta, {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(
        np_state[1].astype(np.int64))}


def set_rng_state(meta: dict[str, Any], tensors: StateDict) -> None:
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))

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

import json
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
from devft.errors import DevFTError

CHECKPOINTS = "checkpoints"


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
        index[group] = file
    _write_json(tmp / "state.json", {**ckpt.state, "tensor_files": index})
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_json(root / "latest.json", {"dir": name})
    for old in root.iterdir():  # keep only the latest round
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """The latest checkpoint of a run directory, with a clear error if there is none."""
    root = out_dir / CHECKPOINTS
    try:
        latest = json.loads((root / "latest.json").read_text())["dir"]
        state = json.loads((root / latest / "state.json").read_text())
        tensors = {group: load_file(str(root / latest / file))
                   for group, file in state.pop("tensor_files").items()}
    except FileNotFoundError as err:
        raise DevFTError(f"--resume {out_dir}: no checkpoint found ({err.filename}); "
                         "expected a run directory written by `devft run`") from None
    except (json.JSONDecodeError, KeyError, SafetensorError, OSError) as err:
        raise DevFTError(f"--resume {out_dir}: the checkpoint is unreadable ({err})") from None
    return Checkpoint(state, tensors)


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


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

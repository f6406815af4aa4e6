"""Whether a copied run directory holds a finished run's outputs: a summary.json, and the adapter
it recorded, whole. `devft fetch` runs this on what arrived before it keeps any of it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devft.errors import RunFileError
from devft.files import file_digests

ADAPTER, SUMMARY, METRICS = "adapter", "summary.json", "metrics.jsonl"
ADAPTER_CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class RunCheck:
    """A finished run's summary, what was checked, and its adapter's base model."""

    summary: dict[str, Any]
    verdict: str
    base: str
    base_missing: bool
    """The base is a path that exists neither here nor as the run config's model.path."""


def check_run(run: Path, label: str) -> RunCheck:
    """Check the run directory `run` (named `label` in messages, e.g. coord:/srv/runs/lab-1);
    a RunFileError, one line, says what is missing or damaged."""
    summary = _summary(run, label)
    adapter = run / ADAPTER
    if not (adapter / ADAPTER_CONFIG).is_file():
        what = "adapter/adapter_config.json" if adapter.is_dir() else "adapter/"
        raise RunFileError(f"{label} has summary.json but not {what}: the copy is incomplete, "
                           "or the run's adapter was removed; fetch again")
    config = _json_object(adapter / ADAPTER_CONFIG, f"{label}/{ADAPTER}/{ADAPTER_CONFIG}")
    if not (adapter / WEIGHTS).is_file():
        raise RunFileError(f"{label}/{ADAPTER}/ has no {WEIGHTS}: the copy is incomplete, or "
                           "the adapter was not saved by devft (safetensors only)")
    recorded = summary.get("adapter_sha256")
    if isinstance(recorded, dict) and recorded:
        verdict = _check_digests(adapter, recorded, label)
    else:
        for path in sorted(adapter.glob("*.safetensors")):
            if problem := safetensors_problem(path):
                raise RunFileError(f"{label}/{ADAPTER}/{path.name} is damaged: {problem}; "
                                   "fetch again")
        verdict = (f"adapter/ complete ({ADAPTER_CONFIG} parses, weights whole); this "
                   "summary.json predates adapter digests, so that the adapter is this run's "
                   "is not checked")
    base = str(config.get("base_model_name_or_path") or "")
    return RunCheck(summary, verdict, base or "(not named)", _base_missing(base, run))


def _summary(run: Path, label: str) -> dict[str, Any]:
    if not (run / SUMMARY).is_file():
        if (run / METRICS).is_file():
            rounds = _last_round(run / METRICS)
            raise RunFileError(f"{label} has not finished: summary.json is written at the end "
                               f"(metrics.jsonl reaches round {rounds}); fetch again once "
                               "`flwr log` shows \"finished\"")
        raise RunFileError(f"{label} holds no run outputs (no summary.json, metrics.jsonl or "
                           "adapter/): SOURCE must be the run's output.dir")
    summary = _json_object(run / SUMMARY, f"{label}/{SUMMARY}")
    missing = [k for k in ("method", "rounds", "final_eval_loss") if k not in summary]
    if missing:
        raise RunFileError(f"{label}/{SUMMARY} lacks {', '.join(missing)}: it is not a devft "
                           "run's summary")
    return summary


def _json_object(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFileError(f"{label} is unreadable (truncated or not JSON: {err}); fetch "
                           "again") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{label} is not a JSON object, so devft did not write it")
    return data


def _last_round(metrics: Path) -> int | str:
    rounds = []
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            rounds.append(int(json.loads(line)["round"]))
        except (ValueError, KeyError, TypeError):
            continue
    return max(rounds) if rounds else "none yet"


def _check_digests(adapter: Path, recorded: dict[str, Any], label: str) -> str:
    """Every file summary.json recorded arrived, with the same SHA-256."""
    here = file_digests(adapter)
    for name, digest in sorted(recorded.items()):
        if name not in here:
            raise RunFileError(f"{label}/{ADAPTER}/{name} did not arrive (summary.json lists "
                               "it): the copy is incomplete; fetch again")
        if here[name] != digest:
            raise RunFileError(f"{label}/{ADAPTER}/{name} is not the file summary.json recorded "
                               "(its SHA-256 differs): the copy is damaged or the adapter was "
                               "rewritten after the run; fetch again")
    return (f"adapter/ complete: its {len(recorded)} files have the SHA-256 that summary.json "
            "recorded")


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (a header that is cut or not JSON, or fewer or more
    bytes than its header's tensors span), or None."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a header"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"its header needs {8 + length} bytes, the file has {size}"
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items()
                       if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "its header is not a safetensors header"
    if 8 + length + end != size:
        return f"its tensors span {8 + length + end} bytes, the file has {size}"
    return None


def _base_missing(base: str, run: Path) -> bool:
    """As `devft generate` resolves the base (devft.evaluation.adapters): a bundled name or hub
    id is found by name; a path must exist here, else the run config's model.path is used."""
    def usable(name: str) -> bool:
        return bool(name) and (not name.startswith(("/", ".", "~"))
                               or Path(name).expanduser().exists())

    if usable(base):
        return False
    try:
        model = json.loads((run / "config.json").read_text())["model"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        model = ""
    return not usable(str(model))

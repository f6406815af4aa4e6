"""One validated run config: YAML file + `key=value` overrides + Flower's flat run_config.

Every section is a dataclass whose `__post_init__` checks its own values and raises
`ConfigError(field, value, allowed)`. Checks that need the model (stage sizes against the
model's depth, target modules) happen in `devft.run.prepare`, still before any training.
This module imports no torch, so the CLI can reject bad input fast.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from devft.config.budgets import parse_levers
from devft.config.groups import parse_client_groups
from devft.config.method_sections import (
    AdaptiveConfig,
    C2AConfig,
    CalibrateConfig,
    DoFITConfig,
    OffsiteConfig,
    StopConfig,
)
from devft.config.sections import (
    DataConfig,
    DevFTConfig,
    FederationConfig,
    LoraSettings,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    _check,
    _parse_number,
)
from devft.errors import ConfigError
from devft.methods import METHOD_NAMES, get_method

__all__ = [
    "AdaptiveConfig", "C2AConfig", "CalibrateConfig", "DataConfig", "DevFTConfig",
    "DoFITConfig", "FederationConfig", "LoraSettings", "ModelConfig", "OffsiteConfig",
    "OutputConfig", "RunConfig", "StopConfig", "TrainConfig", "from_dict", "from_run_config",
    "load_config",
]


@dataclass
class RunConfig:
    method: str = "devft"
    """Federated method (`devft.methods.METHODS`; `devft methods` lists them)."""
    seed: int = 0
    """Seeds the LoRA init, partitions, client sampling, batches (unless train.batch_seed is
    set), dropout and k-means."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    devft: DevFTConfig = field(default_factory=DevFTConfig)
    dofit: DoFITConfig = field(default_factory=DoFITConfig)
    c2a: C2AConfig = field(default_factory=C2AConfig)
    offsite: OffsiteConfig = field(default_factory=OffsiteConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        _check(
            self.method in METHOD_NAMES, "method", self.method, f"one of {', '.join(METHOD_NAMES)}"
        )
        _check_across_sections(self)

    # ---- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> RunConfig:
        """A copy with dotted-key overrides, e.g. replace(**{"output.dir": "x"})."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return from_dict(data)

    def to_run_config(self) -> dict[str, str]:
        """Flower's flat `context.run_config` form."""
        return {"config-json": json.dumps(self.to_dict())}


def _check_across_sections(cfg: RunConfig) -> None:
    """Constraints between fields of different sections (each section checks its own)."""
    fed, method = cfg.federation, get_method(cfg.method)
    _check(len(cfg.lora.client_ranks) <= fed.num_clients, "lora.client_ranks",
           cfg.lora.client_ranks, f"at most federation.num_clients={fed.num_clients} ranks "
           "(one per client, cycled)")
    _check(cfg.model.quantization == "none" or method.aggregation != "flora",
           "model.quantization", cfg.model.quantization,
           f"none for method {cfg.method}: FLoRA merges its clients' LoRA into the base weights, "
           "which a quantized base cannot take without requantizing them every round")
    if method.aggregation == "dofit":
        _check(cfg.dofit.domains <= fed.num_clients, "dofit.domains", cfg.dofit.domains,
               f"at most federation.num_clients={fed.num_clients} (a domain needs a client)")
    stages, rounds = cfg.devft.stages, cfg.devft.rounds_per_stage
    if method.staged and stages and len(rounds) > 1:
        _check(len(rounds) == len(stages), "devft.rounds_per_stage", rounds,
               f"one number, or one per stage of devft.stages ({len(stages)} stages)")
    groups = parse_client_groups(cfg.data.client_groups)
    _check(len(groups) in (0, fed.num_clients), "data.client_groups", cfg.data.client_groups,
           f"one group per client: {fed.num_clients} ids (federation.num_clients="
           f"{fed.num_clients}), e.g. tiers like 4x0,4x1 for 8 clients")
    _check_budgets(cfg, method)
    if fed.client_gpus != "auto" and float(fed.client_gpus) > 0:
        _check(fed.runtime == "simulation", "federation.client_gpus", fed.client_gpus,
               "auto or 0 unless federation.runtime=simulation (only Ray shares GPUs)")
        _check(cfg.model.device != "cpu", "federation.client_gpus", fed.client_gpus,
               "auto or 0 with model.device=cpu (the clients would not use the GPUs)")


def _check_budgets(cfg: RunConfig, method: Any) -> None:
    """Per-client budgets: shrinking needs FedAvg replies of real or fused layers only."""
    fed = cfg.federation
    if not fed.has_budgets:
        return
    levers = parse_levers(fed.budget_levers)
    _check("quantize" not in levers or method.aggregation != "flora", "federation.budget_levers",
           fed.budget_levers, f"levers without quantize for method {cfg.method}: FLoRA merges "
           "into the base, which cannot be quantized")
    if not fed.shrinks:
        return
    why = ("its rule does not aggregate with FedAvg" if method.aggregation != "fedavg" else
           "its emulator layers are frozen" if method.recipe == "offsite" or
           method.adapter != "all" else
           "model.ship_layers ships whole stages" if cfg.model.ship_layers else None)
    _check(why is None, "federation.budget_policy", fed.budget_policy,
           f"exclude for method {cfg.method} ({why}); or drop shrink from "
           "federation.budget_levers")


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (unknown keys are errors)."""
    return _build(RunConfig, data, "")


def from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """Read Flower's flat run_config: `config-json`, or `config-file`, plus dotted overrides.

    Keys set to "" are declared-but-unset (Flower only lets `--run-config` override keys the
    app's pyproject declares) and are ignored. A relative `config-file` is looked up in the
    working directory, then in the app's own folder (first on sys.path in Flower's apps).
    """
    data: dict[str, Any] = {}
    if run_config.get("config-json", "") != "":
        data = json.loads(str(run_config["config-json"]))
    elif run_config.get("config-file", "") != "":
        data = _read_yaml(_find_config_file(str(run_config["config-file"])))
    for key, value in run_config.items():
        if key not in ("config-json", "config-file") and value != "":
            _set_dotted(data, key.replace("-", "_"), value)
    return from_dict(data)


def _find_config_file(name: str) -> Path:
    path = Path(name)
    if path.is_absolute() or path.is_file():
        return path
    for root in sys.path:
        candidate = Path(root or ".") / name
        if candidate.is_file():
            return candidate
    return path  # _read_yaml reports it missing


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (None = all defaults) and apply `key=value` overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", item, "key=value, e.g. federation.num_clients=8")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("--config", str(path), "an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("--config", str(path), f"valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "a YAML mapping of sections")
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, value, f"'{part}' is a value, not a section")
        node = child
    node[leaf] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Recursively build dataclass `cls` from `data`, coercing and checking each field."""
    name = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(name, data, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            prefix + unknown[0], data[unknown[0]], f"a known key of '{name}': {', '.join(fields)}"
        )
    kwargs = {key: _coerce(hints[key], value, prefix + key) for key, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        _check(value in allowed, key, value, f"one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        _check(isinstance(value, list), key, value, f"a list of {item_tp.__name__}")
        return [_coerce(item_tp, v, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"union field types are not supported in config: {key}")
    if tp is bool:
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, str):  # items of a comma list ("4,8,16"), string run_config values
            value = _parse_number(value, int, value)
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "3e-4" as a string, not a float
            value = _parse_number(value, float, value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, value, "a number")
        return float(value)
    if tp is str:
        _check(
            isinstance(value, (str, int, float)) and not isinstance(value, bool),
            key,
            value,
            "a string",
        )
        return str(value)
    raise TypeError(f"unsupported config field type {tp} for {key}")

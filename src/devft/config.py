"""One validated run config: YAML file + `key=value` overrides + Flower's flat run_config.

Every section is a dataclass whose `__post_init__` checks its own values and raises
`ConfigError(field, value, allowed)`. Checks that need the model (stage sizes against the
model's depth, target modules) happen in `devft.run.prepare`, still before any training.
This module imports no torch, so the CLI can reject bad input fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from devft.core.stopping import StopConfig
from devft.errors import ConfigError
from devft.methods import METHOD_NAMES, get_method


def _check(cond: bool, field_name: str, value: object, allowed: str) -> None:
    if not cond:
        raise ConfigError(field_name, value, allowed)


@dataclass
class ModelConfig:
    path: str = "smollm2-135m-instruct"
    """Bundled model name, local directory of a HF model, or a hub id (org/name)."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage dtype of the frozen base weights."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    ship_layers: bool = False
    """For clients that do not store the base's weights: the server sends each stage's fused
    dense layers once per stage, and the embeddings, final norm and head once per run (counted
    in bytes_down). Off: clients build their stage from their own copy of the base."""


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; empty = all attention and MLP projections of the model family."""
    client_ranks: list[int] = field(default_factory=list)
    """Per-client ranks (cycled over clients) for HetLoRA and FLoRA; each at most r.
    Empty: FLoRA uses r for everyone, HetLoRA cycles r/4, r/2, 3r/4, r."""

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", self.r, "a positive integer")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "a positive number")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a number in [0, 1)")
        _check(all(0 < k <= self.r for k in self.client_ranks), "lora.client_ranks",
               self.client_ranks, f"ranks between 1 and lora.r={self.r}")


@dataclass
class DataConfig:
    name: str = "tasks"
    """Bundled data set (tasks, sharegpt) or a path to a .json/.jsonl file of
    instruction/input/output records (optional category)."""
    max_seq_len: int = 256
    heldout_fraction: float = 0.1
    """Share of each category's rows kept out of training for held-out evaluation."""
    eval_examples: int = 48
    """Held-out examples the server scores every round (stratified over categories)."""
    eval_batch_size: int = 16
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet split over categories (smaller = more skewed)."""

    def __post_init__(self) -> None:
        _check(self.max_seq_len >= 16, "data.max_seq_len", self.max_seq_len, "an integer >= 16")
        _check(
            0.0 < self.heldout_fraction < 1.0,
            "data.heldout_fraction",
            self.heldout_fraction,
            "a number in (0, 1)",
        )
        _check(
            self.eval_examples > 0, "data.eval_examples", self.eval_examples, "a positive integer"
        )
        _check(
            self.eval_batch_size > 0,
            "data.eval_batch_size",
            self.eval_batch_size,
            "a positive integer",
        )
        _check(
            self.dirichlet_alpha > 0,
            "data.dirichlet_alpha",
            self.dirichlet_alpha,
            "a positive number",
        )


@dataclass
class FederationConfig:
    num_clients: int = 4
    clients_per_round: int = 0
    """Clients sampled each round; 0 = all."""
    rounds: int = 12
    """Total rounds; DevFT splits them over its stages unless devft.rounds_per_stage is set."""
    min_replies: int = 1
    """Valid client replies a round needs to update the global model; fewer = round skipped."""
    timeout_s: float = 3600.0
    """Seconds the server waits for a round's replies; a later reply counts as a failure."""
    max_update_norm: float = 1000.0
    """Replies whose tensors' total L2 norm exceeds this are rejected as implausible."""
    max_client_share: float = 1.0
    """FedAvg: most share of the average one client's weight (its partition size) may take;
    larger shares are clipped and the excess spread over the others (1 = no clip; a claim
    above the largest known partition is rejected either way)."""
    runtime: Literal["inprocess", "simulation"] = "inprocess"
    """inprocess: Flower Grid that calls the ClientApp directly (fast default);
    simulation: Flower's Ray simulation runtime."""
    max_skipped_rounds: int = 3
    """Consecutive rounds with fewer than min_replies valid replies after which the run stops
    (exit code 3); its last checkpoint stays for `devft run --resume`."""
    client_gpus: str = "auto"
    """GPUs Ray gives each simulated client (runtime=simulation): a number (fractions up to 1,
    whole numbers above), or auto = an even share of the visible GPUs over the clients of a
    round (0 without GPUs)."""

    def __post_init__(self) -> None:
        _check(
            self.num_clients >= 1, "federation.num_clients", self.num_clients, "a positive integer"
        )
        _check(
            0 <= self.clients_per_round <= self.num_clients,
            "federation.clients_per_round",
            self.clients_per_round,
            f"0 (all) up to federation.num_clients={self.num_clients}",
        )
        _check(self.rounds >= 1, "federation.rounds", self.rounds, "a positive integer")
        per_round = self.clients_per_round or self.num_clients
        _check(1 <= self.min_replies <= per_round, "federation.min_replies", self.min_replies,
               f"1 up to the clients sampled per round ({per_round}: federation.clients_per_round"
               f"={self.clients_per_round}, 0 = all {self.num_clients})")
        _check(self.max_skipped_rounds >= 1, "federation.max_skipped_rounds",
               self.max_skipped_rounds, "a positive integer")
        _check(self.client_gpus == "auto" or _gpu_count_ok(self.client_gpus),
               "federation.client_gpus", self.client_gpus,
               "auto, a fraction in [0, 1], or a whole number of GPUs")
        _check(self.timeout_s > 0, "federation.timeout_s", self.timeout_s, "a positive number")
        _check(self.max_update_norm > 0, "federation.max_update_norm", self.max_update_norm,
               "a positive number")
        _check(0 < self.max_client_share <= 1, "federation.max_client_share",
               self.max_client_share, "a number in (0, 1]")


def _gpu_count_ok(text: str) -> bool:
    number = _parse_number(text, float, None)
    return number is not None and number >= 0 and (number <= 1 or number.is_integer())


@dataclass
class TrainConfig:
    local_steps: int = 3
    """Optimizer steps each client runs per round."""
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 = torch.autocast to bfloat16 (LoRA weights stay fp32). fp32 by default: on CPUs
    without AVX-512 BF16 (e.g. this AVX2 machine) bf16 matmuls are ~6x slower than fp32."""
    threads: int = 0
    """torch intra-op threads; 0 = leave torch's default."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations during backward instead of keeping them:
    less client memory for about one more forward pass of compute (every method)."""

    def __post_init__(self) -> None:
        _check(self.local_steps >= 1, "train.local_steps", self.local_steps, "a positive integer")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "a positive integer")
        _check(self.lr > 0, "train.lr", self.lr, "a positive number")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _check(
            self.max_grad_norm >= 0,
            "train.max_grad_norm",
            self.max_grad_norm,
            "a number >= 0 (0 disables clipping)",
        )
        _check(self.threads >= 0, "train.threads", self.threads, "an integer >= 0")


@dataclass
class DevFTConfig:
    stages: list[int] = field(default_factory=list)
    """Layer count of each stage, strictly increasing and ending at the model's depth;
    empty = num_stages stages doubling up to the depth (30 layers: 4, 8, 15, 30)."""
    num_stages: int = 4
    rounds_per_stage: list[int] = field(default_factory=list)
    """Rounds of each stage (one number = every stage); empty = federation.rounds split evenly."""
    beta: float = 0.1
    """Fusion weight of the differences to the anchor layer (paper: 0.1 for 7B/8B)."""
    similarity: Literal["hidden", "weights"] = "hidden"
    """hidden: cosine of layers' output hidden states on a calibration batch;
    weights: cosine of layers' flattened effective weights (base + LoRA), as the paper writes."""
    laplacian: Literal["normalized", "unnormalized"] = "normalized"
    """normalized: symmetric Laplacian, row-normalized eigenvectors (Ng-Jordan-Weiss);
    unnormalized: D - W, as the paper writes."""
    calibration_examples: int = 8
    """Held-out examples the server runs through the model for `hidden` similarity."""
    boundary_layers: int = 1
    """devft-boundary: the first and last n layers are singleton groups in every stage."""

    def __post_init__(self) -> None:
        _check(self.num_stages >= 1, "devft.num_stages", self.num_stages, "a positive integer")
        _check(0.0 <= self.beta <= 1.0, "devft.beta", self.beta, "a number in [0, 1]")
        _check(
            all(s >= 1 for s in self.stages), "devft.stages", self.stages, "positive layer counts"
        )
        _check(
            all(b > a for a, b in zip(self.stages, self.stages[1:])),
            "devft.stages",
            self.stages,
            "strictly increasing layer counts ending at the model's depth",
        )
        _check(
            all(r >= 1 for r in self.rounds_per_stage),
            "devft.rounds_per_stage",
            self.rounds_per_stage,
            "positive integers",
        )
        _check(
            self.calibration_examples >= 1,
            "devft.calibration_examples",
            self.calibration_examples,
            "a positive integer",
        )
        _check(self.boundary_layers >= 0, "devft.boundary_layers", self.boundary_layers,
               "an integer >= 0")


@dataclass
class DoFITConfig:
    domains: int = 2
    """Pseudo-domains the clients are split into (our reading for one data pool)."""
    topk: int = 15
    """Tensors per domain considered important (the official code's hard-coded 15)."""
    scale: float = 1.0
    """Proximal perturbation scale s."""

    def __post_init__(self) -> None:
        _check(self.domains >= 1, "dofit.domains", self.domains, "a positive integer")
        _check(self.topk >= 1, "dofit.topk", self.topk, "a positive integer")
        _check(self.scale >= 0, "dofit.scale", self.scale, "a number >= 0")


@dataclass
class C2AConfig:
    embed_dim: int = 8
    """Size t of the client/layer/module embeddings fed to the hypernetwork."""
    hidden_dim: int = 32
    """Width c of the factorized generator (L @ H)."""

    def __post_init__(self) -> None:
        _check(self.embed_dim >= 1, "c2a.embed_dim", self.embed_dim, "a positive integer")
        _check(self.hidden_dim >= 1, "c2a.hidden_dim", self.hidden_dim, "a positive integer")


@dataclass
class OffsiteConfig:
    """Offsite-tuning (`offsite`, `devft+offsite`): real adapter layers around an emulator."""

    k_bottom: int = 1
    """First layers trained as the bottom adapter (the full model's own)."""
    k_top: int = 1
    """Last layers trained as the top adapter."""
    emulator_fraction: float = 0.5
    """`offsite`: share of the middle layers the emulator keeps, evenly spaced (0.5 = every
    other layer, Offsite-tuning's default)."""
    emulator_layers: int = 0
    """`offsite`: middle layers the emulator keeps; 0 = use emulator_fraction."""

    def __post_init__(self) -> None:
        _check(self.k_bottom >= 0, "offsite.k_bottom", self.k_bottom, "an integer >= 0")
        _check(self.k_top >= 0, "offsite.k_top", self.k_top, "an integer >= 0")
        _check(self.k_bottom + self.k_top >= 1, "offsite.k_top", self.k_top,
               "at least one adapter layer in all (offsite.k_bottom + offsite.k_top >= 1)")
        _check(0.0 <= self.emulator_fraction <= 1.0, "offsite.emulator_fraction",
               self.emulator_fraction, "a number in [0, 1]")
        _check(self.emulator_layers >= 0, "offsite.emulator_layers", self.emulator_layers,
               "an integer >= 0 (0 = use offsite.emulator_fraction)")


@dataclass
class AdaptiveConfig:
    """`devft-adaptive`: a stage ends when its submodel's calibration loss stops improving."""

    window: int = 2
    """Rounds over which the improvement is measured."""
    threshold: float = 0.01
    """Advance when the calibration loss fell by less than this (nats) over the window."""
    min_rounds: int = 1
    """Rounds every stage runs at least."""
    max_rounds: int = 0
    """Rounds a stage runs at most; 0 = no cap but the budget (federation.rounds)."""

    def __post_init__(self) -> None:
        _check(self.window >= 1, "adaptive.window", self.window, "a positive integer")
        _check(self.threshold >= 0, "adaptive.threshold", self.threshold, "a number >= 0")
        _check(self.min_rounds >= 1, "adaptive.min_rounds", self.min_rounds,
               "a positive integer")
        _check(self.max_rounds == 0 or self.max_rounds >= self.min_rounds,
               "adaptive.max_rounds", self.max_rounds,
               f"0 (no cap) or at least adaptive.min_rounds={self.min_rounds}")


@dataclass
class CalibrateConfig:
    """`devft-calibrated`: the server picks β per stage on its calibration rows."""

    betas: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])
    """Candidate β values (each in [0, 1]; a β a group's size clamps is clamped per group)."""

    def __post_init__(self) -> None:
        _check(bool(self.betas) and all(0.0 <= b <= 1.0 for b in self.betas),
               "calibrate.betas", self.betas, "a non-empty list of numbers in [0, 1]")


@dataclass
class OutputConfig:
    dir: str = "runs/latest"
    progress: bool = True
    """Show progress bars on rounds and local steps."""
    resume: bool = False
    """Continue the run in `dir` from its last checkpoint (set by `devft run --resume DIR`)."""


@dataclass
class RunConfig:
    method: str = "devft"
    """Federated method; see `devft.methods.METHOD_NAMES`."""
    seed: int = 0
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
    if method.aggregation == "dofit":
        _check(cfg.dofit.domains <= fed.num_clients, "dofit.domains", cfg.dofit.domains,
               f"at most federation.num_clients={fed.num_clients} (a domain needs a client)")
    stages, rounds = cfg.devft.stages, cfg.devft.rounds_per_stage
    if method.staged and stages and len(rounds) > 1:
        _check(len(rounds) == len(stages), "devft.rounds_per_stage", rounds,
               f"one number, or one per stage of devft.stages ({len(stages)} stages)")
    if fed.client_gpus != "auto" and float(fed.client_gpus) > 0:
        _check(fed.runtime == "simulation", "federation.client_gpus", fed.client_gpus,
               "auto or 0 unless federation.runtime=simulation (only Ray shares GPUs)")
        _check(cfg.model.device != "cpu", "federation.client_gpus", fed.client_gpus,
               "auto or 0 with model.device=cpu (the clients would not use the GPUs)")


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


def _parse_number(text: str, tp: type, default: Any) -> Any:
    """`tp(text)` for a finite number written as text, else `default` (left to the type check)."""
    try:
        number = tp(text.strip())
    except ValueError:
        return default
    return number if math.isfinite(number) else default


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

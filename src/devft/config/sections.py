"""The run config's general sections: model, LoRA, data, federation, training, DevFT, output.

Each section is a dataclass whose `__post_init__` checks its own values and raises
`ConfigError(field, value, allowed)`. No torch here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from devft.config.budgets import parse_budgets, parse_levers
from devft.config.groups import parse_client_groups
from devft.errors import ConfigError


def _check(cond: bool, field_name: str, value: object, allowed: str) -> None:
    if not cond:
        raise ConfigError(field_name, value, allowed)


QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")
"""model.quantization's values (bitsandbytes storage of the decoder layers' linear weights)."""


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
    quantization: Literal["none", "nf4", "int8"] = "none"
    """Storage of the decoder layers' linear weights (bitsandbytes): none = model.dtype; nf4 =
    4-bit NormalFloat (QLoRA's), int8 = 8-bit rows. Quantized layer by layer as a stage is
    built, after fusion in full precision; embeddings, norms and LM head keep model.dtype,
    LoRA and optimizer state fp32. Not with flora (it merges into the base weights)."""

    def __post_init__(self) -> None:
        _check(self.quantization in QUANTIZATIONS, "model.quantization", self.quantization,
               f"one of {', '.join(QUANTIZATIONS)}")
        if self.quantization != "none":  # found, not imported: this module imports no torch
            import importlib.util

            _check(importlib.util.find_spec("bitsandbytes") is not None, "model.quantization",
                   self.quantization, "none unless bitsandbytes is installed (pip install "
                   "bitsandbytes==0.50.2)")


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input during training."""
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
    """Tokens per example; a longer prompt is cut from the left, the response is kept."""
    heldout_fraction: float = 0.1
    """Share of each category's rows kept out of training for held-out evaluation."""
    eval_examples: int = 48
    """Held-out examples the server scores every round (stratified over categories)."""
    eval_batch_size: int = 16
    """Batch size of the server's held-out evaluation (memory only; the loss is the same)."""
    partition: Literal["iid", "dirichlet", "groups"] = "iid"
    """How the training rows are split over clients: iid, or dirichlet = non-IID over the
    rows' category (flwr-datasets partitioners), or groups = by task group (client_groups)."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet split over categories (smaller = more skewed)."""
    client_groups: str = ""
    """partition=groups: each client's group, one id per client (0,0,1,1) or tiers (4x0,4x1).
    The sorted categories are cut into G contiguous near-equal groups (G = the number of
    client groups); group g's clients split its categories' training rows IID; held-out rows
    stay per category."""

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
        groups = parse_client_groups(self.client_groups)
        _check(bool(groups) or self.partition != "groups", "data.client_groups",
               self.client_groups, "one group per client (e.g. 4x0,4x1) with "
               "data.partition=groups")
        _check(not groups or self.partition == "groups", "data.client_groups",
               self.client_groups, "empty unless data.partition=groups")


@dataclass
class FederationConfig:
    num_clients: int = 4
    """Clients (data partitions) in the federation."""
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
    client_memory_mb: str = ""
    """Per-client memory budgets, MiB of the whole client process's peak (VmHWM, floor
    included; 0 = no limit): empty = none; one number for all; a comma list, one per client;
    tiers like 4x0,4x900; or node = each SuperNode's memory-mb node config
    (docs/memory-budgets.md)."""
    budget_levers: str = "quantize,checkpoint,shrink"
    """What a client over its budget may use, in order: quantize (nf4 base weights),
    checkpoint (gradient checkpointing), shrink (a shallower submodel); or none."""
    budget_policy: Literal["shrink", "exclude"] = "shrink"
    """shrink: a client trains the deepest submodel that fits (up to its round's depth);
    exclude: a client whose round's submodel does not fit sits the round out."""
    shrink_recipe: Literal["spectral", "layerdrop", "prefix", "random"] = "spectral"
    """A shrunken client's layers, among its round's: spectral (DevFT's groups at its depth,
    fused), layerdrop (evenly spaced), prefix (the first d), random (drawn per client and
    round)."""

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
        parse_budgets(self.client_memory_mb, self.num_clients)
        parse_levers(self.budget_levers)

    @property
    def has_budgets(self) -> bool:
        """Whether any client may have a memory budget (`node`: each node says)."""
        budgets = parse_budgets(self.client_memory_mb, self.num_clients)
        return budgets is None or any(b > 0 for b in budgets)

    @property
    def shrinks(self) -> bool:
        """Whether a client over its budget may train a shallower submodel."""
        return (self.has_budgets and self.budget_policy == "shrink"
                and "shrink" in parse_levers(self.budget_levers))


def _parse_number(text: str, tp: type, default: Any) -> Any:
    """`tp(text)` for a finite number written as text, else `default` (left to the type check)."""
    try:
        number = tp(text.strip())
    except ValueError:
        return default
    return number if math.isfinite(number) else default


def _gpu_count_ok(text: str) -> bool:
    number = _parse_number(text, float, None)
    return number is not None and number >= 0 and (number <= 1 or number.is_integer())


@dataclass
class TrainConfig:
    local_steps: int = 3
    """Optimizer steps each client runs per round."""
    batch_size: int = 4
    """Examples per local step."""
    lr: float = 3e-4
    """AdamW learning rate (the optimizer starts fresh every round)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 = torch.autocast to bfloat16 (LoRA weights stay fp32). fp32 by default: on CPUs
    without AVX-512 BF16 instructions a bf16 matmul measured ~6x slower than fp32 (113 ms
    against 19 ms on an AVX2 CPU). Use bf16 on GPUs and CPUs with AVX-512 BF16."""
    threads: int = 0
    """torch intra-op threads; 0 = leave torch's default."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations during backward instead of keeping them:
    less client memory for about one more forward pass of compute (every method)."""
    batch_seed: int = -1
    """Seed of the clients' batch draws only; -1 = the run's `seed`. Another value gives a
    replicate of a run: the same initial LoRA, partitions and schedule, other batches."""
    release_memory: bool = True
    """glibc: fix malloc's mmap threshold at 128 KiB in client processes, so freed activations
    go back to the OS instead of staying in a fragmented heap (devft.training.allocator)."""

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
        _check(self.batch_seed >= -1, "train.batch_seed", self.batch_seed,
               "an integer >= 0, or -1 for the run's seed")


@dataclass
class DevFTConfig:
    stages: list[int] = field(default_factory=list)
    """Layer count of each stage, strictly increasing and ending at the model's depth;
    empty = num_stages stages doubling up to the depth (30 layers: 4, 8, 15, 30)."""
    num_stages: int = 4
    """Stages when devft.stages is empty."""
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
class OutputConfig:
    dir: str = "runs/latest"
    """Output directory (set by --out)."""
    progress: bool = True
    """Show progress bars on rounds and local steps."""
    resume: bool = False
    """Continue the run in `dir` from its last checkpoint (set by `devft run --resume DIR`;
    with `flwr run`, resubmit the run's config with `output.resume=true`)."""

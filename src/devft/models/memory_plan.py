"""Predict a client process's peak memory (VmHWM) for a d-layer stage, before building it.

A client's peak is the sum of five parts (`PeakParts`), in bytes:

- **floor**: the process before it builds anything: VmRSS at the client's first round, after
  its imports and its data partition (`client_floor_bytes`), or `NOMINAL_FLOOR_BYTES` where
  the client's own process is not measured (a server-side check, the in-process grid).
- **weights**: the stage's frozen tensors, counted on a meta-device model of the config:
  embeddings, final norm and untied head once, plus d x one decoder layer (every layer of a
  stage has one layer's shapes, fused layers too), in `model.dtype`; with nf4 / int8 the
  layers' linear weights as bitsandbytes packs them (packed bytes + statistics).
- **lora_state**: 4 fp32 copies of the LoRA parameters of d layers (parameter, gradient and
  AdamW's two moments).
- **activations**: the peak of the tensors autograd saves for backward (and of those custom
  autograd Functions keep on their contexts), measured on tiny probe models of the same config
  (`devft.models.memory_probes`) and extrapolated to d layers and the real vocabulary.
- **overhead**: what the saved tensors miss, three fitted terms:
  `LOGITS_IN_FLIGHT` x the fp32 logits (response tokens x vocabulary x 4 bytes: the logits
  and their gradients alive beside the saved ones), `LAYER_OVERHEAD` x d x one decoder
  layer's fp32 bytes (allocator and module overhead per layer; the same with nf4), and
  `RUNTIME_FIXED` + `RUNTIME_PER_VOCAB` x vocabulary (the tokenizer, loaded after the floor,
  and the runtime's own transient allocations).

Where the constants come from: least squares on the residual peak - floor - weights -
lora_state - activations of every measured stage-client row of docs/bench/client_memory.json
(SmolLM2-135M and Gemma 3 270M, fp32, 3-30 layers, 1x64 and 4x192, checkpointing off/on) and
docs/bench/quantized_memory.json (the same with nf4), each over its file's floor (VmHWM after
the client's imports and data libraries), activations from the probes (which reproduce those
files' saved-tensor counts to the byte), responses half of every row as in that data. The
fit is `benchmarks/memory_plan_check.py --fit` (66 rows; residual sd 6 MiB, all within
17 MiB; Offsite-tuning's rows are left out, see there); the values below are the fit rounded
up. With two models, the two vocabulary terms are set by two per-model constants: a model
with another vocabulary is extrapolated.

The planner assumes a CPU client (its memory is the process's RSS) and the worst batch of a
round: every row `seq` tokens, `response_fraction` of each a response (1.0: the bound for any
data; on the benchmark's half-response rows it predicts 1.02-1.43x the peak, 0.5 gives
1.00-1.08x: docs/bench/memory_plan_check.json). The probes run in the calling process, a few
seconds once per (quantization, checkpointing); their transient peak (measured: at most
150 MiB above the floor, SmolLM2 at 4x192) stays below a stage's training peak. Not modelled:
a layer recomputed under checkpointing where the logits are small next to one layer's
activations (absent from the measured models), and frozen LoRA (Offsite's emulator), whose
peak is overpredicted (up to 1.15x).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from devft.config import LoraSettings, ModelConfig
from devft.models.client_stage import client_layout
from devft.models.loading import DTYPES
from devft.models.lora import target_modules
from devft.models.memory_probes import ActivationFit, probe_activations, response_tokens
from devft.models.quantize import NF4_BLOCK, is_quantizable, require_bitsandbytes
from devft.models.stage_builder import BaseLayout, meta_model
from devft.training.accounting import rss_bytes

MIB = 2**20
NOMINAL_FLOOR_BYTES = 638_382_080
"""609 MiB: VmHWM of a fresh process after a client's imports (torch, transformers, flwr,
peft with bitsandbytes, devft's client, datasets and flwr-datasets), no model; the minimum of
3 runs in docs/bench/quantized_memory.json. Without bitsandbytes installed it was 553 MiB
(580014080, docs/bench/client_memory.json); a Ray worker's floor is higher."""
LOGITS_IN_FLIGHT = 2.0
"""x the fp32 logits (response tokens x vocabulary x 4): the logits and their gradients,
alive but not saved for backward (fitted: 1.957)."""
LAYER_OVERHEAD = 0.13
"""x d x one decoder layer's fp32 bytes, with or without nf4 (fitted: 0.129)."""
RUNTIME_FIXED = 16 * MIB
"""Bytes above the floor that no tensor explains, at a vocabulary of 0 (fitted: 1.2 MiB;
raised to cover the fit's largest under-prediction, 17 MiB)."""
RUNTIME_PER_VOCAB = 1200
"""Bytes above the floor per vocabulary entry (fitted: 1199): the tokenizer, which a client
loads after its floor is read (SmolLM2's 49152 entries: 56 MiB; loading it measured 58 MiB
of VmHWM, quantized_memory.json's breakdown). A client whose shard holds token ids never
loads it."""
_FLOOR: list[int] = []


def client_floor_bytes() -> int:
    """The process floor: VmRSS at the first call in this process, then that same value (a
    process keeps its built stage between rounds, so a later reading would count it twice).
    Call it before the client builds anything, after it has loaded its data."""
    if not _FLOOR:
        _FLOOR.append(rss_bytes())
    return _FLOOR[0]


@dataclass(frozen=True)
class PeakParts:
    """A predicted process peak, in bytes, by part (module docstring)."""

    floor: int
    weights: int
    lora_state: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.floor + self.weights + self.lora_state + self.activations + self.overhead

    def as_dict(self) -> dict[str, int]:
        return asdict(self) | {"total": self.total}


def quantized_weight_bytes(numel: int, out_features: int, quantization: str) -> int:
    """Bytes of one linear weight of `numel` entries stored as bitsandbytes stores it (packed
    bytes + statistics, as `devft.models.quantize.tensor_bytes_by_dtype` counts them)."""
    if quantization == "nf4":  # 4-bit pairs, uint8 absmax per block (double quantization),
        blocks = math.ceil(numel / NF4_BLOCK)  # its fp32 absmax per 256 blocks, two codes
        return (numel + 1) // 2 + blocks + 4 * (math.ceil(blocks / 256) + 16 + 256)
    if quantization == "int8":  # int8 rows + one fp32 scale per output row
        return numel + 4 * out_features
    raise ValueError(f"not a quantization: {quantization!r}")


def _out_features(module: nn.Module) -> int:
    weight = module.weight
    return int(weight.shape[1] if isinstance(module, Conv1D) else weight.shape[0])


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def _lora_count(module: nn.Module, r: int) -> int:
    if isinstance(module, nn.Linear):
        return r * (module.in_features + module.out_features)
    if isinstance(module, Conv1D):
        return r * sum(module.weight.shape)
    if isinstance(module, nn.Embedding):
        return r * (module.num_embeddings + module.embedding_dim)
    return 0


class MemoryPlanner:
    """Peak memory of a client training a d-layer stage of `model` with `lora` at batch x seq.

    `response_fraction`: the share of each row's tokens that are response (its logits are
    computed); 1.0 is the bound for any data."""

    def __init__(self, model: ModelConfig, lora: LoraSettings, batch: int, seq: int,
                 precision: str, response_fraction: float = 1.0) -> None:
        if batch < 1 or seq < 2:
            raise ValueError(f"a batch of at least 1 x 2 tokens, not {batch} x {seq}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
        if not 0.0 < response_fraction <= 1.0:
            raise ValueError(f"response_fraction must be in (0, 1], not {response_fraction}")
        self.layout: BaseLayout = client_layout(model)
        self.lora, self.batch, self.seq, self.precision = lora, batch, seq, precision
        self.response_fraction = response_fraction
        self.dtype = DTYPES[model.dtype]
        meta = meta_model(self.layout.config, self.dtype)
        head = meta.get_output_embeddings()  # the logits' width (None: tied, no head module)
        self.vocab = int(head.out_features if isinstance(head, nn.Linear)
                         else meta.get_input_embeddings().num_embeddings)
        layer = self.layout.family.layers(meta)[0]
        self._shared = _tensor_bytes(self._non_layer(meta))
        self._layer = {q: self._layer_bytes(layer, q) for q in ("none", "nf4", "int8")}
        self._layer_fp32 = 4 * sum(p.numel() for p in layer.parameters())
        self._lora_shared, self._lora_layer = self._lora_counts(meta, layer)
        self._fits: dict[tuple[str, bool], ActivationFit] = {}

    def _non_layer(self, meta: nn.Module) -> list[torch.Tensor]:
        layers = self.layout.family.layers(meta)
        inside = {id(t) for t in list(layers.parameters()) + list(layers.buffers())}
        return [t for t in list(meta.parameters()) + list(meta.buffers()) if id(t) not in inside]

    @staticmethod
    def _layer_bytes(layer: nn.Module, quantization: str) -> int:
        total, seen = 0, set()
        for module in layer.modules():
            for name, t in list(module.named_parameters(recurse=False)) + list(
                    module.named_buffers(recurse=False)):
                if id(t) in seen:
                    continue
                seen.add(id(t))
                if quantization != "none" and name == "weight" and is_quantizable(module):
                    total += quantized_weight_bytes(t.numel(), _out_features(module),
                                                    quantization)
                else:
                    total += t.numel() * t.element_size()
        return total

    def _lora_counts(self, meta: nn.Module, layer: nn.Module) -> tuple[int, int]:
        """LoRA parameters outside the decoder layers (once) and per decoder layer."""
        targets = set(target_modules(self.lora, self.layout.family, meta))
        r = self.lora.r
        per_layer = sum(_lora_count(m, r) for n, m in layer.named_modules()
                        if n.rsplit(".", 1)[-1] in targets)
        inside = {id(m) for m in self.layout.family.layers(meta).modules()}
        shared = sum(_lora_count(m, r) for n, m in meta.named_modules()
                     if id(m) not in inside and n.rsplit(".", 1)[-1] in targets)
        return shared, per_layer

    def weights(self, layers: int, quantization: str) -> int:
        """Frozen tensor bytes of a `layers`-layer stage (parameters, buffers, statistics)."""
        return self._shared + layers * self._layer[quantization]

    def lora_state(self, layers: int) -> int:
        return 4 * 4 * (self._lora_shared + layers * self._lora_layer)

    def activations(self, layers: int, quantization: str, checkpointing: bool) -> int:
        """Saved-tensor peak of one step, from the (cached) probes."""
        key = (quantization, checkpointing)
        if key not in self._fits:
            self._fits[key] = probe_activations(
                self.layout, self.lora, self.batch, self.seq, self.precision, self.dtype,
                quantization, checkpointing, self.response_fraction)
        return max(0, self._fits[key].at(layers, self.vocab))

    def logits_bytes(self) -> int:
        """fp32 logits of one batch: response tokens x vocabulary x 4."""
        return self.batch * response_tokens(self.seq, self.response_fraction) * self.vocab * 4

    def overhead(self, layers: int) -> int:
        return round(LOGITS_IN_FLIGHT * self.logits_bytes()
                     + LAYER_OVERHEAD * layers * self._layer_fp32
                     + RUNTIME_FIXED + RUNTIME_PER_VOCAB * self.vocab)

    def predict(self, layers: int, quantization: str, checkpointing: bool,
                floor: int) -> PeakParts:
        """The predicted peak of a client process training a `layers`-layer stage."""
        if layers < 1:
            raise ValueError(f"a stage has at least 1 layer, not {layers}")
        require_bitsandbytes(quantization)
        return PeakParts(floor, self.weights(layers, quantization), self.lora_state(layers),
                         self.activations(layers, quantization, checkpointing),
                         self.overhead(layers))

    def deepest_fit(self, budget: int, max_layers: int, quantization: str,
                    checkpointing: bool, floor: int) -> int:
        """The deepest d in 1..max_layers whose predicted peak is within `budget`; 0 if none."""
        for layers in range(max_layers, 0, -1):
            if self.predict(layers, quantization, checkpointing, floor).total <= budget:
                return layers
        return 0


@functools.lru_cache(maxsize=16)
def _planner(key: tuple) -> MemoryPlanner:
    path, dtype, device, (r, alpha, dropout, targets), batch, seq, precision, fraction = key
    model = ModelConfig(path=path, dtype=dtype, device=device)
    lora = LoraSettings(r=r, alpha=alpha, dropout=dropout, target_modules=list(targets))
    return MemoryPlanner(model, lora, batch, seq, precision, fraction)


def planner_for(model: ModelConfig, lora: LoraSettings, batch: int, seq: int, precision: str,
                response_fraction: float = 1.0) -> MemoryPlanner:
    """The planner of these arguments, one per process (its probes run once)."""
    lora_key = (lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules))
    return _planner((model.path, model.dtype, model.device, lora_key, batch, seq, precision,
                     response_fraction))

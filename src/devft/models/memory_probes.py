"""Activation memory of a training step, counted from the tensors autograd saves for backward.

`saved_tensor_peak` runs one training step (forward + backward of `response_loss`) under a
saved-tensors hook and reports the peak bytes of the distinct storages autograd holds for
backward (parameters excluded, tensors custom Functions keep on their contexts included:
`context_held`) and the largest of them. It is the counter of
`benchmarks/client_memory_process.py` (the "limit from tensors"), kept here once.

`probe_activations` predicts that peak for a d-layer stage of a real model without building
it: it steps tiny models of the *same config* (hidden size, heads, MLP, LoRA targets,
quantization, gradient checkpointing, batch x seq) but with 1 or 2 decoder layers and a small
vocabulary, random weights, and solves the three probe readings for a fixed part, a part per
decoder layer and a part per vocabulary entry (the logits, whose rows are the response
tokens). The saved-tensor peak is linear in both (every layer of a stage has one layer's
shapes, fused layers too), so the fit extrapolates to d layers and the real vocabulary.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from devft.config import LoraSettings
from devft.models.client_stage import set_gradient_checkpointing
from devft.models.lora import attach_lora
from devft.models.stage_builder import BaseLayout, build_stage, loaded_layout
from devft.models.submodel import UNFUSED, sub_config
from devft.models.tensor_source import module_source
from devft.training.loss import IGNORE, response_loss

PROBE_VOCABS = (256, 512)
"""The probes' vocabulary sizes: small enough to be fast, two to solve for the logits' part."""
PROBE_SEED = 0


@dataclass(frozen=True)
class SavedPeak:
    """Bytes autograd holds for backward at its peak, and the largest single storage."""

    peak: int
    largest: int


def saved_tensor_peak(model: nn.Module, batch: dict[str, torch.Tensor],
                      precision: str = "fp32") -> SavedPeak:
    """One forward + backward of `response_loss` on `batch`, counting the distinct storages
    autograd saves (not parameters); gradients are cleared afterwards."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    refs: dict[int, int] = {}  # storage -> saved tensors alive on it
    sizes: dict[int, int] = {}
    peak = [0, 0]

    def release(ptr: int) -> None:
        refs[ptr] -= 1
        if refs[ptr] == 0:
            del refs[ptr], sizes[ptr]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta":
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in params:
            return t
        refs[ptr] = refs.get(ptr, 0) + 1
        sizes[ptr] = t.untyped_storage().nbytes()
        weakref.finalize(t, release, ptr)
        peak[0] = max(peak[0], sum(sizes.values()))
        peak[1] = max(peak[1], sizes[ptr])
        return t

    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = response_loss(model, batch, precision)
        held = context_held(loss, params | set(sizes))
        peak[0] = max(peak[0], sum(sizes.values()) + sum(held.values()))
        peak[1] = max([peak[1], *held.values()])
        (loss / max(n, 1)).backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return SavedPeak(peak[0], peak[1])


def context_held(root: torch.Tensor, skip: set[int]) -> dict[int, int]:
    """{storage: bytes} of the tensors that custom autograd Functions in `root`'s graph keep as
    attributes of their context (`ctx.x = tensor`, not `save_for_backward`), except storages
    in `skip`: saved-tensor hooks never see them, and they live until the graph is freed.
    (bitsandbytes 0.50.2's int8 CPU training matmul keeps its input so.)"""
    held: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():  # C++ nodes have none
            for t in value if isinstance(value, tuple | list) else (value,):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in skip:
                        held[ptr] = t.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return held


def response_tokens(seq: int, response_fraction: float) -> int:
    """Response tokens per row of `seq` tokens (at least 1, at most seq - 1 predicted)."""
    return min(seq - 1, max(1, round(response_fraction * seq)))


def probe_batch(batch: int, seq: int, vocab: int, response_fraction: float,
                seed: int = PROBE_SEED) -> dict[str, torch.Tensor]:
    """`batch` rows of `seq` random tokens, no padding; the last `response_fraction` of each
    row is its response (labelled), the rest its prompt."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq - response_tokens(seq, response_fraction)] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def probe_model(layout: BaseLayout, lora: LoraSettings, layers: int, vocab: int,
                dtype: torch.dtype, quantization: str) -> nn.Module:
    """A random-weight `layers`-layer model of `layout`'s config with a `vocab`-entry
    vocabulary, built and LoRA-wrapped as a client builds its stage (quantized if asked)."""
    config = sub_config(layout.config, layout.family, [[0]] * layers, layout.depth)
    config.vocab_size = vocab
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= vocab:
            setattr(config, name, 0)
    torch.manual_seed(PROBE_SEED)
    dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    source = module_source(dense, "a memory probe")
    beta, fusion, residual = UNFUSED
    built = build_stage(source, loaded_layout(dense, layout.family, "probe"),
                        [[n] for n in range(layers)], beta, fusion, dtype,  # type: ignore[arg-type]
                        torch.device("cpu"), residual, quantization)
    del dense, source
    return attach_lora(built, lora, layout.family)


@dataclass(frozen=True)
class ActivationFit:
    """Saved-tensor peak = fixed + per_layer x layers + per_vocab x vocabulary size."""

    fixed: float
    per_layer: float
    per_vocab: float

    def at(self, layers: int, vocab: int) -> int:
        return round(self.fixed + self.per_layer * layers + self.per_vocab * vocab)


def probe_activations(layout: BaseLayout, lora: LoraSettings, batch: int, seq: int,
                      precision: str, dtype: torch.dtype, quantization: str,
                      checkpointing: bool, response_fraction: float) -> ActivationFit:
    """Three probe steps, (1 layer, 256), (2 layers, 256), (1 layer, 512), solved for the
    fixed, per-layer and per-vocabulary parts of the saved-tensor peak (module docstring).
    The global RNG is left as it was."""
    small, large = PROBE_VOCABS
    readings = {}
    with torch.random.fork_rng(devices=[]):
        for layers, vocab in ((1, small), (2, small), (1, large)):
            model = probe_model(layout, lora, layers, vocab, dtype, quantization)
            set_gradient_checkpointing(model, checkpointing)
            inputs = probe_batch(batch, seq, vocab, response_fraction)
            readings[layers, vocab] = saved_tensor_peak(model, inputs, precision).peak
            del model
    per_layer = readings[2, small] - readings[1, small]
    per_vocab = (readings[1, large] - readings[1, small]) / (large - small)
    fixed = readings[1, small] - per_layer - per_vocab * small
    return ActivationFit(float(fixed), float(per_layer), float(per_vocab))

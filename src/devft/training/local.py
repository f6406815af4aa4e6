"""One client's local update: an explicit AdamW loop over LoRA parameters."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from devft.config import TrainConfig
from devft.training.accounting import (
    PeakMemory,
    attention_flops,
    attention_width,
    estimate_train_flops,
    lora_params,
    matmul_params,
)
from devft.training.loss import response_loss


@dataclass
class LocalResult:
    steps: int
    examples: int
    tokens: int
    """Non-padding input tokens processed."""
    response_tokens: int
    mean_loss: float
    """Mean over steps of each step's per-token response loss."""
    train_time_s: float
    peak_mem_bytes: int
    mem_delta_bytes: int
    flops_est: int


def train_local(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    layers: nn.Module,
    head: nn.Module,
    seed: int,
    progress: bool = False,
    desc: str = "local steps",
) -> LocalResult:
    """Run one optimizer step per batch on the trainable (LoRA) parameters of `model`.

    A fresh AdamW each round (the usual federated practice). Dropout draws from a private RNG
    seeded by `seed`, so a client round is reproducible and leaves the global RNG untouched.

    Args:
        layers: the model's decoder-layer list (for the FLOPs estimate).
        head: the LM head module (for the FLOPs estimate).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = next(model.parameters()).device
    # a frozen layer's LoRA (an emulator's) runs forward and passes input gradients only
    n_layer = matmul_params(layers) + lora_params(layers, trainable=False)
    n_lora, n_head = lora_params(layers, trainable=True), matmul_params(head)
    hidden = attention_width(getattr(model, "config", None))
    losses, tokens, resp_tokens, examples, flops = [], 0, 0, 0, 0
    model.train()
    start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with PeakMemory(device) as mem, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
            loss_sum, n = response_loss(model, batch, cfg.precision)
            if n == 0:
                continue
            (loss_sum / n).backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss_sum.item() / n)
            b, t = batch["input_ids"].shape
            n_tok = int(batch["attention_mask"].sum())
            tokens, resp_tokens, examples = tokens + n_tok, resp_tokens + n, examples + b
            flops += estimate_train_flops(
                n_layer, n_lora, n_head, b * t, n, attention_flops(b, t, hidden, len(layers))
            )
    model.eval()
    return LocalResult(
        steps=len(losses),
        examples=examples,
        tokens=tokens,
        response_tokens=resp_tokens,
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        train_time_s=time.perf_counter() - start,
        peak_mem_bytes=mem.peak_bytes,
        mem_delta_bytes=max(0, mem.peak_bytes - mem.start_bytes),
        flops_est=flops,
    )

"""Cost accounting: a training-FLOPs estimate and a client's peak memory."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

import torch
from torch import nn


def matmul_params(module: nn.Module) -> int:
    """Elements of the 2-D weight matrices under `module` (LoRA factors excluded), counted at
    their logical shape: an nf4 weight packs two elements a byte, but its matmul costs what
    the dense one does."""
    return sum(_logical_numel(p) for name, p in module.named_parameters()
               if p.dim() == 2 and "lora_" not in name)


def _logical_numel(param: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for (bitsandbytes' 4-bit: its quant state's
    shape, not the packed storage's)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def lora_params(module: nn.Module, trainable: bool | None = None) -> int:
    """Elements of the LoRA factors under `module`; with `trainable`, only those whose
    requires_grad is that value (a frozen layer's LoRA costs what a frozen matmul does)."""
    return sum(p.numel() for name, p in module.named_parameters()
               if "lora_" in name and (trainable is None or p.requires_grad == trainable))


def attention_width(config: object) -> int:
    """Width of the attention scores' matmuls: heads × head_dim (Gemma 3 270M: 4 × 256 =
    1024, not its hidden_size 640); hidden_size where the config names no head_dim."""
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if heads and head_dim:
        return int(heads) * int(head_dim)
    return int(getattr(config, "hidden_size", 0) or 0)


def estimate_train_flops(
    layer_params: int, lora: int, head_params: int, tokens: int, head_tokens: int, attn_flops: int
) -> int:
    """FLOPs of forward + backward with frozen base weights and trainable LoRA.

    Frozen matmuls cost 2·N·T forward and 2·N·T backward (input gradients only); LoRA factors
    also need weight gradients, 6·N·T; the LM head runs only on `head_tokens` positions
    (response positions); `attn_flops` is the score/value matmuls' cost (see `attention_flops`).
    Elementwise work (norms, activations, softmax) is not counted.
    """
    return (
        4 * layer_params * tokens + 6 * lora * tokens + 4 * head_params * head_tokens + attn_flops
    )


def attention_flops(batch: int, seq_len: int, hidden: int, num_layers: int) -> int:
    """QKᵀ and AV matmuls, forward (4·T²·d per sequence and layer) plus backward (2x);
    `hidden`: the attention width d (`attention_width`)."""
    return 12 * batch * seq_len * seq_len * hidden * num_layers


def rss_bytes() -> int:
    """Resident set size of this process now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (VmHWM on Linux; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak on GPU, else sampled process RSS.

    On CPU the in-process runner shares one base model among all clients and the server, so
    RSS also counts the server's share; `peak_bytes - start_bytes` is the training delta.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device, self.interval = device, interval_s
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.peak_bytes = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            time.sleep(self.interval)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

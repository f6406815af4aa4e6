"""Which machine and libraries ran a run: what decides its last digits and its wall time.

CPU runs of one config are deterministic on one machine, but the CPU kernels PyTorch picks
(AVX2, AVX-512, ...) round differently, so the same run on another machine differs in the
fifth digit of its loss; and wall times are only comparable on one machine. A run records
each host it ran on (a resumed run may span several) in its summary.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

UNRECORDED: dict[str, Any] = {"cpu": "unrecorded"}
"""The host of a run's rounds before a resume from a checkpoint that predates host records."""


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def host_fingerprint() -> dict[str, Any]:
    """CPU model and the kernel ISA torch uses, thread count, any GPU, and the versions of
    the libraries that compute the numbers."""
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        **{p: _version(p) for p in ("transformers", "peft", "flwr")},
    }


def with_host(hosts: list[dict[str, Any]], host: dict[str, Any]) -> list[dict[str, Any]]:
    """hosts with host appended unless it is already the last one."""
    return hosts if hosts and hosts[-1] == host else [*hosts, host]

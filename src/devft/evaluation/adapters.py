"""Load a base model, optionally with a saved LoRA adapter, for evaluation.

Adapters are read from safetensors only: a directory whose weights are pickled
(`adapter_model.bin`, `.pt`, ...) is refused, so evaluating an adapter never runs code from a
file. The base model is the adapter's `base_model_name_or_path`, or, when that path does not
exist here (a run made on another machine), the `model.path` of the run's `config.json` beside
the adapter directory; an explicit model path overrides both. With a quantization (nf4,
int8) the base is built layer by layer from its files by devft's stage builder, its decoder
layers' linear weights quantized as in training.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devft.config import ModelConfig
from devft.errors import ConfigError, ModelError
from devft.files import read_json

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class EvalModel:
    """A model ready to score, with where it came from."""

    model: Any
    tokenizer: Any
    model_path: str
    adapter: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    """The adapter's run `config.json` (empty when there is none)."""


def check_adapter_dir(adapter: str | Path, flag: str = "--adapter") -> Path:
    """The adapter directory, checked: exists, has adapter_config.json and safetensors weights."""
    path = Path(adapter).expanduser()
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ModelError(
            f"{flag} = {str(adapter)!r} is a pickled weights file, which is refused (loading it "
            f"could run code): pass an adapter directory with {SAFE_WEIGHTS}"
        )
    if not path.is_dir():
        raise ConfigError(
            flag, str(adapter), "an existing adapter directory (e.g. RUN_DIR/adapter)"
        )
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(flag, str(adapter), "a PEFT adapter directory with adapter_config.json")
    if not (path / SAFE_WEIGHTS).is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        why = (
            f"found only pickled weights ({', '.join(pickled)}), which are refused: "
            if pickled
            else ""
        )
        raise ModelError(
            f"{flag} = {str(adapter)!r}: {why}the adapter must be saved as {SAFE_WEIGHTS} "
            "(save_pretrained(..., safe_serialization=True))"
        )
    return path


def read_run_config(adapter_dir: Path) -> dict[str, Any]:
    """The run's config.json next to the adapter directory ({} if there is none, or it is
    not a devft run's); a config.json that is truncated or unreadable is a RunFileError."""
    path = adapter_dir.parent / "config.json"
    if not path.is_file():
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) and "data" in data else {}


def _adapter_base(adapter_dir: Path, run_config: dict[str, Any]) -> str:
    base = read_json(adapter_dir / "adapter_config.json")
    if not isinstance(base, dict):
        raise ModelError(f"{adapter_dir / 'adapter_config.json'} is not a PEFT adapter config")
    name = base.get("base_model_name_or_path")
    run_model = run_config.get("model", {}).get("path")
    if name and (not name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()):
        return str(name)
    if run_model:
        log.info("adapter base %r not found here; using the run's model.path %r", name, run_model)
        return str(run_model)
    raise ConfigError(
        "--model",
        name,
        "the adapter's base model is not available here: pass --model (bundled name or path)",
    )


def load_eval_model(
    adapter: str | Path | None = None,
    model_path: str | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    quantization: str = "none",
) -> EvalModel:
    """The base model (a private copy when an adapter is attached, quantized when asked) plus
    optional LoRA adapter."""
    from devft.models.loading import load_base_model

    adapter_dir = check_adapter_dir(adapter) if adapter is not None else None
    run_config = read_run_config(adapter_dir) if adapter_dir is not None else {}
    if model_path is None:
        model_path = _adapter_base(adapter_dir, run_config) if adapter_dir else ModelConfig().path
    cfg = ModelConfig(path=model_path, dtype=dtype, device=device, quantization=quantization)  # type: ignore[arg-type]
    if quantization != "none":
        from devft.models.client_stage import built_base_model, client_tokenizer

        model, tokenizer = built_base_model(cfg), client_tokenizer(cfg)
    else:
        base = load_base_model(cfg)
        if adapter_dir is None:
            return EvalModel(base.model, base.tokenizer, model_path)
        # the cached base model stays free of LoRA layers
        model, tokenizer = copy.deepcopy(base.model), base.tokenizer
    if adapter_dir is None:
        return EvalModel(model, tokenizer, model_path)
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except SafetensorError as err:
        raise ModelError(f"{adapter_dir / SAFE_WEIGHTS} is unreadable: truncated or not "
                         f"safetensors ({err})") from None
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelError(
            f"--adapter = {str(adapter_dir)!r} could not be loaded onto {model_path!r}: {err}"
        ) from None
    model.eval()
    log.info("loaded adapter %s onto %s (quantization %s)", adapter_dir, model_path, quantization)
    return EvalModel(model, tokenizer, model_path, str(adapter_dir), run_config)

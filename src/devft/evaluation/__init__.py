"""Evaluation harness: multiple-choice accuracy by log-likelihood and held-out perplexity.

- `multiple_choice`: `score_multiple_choice` (acc, acc_norm as lm-eval-harness) and
  `evaluate_tasks` (per task, grouped into unseen tasks vs held-out rows of trained tasks).
- `items`: which items to score (`heldout_multiple_choice_items`, seeded subsamples).
- `requests`, `loglik`: prompt building/tokenization and batched continuation log-probs.
- `perplexity`: held-out loss/perplexity on a run's held-out rows.
- `adapters`: base model + safetensors-only LoRA adapter loading; `cli`: `devft eval`.

Names are imported lazily, so `devft.evaluation.cli` can parse arguments without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MCResult": "multiple_choice",
    "ItemScore": "multiple_choice",
    "score_multiple_choice": "multiple_choice",
    "evaluate_tasks": "multiple_choice",
    "DEFAULT_TASKS": "multiple_choice",
    "DEFAULT_LIMIT": "multiple_choice",
    "heldout_multiple_choice_items": "items",
    "task_items": "items",
    "heldout_perplexity": "perplexity",
    "heldout_records": "perplexity",
    "load_eval_model": "adapters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"devft.evaluation.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'devft.evaluation' has no attribute {name!r}")

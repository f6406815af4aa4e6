"""Chat-formatted tokenization with loss on response tokens only, and batch collation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devft.data.records import Record

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "### Instruction:\n{content}\n\n### Response:\n"
"""Prompt format for tokenizers without a chat template (base models such as GPT-2)."""


@dataclass
class Encoded:
    """Token ids of prompt + response; labels are IGNORE_INDEX on the prompt tokens."""

    input_ids: list[int]
    labels: list[int]


def prompt_messages(record: Record) -> list[dict[str, str]]:
    """One user message: the instruction, plus a blank line and the input when there is one."""
    content = record.instruction
    if record.input:
        content = f"{content}\n\n{record.input}"
    return [{"role": "user", "content": content}]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(record: Record, tokenizer: Any) -> str:
    """The prompt string up to where the assistant's answer starts."""
    messages = prompt_messages(record)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return PLAIN_TEMPLATE.format(content=messages[0]["content"])


def prompt_ids(record: Record, tokenizer: Any) -> list[int]:
    """The prompt's token ids exactly as training sees them (before truncation): a leading
    BOS where the tokenizer starts plain text with one, then `prompt_text`. `devft generate`
    prompts the trained model with these."""
    prefix = [] if has_chat_template(tokenizer) else _leading_bos(tokenizer)
    return prefix + _ids(tokenizer, prompt_text(record, tokenizer))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_bos(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer itself would start a plain text with BOS (Gemma, Llama base)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def encode(record: Record, tokenizer: Any, max_len: int) -> Encoded:
    """Tokenize prompt and response (output + eos) separately; labels only on the response.

    When prompt + response exceed `max_len`, the response keeps its first
    max(max_len // 2, max_len - len(prompt)) tokens (so at most max_len // 2 when both are
    long; a cut response loses its eos) and the prompt keeps its last tokens, i.e. it is
    left-truncated so the question near its end survives (a leading BOS is kept).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    prompt = prompt_ids(record, tokenizer)
    prefix = [] if has_chat_template(tokenizer) else _leading_bos(tokenizer)
    eos = tokenizer.eos_token or ""
    response = _ids(tokenizer, record.output + eos)
    if len(prompt) + len(response) > max_len:
        keep = min(len(response), max(max_len // 2, max_len - len(prompt)))
        response = response[:keep]
        budget = max_len - len(response)
        if len(prompt) > budget:
            head = prefix[:1] if prefix and budget > 1 else []
            prompt = head + prompt[len(prompt) - (budget - len(head)) :]
    return Encoded(
        input_ids=prompt + response, labels=[IGNORE_INDEX] * len(prompt) + list(response)
    )


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded int64 batch: input_ids, attention_mask (1/0), labels (-100 on padding)."""
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), int(pad_id), dtype=torch.int64)
    attention = torch.zeros((batch, width), dtype=torch.int64)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.int64)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.int64)
        attention[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def length_sorted_batches(
    examples: list[Encoded], batch_size: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Collated batches of examples sorted by length (little padding; for evaluation)."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [
        collate(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)
    ]

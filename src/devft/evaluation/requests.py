"""Multiple-choice items -> token-level (context, continuations) requests, as lm-eval builds them.

Two prompt styles:

- ``plain`` (lm-eval-harness / OLMES cloze style, the default): the context is plain text such as
  ``"Question: ...\\nAnswer:"`` and each continuation is ``" " + choice``. Tokenization follows
  lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the continuation, the
  context is encoded alone and the continuation tokens are the suffix of the encoded
  context + continuation after the context's token count.
- ``chat``: the question is the user message of the tokenizer's chat template (or
  `PLAIN_TEMPLATE` without one) with the generation prompt, exactly as training formats
  prompts; the continuation is the bare choice text, encoded separately (as training encodes
  responses).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from devft.data.formatting import _leading_bos, has_chat_template, prompt_text
from devft.data.records import Record
from devft.data.tasks import MCItem

log = logging.getLogger(__name__)

PromptStyle = Literal["plain", "chat"]
PROMPT_STYLES: tuple[str, ...] = ("plain", "chat")
DEFAULT_MAX_LEN = 512


@dataclass(frozen=True)
class Request:
    """One item as tokens: a shared context and one continuation per choice."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    norm_lengths: tuple[int, ...]
    """Length in characters of each choice text (lm-eval's `acc_norm` divisor)."""


def plain_context(item: MCItem) -> str:
    """lm-eval style cloze context for an item's stem (ends with "Answer:" except HellaSwag)."""
    stem = item.prompt
    if item.task == "hellaswag":  # lm-eval: "{activity}: {ctx}" continued by " {ending}"
        return stem.removeprefix("Complete the passage: ")
    if item.task == "piqa":
        goal = stem.removeprefix("Goal: ").removesuffix("\nWhich solution is better?")
        return f"Question: {goal}\nAnswer:"
    if "\n\nQuestion: " in stem:  # SciQ / BoolQ: "{passage}\nQuestion: {q}\nAnswer:"
        return stem.replace("\n\nQuestion: ", "\nQuestion: ") + "\nAnswer:"
    if stem.startswith("Question: "):
        return f"{stem}\nAnswer:"
    return f"Question: {stem}\nAnswer:"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _plain_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: continuation tokens = encode(ctx + cont)[len(encode(ctx)):]."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = _ids(tokenizer, context)
    whole = _ids(tokenizer, context + continuation)
    cont = whole[len(ctx) :]
    if not cont or whole[: len(ctx)] != ctx:  # a merge across the boundary: encode apart
        cont = _ids(tokenizer, continuation)
    return ctx, cont


def _truncate(
    prefix: list[int], context: list[int], conts: list[list[int]], max_len: int
) -> tuple[list[int], list[list[int]]]:
    """Left-truncate the context (keeping `prefix`) so that context + every continuation fits."""
    longest = max(len(c) for c in conts)
    if longest >= max_len:
        keep = max_len - 1 - len(prefix)
        log.warning("a continuation of %d tokens is cut to %d (max_len=%d)", longest, keep, max_len)
        conts = [c[:keep] for c in conts]
        longest = keep
    budget = max_len - longest - len(prefix)
    if len(context) > budget:
        context = context[len(context) - budget :]
    return prefix + context, conts


def build_request(
    item: MCItem,
    tokenizer: Any,
    prompt_style: PromptStyle = "plain",
    max_len: int = DEFAULT_MAX_LEN,
) -> Request:
    """Tokenize one item's context and choices; contexts are cut from the left to `max_len`."""
    if prompt_style == "plain":
        prefix = _leading_bos(tokenizer)
        context = plain_context(item)
        pairs = [_plain_pair(tokenizer, context, " " + choice) for choice in item.choices]
        ctx = pairs[0][0]
        conts = [cont for _, cont in pairs]
    elif prompt_style == "chat":
        prefix = [] if has_chat_template(tokenizer) else _leading_bos(tokenizer)
        ctx = _ids(tokenizer, prompt_text(Record(item.prompt, "", "", item.task), tokenizer))
        conts = [_ids(tokenizer, choice) for choice in item.choices]
    else:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    if not ctx and not prefix:  # nothing to condition on: start from a BOS/EOS token
        ctx = [int(tokenizer.bos_token_id or tokenizer.eos_token_id)]
    ctx, conts = _truncate(prefix, ctx, conts, max_len)
    return Request(
        tuple(ctx),
        tuple(tuple(c) for c in conts),
        tuple(max(len(choice), 1) for choice in item.choices),
    )


def build_requests(
    items: Sequence[MCItem],
    tokenizer: Any,
    prompt_style: PromptStyle = "plain",
    max_len: int = DEFAULT_MAX_LEN,
) -> list[Request]:
    """`build_request` for every item (checks the items first)."""
    if max_len < 4:
        raise ValueError(f"max_len must be >= 4, got {max_len}")
    for item in items:
        if not item.choices or not 0 <= item.answer < len(item.choices):
            raise ValueError(
                f"bad item of task {item.task!r}: answer {item.answer} of "
                f"{len(item.choices)} choices"
            )
    return [build_request(item, tokenizer, prompt_style, max_len) for item in items]

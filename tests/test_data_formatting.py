"""Tokenization with response-only labels, truncation, fallback template and collation."""

import pytest
import torch
from tiny import byte_tokenizer
from tokenizers import processors

from devft.data.formatting import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    collate,
    encode,
    prompt_messages,
    prompt_text,
)
from devft.data.records import Record

QA = Record("What is 2+2?", "", "4", "math")
WITH_INPUT = Record("Name the capital.", "France", "Paris", "geo")


def n_prompt(enc):
    return sum(1 for x in enc.labels if x == IGNORE_INDEX)


def test_prompt_messages():
    assert prompt_messages(QA) == [{"role": "user", "content": "What is 2+2?"}]
    assert prompt_messages(WITH_INPUT) == [
        {"role": "user", "content": "Name the capital.\n\nFrance"}
    ]


def test_labels_only_on_response(tokenizer):
    enc = encode(WITH_INPUT, tokenizer, 256)
    assert len(enc.input_ids) == len(enc.labels)
    k = n_prompt(enc)
    prompt = tokenizer.apply_chat_template(
        prompt_messages(WITH_INPUT), add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(enc.input_ids[:k]) == prompt
    assert all(x == IGNORE_INDEX for x in enc.labels[:k])
    assert enc.labels[k:] == enc.input_ids[k:]
    assert tokenizer.decode(enc.input_ids[k:]) == "Paris<|im_end|>"
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    # pad == eos here: the eos label must survive (labels never come from pad masking)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and enc.labels[-1] == enc.input_ids[-1]


def test_prompt_tokens_in_the_response_are_labelled(tokenizer):
    # the response contains the same text as the prompt; only position decides the mask
    rec = Record("echo", "", "<|im_start|>user\necho", "x")
    enc = encode(rec, tokenizer, 256)
    k = n_prompt(enc)
    assert enc.labels[k:] == enc.input_ids[k:] and len(enc.input_ids) - k == 1 + 5 + 4 + 1


def test_no_truncation_when_it_fits(tokenizer):
    enc = encode(QA, tokenizer, 256)
    full = encode(QA, tokenizer, len(enc.input_ids))
    assert full == enc


def test_long_response_and_long_prompt(tokenizer):
    rec = Record("x" * 100 + " QUESTION?", "", "y" * 100, "t")  # byte tokenizer: 1 token/char
    enc = encode(rec, tokenizer, 64)
    assert len(enc.input_ids) == 64
    k = n_prompt(enc)
    assert len(enc.input_ids) - k == 32  # response cut to max_len // 2, keeps its start
    assert tokenizer.decode(enc.input_ids[k:]) == "y" * 32  # a cut response has no eos
    # prompt keeps its last tokens: the question and the assistant header survive
    assert tokenizer.decode(enc.input_ids[:k]).endswith(
        " QUESTION?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "user" not in tokenizer.decode(enc.input_ids[:k])


def test_short_prompt_lets_the_response_use_the_rest(tokenizer):
    rec = Record("q", "", "y" * 100, "t")
    prompt_len = n_prompt(encode(rec, tokenizer, 1024))
    enc = encode(rec, tokenizer, 64)
    assert n_prompt(enc) == prompt_len  # prompt untouched
    assert len(enc.input_ids) == 64 and len(enc.input_ids) - prompt_len == 64 - prompt_len


def test_long_prompt_short_response_keeps_whole_response(tokenizer):
    rec = Record("z" * 300, "", "ok", "t")
    enc = encode(rec, tokenizer, 48)
    assert len(enc.input_ids) == 48
    assert tokenizer.decode(enc.input_ids[n_prompt(enc) :]) == "ok<|im_end|>"


def test_fallback_template_without_chat_template():
    tok = byte_tokenizer()
    tok.chat_template = None
    assert prompt_text(WITH_INPUT, tok) == PLAIN_TEMPLATE.format(
        content="Name the capital.\n\nFrance"
    )
    enc = encode(WITH_INPUT, tok, 256)
    k = n_prompt(enc)
    assert (
        tok.decode(enc.input_ids[:k])
        == "### Instruction:\nName the capital.\n\nFrance\n\n### Response:\n"
    )
    assert tok.decode(enc.input_ids[k:]) == "Paris<|im_end|>"


def test_fallback_keeps_bos_of_tokenizers_that_add_one():
    tok = byte_tokenizer()
    tok.chat_template = None
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)]
    )
    assert tok("a", add_special_tokens=True)["input_ids"][0] == tok.bos_token_id
    enc = encode(Record("w" * 200, "", "ok", "t"), tok, 40)
    assert len(enc.input_ids) == 40
    assert enc.input_ids[0] == tok.bos_token_id  # kept through left-truncation
    assert tok.decode(enc.input_ids[1 : n_prompt(enc)]).endswith("www\n\n### Response:\n")


def test_collate_pads_right(tokenizer):
    a, b = encode(QA, tokenizer, 256), encode(WITH_INPUT, tokenizer, 256)
    batch = collate([a, b], pad_id=tokenizer.pad_token_id)
    width = max(len(a.input_ids), len(b.input_ids))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for t in batch.values():
        assert t.shape == (2, width) and t.dtype == torch.int64
    short = 0 if len(a.input_ids) < width else 1
    n = len((a, b)[short].input_ids)
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (width - n)
    assert batch["input_ids"][short, n:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][short, n:].eq(IGNORE_INDEX).all()
    assert batch["labels"][short, :n].tolist() == (a, b)[short].labels
    assert batch["attention_mask"][1 - short].eq(1).all()


def test_collate_empty():
    with pytest.raises(ValueError):
        collate([], 0)

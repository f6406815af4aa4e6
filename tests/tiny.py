"""Tiny random-weight models and a byte-level tokenizer, built offline for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Qwen2Config,
)

from devft.models.synthetic import byte_tokenizer  # noqa: F401  (re-exported for tests)


def tiny_config(family: str = "llama", num_layers: int = 4, vocab_size: int = 258):
    """Config of a tiny decoder of the given family (hidden 16)."""
    ids = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257}
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **ids,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **ids,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=16, n_layer=num_layers, n_head=4, n_positions=512, **ids
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            **ids,
        )
    raise ValueError(family)


def tiny_model(family: str = "llama", num_layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, num_layers)).eval()


def save_tiny_model(path: Path, family: str = "llama", num_layers: int = 4, seed: int = 0) -> Path:
    """Write a tiny model + byte tokenizer to `path` (a loadable HF directory)."""
    tiny_model(family, num_layers, seed).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def save_wide_model(path: Path, hidden: int, intermediate: int, num_layers: int = 4,
                    heads: int = 4, kv_heads: int = 2) -> Path:
    """A llama with the byte tokenizer whose layers are large enough (hidden 128+) for memory
    budgets in whole MiB to tell depths apart; saved as a HF directory."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=num_layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=256, eos_token_id=257,
                         pad_token_id=257)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path

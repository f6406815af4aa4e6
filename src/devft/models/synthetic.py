"""Random-weight models and a byte-level tokenizer, built offline from a config.

For tests and for cost measurements at scales whose weights cannot be downloaded here (e.g. a
LLaMA-2-7B-shaped model for per-stage FLOPs and memory on a GPU). Never for claims about
learning: those need the real pretrained model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 258-token byte-level tokenizer with a ChatML template (pad = eos = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   chat_template=CHATML)


def save_random_model(config: PretrainedConfig, path: Path, seed: int = 0,
                      dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """Write a random-weight model of `config` + the byte tokenizer as a HF directory.

    `device="cuda"` initializes on the GPU (minutes faster for billion-parameter shapes).
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path

"""`devft generate`: answer prompts with the base model and a run's adapter, streaming the reply.

Each prompt is formatted exactly as training formatted the run's prompts
(`devft.data.formatting.prompt_ids`: the base tokenizer's chat template with one user
message, or the plain `### Instruction:` template for tokenizers without one). Decoding is
greedy unless `--temperature` > 0, and stops at the tokenizer's eos, which training appended to
every response. Prompt files: `.jsonl` holds one JSON object per line with `instruction`
(and optionally `input`), or a JSON string; any other file holds one prompt per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from devft.config.sections import QUANTIZATIONS
from devft.data.records import DEFAULT_CATEGORY, Record
from devft.errors import ConfigError, DataError


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `generate` sub-command to an argparse sub-parsers object."""
    p = subparsers.add_parser("generate", help="answer prompts with a run's adapter")
    p.add_argument("--adapter", help="RUN_DIR/adapter (or RUN_DIR); absent = the base model")
    p.add_argument("--model", help="base model (default: the adapter's base)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", metavar="FILE",
                        help="prompts: .jsonl = one {instruction, input} object or JSON string "
                             "per line; any other file = one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy decoding (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="store the base's decoder linear weights as nf4 or int8 (bitsandbytes), "
                        "e.g. as the adapter was trained (default none)")
    p.add_argument("--out", help="also write prompts and answers to this JSONL file")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _record(instruction: str, input_: str = "") -> Record:
    return Record(instruction=instruction, input=input_, output="", category=DEFAULT_CATEGORY)


def read_prompts(path: str | Path) -> list[Record]:
    """The prompts of a file (see the module docstring), as records without an output."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--prompts", str(path), "an existing file of prompts")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            records.append(_record(line.strip()))
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number} is not JSON ({err})") from None
        if isinstance(item, str):
            records.append(_record(item))
        elif isinstance(item, dict) and isinstance(item.get("instruction"), str):
            records.append(_record(item["instruction"], str(item.get("input") or "")))
        else:
            raise DataError(f"{path}: line {number} is neither a JSON string nor an object "
                            "with an 'instruction' string")
    if not records:
        raise DataError(f"{path} holds no prompts")
    return records


def generate_answers(model: Any, tokenizer: Any, records: list[Record], max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0,
                     stream: bool = True) -> list[str]:
    """Answer each prompt (formatted as in training); with `stream`, print tokens as they
    come (a `> prompt` line first when there are several prompts)."""
    import torch
    from transformers import TextStreamer

    from devft.data.formatting import prompt_ids

    sample = temperature > 0
    options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens,
                               "pad_token_id": tokenizer.pad_token_id,
                               "eos_token_id": tokenizer.eos_token_id}
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    else:  # the model's generation_config may carry sampling defaults that greedy ignores
        options.update(temperature=None, top_p=None, top_k=None)
    device = next(model.parameters()).device
    answers = []
    for record in records:
        ids = torch.tensor([prompt_ids(record, tokenizer)], device=device)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        if stream and len(records) > 1:
            print(f"> {' '.join(record.instruction.split())}", flush=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 streamer=streamer if stream else None, **options)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        if stream and len(records) > 1:
            print(flush=True)  # the streamer ended the answer's line; a blank line between
    return answers


def _adapter_dir(path: str | None) -> str | None:
    """An adapter directory, or a run directory holding one in `adapter/`."""
    if path is None:
        return None
    run = Path(path).expanduser()
    if not (run / "adapter_config.json").exists() and (run / "adapter").is_dir():
        return str(run / "adapter")
    return path


def generate_main(args: argparse.Namespace) -> int:
    """Run `devft generate` for parsed `args`; returns the exit code (0)."""
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", args.max_new_tokens, "a positive integer")
    if args.temperature < 0:
        raise ConfigError("--temperature", args.temperature, "a number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise ConfigError("--top-p", args.top_p, "a number in (0, 1]")
    records = read_prompts(args.prompts) if args.prompts else [_record(args.prompt)]
    import torch

    from devft.evaluation.adapters import load_eval_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", args.device, "cpu or auto (no CUDA device is available)")
    try:
        loaded = load_eval_model(_adapter_dir(args.adapter), args.model, args.device, "fp32",
                                 args.quantization)
    except ConfigError as err:
        if err.field != "model.path":
            raise
        raise ConfigError("--model", err.value, err.allowed) from None
    torch.manual_seed(args.seed)
    answers = generate_answers(loaded.model, loaded.tokenizer, records, args.max_new_tokens,
                               args.temperature, args.top_p)
    if args.out:
        from devft.files import atomic_write_text

        lines = [json.dumps({"instruction": r.instruction, "input": r.input, "answer": a})
                 for r, a in zip(records, answers)]
        atomic_write_text(args.out, "".join(line + "\n" for line in lines))
        print(f"answers in {args.out}", file=sys.stderr)
    return 0

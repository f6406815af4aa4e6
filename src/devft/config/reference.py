"""The configuration reference, generated from the config classes themselves.

    python -m devft.config.reference > docs/configuration.md

Every key of `RunConfig` gets one row: its default, its type or allowed values (a `Literal`
field's choices, and the one-line rule of each `_check` in the section's `__post_init__`), and
its field docstring. The rules between sections come from `_check_across_sections`; the rules
that need the loaded model are listed by hand below (`MODEL_RULES`). `tests/test_docs.py`
fails when docs/configuration.md differs from this output, so a new or changed key shows up as
a test failure that names the command to run. No torch here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import typing
from collections.abc import Iterator
from typing import Any, Literal

REGENERATE = "python -m devft.config.reference > docs/configuration.md"

# Checks made once the model is loaded (devft.federation.runner.prepare and the modules it
# calls), still before any training. Keep in step with those modules.
MODEL_RULES: tuple[str, ...] = (
    "`devft.stages`: strictly increasing and ending at the model's depth "
    "(`core/schedule.py`); with `devft.stages` empty, `devft.num_stages` doubling stages "
    "up to the depth (30 layers: 4, 8, 15, 30).",
    "`federation.rounds` (or `devft.rounds_per_stage`): at least one round per stage.",
    "`devft.beta` at most 1/(|g|−1) for the group size |g| = ⌈depth / L_s⌉ of every stage, "
    "so no anchor coefficient 1 − β(|g|−1) is negative (`core/fusion.py`); larger spectral "
    "groups found at run time are clamped to β_g = 1/(|g|−1), with a warning.",
    "`lora.target_modules`: module names present in the model (`models/lora.py`).",
    "`model.path`: a bundled name, a directory with a Hugging Face `config.json`, or a hub id "
    "(`models/loading.py`); `model.device=cuda` needs a CUDA device.",
    "`devft-boundary`, `devft+offsite`: every stage but the last has at least "
    "bottom + top + 1 layers (`core/recipes.py`); `offsite`: `offsite.k_bottom + "
    "offsite.k_top` below the depth (`core/offsite.py`).",
    "`devft-adaptive`: `federation.rounds` ≥ stages × `adaptive.min_rounds`.",
    "`model.ship_layers=true`: not for FLoRA or FedSA-LoRA methods (their clients need the "
    "full base) (`federation/shipping.py`).",
    "`federation.client_gpus`: at most the visible GPUs (`federation/runner.py`).",
    "`model.quantization` nf4 or int8: bitsandbytes imports here (`models/quantize.py`).",
    "`data.client_groups` (`data.partition=groups`): at most as many groups as the data set "
    "has categories, and at least one training row for each client of a group, once the data "
    "is loaded (`data/partition.py`).",
    "`federation.client_memory_mb`: empty, one number, one per client, tiers `COUNTxMiB` "
    "adding up to `federation.num_clients`, or `node` (`config/budgets.py`); under "
    "`budget_policy=shrink`, a budget that fits no 1-layer submodel is refused before "
    "training, and shrinking needs a FedAvg method without emulator layers or "
    "`model.ship_layers` (`federation/budgets.py`, docs/memory-budgets.md).",
)

SECTION_INTRO: dict[str, str] = {
    "model": "The frozen base model.",
    "lora": "The LoRA adapter every method trains (through `peft`).",
    "data": "The instruction data, its held-out split and its partition over clients.",
    "federation": "Clients, rounds, the Flower runtime and the server's defences.",
    "train": "Each client's local training in a round.",
    "devft": "DevFT's stages, grouping and fusion (every staged method).",
    "dofit": "DoFIT (`dofit`, `devft+dofit`).",
    "c2a": "C2A (`c2a`, `devft+c2a`).",
    "output": "Where a run writes.",
}


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (attribute docstrings), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _render(node: ast.expr) -> str:
    """A check's `allowed` text; an f-string's `key={value}` parts keep only the key."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        out = ""
        for part in node.values:
            if isinstance(part, ast.Constant):
                out += str(part.value)
            elif out.endswith("="):
                out = out[:-1]
            else:  # a run-time value: its name (`{cfg.method}` -> <method>), or a mark
                value = part.value  # type: ignore[attr-defined]
                name = value.attr if isinstance(value, ast.Attribute) else getattr(
                    value, "id", None)
                out += f"<{name}>" if name else "{…}"
        # a parenthesis that only shows run-time values says nothing in a reference
        return re.sub(r"\s*\([^()]*[<{][^()]*\)", "", out)
    return ast.unparse(node)


def _checks(func: Any) -> Iterator[tuple[str, str]]:
    """(key, allowed) of each `_check(cond, "key", value, allowed)` and
    `_check_grid(values, low, high, "key")` in a function."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        args = node.args
        if node.func.id == "_check" and len(args) == 4 and isinstance(args[1], ast.Constant):
            yield str(args[1].value), _render(args[3])
        elif node.func.id == "_check_grid" and len(args) == 4:
            low, high = ast.unparse(args[1]), ast.unparse(args[2])
            yield str(args[3].value), f"a non-empty list of numbers in [{low}, {high}]"  # type: ignore


def _type_text(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return f"list of {item.__name__} (YAML list or `a,b,c`)"
    return {bool: "true or false", int: "integer", float: "number", str: "string"}.get(
        tp, str(tp))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[" + ", ".join(map(str, value)) + "]`" if value else "`[]` (empty)"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_keys() -> list[str]:
    """Every dotted key of the run config, in the order of the classes."""
    from devft.config import RunConfig

    keys: list[str] = []
    for f in dataclasses.fields(RunConfig):
        if _is_section(f):
            section = f.default_factory  # type: ignore[misc]
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]  # type: ignore
        else:
            keys.append(f.name)
    return keys


def _rows(prefix: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    rules: dict[str, list[str]] = {}
    post = getattr(cls, "__post_init__", None)
    if post is not None:
        for key, allowed in _checks(post):
            rules.setdefault(key, []).append(allowed)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        allowed = [_type_text(hints[f.name])]
        if key == "method":
            allowed = ["a method name: `devft methods` lists them"]
        else:
            allowed += [a for a in dict.fromkeys(rules.get(key, []))
                        if a not in allowed[0] and not (a.startswith("one of") and "{" in a)]
        rows.append(f"| `{key}` | {_cell(_default_text(f))} | {_cell('; '.join(allowed))} | "
                    f"{_cell(docs.get(f.name, ''))} |")
    return rows


def reference() -> str:
    """docs/configuration.md, as Markdown."""
    from devft.config import RunConfig, _check_across_sections

    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REGENERATE}`; do not edit by hand. "
        "tests/test_docs.py fails when this file and the config classes differ. -->",
        "",
        "One validated config object (`src/devft/config/`) holds every setting of a run. Write "
        "it as YAML (see [configs/default.yaml](../configs/default.yaml)) and override any key "
        "on the command line with `--set section.key=value`, e.g. "
        "`--set federation.num_clients=8 --set devft.stages=4,8,15,30`. A list can be written "
        "`a,b,c`. An unknown key, a value of the wrong type or a value outside its allowed "
        "range stops the command before any training, with one line naming the key, the value "
        "and what is allowed (exit code 2):",
        "",
        "```",
        "devft: error: devft.stages = [1, 3] is not allowed: strictly increasing layer counts "
        "ending at the model's depth (4)",
        "```",
        "",
        "Columns: the key, its default, its type and the values allowed, and what it does.",
        "",
    ]
    top = [f for f in dataclasses.fields(RunConfig) if not _is_section(f)]
    out += ["## Top level", "", "| key | default | allowed | meaning |", "|---|---|---|---|"]
    out += [r for r in _rows("", RunConfig) if any(f"| `{f.name}` |" in r for f in top)]
    out.append("")
    for f in dataclasses.fields(RunConfig):
        if not _is_section(f):
            continue
        cls = f.default_factory  # type: ignore[misc]
        intro = SECTION_INTRO.get(f.name) or " ".join((cls.__doc__ or "").split())
        if intro.startswith(cls.__name__ + "("):  # dataclass's generated signature
            intro = ""
        out += [f"## `{f.name}`", ""]
        if intro:
            out += [intro, ""]
        out += ["| key | default | allowed | meaning |", "|---|---|---|---|"]
        out += _rows(f"{f.name}.", cls)  # type: ignore[arg-type]
        out.append("")
    out += [
        "## Rules between keys",
        "",
        "Checked when the config is read, before any model is loaded:",
        "",
    ]
    out += [f"- `{key}`: {_cell(allowed)}" for key, allowed in _checks(_check_across_sections)]
    out += [
        "",
        "Checked once the model is loaded, still before any training:",
        "",
    ]
    out += [f"- {rule}" for rule in MODEL_RULES]
    out += [
        "",
        "Within a section, a key's allowed values may name another key of the same section "
        "(e.g. `federation.min_replies` up to the clients sampled per round); those rules are "
        "in the key's row above.",
        "",
    ]
    return "\n".join(out)


def _is_section(f: dataclasses.Field) -> bool:
    factory = f.default_factory  # type: ignore[misc]
    return isinstance(factory, type) and dataclasses.is_dataclass(factory)


def main() -> int:
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())

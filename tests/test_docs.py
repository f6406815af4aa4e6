"""The documentation cannot go stale silently: the configuration reference matches the config
classes, every relative link resolves, and the CLI's help speaks to users."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from devft.cli import _parser, method_group, methods_text
from devft.config.reference import REGENERATE, config_keys, reference
from devft.methods import METHOD_NAMES

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
DOCS = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").rglob("*.md")])

# [text](target) and ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def test_every_config_key_is_in_the_reference():
    text = CONFIG_DOC.read_text()
    missing = [key for key in config_keys() if f"`{key}`" not in text]
    assert not missing, (f"docs/configuration.md lacks {', '.join(missing)}; regenerate it: "
                         f"{REGENERATE}")


def test_reference_matches_the_config_classes():
    assert CONFIG_DOC.read_text() == reference(), (
        f"docs/configuration.md is out of date with src/devft/config/; regenerate it: "
        f"{REGENERATE}")


def test_reference_names_defaults_and_choices():
    text = reference()
    assert "| `federation.runtime` | `inprocess` | one of `inprocess`, `simulation` |" in text
    assert "| `devft.beta` | `0.1` | number; a number in [0, 1] |" in text
    assert "`dofit.domains`: at most federation.num_clients" in text  # across sections
    assert "{" not in text.split("## Rules between keys")[1]  # no raw f-string placeholders


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return LINK.findall(text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_link_checker_sees_links_and_anchors(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# The `x` study (issue 13)\n[ok](#the-x-study-issue-13) ![f](img.png)\n"
                   "```\n[not a link](nowhere.md)\n```\n")
    assert _links(doc) == ["#the-x-study-issue-13", "img.png"]
    assert _anchors(doc) == {"the-x-study-issue-13"}


def test_readme_and_benchmarks_stay_short():
    readme = (ROOT / "README.md").read_text()
    bench = (ROOT / "BENCHMARKS.md").read_text()
    assert len(readme.splitlines()) <= 220 and len(readme.split()) <= 2200
    assert len(bench.splitlines()) <= 450


def test_help_is_written_for_users():
    text = _parser().format_help()
    assert "Owns all printing" not in text
    for command in ("run", "compare", "eval", "generate", "shard", "fetch", "methods"):
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), command
    assert "docs/configuration.md" in text


def test_methods_lists_every_method_once():
    lines = methods_text().splitlines()
    for name in METHOD_NAMES:
        assert sum(line.split()[:1] == [name] for line in lines) == 1, name
    assert method_group("fedit") == "baselines"
    assert method_group("devft") == "devft"
    assert method_group("devft-notransfer") == "ablations"
    assert method_group("layerdrop") == "growth"


def test_methods_command_prints_the_list(capsys):
    from devft.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "devft-boundary" in out and "docs/configuration.md" in out

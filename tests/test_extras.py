"""Install sets: pyproject's extras declare what the code imports, and a command that needs an
extra the install lacks stops with one line naming it (a core-only install is a SuperNode's)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from devft.cli import NEEDS_EXTRA, main
from devft.extras import EXTRA_MODULES

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def declared(extra: str | None) -> set[str]:
    """The distributions the core set (None) or an extra names, its devft[...] followed."""
    if extra is None:
        return {_name(r) for r in PYPROJECT["dependencies"]}
    names: set[str] = set()
    for req in PYPROJECT["optional-dependencies"][extra]:
        if req.startswith("devft["):
            for inner in req[len("devft["):-1].split(","):
                names |= declared(inner.strip())
        else:
            names.add(_name(req))
    return names


def third_party_imports(root: Path) -> dict[str, str]:
    """Top-level modules imported anywhere under `root` that are neither the standard library
    nor this repository's own (devft, benchmarks/ and tests/ helpers): module -> a file."""
    local = {"devft", "deployment"} | {p.stem for d in ("benchmarks", "tests")
                                       for p in (ROOT / d).glob("*.py")}
    found: dict[str, str] = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in (n.split(".")[0] for n in names):
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    return {_name(d) for d in _providers().get(module, [])}


def test_bench_declares_every_package_the_benchmarks_import():
    allowed = declared(None) | declared("bench")
    missing = {m: f for m, f in third_party_imports(ROOT / "benchmarks").items()
               if not _distributions(m) & allowed}
    assert not missing, f"benchmarks import packages [bench] does not declare: {missing}"
    assert "scipy" in declared("bench") - declared("server")  # what bench adds
    assert declared("bench") <= declared("dev")  # `make install` installs dev: the suite runs them


def test_the_package_imports_nothing_only_bench_installs():
    bench_only = declared("bench") - declared("server") - declared(None)
    used = {d for m in third_party_imports(ROOT / "src") for d in _distributions(m)}
    assert not used & bench_only, "src/devft imports a package of [bench] only"


def test_each_extra_check_names_modules_its_extra_declares():
    for extra, modules in EXTRA_MODULES.items():
        for module, package in modules:
            assert _name(package) in declared(extra), (extra, package)
            assert _name(package) in _distributions(module), (module, package)
    assert set(NEEDS_EXTRA.values()) <= set(EXTRA_MODULES)


@pytest.mark.parametrize("argv, extra, package", [
    (["run", "--out", "x"], "server", "matplotlib"),
    (["compare", "--out", "x"], "server", "scikit-learn"),
    (["shard", "--out", "x"], "data", "flwr-datasets"),
])
def test_a_command_needing_a_missing_extra_stops_with_one_line(
        argv, extra, package, monkeypatch, capsys, tmp_path):
    missing = {m for m, p in EXTRA_MODULES[extra] if p == package}
    monkeypatch.setattr("devft.extras._importable", lambda module: module not in missing)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"devft: error: devft {argv[0]} needs the [{extra}] extra")
    assert f"(missing: {package}): pip install 'devft[{extra}]'" in err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_plots_import_without_matplotlib_and_refuse_to_plot_with_one_line():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import devft.federation.server_app, devft.comparison\n"
            "from devft.reporting.plots import plot_run\n"
            "try:\n    plot_run([], 'x.png')\n"
            "except Exception as err:\n    print(type(err).__name__, err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("MissingExtraError plotting (loss.png, comparison.png) needs the "
                          "[server] extra"), out

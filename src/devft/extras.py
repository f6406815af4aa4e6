"""Which optional dependency sets (pyproject's extras) a command needs, checked before it runs.

The core set is what a data owner's SuperNode needs. A command that needs more is refused
with one line that names the extra to install, instead of an ImportError halfway through.
Only whether a module can be found is checked (`importlib.util.find_spec`): nothing is
imported."""

from __future__ import annotations

import importlib.util

from devft.errors import DevFTError

# extra -> (module, the pip package that provides it); only what devft itself imports
EXTRA_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "data": (("datasets", "datasets"), ("flwr_datasets", "flwr-datasets")),
    "server": (("datasets", "datasets"), ("flwr_datasets", "flwr-datasets"),
               ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")),
}


class MissingExtraError(DevFTError):
    """A command needs an optional dependency set that is not installed."""


def missing_packages(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The pip packages of `extra` whose modules cannot be imported here (all of them, or
    only those of `modules`)."""
    return [package for module, package in EXTRA_MODULES[extra]
            if (modules is None or module in modules) and not _importable(module)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a broken __spec__
        return False


def require_extra(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtraError, one line naming `extra`, if any of its modules is missing.
    `what` is what needs them, e.g. "devft run"."""
    missing = missing_packages(extra, modules)
    if missing:
        raise MissingExtraError(
            f"{what} needs the [{extra}] extra, which is not installed here (missing: "
            f"{', '.join(missing)}): pip install 'devft[{extra}]' (from a checkout: "
            f"pip install -e '.[{extra}]')")

"""Every shipped config loads and validates (model-independent checks)."""

from pathlib import Path

import pytest

from devft.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "benchmarks").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.method and cfg.federation.rounds >= 1


def test_there_is_a_default_config():
    assert any("default" in p.name for p in CONFIGS)

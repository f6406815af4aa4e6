"""Aggregation rules for federated LoRA, one module each, behind `devft.rules.base.Rule`.

Adding a rule: a module with a `Rule` subclass, plus one line in `_RULES`.
"""

from __future__ import annotations

import importlib

from devft.config import RunConfig
from devft.methods import get_method
from devft.rules.base import ClientEnv, ClientStore, NodeSlot, Rule

_RULES: dict[str, str] = {
    "fedavg": "devft.rules.base:Rule",
    "ffa": "devft.rules.ffa:FFALoRA",
    "fedsa": "devft.rules.fedsa:FedSALoRA",
    "hetlora": "devft.rules.hetlora:HetLoRA",
    "flora": "devft.rules.flora:FLoRA",
    "dofit": "devft.rules.dofit:DoFIT",
    "c2a": "devft.rules.c2a:C2A",
}


def rule_class(name: str) -> type[Rule]:
    module, _, cls = _RULES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_rule(cfg: RunConfig) -> Rule:
    """A fresh instance of the aggregation rule of `cfg.method`."""
    return rule_class(get_method(cfg.method).aggregation)(cfg)


__all__ = ["ClientEnv", "ClientStore", "NodeSlot", "Rule", "make_rule", "rule_class"]

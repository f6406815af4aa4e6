"""Configs saved by older code: which differences still mean "the same run".

A run's config.json and its checkpoints hold the whole config as it was when the run
started. Keys added since then, whose default changes nothing those runs did, are listed in
NEUTRAL_NEW_KEYS: a saved config that lacks one (or holds null, as an early draft of
`model.quantization` wrote) still matches a config at that key's default.
"""

from __future__ import annotations

import copy
from typing import Any

NEUTRAL_NEW_KEYS: tuple[str, ...] = ("calibrate.residual_exponents", "train.batch_seed",
                                     "model.quantization", "federation.client_memory_mb",
                                     "federation.budget_levers", "federation.budget_policy",
                                     "federation.shrink_recipe", "data.client_groups")
"""A key added with a change of behaviour must not be listed, so runs of the older code are
run again, not reused or resumed."""


def same_config(saved: dict[str, Any], mine: dict[str, Any],
                ignore: tuple[str, ...] = ("output",)) -> bool:
    """Whether a saved config dict is `mine` (RunConfig.to_dict()), the `ignore` sections
    and missing neutral new keys (taken at mine's value when it is the default) aside."""
    from devft.config import RunConfig

    saved = copy.deepcopy(saved)
    defaults = RunConfig().to_dict()
    for dotted in NEUTRAL_NEW_KEYS:
        section, key = dotted.split(".")
        held = saved.get(section)
        at_default = mine[section][key] == defaults[section][key]
        if isinstance(held, dict) and held.get(key) is None and at_default:
            held[key] = mine[section][key]
    return ({k: v for k, v in saved.items() if k not in ignore}
            == {k: v for k, v in mine.items() if k not in ignore})

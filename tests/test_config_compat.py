"""Configs saved by older code still match when they lack a neutral new key (or hold null)."""

from devft.config import RunConfig
from devft.config.compat import NEUTRAL_NEW_KEYS, same_config


def _without(d, dotted, value=...):
    section, key = dotted.split(".")
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    if value is ...:
        del out[section][key]
    else:
        out[section][key] = value
    return out


def test_a_saved_config_without_or_with_null_neutral_keys_is_the_same_run():
    mine = RunConfig().to_dict()
    for dotted in NEUTRAL_NEW_KEYS:
        assert same_config(_without(mine, dotted), mine)
        assert same_config(_without(mine, dotted, None), mine)  # an early draft wrote null


def test_a_neutral_key_away_from_its_default_or_another_key_is_another_run():
    mine = RunConfig().to_dict()
    replicate = RunConfig().replace(**{"train.batch_seed": 1000}).to_dict()
    assert not same_config(_without(replicate, "train.batch_seed"), mine | {"train": {
        **mine["train"], "batch_seed": 1000}})
    assert not same_config(_without(mine, "train.lr", 1.0), mine)
    assert same_config(_without(mine, "stop.rule", "plateau"), mine, ("output", "stop"))
    assert not same_config(_without(mine, "stop.rule", "plateau"), mine)

"""Config: defaults, YAML + overrides, validation messages, Flower run_config, round trips."""

import json

import pytest

from devft.config import (
    DevFTConfig,
    LoraSettings,
    RunConfig,
    from_dict,
    from_run_config,
    load_config,
)
from devft.errors import ConfigError
from devft.methods import METHOD_NAMES


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(overrides, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


# ---- defaults --------------------------------------------------------------------------------


def test_defaults_load():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.method == "devft"
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16.0 and cfg.lora.target_modules == []
    assert cfg.devft.beta == 0.1 and cfg.devft.stages == [] and cfg.devft.num_stages == 4
    assert cfg.devft.laplacian == "normalized"
    assert cfg.federation.rounds == 12
    assert load_config(None, []) == cfg


def test_empty_yaml_file_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()


# ---- YAML + overrides ------------------------------------------------------------------------


def test_yaml_then_overrides(tmp_path):
    path = write(
        tmp_path,
        """
method: fedit
seed: 3
lora:
  r: 16
  alpha: 32
  target_modules: [q_proj, v_proj]
train:
  lr: 0.001
devft:
  stages: [2, 4, 8]
  beta: 0.15
""",
    )
    cfg = load_config(path, ["seed=7", "train.lr=0.01", "federation.num_clients=8"])
    assert cfg.method == "fedit"
    assert cfg.seed == 7  # override wins over the file
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == 0.01
    assert cfg.federation.num_clients == 8
    assert cfg.devft.stages == [2, 4, 8] and cfg.devft.beta == 0.15
    assert cfg.lora.dropout == 0.05  # untouched defaults stay


@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        ("lora.r=32", lambda c: c.lora.r, 32),
        ("lora.alpha=64", lambda c: c.lora.alpha, 64.0),  # int -> float field
        ("train.lr=0.0005", lambda c: c.train.lr, 0.0005),
        ("train.lr=3e-4", lambda c: c.train.lr, 3e-4),  # YAML 1.1 reads this as a str
        ("train.lr=1E-3", lambda c: c.train.lr, 1e-3),
        ("devft.beta=0", lambda c: c.devft.beta, 0.0),
        ("devft.beta=1", lambda c: c.devft.beta, 1.0),
        ("output.progress=false", lambda c: c.output.progress, False),
        ("output.progress=true", lambda c: c.output.progress, True),
        ("devft.stages=[4, 8, 16, 30]", lambda c: c.devft.stages, [4, 8, 16, 30]),
        ("devft.stages=4,8,15,30", lambda c: c.devft.stages, [4, 8, 15, 30]),  # comma list
        ("devft.stages= 4, 8 ,15,30 ", lambda c: c.devft.stages, [4, 8, 15, 30]),
        ("devft.stages=30", lambda c: c.devft.stages, [30]),  # scalar -> one-item list
        ("devft.stages=", lambda c: c.devft.stages, []),  # empty = doubling default
        ("devft.rounds_per_stage=2,3,4", lambda c: c.devft.rounds_per_stage, [2, 3, 4]),
        (
            "lora.target_modules=q_proj,v_proj",
            lambda c: c.lora.target_modules,
            ["q_proj", "v_proj"],
        ),
        (
            "lora.target_modules=[q_proj, k_proj]",
            lambda c: c.lora.target_modules,
            ["q_proj", "k_proj"],
        ),
        ("lora.target_modules=o_proj", lambda c: c.lora.target_modules, ["o_proj"]),
        ("output.dir=runs/x", lambda c: c.output.dir, "runs/x"),
        ("output.dir=123", lambda c: c.output.dir, "123"),
        ("model.dtype=bf16", lambda c: c.model.dtype, "bf16"),
        ("devft.laplacian=unnormalized", lambda c: c.devft.laplacian, "unnormalized"),
        ("method=fedit", lambda c: c.method, "fedit"),
        (" seed = 5", lambda c: c.seed, 5),
    ],
)
def test_override_parsing(override, getter, expected):
    value = getter(load_config(None, [override]))
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(value, list):
        assert all(type(v) is type(e) for v, e in zip(value, expected))


def test_scientific_float_in_yaml_file(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 3e-4\n  weight_decay: 1e-2\n"))
    assert cfg.train.lr == 3e-4 and cfg.train.weight_decay == 0.01


def test_later_override_wins():
    assert load_config(None, ["lora.r=4", "lora.r=16"]).lora.r == 16


# ---- errors: field, value and what is allowed ------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field", "value", "allowed"),
    [
        ("lora.r=0", "lora.r", 0, "positive integer"),
        ("lora.r=-4", "lora.r", -4, "positive integer"),
        ("lora.alpha=0", "lora.alpha", 0.0, "positive number"),
        ("lora.dropout=1", "lora.dropout", 1.0, "[0, 1)"),
        ("devft.beta=1.5", "devft.beta", 1.5, "[0, 1]"),
        ("devft.beta=-0.1", "devft.beta", -0.1, "[0, 1]"),
        ("method=fedprox", "method", "fedprox", "one of"),
        ("devft.stages=8,4,16", "devft.stages", [8, 4, 16], "strictly increasing"),
        ("devft.stages=[4, 4, 8]", "devft.stages", [4, 4, 8], "strictly increasing"),
        ("devft.stages=0,4", "devft.stages", [0, 4], "positive"),
        ("devft.num_stages=0", "devft.num_stages", 0, "positive integer"),
        ("devft.rounds_per_stage=0,2", "devft.rounds_per_stage", [0, 2], "positive"),
        ("federation.rounds=0", "federation.rounds", 0, "positive integer"),
        ("federation.clients_per_round=9", "federation.clients_per_round", 9, "num_clients=4"),
        ("data.heldout_fraction=1", "data.heldout_fraction", 1, "(0, 1)"),
        ("model.dtype=fp16", "model.dtype", "fp16", "one of fp32, bf16"),
        ("devft.laplacian=rw", "devft.laplacian", "rw", "one of normalized, unnormalized"),
        # wrong types
        ("lora.r=abc", "lora.r", "abc", "an integer"),
        ("lora.r=2.5", "lora.r", 2.5, "an integer"),
        ("lora.r=true", "lora.r", True, "an integer"),
        ("lora.dropout=lots", "lora.dropout", "lots", "a number"),
        ("train.lr=nan", "train.lr", "nan", "a number"),
        ("output.progress=maybe", "output.progress", "maybe", "true or false"),
        ("output.progress=1", "output.progress", 1, "true or false"),
        ("output.dir=[a, b]", "output.dir", ["a", "b"], "a string"),
        ("devft.stages=4,x", "devft.stages", "x", "an integer"),
        ("devft.stages={a: 1}", "devft.stages", {"a": 1}, "a list of int"),
        ("lora=5", "lora", 5, "a mapping"),
    ],
)
def test_bad_values_name_field_value_and_allowed(override, field, value, allowed):
    err = config_error([override])
    assert err.field == field
    assert err.value == value
    assert allowed in err.allowed
    message = str(err)
    assert message.startswith(f"{field} = {value!r}")
    assert allowed in message


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        (["federation.min_replies=3", "federation.clients_per_round=2"],
         "federation.min_replies", "clients sampled per round (2"),
        (["federation.min_replies=5"], "federation.min_replies", "0 = all 4"),
        (["federation.clients_per_round=5"], "federation.clients_per_round", "num_clients=4"),
        (["federation.max_skipped_rounds=0"], "federation.max_skipped_rounds", "positive"),
        (["federation.client_gpus=1.5"], "federation.client_gpus", "whole number"),
        (["federation.client_gpus=-1"], "federation.client_gpus", "auto, a fraction"),
        (["federation.client_gpus=some"], "federation.client_gpus", "auto, a fraction"),
        (["federation.client_gpus=0.5"], "federation.client_gpus", "runtime=simulation"),
        (["federation.client_gpus=0.5", "federation.runtime=simulation", "model.device=cpu"],
         "federation.client_gpus", "model.device=cpu"),
        (["lora.client_ranks=2,4,6,8,8"], "lora.client_ranks", "num_clients=4"),
        (["method=dofit", "dofit.domains=5"], "dofit.domains", "num_clients=4"),
        (["devft.stages=2,4,8", "devft.rounds_per_stage=1,2"], "devft.rounds_per_stage",
         "one per stage of devft.stages (3"),
        (["data.partition=groups", "data.client_groups=0,1,1"], "data.client_groups",
         "4 ids (federation.num_clients=4)"),
        (["data.partition=groups", "data.client_groups=0,1"], "data.client_groups",
         "federation.num_clients=4"),
        (["data.partition=groups"], "data.client_groups", "with data.partition=groups"),
        (["data.client_groups=2x0,2x1"], "data.client_groups", "empty unless"),
        (["data.partition=groups", "data.client_groups=4x1"], "data.client_groups",
         "group ids 0..G-1 with every group used (got 1)"),
        (["data.partition=groups", "data.client_groups=2y0"], "data.client_groups",
         "tiers like 4x0,4x1"),
        (["data.partition=groups", "data.client_groups=0x0,4x1"], "data.client_groups",
         "counts >= 1"),
    ],
)
def test_cross_field_constraints_name_field_value_and_allowed(overrides, field, allowed):
    err = config_error(overrides)
    assert err.field == field and allowed in str(err)


@pytest.mark.parametrize(
    "overrides",
    [
        ["federation.min_replies=2", "federation.clients_per_round=2"],
        ["federation.min_replies=4"],  # clients_per_round=0: all 4
        ["federation.client_gpus=0.25", "federation.runtime=simulation"],
        ["federation.client_gpus=2", "federation.runtime=simulation"],
        ["federation.client_gpus=0"],
        ["method=fedit", "dofit.domains=9"],  # dofit settings unused by fedit
        ["method=fedit", "devft.stages=2,4,8", "devft.rounds_per_stage=1,2"],
        ["devft.stages=2,4,8", "devft.rounds_per_stage=2"],
        ["data.partition=groups", "data.client_groups=2x0,2x1"],
        ["data.partition=groups", "data.client_groups=0,1,1,2"],
        ["data.partition=groups", "data.client_groups=0,3x1"],
    ],
)
def test_cross_field_constraints_accept_what_can_work(overrides):
    load_config(None, overrides)


def test_client_groups_parse_to_one_group_per_client():
    from devft.config.groups import num_groups, parse_client_groups

    assert parse_client_groups("") == [] and num_groups([]) == 0
    assert parse_client_groups("4x0,4x1") == [0, 0, 0, 0, 1, 1, 1, 1]
    assert parse_client_groups(" 0, 3x1 ,2") == [0, 1, 1, 1, 2]
    assert num_groups(parse_client_groups("1,0,1")) == 2


def test_unknown_method_lists_the_methods():
    err = config_error(["method=nope"])
    for name in METHOD_NAMES:
        assert name in str(err)


def test_unknown_key_lists_known_keys():
    err = config_error(["lora.rank=4"])
    assert err.field == "lora.rank" and err.value == 4
    assert "r, alpha, dropout, target_modules" in str(err)


def test_unknown_top_level_key_lists_sections():
    err = config_error(["lr=0.1"])
    assert err.field == "lr"
    for key in [
        "method",
        "seed",
        "model",
        "lora",
        "data",
        "federation",
        "train",
        "devft",
        "output",
    ]:
        assert key in err.allowed


def test_unknown_key_in_yaml_file(tmp_path):
    err = config_error([], write(tmp_path, "devft:\n  betta: 0.2\n"))
    assert err.field == "devft.betta"
    assert "beta" in err.allowed and "stages" in err.allowed


def test_override_without_equals():
    err = config_error(["lora.r"])
    assert err.field == "--set" and err.value == "lora.r"
    assert "key=value" in str(err)


def test_override_with_empty_key():
    assert config_error(["=3"]).field == "--set"


def test_override_below_a_value_is_an_error():
    err = config_error(["seed.x=1"])
    assert "seed" in str(err)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    err = config_error([], missing)
    assert err.field == "--config"
    assert str(missing) in str(err)
    assert "existing YAML file" in str(err)


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "lora: [1, 2\n  r: :\n")
    err = config_error([], path)
    assert err.field == "--config"
    assert str(path) in str(err)
    assert "valid YAML" in str(err)


def test_yaml_that_is_not_a_mapping(tmp_path):
    err = config_error([], write(tmp_path, "- a\n- b\n"))
    assert err.field == "--config" and "mapping" in str(err)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(None, ["lora.r=0"])


def test_dataclass_validation_direct():
    with pytest.raises(ConfigError) as info:
        LoraSettings(r=0)
    assert info.value.field == "lora.r"
    with pytest.raises(ConfigError) as info:
        DevFTConfig(stages=[4, 2])
    assert info.value.field == "devft.stages"


# ---- Flower run_config, dicts, round trips ---------------------------------------------------


def nondefault():
    return load_config(
        None,
        [
            "method=fedit",
            "seed=9",
            "lora.r=4",
            "lora.target_modules=q_proj,v_proj",
            "devft.stages=2,4",
            "devft.beta=0.2",
            "train.lr=0.002",
            "output.progress=false",
            "model.dtype=bf16",
            "devft.laplacian=unnormalized",
        ],
    )


def test_to_dict_from_dict_round_trip():
    cfg = nondefault()
    data = cfg.to_dict()
    assert data["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads(json.dumps(data)) == data
    assert from_dict(data) == cfg
    assert from_dict(RunConfig().to_dict()) == RunConfig()


def test_from_dict_unknown_key():
    data = RunConfig().to_dict()
    data["train"]["epochs"] = 3
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert info.value.field == "train.epochs"


def test_from_run_config_with_config_json():
    cfg = nondefault()
    assert from_run_config({"config-json": json.dumps(cfg.to_dict())}) == cfg
    assert from_run_config(cfg.to_run_config()) == cfg


def test_from_run_config_with_dotted_overrides():
    cfg = nondefault()
    rc = {
        "config-json": json.dumps(cfg.to_dict()),
        "lora.r": 16,
        "federation.num-clients": 6,
        "devft.rounds-per-stage": "1,2",
        "train.lr": 1e-3,
    }
    out = from_run_config(rc)
    assert out.lora.r == 16
    assert out.federation.num_clients == 6  # dashes become underscores
    assert out.devft.rounds_per_stage == [1, 2]
    assert out.train.lr == 1e-3
    assert out.method == "fedit" and out.devft.stages == [2, 4]  # the rest from config-json


def test_from_run_config_with_config_file_and_overrides(tmp_path):
    path = write(tmp_path, "lora:\n  r: 12\nseed: 4\n")
    out = from_run_config({"config-file": str(path), "seed": 5})
    assert out.lora.r == 12 and out.seed == 5


def test_from_run_config_json_wins_over_file(tmp_path):
    cfg = nondefault()
    out = from_run_config(
        {
            "config-json": json.dumps(cfg.to_dict()),
            "config-file": str(tmp_path / "does-not-exist.yaml"),
        }
    )
    assert out == cfg


def test_from_run_config_only_overrides_and_errors():
    assert from_run_config({"lora.r": 2}).lora.r == 2
    assert from_run_config({}) == RunConfig()
    with pytest.raises(ConfigError) as info:
        from_run_config({"devft.beta": 2.0})
    assert info.value.field == "devft.beta"


def test_replace():
    cfg = RunConfig()
    out = cfg.replace(**{"output.dir": "x", "lora.r": 2})
    assert out.output.dir == "x" and out.lora.r == 2
    assert cfg.output.dir == "runs/latest" and cfg.lora.r == 8  # original untouched
    with pytest.raises(ConfigError):
        cfg.replace(**{"lora.r": 0})

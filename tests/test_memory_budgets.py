"""Per-client memory budgets (issue 34): the config forms, each client's levers and depth at
the planner's boundaries, refusal before training, `exclude` as FedIT without the small
clients, and `shrink` runs whose clients train the layers their recipe gives them."""

import math

import pytest
import torch
from flwr.app import Context, Message
from safetensors.torch import load_file
from test_faults import _run
from test_federation_run import tiny_cfg
from tiny import save_wide_model

from devft.config import load_config
from devft.config.budgets import node_budget, parse_budgets, parse_levers
from devft.core.recipes import evenly_spaced
from devft.errors import ConfigError
from devft.federation.budgets import MIB, client_budget_mb, plan_work
from devft.federation.client_app import make_client_app
from devft.federation.runner import run_method
from devft.models.memory_plan import NOMINAL_FLOOR_BYTES, planner_for
from devft.models.submodel import StagePlan
from devft.reporting.recorder import read_metrics

CLIENTS = 4
SHARED = {"devft-shared-process": True}  # the in-process grid's clients: nominal floor


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A 4-layer llama whose layers weigh ~3.8 MiB each, so budgets in MiB tell depths apart."""
    return save_wide_model(tmp_path_factory.mktemp("wide-llama"), 256, 1024)


def _cfg(model_dir, data_file, out, method="fedit", *extra):
    return tiny_cfg(model_dir, data_file, out, method, f"federation.num_clients={CLIENTS}",
                    "federation.rounds=2", "devft.stages=2,4", *extra)


def _mib_for(cfg, depth, quantization="none", checkpointing=False):
    """The smallest whole-MiB budget that holds a `depth`-layer submodel (nominal floor)."""
    planner = planner_for(cfg.model, cfg.lora, cfg.train.batch_size, cfg.data.max_seq_len,
                          cfg.train.precision)
    return math.ceil(planner.predict(depth, quantization, checkpointing,
                                     NOMINAL_FLOOR_BYTES).total / MIB)


# ---- config forms ----------------------------------------------------------------------------
def test_budget_forms_parse_to_one_budget_per_client():
    assert parse_budgets("", 4) == []
    assert parse_budgets("900", 3) == [900, 900, 900]
    assert parse_budgets("0,0,900,700", 4) == [0, 0, 900, 700]
    assert parse_budgets("2x0,2x900", 4) == [0, 0, 900, 900]
    assert parse_budgets("0,3x900", 4) == [0, 900, 900, 900]
    assert parse_budgets("node", 4) is None
    assert parse_levers("checkpoint,shrink") == ("checkpoint", "shrink")
    assert parse_levers("none") == ()
    assert node_budget("900", 1) == 900 and node_budget(None, 1) == 0


@pytest.mark.parametrize("text, says", [
    ("3x900", "4 budgets"), ("abc", "tiers like 4x0,4x900"), ("0x900,4x1", "counts >= 1"),
    ("-5", "counts >= 1"), ("1,2", "4 budgets")])
def test_malformed_budgets_are_refused_in_one_line(text, says):
    with pytest.raises(ConfigError, match="federation.client_memory_mb") as err:
        load_config(None, [f"federation.client_memory_mb={text}"])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_levers_and_policies_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="federation.budget_levers"):
        load_config(None, ["federation.budget_levers=shrink,shrink"])
    with pytest.raises(ConfigError, match="FLoRA"):
        load_config(None, ["federation.client_memory_mb=900", "method=flora"])
    for method, why in (("devft+offsite", "emulator"), ("fedsa", "FedAvg")):
        with pytest.raises(ConfigError, match=why):
            load_config(None, ["federation.client_memory_mb=900", f"method={method}"])
        load_config(None, ["federation.client_memory_mb=900", f"method={method}",
                           "federation.budget_policy=exclude"])  # excluding works for all
    with pytest.raises(ConfigError, match="ship_layers"):
        load_config(None, ["federation.client_memory_mb=900", "model.ship_layers=true"])
    with pytest.raises(ConfigError, match="memory-mb"):
        node_budget("lots", 2)


def test_a_node_states_its_own_budget(wide_dir, tiny_data_file, tmp_path):
    cfg = _cfg(wide_dir, tiny_data_file, tmp_path, "fedit", "federation.client_memory_mb=node")
    assert client_budget_mb(cfg, 1, {"memory-mb": 750}) == 750
    assert client_budget_mb(cfg, 1, {}) == 0


# ---- the planner's boundaries in a client's plan ---------------------------------------------
def test_levers_and_depth_at_the_planner_boundaries(wide_dir, tiny_data_file, tmp_path):
    base = ["federation.shrink_recipe=layerdrop"]
    cfg = _cfg(wide_dir, tiny_data_file, tmp_path, "fedit", *base)
    stage = StagePlan.full(4)
    full, three = _mib_for(cfg, 4), _mib_for(cfg, 3)
    assert three < full  # the model's layers are large enough to tell depths apart

    def work(mib, levers="shrink", policy="shrink"):
        run = cfg.replace(**{"federation.client_memory_mb": str(mib),
                             "federation.budget_levers": levers,
                             "federation.budget_policy": policy})
        return plan_work(run, stage, 0, 1, SHARED)

    at = work(full)
    assert (at.depth, at.levers, at.groups) == (4, (), None)
    assert at.predicted_bytes <= full * MIB < at.predicted_bytes + MIB
    below = work(full - 1)
    assert below.depth == 3 and below.levers == ("shrink",)
    assert below.groups == [[i] for i in evenly_spaced(4, 3)]
    assert work(three - 1).depth == 2
    ckpt = _mib_for(cfg, 4, checkpointing=True)
    if ckpt < full:  # checkpointing saves at least a MiB here: it comes before shrinking
        got = work(ckpt, "checkpoint,shrink")
        assert (got.depth, got.levers, got.checkpointing) == (4, ("checkpoint",), True)
    assert work(full - 1, policy="exclude").sat_out
    with pytest.raises(ConfigError, match=r"client 0\).*at least \d+ MiB"):
        work(_mib_for(cfg, 1) - 1)


def test_a_budget_that_fits_no_submodel_is_refused_before_training(wide_dir, tiny_data_file,
                                                                   tmp_path):
    cfg = _cfg(wide_dir, tiny_data_file, tmp_path / "run", "fedit",
               "federation.client_memory_mb=0,0,1,0", "federation.budget_levers=shrink")
    with pytest.raises(ConfigError) as err:
        run_method(cfg)
    text = str(err.value)
    assert "client 2" in text and "= 1 is not allowed" in text and "at least" in text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no round ran


# ---- runs ----------------------------------------------------------------------------------
def _failing(app, partitions):
    """`app`, except that the clients of `partitions` fail every message (out of memory)."""

    def failing(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) in partitions:
            raise RuntimeError("out of memory")
        return app(msg, context)

    return failing


def test_exclude_is_fedit_without_the_small_clients(wide_dir, tiny_data_file, tmp_path):
    """`exclude`: clients 1 and 3 (1 MiB) sit out every round; the adapter is bit for bit
    that of a FedIT run whose clients 1 and 3 fail every round."""
    small = (1, 3)
    excl = _cfg(wide_dir, tiny_data_file, tmp_path / "exclude", "fedit",
                "federation.client_memory_mb=0,1,0,1", "federation.budget_policy=exclude")
    records = _run(excl, make_client_app(excl))
    fedit = _cfg(wide_dir, tiny_data_file, tmp_path / "fedit", "fedit")
    failed = _run(fedit, _failing(make_client_app(fedit), small))
    for r, f in zip(records[1:], failed[1:]):
        assert r["clients_sat_out"] == 2 and r["clients_failed"] == 0
        assert f["clients_failed"] == 2
        assert r["client_depth"] == [4, 0, 4, 0] and r["client_budget_mb"] == [0, 1, 0, 1]
        assert r["eval_loss"] == f["eval_loss"]
    ours = load_file(tmp_path / "exclude" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "fedit" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_clients_that_cannot_hold_the_model_sit_out_personalized_evaluation(
        wide_dir, tiny_data_file, tmp_path):
    """FedSA evaluates on the clients, on the full model: under `exclude`, clients 1 and 3
    (1 MiB) sit out its evaluation as well as its training, and the round's loss is the
    mean over clients 0 and 2, as in a FedSA run whose clients 1 and 3 fail both."""
    excl = _cfg(wide_dir, tiny_data_file, tmp_path / "exclude", "fedsa",
                "federation.client_memory_mb=0,1,0,1", "federation.budget_policy=exclude")
    records = _run(excl, make_client_app(excl))
    fedsa = _cfg(wide_dir, tiny_data_file, tmp_path / "fedsa", "fedsa")
    failed = _run(fedsa, _failing(make_client_app(fedsa), (1, 3)))
    for r, f in zip(records[1:], failed[1:]):
        assert r["eval_mode"] == "personalized" and r["clients_sat_out"] == 2
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] == f["eval_loss"]


@pytest.mark.parametrize("recipe", ["spectral", "layerdrop", "prefix", "random"])
def test_shrunken_clients_train_their_recipes_layers(wide_dir, tiny_data_file, tmp_path,
                                                     recipe):
    probe = _cfg(wide_dir, tiny_data_file, tmp_path / "probe")
    budget = _mib_for(probe, 2)
    assert budget < _mib_for(probe, 3)
    cfg = _cfg(wide_dir, tiny_data_file, tmp_path / recipe, "fedit",
               f"federation.client_memory_mb=0,0,{budget},{budget}",
               "federation.budget_levers=shrink", f"federation.shrink_recipe={recipe}")
    records = _run(cfg, make_client_app(cfg))
    for r in records[1:]:
        assert r["client_depth"] == [4, 4, 2, 2] and r["clients_ok"] == CLIENTS
        assert r["client_levers"] == ["", "", "shrink", "shrink"]
        assert all(p <= budget for p in r["client_predicted_peak_mb"][2:])
        small = r["client_covered_layers"][2:]
        if recipe == "prefix":
            assert small == [[0, 1], [0, 1]]
        elif recipe == "layerdrop":
            assert small == [evenly_spaced(4, 2)] * 2
        elif recipe == "spectral":  # two fused groups that cover the whole model
            assert small == [[0, 1, 2, 3]] * 2
        else:
            assert all(len(c) == 2 for c in small)
    assert math.isfinite(records[-1]["eval_loss"])


def test_layers_no_client_covers_keep_their_global_lora(wide_dir, tiny_data_file, tmp_path):
    """Every client holds 2 of 4 layers (prefix): layers 2 and 3 never train, so their B stays
    at its initial zeros, while layers 0 and 1 move."""
    probe = _cfg(wide_dir, tiny_data_file, tmp_path / "probe")
    budget = _mib_for(probe, 2)
    cfg = _cfg(wide_dir, tiny_data_file, tmp_path / "run", "fedit",
               f"federation.client_memory_mb={budget}", "federation.budget_levers=shrink",
               "federation.shrink_recipe=prefix")
    _run(cfg, make_client_app(cfg))
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    b = {k: v for k, v in adapter.items() if "lora_B" in k}
    untouched = [v for k, v in b.items() if ".layers.2." in k or ".layers.3." in k]
    trained = [v for k, v in b.items() if ".layers.0." in k or ".layers.1." in k]
    assert untouched and all(torch.count_nonzero(v) == 0 for v in untouched)
    assert trained and all(torch.count_nonzero(v) > 0 for v in trained)


def test_devft_stages_shrink_by_spectral_groups_of_their_own_layers(wide_dir, tiny_data_file,
                                                                   tmp_path):
    """DevFT, stages of 2 then 4 layers; clients 2 and 3 hold one layer: in each stage they
    train one layer fused from all of the stage's groups, and the run trains on."""
    probe = _cfg(wide_dir, tiny_data_file, tmp_path / "probe")
    budget = _mib_for(probe, 1)
    cfg = _cfg(wide_dir, tiny_data_file, tmp_path / "run", "devft", "federation.rounds=4",
               f"federation.client_memory_mb=0,0,{budget},{budget}",
               "federation.budget_levers=shrink")
    records = _run(cfg, make_client_app(cfg))
    stages = {r["stage"]: r for r in records[1:]}
    assert stages[0]["client_depth"] == [2, 2, 1, 1] and stages[1]["client_depth"] == [4, 4, 1, 1]
    for r in records[1:]:
        assert r["client_covered_layers"][2:] == [[0, 1, 2, 3]] * 2
        assert r["clients_ok"] == CLIENTS and math.isfinite(r["eval_loss"])


def test_a_budgeted_run_killed_with_9_resumes_to_the_identical_adapter(
        wide_dir, tiny_data_file, tmp_path, monkeypatch):
    import test_resume

    # the process's own peak differs between a run and a resumed run: a timing, not a result
    monkeypatch.setattr(test_resume, "TIMING", test_resume.TIMING + ("client_process_peak_mb",))
    probe = _cfg(wide_dir, tiny_data_file, tmp_path / "probe", "fedit",
                 "train.batch_size=4", "data.max_seq_len=256")  # test_resume's: the defaults
    args = test_resume._args(wide_dir, tiny_data_file, "devft") + [
        "--set", f"federation.client_memory_mb=0,{_mib_for(probe, 1)}",
        "--set", "federation.budget_levers=shrink"]
    ref, _ = test_resume._kill_resume_and_compare(args, tmp_path)
    depths = read_metrics(ref)[-1]["client_depth"]
    assert depths[0] == 4 and 1 <= depths[1] < 4  # planned on its round's (shorter) rows

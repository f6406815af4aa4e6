"""Runs survive faulty clients and bad replies; each failure is logged and counted."""

import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from test_federation_run import tiny_cfg

from devft.federation.client_app import make_client_app
from devft.federation.grid import InProcessGrid
from devft.federation.runner import prepare
from devft.federation.server_app import make_server_app
from devft.reporting.recorder import read_metrics

CLIENTS = 3


def _run(cfg, client_app):
    """The real ServerApp over an in-process grid whose ClientApp is `client_app`."""
    prepare(cfg)
    grid = InProcessGrid(client_app, cfg.federation.num_clients)
    make_server_app(cfg)(grid, Context(run_id=1, node_id=0, node_config={},
                                        state=RecordDict(), run_config={}))
    return read_metrics(cfg.output.dir)


def _faulty(cfg, fault, victim=1):
    """A ClientApp whose partition `victim` misbehaves with `fault(reply or msg)`."""
    app = make_client_app(cfg)

    def call(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) != victim:
            return app(msg, context)
        return fault(app, msg, context)

    return call


@pytest.fixture
def cfg(tiny_model_dir, tiny_data_file, tmp_path):
    def make(*extra):
        return tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "run", "devft",
                        f"federation.num_clients={CLIENTS}", *extra)
    return make


def test_a_client_that_always_raises_is_counted_and_the_run_completes(cfg, caplog):
    run_cfg = cfg()

    def boom(app, msg, context):
        raise RuntimeError("disk full")

    records = _run(run_cfg, _faulty(run_cfg, boom))
    assert len(records) == 5  # rounds 0..4
    for r in records[1:]:
        assert r["clients_failed"] == 1 and r["clients_ok"] == CLIENTS - 1
    assert "disk full" in caplog.text
    assert records[-1]["eval_loss"] != records[0]["eval_loss"]


def test_a_client_past_the_timeout_counts_as_failed(cfg):
    run_cfg = cfg("federation.timeout_s=0.3", "federation.rounds=2", "devft.stages=4")

    def slow(app, msg, context):
        time.sleep(0.5)
        return app(msg, context)

    records = _run(run_cfg, _faulty(run_cfg, slow))
    assert all(r["clients_failed"] == 1 and r["clients_ok"] == CLIENTS - 1 for r in records[1:])


def test_too_few_replies_leave_the_global_model_unchanged(cfg):
    run_cfg = cfg("federation.min_replies=3", "federation.rounds=2", "devft.stages=4")

    def disconnect(app, msg, context):
        raise ConnectionError("node went away")

    records = _run(run_cfg, _faulty(run_cfg, disconnect))
    assert [r["eval_loss"] for r in records] == [records[0]["eval_loss"]] * 3
    assert all(r["clients_ok"] == 2 and r["clients_failed"] == 1 for r in records[1:])


def _tamper(change):
    def fault(app, msg, context):
        reply = app(msg, context)
        state = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord(change(state))
        return reply
    return fault


def _first_key(state, part="lora_A"):
    return next(k for k in state if part in k)


BAD_REPLIES = {
    "nan": (lambda s: {**s, _first_key(s): torch.full_like(s[_first_key(s)], math.nan)},
            "NaN or Inf"),
    "inf": (lambda s: {**s, _first_key(s): torch.full_like(s[_first_key(s)], math.inf)},
            "NaN or Inf"),
    "shape": (lambda s: {**s, _first_key(s): torch.zeros(3, 3)}, "has shape"),
    "missing": (lambda s: {k: v for k, v in s.items() if k != _first_key(s)}, "missing"),
    "extra": (lambda s: {**s, "evil.weight": torch.zeros(2)}, "unexpected"),
    "norm": (lambda s: {k: v * 1e6 for k, v in s.items()}, "exceeds federation.max_update_norm"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_each_kind_of_bad_reply_is_rejected_and_the_run_completes(cfg, caplog, kind):
    change, reason = BAD_REPLIES[kind]
    run_cfg = cfg("federation.rounds=2", "devft.stages=4")
    records = _run(run_cfg, _faulty(run_cfg, _tamper(change)))
    for r in records[1:]:
        assert r["clients_rejected"] == 1 and r["clients_ok"] == CLIENTS - 1
        assert len(r["rejections"]) == 1 and reason in r["rejections"][0]
    assert reason in caplog.text and all(math.isfinite(r["eval_loss"]) for r in records)


def test_a_reply_without_metrics_is_rejected(cfg):
    run_cfg = cfg("federation.rounds=1", "devft.stages=4")

    def no_metrics(app, msg, context):
        reply = app(msg, context)
        return Message(RecordDict({"arrays": reply.content["arrays"]}), reply_to=msg)

    records = _run(run_cfg, _faulty(run_cfg, no_metrics))
    assert records[1]["clients_rejected"] == 1
    assert "metrics" in records[1]["rejections"][0]

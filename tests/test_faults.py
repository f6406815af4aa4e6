"""Runs survive faulty clients and bad replies; each failure is logged and counted. A run
whose clients keep failing stops, with one line naming the round and the first error."""

import math
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from test_federation_run import tiny_cfg

from devft.errors import RunStalledError
from devft.federation.checkpoint import load_checkpoint
from devft.federation.client_app import make_client_app
from devft.federation.grid import InProcessGrid
from devft.federation.runner import prepare
from devft.federation.server_app import make_server_app
from devft.federation.strategy import one_line
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
    run_cfg = cfg("federation.timeout_s=3", "federation.rounds=2", "devft.stages=4")

    def slow(app, msg, context):
        time.sleep(4)  # margin: a healthy tiny client takes ~0.1 s, more under load
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


# ---- a run that cannot make progress stops ---------------------------------------------------


def _everyone(cfg, fault, rounds=None):
    """A ClientApp whose every client misbehaves in the global `rounds` (None = all)."""
    app = make_client_app(cfg)

    def call(msg: Message, context: Context) -> Message:
        if rounds is not None and int(msg.content["config"]["global-round"]) not in rounds:
            return app(msg, context)
        return fault(app, msg, context)

    return call


def _raise(app, msg, context):
    raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")


def test_every_client_raising_stops_the_run_and_it_resumes_once_fixed(cfg):
    run_cfg = cfg("federation.rounds=6", "devft.rounds_per_stage=3")
    with pytest.raises(RunStalledError) as info:
        _run(run_cfg, _everyone(run_cfg, _raise))
    message = str(info.value)
    assert message.startswith("round 3: stopped after 3 rounds in a row")
    assert f"{CLIENTS} of {CLIENTS} clients failed, 0 rejected" in message
    assert "first client error: RuntimeError: CUDA out of memory. Tried to allocate" in message
    assert "\n" not in message and "--resume" in message
    out = run_cfg.output.dir
    assert not (Path(out) / "summary.json").exists()
    assert [r["round"] for r in read_metrics(out)] == [0, 1, 2]
    assert load_checkpoint(Path(out)).state["round"] == 2

    resumed = run_cfg.replace(**{"output.resume": True})
    records = _run(resumed, make_client_app(resumed))
    assert [r["round"] for r in records] == list(range(7))
    assert all(r["clients_ok"] == CLIENTS for r in records[3:])
    assert (Path(out) / "summary.json").is_file()


def test_every_reply_rejected_stops_the_run(cfg):
    run_cfg = cfg("federation.rounds=4", "federation.max_skipped_rounds=2")
    nan = BAD_REPLIES["nan"][0]
    with pytest.raises(RunStalledError) as info:
        _run(run_cfg, _everyone(run_cfg, _tamper(nan)))
    message = str(info.value)
    assert message.startswith("round 2: stopped after 2 rounds in a row")
    assert f"0 of {CLIENTS} clients failed, {CLIENTS} rejected" in message
    assert "NaN or Inf" in message


def test_clients_failing_in_some_rounds_only_do_not_stop_the_run(cfg):
    # every client fails in rounds 1, 2 and 4, 5: never 3 skipped rounds in a row
    run_cfg = cfg("federation.rounds=6", "devft.rounds_per_stage=3")
    records = _run(run_cfg, _everyone(run_cfg, _raise, rounds={1, 2, 4, 5}))
    assert [r["round"] for r in records] == list(range(7))
    assert [r["clients_ok"] for r in records[1:]] == [0, 0, CLIENTS, 0, 0, CLIENTS]
    assert records[3]["eval_loss"] != records[0]["eval_loss"]


def test_a_stalled_run_exits_3_with_one_line(monkeypatch, capsys, tiny_model_dir,
                                             tiny_data_file, tmp_path):
    import devft.federation.client_app as client_app
    from devft.cli import main

    def broken(msg, context, cfg):
        raise KeyError("partition-id")

    monkeypatch.setattr(client_app, "client_train", broken)
    args = ["run", "--set", f"model.path={tiny_model_dir}", "--set", f"data.name={tiny_data_file}",
            "--set", "federation.num_clients=2", "--set", "federation.rounds=4",
            "--set", "devft.stages=4", "--set", "data.eval_examples=4",
            "--set", "output.progress=false", "--out", str(tmp_path / "run")]
    assert main(args) == 3
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("devft: error:")]
    assert line and "round 3" in line[0] and "KeyError: 'partition-id'" in line[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("RuntimeError: disk full", "RuntimeError: disk full"),
        ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
         "ClientAppException occurred. Message: ValueError: bad  shape\n'>",
         "ValueError: bad shape"),
        ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
         "torch.OutOfMemoryError: CUDA out of memory\n",
         "torch.OutOfMemoryError: CUDA out of memory"),
        ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::"
         "ClientAppActor.run()\x1b[39m (pid=1)\n  File \"app.py\", line 19, in train\n"
         "    raise RuntimeError(\"disk full\")\nRuntimeError: disk full\n\nThe above "
         "exception was the direct cause of the following exception:\n\n  File \"a.py\", "
         "line 65, in run\nflwr.clientapp.client_app.ClientAppException: \nException "
         "ClientAppException occurred. Message: disk full'>", "RuntimeError: disk full"),
        ("x" * 500, "x" * 199 + "…"),
    ],
)
def test_client_errors_are_shortened_to_one_line(reason, expected):
    assert one_line(reason) == expected

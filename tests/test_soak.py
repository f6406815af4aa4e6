"""Long run: 50 rounds, 8 clients, tiny model. Memory stays flat; every round is on disk."""

from test_federation_run import tiny_cfg

from devft.federation.runner import run_method
from devft.reporting.recorder import read_metrics

ROUNDS = 50


def test_fifty_rounds_with_eight_clients_memory_flat_metrics_complete(
        tiny_model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "soak", "devft",
                   "federation.num_clients=8", f"federation.rounds={ROUNDS}",
                   "train.local_steps=1", "data.eval_examples=4")
    summary = run_method(cfg)
    records = read_metrics(tmp_path / "soak")
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    assert summary["rounds"] == ROUNDS and all(r["clients_ok"] == 8 for r in records[1:])
    rss = [r["process_rss_bytes"] for r in records]
    early, late = max(rss[10:20]), max(rss[-10:])
    assert late - early < 25 * 2**20, f"RSS grew by {(late - early) / 2**20:.1f} MiB"

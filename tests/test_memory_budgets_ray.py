"""Per-client budgets in Flower's Ray simulation, where every client is a process of its own:
the budget is the process's whole peak, floor included, and a shrunken client stays in it."""

import torch
from test_federation_run import tiny_cfg
from tiny import byte_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from devft.federation.runner import run_method
from devft.reporting.recorder import read_metrics

BUDGET_MB = 1200
"""Above a Ray worker's floor (about 700-900 MiB here) plus one layer, below the whole model."""


def _heavy_model(path):
    """8 layers of about 49 MiB each (fp32): the whole model does not fit the budget."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=256, eos_token_id=257, pad_token_id=257)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_a_shrunken_ray_client_never_exceeds_its_budget(tiny_data_file, tmp_path):
    model = _heavy_model(tmp_path / "heavy")
    cfg = tiny_cfg(model, tiny_data_file, tmp_path / "run", "fedit",
                   "federation.runtime=simulation", "federation.rounds=2",
                   f"federation.client_memory_mb={BUDGET_MB}",
                   "federation.budget_levers=shrink", "federation.shrink_recipe=layerdrop",
                   "train.local_steps=1")
    run_method(cfg)
    records = read_metrics(tmp_path / "run")[1:]
    print({k: [r[k] for r in records] for k in records[0] if k.startswith("client_")
           and k != "client_covered_layers"})
    assert len(records) == 2
    for r in records:
        assert r["clients_ok"] == cfg.federation.num_clients
        assert all(0 < d < 8 for d in r["client_depth"]), r["client_depth"]
        assert all(f > 300 for f in r["client_floor_mb"])  # its own process's floor, measured
        for predicted, peak in zip(r["client_predicted_peak_mb"], r["client_process_peak_mb"]):
            assert predicted <= BUDGET_MB and peak <= BUDGET_MB, r
            assert predicted >= 0.95 * peak, r  # the planner's target: never 5 % below

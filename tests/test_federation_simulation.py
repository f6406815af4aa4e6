"""DevFT through Flower's own Simulation Runtime (run_simulation, Ray backend)."""

from test_federation_run import tiny_cfg

from devft.federation.runner import run_method
from devft.reporting.recorder import read_metrics


def test_ray_simulation_runs_two_stages_and_matches_the_in_process_grid(
    tiny_model_dir, tiny_data_file, tmp_path
):
    # 2 stages x 1 round x 2 clients on a tiny model
    args = (tiny_model_dir, tiny_data_file)
    extra = ["federation.rounds=2", "devft.rounds_per_stage=1"]
    ray = run_method(
        tiny_cfg(*args, tmp_path / "ray", "devft", "federation.runtime=simulation", *extra)
    )
    local = run_method(tiny_cfg(*args, tmp_path / "local", "devft", *extra))
    records = read_metrics(tmp_path / "ray")
    assert [r["layers_trained"] for r in records[1:]] == [2, 4]
    assert all(r["clients_ok"] == 2 for r in records[1:])
    assert ray["rounds"] == 2 and [s["num_layers"] for s in ray["stages"]] == [2, 4]
    # same app code, same seed: the same model, whichever runtime delivered the messages
    assert ray["final_eval_loss"] == local["final_eval_loss"]
    assert (tmp_path / "ray" / "adapter" / "adapter_model.safetensors").is_file()


def _gpus(monkeypatch, visible, *overrides):
    import torch

    from devft.config import load_config
    from devft.federation.runner import client_resources

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    cfg = load_config(None, ["federation.runtime=simulation", *overrides])
    return client_resources(cfg)


def test_each_simulated_client_gets_an_even_share_of_the_visible_gpus(monkeypatch):
    assert _gpus(monkeypatch, 0) == {"num_cpus": 1, "num_gpus": 0.0}
    assert _gpus(monkeypatch, 1)["num_gpus"] == 0.25  # 4 clients per round
    assert _gpus(monkeypatch, 1, "federation.clients_per_round=2")["num_gpus"] == 0.5
    assert _gpus(monkeypatch, 8)["num_gpus"] == 2.0
    assert _gpus(monkeypatch, 6)["num_gpus"] == 1.0  # 1.5 each: Ray wants whole GPUs above 1
    assert _gpus(monkeypatch, 2, "model.device=cpu")["num_gpus"] == 0.0
    assert _gpus(monkeypatch, 2, "federation.client_gpus=0.3")["num_gpus"] == 0.3
    assert _gpus(monkeypatch, 2, "federation.client_gpus=0")["num_gpus"] == 0.0


def test_more_gpus_per_client_than_visible_is_a_config_error(monkeypatch):
    import pytest

    from devft.errors import ConfigError

    with pytest.raises(ConfigError, match="client_gpus = '1'.*0 GPU"):
        _gpus(monkeypatch, 0, "federation.client_gpus=1")

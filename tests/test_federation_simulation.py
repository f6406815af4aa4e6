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

"""The CUDA path (bf16 autocast, CUDA memory accounting, whole runs on the GPU).

These need a GPU; on CPU-only machines they are skipped as a file. They ran on an H100 of
the device lent to this project (see BENCHMARKS.md).
"""

import pytest
import torch
from test_federation_run import tiny_cfg

from devft.config import LoraSettings, ModelConfig, TrainConfig
from devft.federation.runner import run_method
from devft.models.loading import load_base_model
from devft.models.lora import get_lora_state, seeded_lora_init, set_lora_state
from devft.models.submodel import StagePlan, stage_model
from devft.reporting.recorder import read_metrics
from devft.training.local import train_local
from devft.training.loss import response_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(device="cpu"):
    ids = torch.randint(0, 250, (2, 24))
    labels = torch.full_like(ids, -100)
    labels[:, 16:] = ids[:, 16:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_stage_model_trains_on_cuda_with_bf16_autocast(tiny_model_dir, dtype):
    base = load_base_model(ModelConfig(path=str(tiny_model_dir), device="cuda", dtype=dtype))
    plan = StagePlan(0, ((0, 1), (2, 3)), 0.1)
    model = stage_model(base, plan, LoraSettings(r=4, alpha=8))
    assert next(model.parameters()).device.type == "cuda"
    init = seeded_lora_init(model, 0)
    set_lora_state(model, {k: v + 0.01 if "lora_B" in k else v for k, v in init.items()})
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    inner = model.base_model.model
    result = train_local(model, [_batch() for _ in range(4)],
                         TrainConfig(precision="bf16", lr=1e-2), base.family.layers(inner),
                         inner.get_output_embeddings(), seed=0)
    assert result.steps == 4 and torch.isfinite(torch.tensor(result.mean_loss))
    assert result.peak_mem_bytes > 0  # CUDA allocator peak
    after = get_lora_state(model)
    assert any(not torch.equal(after[k], init[k] + 0.01) for k in after if "lora_B" in k)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters()
               if not p.requires_grad)


def test_bf16_autocast_loss_matches_fp32_on_cuda(tiny_model_dir):
    base = load_base_model(ModelConfig(path=str(tiny_model_dir), device="cuda"))
    model = stage_model(base, StagePlan.full(base.num_layers), LoraSettings(r=4, alpha=8))
    batch = _batch()
    with torch.no_grad():
        s32, n = response_loss(model, batch, "fp32")
        s16, _ = response_loss(model, batch, "bf16")
    assert abs(float(s32 - s16)) / n < 0.05


@pytest.mark.parametrize("method", ["devft", "flora", "fedsa"])
def test_whole_runs_on_cuda(tiny_model_dir, tiny_data_file, tmp_path, method):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / method, method,
                   "model.device=cuda", "train.precision=bf16")
    summary = run_method(cfg)
    records = read_metrics(tmp_path / method)
    assert summary["rounds"] == 4 and all(r["clients_ok"] == 2 for r in records[1:])
    assert all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in records)
    assert (tmp_path / method / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_client_stage_from_mapped_files_lands_on_cuda_and_matches_the_cpu_one(tmp_path, dtype):
    from tiny import save_tiny_model

    from devft.models.client_stage import HOLDER, client_stage_model

    path = save_tiny_model(tmp_path / "model", "llama", num_layers=4)  # never loaded: files
    plan = StagePlan(0, ((0, 1), (2, 3)), 0.1)
    settings = LoraSettings(r=4, alpha=8)
    cpu = {k: v.clone() for k, v in client_stage_model(
        ModelConfig(path=str(path), device="cpu", dtype=dtype), plan, settings)
        .base_model.model.state_dict().items() if "lora_" not in k}
    gpu = client_stage_model(ModelConfig(path=str(path), device="cuda", dtype=dtype), plan,
                             settings)
    state = {k: v for k, v in gpu.base_model.model.state_dict().items() if "lora_" not in k}
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert all(torch.equal(state[k].cpu(), v) for k, v in cpu.items())
    HOLDER.release()

"""Runs on an nf4 base, end to end: in-process and Ray runtimes, shipped layers, the exported
adapter in plain peft on both bases, `devft eval`/`generate --quantization`, kill -9 + resume."""

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel
from safetensors.torch import load_file
from test_federation_run import tiny_cfg
from test_models_quantize import _config
from test_resume import _args, _kill_resume_and_compare
from tiny import byte_tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from devft.cli import main
from devft.config import ModelConfig
from devft.evaluation.adapters import load_eval_model
from devft.federation.runner import run_method
from devft.federation.shipping import SHIPPED, LayerShipper, shipped_source
from devft.models.client_stage import HOLDER, client_stage_model
from devft.models.lora import set_lora_state
from devft.models.quantize import is_quantized, weight_parts
from devft.models.stage_builder import base_layout
from devft.models.submodel import StagePlan
from devft.reporting.recorder import read_metrics
from devft.rules import make_rule

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")

IDS = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 6-layer llama of hidden size 64 (one NF4 block per row)."""
    path = tmp_path_factory.mktemp("q-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama")).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _cfg(model_dir, data_file, out, method, *extra):
    return tiny_cfg(model_dir, data_file, out, method, "devft.stages=2,6", "model.device=cpu",
                    "model.quantization=nf4", *extra)


@pytest.fixture(scope="module")
def nf4_runs(model_dir, tiny_data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4-runs")
    runs = {m: (run_method(_cfg(model_dir, tiny_data_file, out / m, m)), out / m)
            for m in ("fedit", "devft")}
    ship = _cfg(model_dir, tiny_data_file, out / "ship", "devft", "model.ship_layers=true")
    runs["devft-ship"] = (run_method(ship), out / "ship")
    return runs


@pytest.mark.parametrize("method", ["fedit", "devft"])
def test_nf4_runs_train_and_record_every_round(nf4_runs, method):
    summary, out = nf4_runs[method]
    records = read_metrics(out)
    assert all(r["clients_ok"] == 2 for r in records[1:])
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    card = (out / "adapter" / "README.md").read_text()
    assert "| quantization | `nf4`: trained on the base's decoder linear weights in nf4" in card


def _training_time_model(model_dir, adapter, quantization="nf4"):
    """The full model as the run's clients and server built it, with the exported adapter."""
    from devft.config import LoraSettings

    cfg = ModelConfig(path=str(model_dir), device="cpu", quantization=quantization)
    model = client_stage_model(cfg, StagePlan.full(6), LoraSettings(r=8, alpha=16))
    set_lora_state(model, load_file(str(adapter / "adapter_model.safetensors")))
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_an_nf4_adapter_loads_in_plain_peft_onto_the_nf4_and_the_fp32_base(nf4_runs, model_dir):
    adapter = nf4_runs["fedit"][1] / "adapter"
    trained = _logits(_training_time_model(model_dir, adapter))
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base4 = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb,
                                                 device_map="cpu")
    plain4 = PeftModel.from_pretrained(base4, str(adapter)).eval()
    for module in plain4.modules():  # bitsandbytes' repacked CPU inference kernel computes
        if hasattr(module, "support_avx512bf16_for_cpu"):  # in bf16; devft keeps one layout
            module.support_avx512bf16_for_cpu = False
    assert torch.equal(_logits(plain4), trained)
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                     str(adapter)).eval()
    fp32 = _training_time_model(model_dir, adapter, "none")
    assert torch.allclose(_logits(full), _logits(fp32), atol=1e-5)
    HOLDER.release()
    # the adapter moves the logits, and nf4 is close to fp32 but not equal
    base = _logits(AutoModelForCausalLM.from_pretrained(model_dir))
    assert not torch.allclose(_logits(full), base, atol=1e-4)
    gap = (_logits(full) - trained).abs().mean() / _logits(full).abs().mean()
    assert 0 < gap < 0.3


def test_eval_and_generate_take_quantization_nf4(nf4_runs, model_dir, capsys):
    adapter = nf4_runs["fedit"][1] / "adapter"
    loaded = load_eval_model(adapter, str(model_dir), "cpu", "fp32", "nf4")
    trained = _logits(_training_time_model(model_dir, adapter))
    assert torch.equal(_logits(loaded.model), trained)
    HOLDER.release()
    assert main(["generate", "--adapter", str(adapter), "--model", str(model_dir),
                 "--device", "cpu", "--quantization", "nf4", "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 0
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["generate", "--adapter", str(adapter), "--quantization", "nf3", "--prompt", "hi"])
    assert "--quantization: invalid choice: 'nf3'" in capsys.readouterr().err


def test_shipped_nf4_layers_are_counted_quantized_and_build_the_local_stage(
        model_dir, tiny_data_file, tmp_path):
    plan = StagePlan(0, ((0, 1, 2), (3,), (4, 5)), 0.1)
    sizes = {}
    for quantization in ("none", "nf4"):
        cfg = tiny_cfg(model_dir, tiny_data_file, tmp_path / quantization, "devft",
                       "model.ship_layers=true", "model.device=cpu",
                       f"model.quantization={quantization}")
        shipper = LayerShipper(cfg, make_rule(cfg))
        shipper.begin_stage(plan)
        weights = [k for k in shipper.layers if k.endswith("_proj.weight")]
        sizes[quantization] = (sum(len(a.data) for a in shipper.layers.values()),
                               sum(len(shipper.layers[k].data) for k in weights))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(RecordDict({SHIPPED: shipper.payload(7)}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    layout = base_layout(cfg.model.path)
    source = shipped_source(msg, context, plan, cfg, layout.layer_prefix())
    shipped = client_stage_model(cfg.model, plan, cfg.lora, source).base_model.model
    HOLDER.release()
    local = client_stage_model(cfg.model, plan, cfg.lora).base_model.model
    linears = [name for name, module in local.named_modules()
               if is_quantized(module) and name.endswith(".base_layer")]
    assert len(linears) == 3 * 7
    for name in linears:
        a = weight_parts(local.get_submodule(name).weight, name)
        b = weight_parts(shipped.get_submodule(name).weight, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    HOLDER.release()
    # the layers' bytes on the wire: 4-bit weights (1/8 of fp32, plus .npy headers), and all
    # the layers with statistics and norms (per weight ~1.2 kB of code tables: a tiny model's
    # weights are small)
    assert sizes["nf4"][1] < sizes["none"][1] / 7.5
    assert sizes["nf4"][0] < sizes["none"][0] / 4


def test_shipping_nf4_layers_changes_the_bytes_not_the_model(nf4_runs):
    (plain, out), (shipped, ship_out) = nf4_runs["devft"], nf4_runs["devft-ship"]
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ship_out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dense = sum(r["dense_bytes_down"] for r in read_metrics(ship_out))
    assert dense > 0 and shipped["total_bytes_down"] - plain["total_bytes_down"] == dense


def test_ray_simulation_on_nf4_matches_the_in_process_grid(model_dir, tiny_data_file, tmp_path):
    extra = ["federation.rounds=2", "devft.rounds_per_stage=1"]
    ray = run_method(_cfg(model_dir, tiny_data_file, tmp_path / "ray", "devft",
                          "federation.runtime=simulation", *extra))
    local = run_method(_cfg(model_dir, tiny_data_file, tmp_path / "local", "devft", *extra))
    assert ray["rounds"] == 2 and ray["final_eval_loss"] == local["final_eval_loss"]


def test_nf4_resume_after_kill_9_gives_the_identical_adapter(model_dir, tiny_data_file,
                                                             tmp_path):
    args = [*_args(model_dir, tiny_data_file, "devft"), "--set", "model.quantization=nf4",
            "--set", "devft.stages=2,6"]
    _kill_resume_and_compare(args, tmp_path)


def test_an_int8_run_trains_too(model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(model_dir, tiny_data_file, tmp_path, "devft", "devft.stages=2,6",
                   "model.device=cpu", "model.quantization=int8", "federation.rounds=2",
                   "devft.rounds_per_stage=1")
    summary = run_method(cfg)
    records = read_metrics(tmp_path)
    assert summary["rounds"] == 2 and all(r["clients_ok"] == 2 for r in records[1:])
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_nf4_run_on_cuda_trains_and_keeps_its_linears_4bit(model_dir, tiny_data_file,
                                                              tmp_path):
    cfg = tiny_cfg(model_dir, tiny_data_file, tmp_path, "devft", "devft.stages=2,6",
                   "model.device=cuda", "model.quantization=nf4", "federation.rounds=2",
                   "devft.rounds_per_stage=1", "train.precision=bf16")
    summary = run_method(cfg)
    assert summary["rounds"] == 2
    model = client_stage_model(cfg.model, StagePlan.full(6), cfg.lora).base_model.model
    quantized = [m for m in model.modules() if is_quantized(m)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    HOLDER.release()

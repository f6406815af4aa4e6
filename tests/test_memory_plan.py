"""The memory planner (issue 34): each predicted part against the real built stage.

Tiny random LLaMA and GPT-2 models with hidden size 64 (nf4 needs linear input sizes that are
multiples of 64 on CPU), saved as HF directories so the planner reads them as a client does.
"""

import importlib.util

import pytest
import torch
from tiny import byte_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from devft.config import LoraSettings, ModelConfig
from devft.errors import ConfigError
from devft.models import memory_plan
from devft.models.client_stage import set_gradient_checkpointing
from devft.models.lora import attach_lora
from devft.models.memory_plan import (
    MemoryPlanner,
    PeakParts,
    client_floor_bytes,
    planner_for,
    quantized_weight_bytes,
)
from devft.models.memory_probes import context_held, probe_batch, saved_tensor_peak
from devft.models.quantize import quantize_weight, tensor_bytes_by_dtype
from devft.models.stage_builder import base_layout, build_stage
from devft.training.accounting import rss_bytes

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")

DEPTH = 6
CPU = torch.device("cpu")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
QUANTIZATIONS = ["none"] + (["nf4", "int8"] if HAS_BNB else [])
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")


def _config(family: str):
    ids = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257, "vocab_size": 258}
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=DEPTH, n_head=4, n_positions=64, **ids)
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=DEPTH,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=True, **ids)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"plan-{request.param}")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(request.param)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _groups(layers: int) -> list[list[int]]:
    """`layers` contiguous groups of the DEPTH layers (fused where a group has several)."""
    bounds = [round(i * DEPTH / layers) for i in range(layers + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(layers)]


def _stage(path, layers: int, quantization: str = "none", lora: LoraSettings | None = None):
    layout = base_layout(str(path))
    sub = build_stage(layout.open_files(), layout, _groups(layers), 0.1, "differential",
                      torch.float32, CPU, quantization=quantization)
    return sub if lora is None else attach_lora(sub, lora, layout.family)


def _planner(path, batch=2, seq=32, fraction=0.5, lora=None) -> MemoryPlanner:
    return MemoryPlanner(ModelConfig(path=str(path), device="cpu"), lora or LoraSettings(),
                         batch, seq, "fp32", fraction)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("layers", [1, 2, DEPTH])
def test_weights_equal_the_bytes_of_the_built_stage(model_dir, quantization, layers):
    stage = _stage(model_dir, layers, quantization)
    assert _planner(model_dir).weights(layers, quantization) == sum(
        tensor_bytes_by_dtype(stage).values())


@needs_bnb
@pytest.mark.parametrize("shape", [(64, 64), (128, 64), (64, 192), (1536, 576)])
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_weight_bytes_match_bitsandbytes(shape, quantization):
    param = quantize_weight(torch.randn(*shape), quantization, CPU)
    holder = torch.nn.Module()
    holder.weight = param
    assert quantized_weight_bytes(shape[0] * shape[1], shape[0], quantization) == sum(
        tensor_bytes_by_dtype(holder).values())


@pytest.mark.parametrize("lora", [LoraSettings(), LoraSettings(r=4, target_modules=["q_proj"])])
def test_lora_state_is_four_fp32_copies_of_the_adapter(model_dir, lora):
    if lora.target_modules and "gpt2" in str(model_dir):
        lora = LoraSettings(r=4, target_modules=["c_attn"])
    for layers in (1, 3):
        peft = _stage(model_dir, layers, lora=lora)
        adapter = sum(p.numel() * 4 for n, p in peft.named_parameters() if "lora_" in n)
        assert _planner(model_dir, lora=lora).lora_state(layers) == 4 * adapter > 0


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layers", [2, DEPTH])
def test_probe_activations_match_the_counter_on_the_real_stage(model_dir, quantization,
                                                              checkpointing, layers):
    batch, seq = 2, 48
    planner = _planner(model_dir, batch, seq)
    peft = _stage(model_dir, layers, quantization, LoraSettings())
    set_gradient_checkpointing(peft, checkpointing)
    counted = saved_tensor_peak(peft, probe_batch(batch, seq, 258, 0.5)).peak
    predicted = planner.activations(layers, quantization, checkpointing)
    assert predicted == pytest.approx(counted, rel=0.03)


class _KeepOnContext(torch.autograd.Function):
    """Identity whose context keeps a copy of its input, outside save_for_backward (as
    bitsandbytes' int8 CPU matmul keeps its input)."""

    @staticmethod
    def forward(ctx, x):
        ctx.kept = (x.detach().clone(), None)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_context_held_finds_tensors_kept_on_a_context():
    leaf = torch.randn(4, 8, requires_grad=True)
    out = _KeepOnContext.apply(leaf * 2.0).sum()
    (kept, _), = [n.kept for n in [out.grad_fn.next_functions[0][0]]]
    held = context_held(out, set())
    assert held == {kept.untyped_storage().data_ptr(): 4 * 8 * 4}
    assert context_held(out, {kept.untyped_storage().data_ptr()}) == {}


def test_saved_tensor_peak_counts_what_a_context_keeps(model_dir):
    """A hook that keeps every MLP's output on a context raises the counted peak by those
    outputs' bytes (the peak is at the end of the forward pass)."""
    batch, seq = 2, 48
    peft = _stage(model_dir, DEPTH, "none", LoraSettings())
    inputs = probe_batch(batch, seq, 258, 0.5)
    base = saved_tensor_peak(peft, inputs).peak
    mlps = [m for n, m in peft.named_modules() if n.endswith(".mlp")]
    hooks = [m.register_forward_hook(lambda _m, _i, out: _KeepOnContext.apply(out))
             for m in mlps]
    try:
        kept = saved_tensor_peak(peft, inputs).peak
    finally:
        for hook in hooks:
            hook.remove()
    assert len(mlps) == DEPTH
    assert kept - base == DEPTH * batch * seq * 64 * 4


def test_deepest_fit_boundaries(model_dir):
    planner = _planner(model_dir)
    floor = 100 * 2**20
    for d in (1, 3, DEPTH):
        at = planner.predict(d, "none", False, floor).total
        assert planner.deepest_fit(at, DEPTH, "none", False, floor) == d
        assert planner.deepest_fit(at - 1, DEPTH, "none", False, floor) == d - 1
    one = planner.predict(1, "none", False, floor).total
    assert planner.deepest_fit(one - 1, DEPTH, "none", False, floor) == 0
    assert planner.deepest_fit(10**15, DEPTH, "none", False, floor) == DEPTH
    assert planner.deepest_fit(10**15, 2, "none", False, floor) == 2  # capped by max_layers


def test_predictions_grow_with_depth_batch_and_sequence(model_dir):
    def total(d=3, batch=2, seq=32):
        return _planner(model_dir, batch, seq).predict(d, "none", False, 0).total

    assert total(1) < total(2) < total(DEPTH)
    assert total(batch=1) < total(batch=2) < total(batch=4)
    assert total(seq=16) < total(seq=32) < total(seq=64)


def test_checkpointing_and_nf4_lower_the_prediction(model_dir):
    planner = _planner(model_dir, batch=4, seq=64)
    plain = planner.predict(DEPTH, "none", False, 0)
    ckpt = planner.predict(DEPTH, "none", True, 0)
    assert ckpt.activations < plain.activations and ckpt.total < plain.total
    if HAS_BNB:
        nf4 = planner.predict(DEPTH, "nf4", False, 0)
        assert nf4.weights < plain.weights and nf4.total < plain.total
        assert nf4.lora_state == plain.lora_state


def test_parts_add_up_and_the_floor_is_passed_through(model_dir):
    parts = _planner(model_dir).predict(2, "none", False, 12345)
    assert isinstance(parts, PeakParts) and parts.floor == 12345
    assert parts.total == sum(v for k, v in parts.as_dict().items() if k != "total")
    assert min(parts.weights, parts.lora_state, parts.activations, parts.overhead) > 0


def test_response_fraction_raises_logits_and_activations(model_dir):
    half, whole = _planner(model_dir, fraction=0.5), _planner(model_dir, fraction=1.0)
    assert whole.logits_bytes() > half.logits_bytes()
    assert whole.predict(2, "none", False, 0).total > half.predict(2, "none", False, 0).total


def test_bad_arguments_are_refused(model_dir):
    planner = _planner(model_dir)
    with pytest.raises(ValueError, match="at least 1 layer"):
        planner.predict(0, "none", False, 0)
    with pytest.raises(ConfigError):
        planner.predict(1, "nf3", False, 0)
    with pytest.raises(ValueError, match="response_fraction"):
        _planner(model_dir, fraction=0.0)
    with pytest.raises(ValueError, match="precision"):
        MemoryPlanner(ModelConfig(path=str(model_dir)), LoraSettings(), 1, 8, "fp16")


def test_planner_for_is_cached_per_arguments(model_dir):
    model, lora = ModelConfig(path=str(model_dir), device="cpu"), LoraSettings()
    first = planner_for(model, lora, 2, 32, "fp32")
    assert planner_for(model, LoraSettings(), 2, 32, "fp32") is first
    assert planner_for(model, lora, 2, 64, "fp32") is not first
    assert planner_for(model, LoraSettings(r=4), 2, 32, "fp32") is not first


def test_probes_leave_the_global_rng_alone(model_dir):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    _planner(model_dir, batch=1, seq=16).activations(2, "none", False)
    assert torch.equal(torch.rand(3), expected)


def test_client_floor_is_read_once(monkeypatch):
    monkeypatch.setattr(memory_plan, "_FLOOR", [])
    first = client_floor_bytes()
    assert first > 0
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert rss_bytes() > first
    assert client_floor_bytes() == first
    del held

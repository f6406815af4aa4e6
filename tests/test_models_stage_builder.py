"""A stage built tensor by tensor from memory-mapped safetensors files is the submodel.

Reference: `build_submodel` on the base loaded by transformers (an independent code path that
deep-copies the base's modules). Tiny random models of several families, tied and untied
heads, sharded and unsharded checkpoints, fp32 and bf16.
"""

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import byte_tokenizer, tiny_config
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MixtralConfig, Phi3Config

from devft.config import LoraSettings, ModelConfig
from devft.errors import ModelError
from devft.models import stage_builder
from devft.models.client_stage import HOLDER, client_stage_model
from devft.models.loading import DTYPES, load_base_model
from devft.models.stage_builder import base_layout, build_stage
from devft.models.submodel import StagePlan, build_submodel
from devft.models.tensor_source import SafetensorsSource

IDS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257}
GROUPS = [[0, 1, 2], [3], [4, 5]]
SMALL = {"vocab_size": 258, "hidden_size": 16, "intermediate_size": 32,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _config(family: str, layers: int = 6):
    if family == "gemma3_text":  # tied head, sliding/full layer types, scaled embedding
        return Gemma3TextConfig(num_hidden_layers=layers, head_dim=4, sliding_window=8,
                                **SMALL, **IDS)
    if family == "phi3":
        return Phi3Config(num_hidden_layers=layers, **SMALL, **IDS)
    if family == "mixtral":
        return MixtralConfig(num_hidden_layers=layers, num_local_experts=2, **SMALL, **IDS)
    return tiny_config(family, layers)


def _save(path: Path, family: str, sharded: bool = False, dtype=torch.float32) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family), dtype=dtype)
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "5GB")
    byte_tokenizer().save_pretrained(path)
    return path


def _from_files(path: Path, dtype: str, groups=GROUPS, beta: float = 0.1):
    layout = base_layout(str(path))
    return build_stage(layout.open_files(), layout, groups, beta, "differential",
                       DTYPES[dtype], torch.device("cpu"))


def _assert_same(reference, stage) -> None:
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, stage(ids).logits)
    ref, sd = reference.state_dict(), stage.state_dict()
    assert set(ref) == set(sd)
    assert all(torch.equal(ref[k], sd[k]) and ref[k].dtype == sd[k].dtype for k in ref)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma3_text", "phi3"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_stage_from_mapped_files_equals_the_submodel_of_the_loaded_base(tmp_path, family, dtype):
    path = _save(tmp_path, family)
    base = load_base_model(ModelConfig(path=str(path), dtype=dtype, device="cpu"))
    reference = build_submodel(base.model, base.family, GROUPS, 0.1)
    stage = _from_files(path, dtype)
    assert stage.dtype == DTYPES[dtype]
    _assert_same(reference, stage)
    tied = reference.config.tie_word_embeddings
    head, embed = stage.get_output_embeddings().weight, stage.get_input_embeddings().weight
    assert (head is embed) == tied


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sharded_checkpoint_of_either_dtype_gives_the_same_stage(tmp_path, dtype):
    unsharded = _save(tmp_path / "one", "qwen2")
    sharded = _save(tmp_path / "many", "qwen2", sharded=True, dtype=torch.bfloat16
                    if dtype == "bf16" else torch.float32)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # really sharded
    base = load_base_model(ModelConfig(path=str(sharded), dtype=dtype, device="cpu"))
    _assert_same(build_submodel(base.model, base.family, GROUPS, 0.1), _from_files(sharded, dtype))
    if dtype == "fp32":
        _assert_same(_from_files(unsharded, dtype), _from_files(sharded, dtype))


def test_reads_only_the_stage_layers_and_holds_at_most_two_source_tensors(tmp_path,
                                                                          monkeypatch):
    """A 2-layer stage of layers 1-3 never reads layers 0, 4, 5; while fusing, the tensors read
    are dropped one by one (weakrefs: at most the anchor and one other alive at once)."""
    path = _save(tmp_path, "llama")
    read, alive, peak = [], [], [0]
    original = SafetensorsSource.get

    def spy(self, key, dtype):
        tensor = original(self, key, dtype)
        read.append(key)
        alive[:] = [r for r in alive if r() is not None] + [weakref.ref(tensor)]
        peak[0] = max(peak[0], len(alive))
        return tensor

    monkeypatch.setattr(SafetensorsSource, "get", spy)
    layout = base_layout(str(path))
    source = layout.open_files()
    name = "model.layers.0.mlp.up_proj.weight"
    fused = stage_builder.stage_tensor(source, layout, name, [[1, 2, 3]], 0.1, "differential",
                                       torch.float32)
    assert fused.shape == (32, 16) and len(read) == 3 and peak[0] <= 2
    read.clear()
    build_stage(source, layout, [[1, 2], [3]], 0.1, "differential", torch.float32,
                torch.device("cpu"))
    layers = {int(k.split(".")[2]) for k in read if k.startswith("model.layers.")}
    assert layers == {1, 2, 3}
    assert "model.embed_tokens.weight" in read and "model.norm.weight" in read


def test_pickled_weights_only_are_refused_without_unpickling(tmp_path, monkeypatch):
    path = _save(tmp_path, "llama")
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")

    def never(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(ModelError) as err:
        _from_files(path, "fp32")
    assert str(path) in str(err.value) and "safetensors is required" in str(err.value)
    assert "pytorch_model.bin" in str(err.value)


def test_files_that_do_not_match_config_name_the_first_missing_tensor(tmp_path):
    path = _save(tmp_path, "llama")
    state = load_file(path / "model.safetensors")
    del state["model.layers.3.self_attn.k_proj.weight"], state["model.layers.5.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"'model\.layers\.3\.self_attn\.k_proj\.weight' is "
                                         r"missing.*config\.json"):
        _from_files(path, "fp32")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 8  # more layers than the files hold
    (path / "config.json").write_text(json.dumps(config))
    base_layout.cache_clear()
    with pytest.raises(ModelError, match=r"'model\.layers\.3\.self_attn\.k_proj\.weight'"):
        _from_files(path, "fp32")


def test_converted_checkpoint_family_falls_back_to_the_loaded_base(tmp_path):
    """Mixtral's files store experts one by one, its modules merged: transformers converts at
    load, so its client builds the stage from the loaded base (still the right submodel)."""
    path = _save(tmp_path, "mixtral")
    assert base_layout(str(path)).needs_conversion
    cfg = ModelConfig(path=str(path), device="cpu")
    plan = StagePlan(1, ((0, 1, 2), (3,), (4, 5)), 0.1)
    model = client_stage_model(cfg, plan, LoraSettings(r=2, alpha=4, target_modules=["q_proj"]))
    base = load_base_model(cfg)
    reference = build_submodel(base.model, base.family, GROUPS, 0.1)
    ids = torch.randint(0, 250, (2, 12))
    with torch.no_grad():  # LoRA B = 0: the wrapped stage computes the submodel's logits
        assert torch.equal(reference(ids).logits, model(input_ids=ids).logits)
    HOLDER.release()


OUTPUTS = {"llama": ("self_attn.o_proj", "mlp.down_proj"),
           "phi3": ("self_attn.o_proj", "mlp.down_proj"),
           "gpt2": ("attn.c_proj", "mlp.c_proj"),
           "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h")}


@pytest.mark.parametrize("family", sorted(OUTPUTS))
def test_residual_scale_multiplies_only_fused_output_projections_by_group_size(tmp_path, family):
    path = _save(tmp_path, family)
    base = load_base_model(ModelConfig(path=str(path), dtype="fp32", device="cpu"))
    plain = build_submodel(base.model, base.family, GROUPS, 0.1)
    scaled = build_submodel(base.model, base.family, GROUPS, 0.1, residual=1.0)
    half = build_submodel(base.model, base.family, GROUPS, 0.1, residual=0.5)
    prefix = base.family.layers_path + "."
    plain_sd, scaled_sd, half_sd = plain.state_dict(), scaled.state_dict(), half.state_dict()
    hits = 0
    for key, tensor in plain_sd.items():
        if not key.startswith(prefix):
            assert torch.equal(scaled_sd[key], tensor)
            continue
        index, rest = key[len(prefix):].split(".", 1)
        size = len(GROUPS[int(index)])
        if rest.rsplit(".", 1)[0] in OUTPUTS[family] and size > 1:
            hits += 1
            torch.testing.assert_close(scaled_sd[key], tensor * size)
            torch.testing.assert_close(half_sd[key], tensor * size ** 0.5)
        else:  # everything else, and one-layer groups, as without the scale
            assert torch.equal(scaled_sd[key], tensor), key
    assert hits >= 4  # both projections (and biases where present) of both fused groups
    # the client's memory-mapped build applies the same scale
    layout = base_layout(str(path))
    stage = build_stage(layout.open_files(), layout, GROUPS, 0.1, "differential",
                        torch.float32, torch.device("cpu"), residual=1.0)
    _assert_same(scaled, stage)


def test_residual_scale_on_a_family_without_known_output_projections_is_refused():
    from devft.models.families import Family

    family = Family("custom", "model.layers", output_projections=())
    assert family.output_scale("mlp.down_proj.weight", 3, 0.0) == 1.0
    with pytest.raises(ModelError, match="residual_exponents"):
        family.output_scale("mlp.down_proj.weight", 3, 1.0)

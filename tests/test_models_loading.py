"""Loading a base model from a local directory: frozen, cached, with a pad token."""

import pytest
import torch

from devft.config import ModelConfig
from devft.errors import ConfigError
from devft.models.loading import (
    check_model_config,
    load_base_model,
    resolve_device,
    resolve_model_path,
)


def test_load_base_model_from_a_directory_is_frozen_and_cached(tiny_model_dir):
    cfg = ModelConfig(path=str(tiny_model_dir), device="cpu")

    base = load_base_model(cfg)

    assert base.family.name == "llama" and base.num_layers == 4
    assert base.device == torch.device("cpu") and not base.model.training
    assert all(not p.requires_grad for p in base.model.parameters())
    assert next(base.model.parameters()).dtype == torch.float32
    assert base.tokenizer.pad_token_id is not None
    assert load_base_model(ModelConfig(path=str(tiny_model_dir), device="cpu")) is base


def test_resolve_model_path(tmp_path, tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path("org/some-model") == "org/some-model"  # hub ids pass through
    with pytest.raises(ConfigError, match="model.path.*config.json"):
        resolve_model_path(str(tmp_path))  # a directory without a HF config
    with pytest.raises(ConfigError, match="model.path.*hub id"):
        resolve_model_path("./no/such/dir")


def test_check_model_config_reads_only_the_config(tiny_model_dir):
    assert check_model_config(str(tiny_model_dir)).num_hidden_layers == 4


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="model.device"):
            resolve_device("cuda")

"""Cost accounting: hand-computed FLOPs estimates and the peak-memory monitor."""

import time

import pytest
import torch
from torch import nn

from devft.training.accounting import (
    PeakMemory,
    attention_flops,
    attention_width,
    estimate_train_flops,
    lora_params,
    matmul_params,
)


def test_estimate_train_flops_hand_computed():
    # 4*10*7 frozen fwd+bwd, 6*2*7 LoRA, 4*5*3 head on 3 response positions, + 100 attention
    assert estimate_train_flops(10, 2, 5, 7, 3, 100) == 280 + 84 + 60 + 100
    assert estimate_train_flops(0, 0, 0, 7, 3, 0) == 0
    assert estimate_train_flops(1, 0, 0, 1000, 0, 0) == 4000


def test_attention_flops_hand_computed():
    # 12 * batch * T^2 * d * layers
    assert attention_flops(2, 8, 16, 4) == 12 * 2 * 64 * 16 * 4 == 98304
    assert attention_flops(1, 1, 1, 1) == 12
    assert attention_flops(3, 10, 8, 2) == 2 * attention_flops(3, 10, 8, 1)


def test_matmul_and_lora_params_count_2d_weights():
    module = nn.ModuleDict({"proj": nn.Linear(3, 4), "norm": nn.LayerNorm(4)})
    module["proj"].lora_A = nn.Linear(3, 2, bias=False)  # named like PEFT's factors
    module["proj"].lora_B = nn.Linear(2, 4, bias=False)

    assert matmul_params(module) == 3 * 4  # biases, norms and LoRA excluded
    assert lora_params(module) == 3 * 2 + 2 * 4


def test_a_frozen_layers_lora_is_counted_apart_from_the_trained_ones():
    module = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(3, 4)})
    for name in ("a", "b"):
        module[name].lora_A = nn.Linear(3, 2, bias=False)
        module[name].lora_B = nn.Linear(2, 4, bias=False)
    module["b"].lora_A.weight.requires_grad_(False)  # an emulator's frozen layer
    module["b"].lora_B.weight.requires_grad_(False)
    assert lora_params(module, trainable=True) == lora_params(module, trainable=False) == 14
    assert lora_params(module) == 28


def test_attention_width_is_heads_times_head_dim_not_hidden_size():
    from transformers import Gemma3TextConfig, LlamaConfig

    gemma = Gemma3TextConfig(hidden_size=640, num_attention_heads=4, head_dim=256)
    assert attention_width(gemma) == 1024
    llama = LlamaConfig(hidden_size=576, num_attention_heads=9)
    assert attention_width(llama) == 576
    assert attention_width(None) == 0


def test_peak_memory_on_cpu_sees_an_allocation_inside_the_block():
    size = 200 * 2**20

    with PeakMemory(torch.device("cpu"), interval_s=0.005) as mem:
        block = torch.ones(size // 4, dtype=torch.float32)  # touched pages count in RSS
        time.sleep(0.1)
        del block

    assert mem.start_bytes > 0 and mem.peak_bytes >= mem.start_bytes
    assert mem.peak_bytes - mem.start_bytes >= 0.75 * size


def test_peak_memory_without_allocation_stays_near_start():
    with PeakMemory(torch.device("cpu")) as mem:
        time.sleep(0.02)

    assert mem.start_bytes <= mem.peak_bytes < mem.start_bytes + 50 * 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_uses_the_allocator_peak():
    device = torch.device("cuda")
    with PeakMemory(device) as mem:
        block = torch.ones(64 * 2**20 // 4, device=device)
        del block

    assert mem.peak_bytes - mem.start_bytes >= 64 * 2**20


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_weight_costs_the_matmul_of_its_dense_shape(quantization):
    """nf4 packs two elements a byte; its matmul still costs out × in (an nf4 run once counted
    0.56× the FLOPs of the same fp32 run)."""
    from devft.models.quantize import quantize_weight

    dense = nn.Linear(128, 96, bias=False)
    quantized = nn.Module()
    quantized.weight = quantize_weight(dense.weight.data, quantization, torch.device("cpu"))
    assert quantized.weight.numel() != dense.weight.numel() or quantization == "int8"
    assert matmul_params(quantized) == matmul_params(dense) == 128 * 96

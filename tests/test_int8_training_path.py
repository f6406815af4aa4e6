"""An int8 linear trains as bitsandbytes' own layer does, to the bit, without keeping its
input alive for a backward that never reads it (`devft.models.quantize._FrozenInt8Matmul`).
On CPU bitsandbytes trains through MatMul8bitFp, on CUDA through MatMul8bitLt."""

import weakref

import pytest
import torch
from torch import nn

from devft.models.quantize import _bnb, quantize_weight, quantized_linear

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


def _layers(device: str) -> tuple[nn.Module, nn.Module]:
    """(devft's int8 linear, bitsandbytes' Linear8bitLt) of one random 64 -> 32 weight + bias."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(32, 64, generator=gen), torch.randn(32, generator=gen)
    dev = torch.device(device)
    ours = quantized_linear(nn.Linear(64, 32), quantize_weight(weight, "int8", dev), "int8",
                            torch.float32)
    theirs = _bnb().nn.Linear8bitLt(64, 32, has_fp16_weights=False, device="meta")
    theirs.weight = quantize_weight(weight, "int8", dev)
    for layer in (ours, theirs):
        layer.bias = nn.Parameter(bias.clone().to(dev), requires_grad=False)
    return ours, theirs


def _input(device: str) -> torch.Tensor:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    return x.to(device).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
def test_training_matches_bitsandbytes_to_the_bit(device):
    ours, theirs = _layers(device)
    assert isinstance(ours, _bnb().nn.Linear8bitLt)  # peft wraps it with its int8 LoRA layer
    grads = []
    for layer in (ours, theirs):
        x = _input(device)
        out = layer(x)
        (out * torch.linspace(-1, 1, 32, device=device)).sum().backward()
        grads.append((out.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_is_bitsandbytes_own(device):
    ours, theirs = _layers(device)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(_input(device)), theirs(_input(device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["ours", "bitsandbytes"])
def test_the_input_is_freed_after_forward(which, device):
    """bitsandbytes keeps each input on its autograd context until the graph is freed (the
    control: if a release fixes that, devft's workaround can go)."""
    layer = dict(zip(("ours", "bitsandbytes"), _layers(device), strict=True))[which]
    leaf = _input(device)
    x = leaf * 2.0  # a non-leaf whose own backward keeps nothing of it
    out = layer(x)
    alive = weakref.ref(x)
    del x
    assert (alive() is None) == (which == "ours")
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_a_trainable_weight_takes_bitsandbytes_own_path():
    ours, _ = _layers("cpu")
    ours.bias.requires_grad_(True)
    ours(_input("cpu")).sum().backward()
    assert ours.bias.grad is not None

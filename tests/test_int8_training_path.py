"""An int8 linear trains on CPU as bitsandbytes' own layer does, to the bit, without keeping
its input alive for a backward that never reads it (`devft.models.quantize.Int8Linear`)."""

import weakref

import pytest
import torch
from torch import nn

from devft.models.quantize import _bnb, quantize_weight, quantized_linear

CPU = torch.device("cpu")


def _layers() -> tuple[nn.Module, nn.Module]:
    """(devft's int8 linear, bitsandbytes' Linear8bitLt) of one random 64 -> 32 weight + bias."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(32, 64, generator=gen), torch.randn(32, generator=gen)
    ours = quantized_linear(nn.Linear(64, 32), quantize_weight(weight, "int8", CPU), "int8",
                            torch.float32)
    theirs = _bnb().nn.Linear8bitLt(64, 32, has_fp16_weights=False, device="meta")
    theirs.weight = quantize_weight(weight, "int8", CPU)
    for layer in (ours, theirs):
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return ours, theirs


def _input() -> torch.Tensor:
    return torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()


def test_training_matches_bitsandbytes_to_the_bit():
    ours, theirs = _layers()
    assert isinstance(ours, _bnb().nn.Linear8bitLt)  # peft wraps it with its int8 LoRA layer
    grads = []
    for layer in (ours, theirs):
        x = _input()
        out = layer(x)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append((out.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0


def test_evaluation_is_bitsandbytes_own():
    ours, theirs = _layers()
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(_input()), theirs(_input()))


@pytest.mark.parametrize("which", ["ours", "bitsandbytes"])
def test_the_input_is_freed_after_forward(which):
    """bitsandbytes' CPU path keeps each input on its autograd context until the graph is
    freed (the control: if a release fixes that, this layer's workaround can go)."""
    layer = dict(zip(("ours", "bitsandbytes"), _layers(), strict=True))[which]
    leaf = _input()
    x = leaf * 2.0  # a non-leaf whose own backward keeps nothing of it
    out = layer(x)
    alive = weakref.ref(x)
    del x
    assert (alive() is None) == (which == "ours")
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0

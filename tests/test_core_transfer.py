"""LoRA transfer between stages (devft_paper.md §4, §7.5)."""

import pytest
import torch

from devft.core.fusion import fuse_layers
from devft.core.transfer import transfer_layers


def lora(seed, r=2, d=4):
    g = torch.Generator().manual_seed(seed)
    return {
        "self_attn.q_proj.lora_A.weight": torch.randn(r, d, generator=g),
        "self_attn.q_proj.lora_B.weight": torch.randn(d, r, generator=g),
    }


def test_every_layer_gets_exactly_its_representatives_lora():
    sub = {0: lora(0), 1: lora(1), 2: lora(2)}
    groups = [[0, 2, 5], [1, 3], [4]]
    full = transfer_layers(sub, groups)
    assert sorted(full) == [0, 1, 2, 3, 4, 5]
    owner = {0: 0, 2: 0, 5: 0, 1: 1, 3: 1, 4: 2}
    for layer, n in owner.items():
        assert set(full[layer]) == set(sub[n])
        for key in sub[n]:
            assert torch.equal(full[layer][key], sub[n][key])
            for m in set(owner.values()) - {n}:
                assert not torch.equal(full[layer][key], sub[m][key])


def test_transferred_tensors_are_copies_not_aliases():
    sub = {0: lora(0), 1: lora(1)}
    full = transfer_layers(sub, [[0, 1], [2, 3]])
    key = "self_attn.q_proj.lora_A.weight"
    ptrs = {full[j][key].data_ptr() for j in range(4)} | {sub[n][key].data_ptr() for n in range(2)}
    assert len(ptrs) == 6
    original = sub[0][key].clone()
    full[0][key].add_(100.0)
    assert torch.equal(sub[0][key], original)
    assert torch.equal(full[1][key], original)


def test_full_depth_transfer_is_identity():
    sub = {i: lora(i) for i in range(4)}
    full = transfer_layers(sub, [[0], [1], [2], [3]])
    for i in range(4):
        for key in sub[i]:
            assert torch.equal(full[i][key], sub[i][key])


@pytest.mark.parametrize("variant", ["differential", "average", "anchor"])
def test_fuse_after_transfer_inside_one_old_group_is_that_lora(variant):
    # stage s: groups of 4 and 2; stage s+1 regroups inside the old groups (devft_paper.md §7.5:
    # all members carry the same copied LoRA, differences are 0, the fused LoRA equals it)
    old_groups = [[0, 1, 2, 3], [4, 5]]
    trained = {0: lora(10), 1: lora(11)}
    full = transfer_layers(trained, old_groups)
    new_groups = [[0, 2], [1, 3], [4], [5]]
    fused = fuse_layers(full, new_groups, beta=0.1, variant=variant)
    expected_owner = [0, 0, 1, 1]
    for n, owner in enumerate(expected_owner):
        for key, value in trained[owner].items():
            torch.testing.assert_close(fused[n][key], value, rtol=1e-6, atol=1e-7)


def test_fuse_after_transfer_across_old_groups_mixes_them():
    # a new group spanning two old groups is NOT trivial: anchor LoRA + beta*(other - anchor)
    old_groups = [[0, 1], [2, 3]]
    trained = {0: lora(20), 1: lora(21)}
    full = transfer_layers(trained, old_groups)
    fused = fuse_layers(full, [[0], [1, 2], [3]], beta=0.1)
    for key in trained[0]:
        expected = trained[0][key] + 0.1 * (trained[1][key] - trained[0][key])
        torch.testing.assert_close(fused[1][key], expected)

"""Shrinking a round's submodel to a client's memory: recipes, unions, checks, wire forms."""

import numpy as np
import pytest

from devft.core.shrink import (
    check_groups,
    shrink_groups,
    spectral_table,
    split_groups,
    stage_similarity,
    table_from_wire,
    table_to_wire,
    union_groups,
)


def _blocks(n: int, cut: int) -> np.ndarray:
    """Similarity of two blocks of layers, 0..cut-1 and cut..n-1."""
    sim = np.full((n, n), 0.1)
    sim[:cut, :cut] = 0.9
    sim[cut:, cut:] = 0.9
    return sim


def test_each_recipe_picks_its_layers():
    assert shrink_groups("prefix", 6, 2) == [[0], [1]]
    assert shrink_groups("layerdrop", 7, 3) == [[0], [3], [6]]
    a = shrink_groups("random", 6, 3, draw=(0, 1, 5))
    assert len(a) == 3 and all(len(g) == 1 for g in a) and a == sorted(a)
    assert a == shrink_groups("random", 6, 3, draw=(0, 1, 5))  # the same draw, the same layers
    draws = {tuple(i for g in shrink_groups("random", 6, 3, draw=(0, p, 5)) for i in g)
             for p in range(8)}
    assert len(draws) > 1  # clients (and rounds) draw different layers


def test_spectral_groups_come_from_the_table_and_follow_the_blocks():
    table = spectral_table(_blocks(6, 2), [[i] for i in range(6)], "normalized", seed=0)
    assert sorted(table) == [1, 2, 3, 4, 5]
    assert table[1] == [list(range(6))]
    assert table[2] == [[0, 1], [2, 3, 4, 5]]
    for d, groups in table.items():
        assert check_groups(groups, 6) is None and len(groups) == d
    assert shrink_groups("spectral", 6, 2, table) == [[0, 1], [2, 3, 4, 5]]
    with pytest.raises(ValueError, match="no spectral groups of depth 2"):
        shrink_groups("spectral", 6, 2, {})


def test_stage_similarity_averages_the_members_of_each_stage_layer():
    sim = np.arange(16, dtype=float).reshape(4, 4)
    out = stage_similarity(sim, [[0, 1], [2], [3]])
    assert out[0, 0] == pytest.approx(sim[:2, :2].mean())
    assert out[0, 1] == pytest.approx(sim[:2, 2].mean())
    assert out[2, 1] == sim[3, 2]


def test_a_depth_outside_the_stage_is_refused():
    for depth in (0, 4, 5):
        with pytest.raises(ValueError, match="1..3"):
            shrink_groups("prefix", 4, depth)
    with pytest.raises(ValueError, match="unknown shrink recipe"):
        shrink_groups("bogus", 4, 2)


def test_unions_map_shrunken_layers_onto_the_full_model():
    stage = [[0, 1], [2], [3, 4, 5]]
    assert union_groups(stage, [[0, 2], [1]]) == [[0, 1, 3, 4, 5], [2]]
    assert union_groups(stage, [[1]]) == [[2]]


def test_invalid_groups_are_named():
    assert check_groups([[0], [1]], 4) is None
    assert "overlaps" in check_groups([[0, 1], [1]], 4)
    assert "outside 0..3" in check_groups([[0], [4]], 4)
    assert "need 1..3" in check_groups([[0], [1], [2], [3]], 4)
    assert "empty" in check_groups([[0], []], 4)


def test_the_table_survives_the_wire():
    table = spectral_table(_blocks(6, 3), [[0], [1], [2], [3, 4], [5]], "normalized", seed=1)
    flat, sizes = table_to_wire(table)
    assert table_from_wire(flat, sizes) == table
    with pytest.raises(ValueError):
        split_groups([0, 1, 2], [2, 2])
    with pytest.raises(ValueError, match="depths"):
        table_from_wire([0, 1], [1, 1])  # depth 1, then half of depth 2

"""Cosine similarity between layers (devft_paper.md §2, §7.1)."""

import math

import pytest
import torch

from devft.core.similarity import cosine_from_gram, cosine_matrix


def test_cosine_matrix_hand_computed():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    s = 1 / math.sqrt(2)
    expected = torch.tensor(
        [[1.0, 0.0, s, -1.0], [0.0, 1.0, s, 0.0], [s, s, 1.0, -s], [-1.0, 0.0, -s, 1.0]],
        dtype=torch.float64,
    )
    sim = cosine_matrix(vectors)
    assert sim.dtype == torch.float64
    torch.testing.assert_close(sim, expected)


def test_cosine_matrix_scale_invariant_and_symmetric():
    v = torch.randn(6, 50)
    sim = cosine_matrix(v)
    scaled = cosine_matrix(v * torch.tensor([[0.1], [3.0], [7.0], [1.0], [100.0], [0.5]]))
    torch.testing.assert_close(sim, scaled)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(6, dtype=torch.float64))
    assert (sim.abs() <= 1 + 1e-12).all()


def test_cosine_matrix_bf16_input_computed_in_float64():
    v = torch.randn(4, 64).to(torch.bfloat16)
    torch.testing.assert_close(cosine_matrix(v), cosine_matrix(v.double()))


def test_zero_vector_gives_zero_similarity_not_nan():
    sim = cosine_matrix(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert not torch.isnan(sim).any()
    assert sim[0, 1] == 0 and sim[1, 0] == 0 and sim[0, 0] == 0
    assert sim[1, 1].item() == pytest.approx(1.0)


def test_cosine_from_gram_matches_cosine_matrix():
    v = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(cosine_from_gram(v @ v.T), cosine_matrix(v))

"""Cosine similarity between layers, from per-layer vectors or from their Gram matrix."""

from __future__ import annotations

import torch


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """(L, L) cosine similarities from a Gram matrix G_ij = <v_i, v_j>."""
    norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
    return gram / norms[:, None] / norms[None, :]


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(L, L) cosine similarities between the rows of `vectors` (L, P), computed in float64."""
    v = vectors.double()
    return cosine_from_gram(v @ v.T)


def per_token_cosine(states: torch.Tensor) -> torch.Tensor:
    """(L, L) mean over tokens of cos(h_i[t], h_j[t]), from per-layer states (L, N, d)."""
    unit = torch.nn.functional.normalize(states.double(), dim=-1)  # (L, N, d)
    return torch.einsum("ind,jnd->ij", unit, unit) / states.shape[1]

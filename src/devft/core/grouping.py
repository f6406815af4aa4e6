"""Deconfliction-guided layer grouping (DevFT paper, Sec. "DGLG"; devft_paper.md §2, §7.2-7.4).

similarity (L, L) -> graph W = max(sim, 0) with a zero diagonal -> Laplacian -> eigenvectors
of the k smallest eigenvalues -> k-means with k clusters on their rows. Negative similarity
("conflict") means no edge, so conflicting layers tend to land in different groups.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Groups = list[list[int]]
"""Groups of layer indices: each sorted ascending, groups sorted by their first (anchor) layer."""

Laplacian = Literal["normalized", "unnormalized"]


def similarity_graph(similarity: np.ndarray) -> np.ndarray:
    """Adjacency W (L, L): negative similarities clipped to 0, no self-loops."""
    w = np.clip(np.asarray(similarity, dtype=np.float64), 0.0, None)
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0.0)
    return w


def spectral_embedding(adjacency: np.ndarray, k: int, laplacian: Laplacian) -> np.ndarray:
    """Rows of the eigenvectors of the k smallest Laplacian eigenvalues, shape (L, k).

    unnormalized: L = D - W (the paper's formula).
    normalized: L_sym = I - D^-1/2 W D^-1/2, rows scaled to unit length (Ng, Jordan, Weiss 2001).
    An isolated layer (degree 0) keeps a zero row under the normalized form.
    """
    degree = adjacency.sum(axis=1)
    if laplacian == "unnormalized":
        lap = np.diag(degree) - adjacency
    elif laplacian == "normalized":
        inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
        lap = np.eye(len(degree)) - inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]
    else:
        raise ValueError(f"unknown laplacian {laplacian!r}")
    _, vectors = np.linalg.eigh(lap)  # eigenvalues ascending
    emb = vectors[:, :k]
    if laplacian == "normalized":
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb / np.where(norms > 0, norms, 1.0)
    return emb


def group_layers(
    similarity: np.ndarray, k: int, laplacian: Laplacian = "normalized", seed: int = 0
) -> Groups:
    """Split L layers into exactly k non-empty groups by spectral clustering.

    Args:
        similarity: (L, L) layer similarity (e.g. cosine), symmetric.
        k: number of groups L_s, 1 <= k <= L.
        laplacian: which graph Laplacian to embed with.
        seed: k-means seed (fixed, for determinism).

    Returns:
        k sorted groups covering range(L) exactly once, ordered by anchor (lowest) layer.
    """
    num_layers = similarity.shape[0]
    if not 1 <= k <= num_layers:
        raise ValueError(f"k must be in [1, {num_layers}], got {k}")
    if k == num_layers:
        return [[i] for i in range(num_layers)]
    if k == 1:
        return [list(range(num_layers))]
    emb = spectral_embedding(similarity_graph(similarity), k, laplacian)
    labels = _kmeans_labels(emb, k, seed)
    groups = _groups_from_labels(labels, k)
    assert sorted(i for g in groups for i in g) == list(range(num_layers))
    return groups


KMEANS_RETRIES = 5
"""Seeds tried (seed, seed + 1, ...) before `_groups_from_labels` splits groups itself."""


def _kmeans_labels(emb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels; if a seed yields fewer than k clusters, try the next few seeds.

    Only scikit-learn's "Number of distinct clusters (m) found smaller than n_clusters (k)"
    ConvergenceWarning is silenced: this function retries exactly that case, and
    `_groups_from_labels` logs it if every seed collapses. Any other warning reaches the user.
    """
    from sklearn.cluster import KMeans  # imported here: ~2 s, needed by the server only
    from sklearn.exceptions import ConvergenceWarning

    labels = np.zeros(len(emb), dtype=int)
    for attempt in range(KMEANS_RETRIES):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Number of distinct clusters",
                                    category=ConvergenceWarning)
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed + attempt).fit_predict(emb)
        if len(set(labels.tolist())) == k:
            return labels
        log.debug("k-means seed %d found fewer than %d clusters; retrying", seed + attempt, k)
    return labels


def _groups_from_labels(labels: np.ndarray, k: int) -> Groups:
    """Turn labels into k sorted groups; if clustering left fewer than k, split the largest.

    Duplicate embedding rows (e.g. identical layers) can make k-means return fewer distinct
    clusters than k. Splitting the largest group in two by layer order keeps the contract
    "exactly k non-empty groups"; it is logged because it bypasses the spectral solution.
    """
    groups = sorted(
        (sorted(np.flatnonzero(labels == c).tolist()) for c in set(labels.tolist())),
        key=lambda g: g[0],
    )
    if len(groups) < k:
        log.warning(
            "k-means found %d distinct groups for k=%d; splitting the largest groups",
            len(groups),
            k,
        )
    while len(groups) < k:
        largest = max(range(len(groups)), key=lambda i: (len(groups[i]), -groups[i][0]))
        g = groups.pop(largest)
        half = len(g) // 2
        groups.extend([g[:half], g[half:]])
        groups.sort(key=lambda grp: grp[0])
    return groups


def contiguous_groups(num_layers: int, k: int) -> Groups:
    """k contiguous groups of (nearly) equal size: the paper's "EVEN" ablation."""
    bounds = np.linspace(0, num_layers, k + 1).round().astype(int)
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def format_groups(groups: Groups) -> str:
    """Compact text form, e.g. "[0-2] [3-6] [7]" (runs of consecutive layers as ranges)."""

    def part(g: list[int]) -> str:
        runs, start = [], g[0]
        for a, b in zip(g, g[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        return "[" + ",".join(runs) + "]"

    return " ".join(part(g) for g in groups)

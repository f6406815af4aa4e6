"""DGLG: spectral grouping of layers (devft_paper.md §2, §7.2-7.4)."""

import logging

import numpy as np
import pytest

from devft.core.grouping import (
    _groups_from_labels,
    contiguous_groups,
    format_groups,
    group_layers,
    similarity_graph,
    spectral_embedding,
)

LAPLACIANS = ["normalized", "unnormalized"]


def planted_similarity(clusters, within=0.9, across=-0.3, noise=0.05, seed=0):
    """Symmetric (L, L) similarity: `within` inside each cluster, `across` between, plus noise."""
    num_layers = sum(len(c) for c in clusters)
    label = np.empty(num_layers, dtype=int)
    for c, members in enumerate(clusters):
        label[members] = c
    same = label[:, None] == label[None, :]
    sim = np.where(same, within, across)
    rng = np.random.default_rng(seed)
    eps = rng.normal(0.0, noise, size=(num_layers, num_layers))
    sim = sim + (eps + eps.T) / 2
    np.fill_diagonal(sim, 1.0)
    return sim


def as_partition(groups):
    return {frozenset(g) for g in groups}


def check_contract(groups, num_layers, k):
    """Exactly k non-empty groups, every layer once, each sorted, groups ordered by anchor."""
    assert len(groups) == k
    assert all(len(g) > 0 for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(num_layers))
    assert all(g == sorted(g) for g in groups)
    anchors = [g[0] for g in groups]
    assert anchors == sorted(anchors)
    assert anchors[0] == 0
    assert all(isinstance(i, int) for g in groups for i in g)


# ---- similarity_graph ------------------------------------------------------------------------


def test_similarity_graph_clips_negatives_symmetrizes_and_drops_self_loops():
    sim = np.array([[1.0, 0.5, -0.2], [0.3, 1.0, 0.4], [-0.7, 0.4, 1.0]])
    w = similarity_graph(sim)
    expected = np.array([[0.0, 0.4, 0.0], [0.4, 0.0, 0.4], [0.0, 0.4, 0.0]])
    np.testing.assert_allclose(w, expected)
    assert w.dtype == np.float64
    assert (w >= 0).all()


def test_similarity_graph_all_negative_is_empty():
    sim = -np.ones((5, 5))
    np.fill_diagonal(sim, 1.0)
    assert not similarity_graph(sim).any()


def test_similarity_graph_does_not_modify_input():
    sim = np.array([[1.0, -0.5], [-0.5, 1.0]])
    before = sim.copy()
    similarity_graph(sim)
    np.testing.assert_array_equal(sim, before)


# ---- spectral_embedding ----------------------------------------------------------------------


@pytest.mark.parametrize("laplacian", LAPLACIANS)
def test_spectral_embedding_is_constant_on_connected_components(laplacian):
    # two components {0,1,2} and {3,4}: the 2 smallest eigenvectors span their indicators
    w = np.zeros((5, 5))
    for a, b in [(0, 1), (1, 2), (0, 2), (3, 4)]:
        w[a, b] = w[b, a] = 1.0
    emb = spectral_embedding(w, 2, laplacian)
    assert emb.shape == (5, 2)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-8)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-8)
    np.testing.assert_allclose(emb[3], emb[4], atol=1e-8)
    assert np.linalg.norm(emb[0] - emb[3]) > 0.1


def test_spectral_embedding_normalized_rows_have_unit_length():
    w = similarity_graph(planted_similarity([[0, 1, 2, 3], [4, 5, 6, 7]]))
    emb = spectral_embedding(w, 2, "normalized")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-10)


def test_spectral_embedding_unnormalized_first_vector_is_constant():
    # D - W always has the constant vector in its null space
    w = similarity_graph(planted_similarity([list(range(6))], noise=0.1))
    emb = spectral_embedding(w, 3, "unnormalized")
    np.testing.assert_allclose(np.abs(emb[:, 0]), 1 / np.sqrt(6), atol=1e-8)


def test_spectral_embedding_unknown_laplacian():
    with pytest.raises(ValueError, match="laplacian"):
        spectral_embedding(np.zeros((3, 3)), 2, "random-walk")


# ---- group_layers: planted structure ---------------------------------------------------------


@pytest.mark.parametrize("laplacian", LAPLACIANS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_contiguous_planted_blocks(laplacian, seed):
    clusters = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    sim = planted_similarity(clusters, noise=0.05, seed=seed)
    groups = group_layers(sim, 3, laplacian, seed=seed)
    check_contract(groups, 12, 3)
    assert groups == clusters


@pytest.mark.parametrize("laplacian", LAPLACIANS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_non_contiguous_planted_clusters(laplacian, seed):
    clusters = [[0, 5, 9, 2], [1, 4, 8, 11], [3, 6, 7, 10]]
    sim = planted_similarity(clusters, noise=0.05, seed=seed)
    groups = group_layers(sim, 3, laplacian, seed=seed)
    check_contract(groups, 12, 3)
    assert groups == [[0, 2, 5, 9], [1, 4, 8, 11], [3, 6, 7, 10]]


@pytest.mark.parametrize("laplacian", LAPLACIANS)
def test_recovers_unequal_interleaved_clusters_with_weak_positive_across(laplacian):
    # sizes 6/4/2, cross-cluster similarity slightly positive (not clipped away)
    clusters = [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7], [9, 11]]
    sim = planted_similarity(clusters, within=0.8, across=0.05, noise=0.02, seed=3)
    groups = group_layers(sim, 3, laplacian)
    check_contract(groups, 12, 3)
    assert as_partition(groups) == as_partition(clusters)


@pytest.mark.parametrize("laplacian", LAPLACIANS)
def test_conflicting_layers_are_separated(laplacian):
    # 0 and 1 agree, 2 and 3 agree, the pairs conflict (negative cosine): k=2 splits the pairs
    sim = np.array(
        [
            [1.0, 0.8, -0.6, -0.5],
            [0.8, 1.0, -0.4, -0.7],
            [-0.6, -0.4, 1.0, 0.9],
            [-0.5, -0.7, 0.9, 1.0],
        ]
    )
    assert group_layers(sim, 2, laplacian) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("laplacian", LAPLACIANS)
def test_deterministic_for_a_seed(laplacian):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 5))
    sim = np.corrcoef(x)
    for k in [2, 3, 5, 8]:
        first = group_layers(sim, k, laplacian, seed=11)
        for _ in range(3):
            assert group_layers(sim.copy(), k, laplacian, seed=11) == first


@pytest.mark.parametrize("laplacian", LAPLACIANS)
def test_accepts_non_float64_input(laplacian):
    clusters = [[0, 1, 2], [3, 4, 5]]
    sim = planted_similarity(clusters).astype(np.float32)
    assert group_layers(sim, 2, laplacian) == clusters


# ---- group_layers: exactly k groups for every k ----------------------------------------------


def _degenerate(name, num_layers):
    if name == "identical":
        return np.ones((num_layers, num_layers))
    if name == "zero":
        return np.zeros((num_layers, num_layers))
    if name == "negative":
        sim = -np.ones((num_layers, num_layers))
        np.fill_diagonal(sim, 1.0)
        return sim
    if name == "random":
        x = np.random.default_rng(0).normal(size=(num_layers, 4))
        return np.atleast_2d(np.corrcoef(x))
    if name == "planted":
        return planted_similarity([list(range(0, num_layers, 2)), list(range(1, num_layers, 2))])
    raise AssertionError(name)


@pytest.mark.parametrize("laplacian", LAPLACIANS)
@pytest.mark.parametrize(
    ("kind", "num_layers"),
    [
        ("identical", 1),
        ("identical", 2),
        ("identical", 12),
        ("zero", 2),
        ("zero", 12),
        ("negative", 2),
        ("negative", 12),
        ("random", 7),
        ("planted", 8),
    ],
)
def test_exactly_k_nonempty_groups_for_every_k(laplacian, kind, num_layers):
    sim = _degenerate(kind, num_layers)
    for k in range(1, num_layers + 1):
        check_contract(group_layers(sim, k, laplacian), num_layers, k)


def test_k_extremes():
    sim = planted_similarity([[0, 1, 2], [3, 4, 5]])
    assert group_layers(sim, 1) == [[0, 1, 2, 3, 4, 5]]
    assert group_layers(sim, 6) == [[0], [1], [2], [3], [4], [5]]


@pytest.mark.parametrize("k", [0, -1, 7])
def test_invalid_k(k):
    with pytest.raises(ValueError, match="k must be in"):
        group_layers(np.eye(6), k)


def test_groups_from_labels_splits_largest_when_kmeans_returns_too_few(caplog):
    # k-means gave 2 clusters for k=3: the largest ({0,1,4,5}) is split in layer order
    labels = np.array([1, 1, 0, 0, 1, 1])
    with caplog.at_level(logging.WARNING, logger="devft.core.grouping"):
        groups = _groups_from_labels(labels, 3)
    assert groups == [[0, 1], [2, 3], [4, 5]]
    assert "k=3" in caplog.text


def test_groups_from_labels_sorted_by_anchor_without_fallback(caplog):
    labels = np.array([2, 0, 2, 1, 0])
    with caplog.at_level(logging.WARNING, logger="devft.core.grouping"):
        groups = _groups_from_labels(labels, 3)
    assert groups == [[0, 2], [1, 4], [3]]
    assert caplog.records == []


def test_groups_from_labels_all_one_label_reaches_k():
    groups = _groups_from_labels(np.zeros(7, dtype=int), 4)
    check_contract(groups, 7, 4)
    # splits: [0..6] -> [0,1,2] [3..6] -> [0,1,2] [3,4] [5,6] -> [0] [1,2] [3,4] [5,6]
    assert groups == [[0], [1, 2], [3, 4], [5, 6]]


# ---- contiguous_groups / format_groups -------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "k", "expected"),
    [
        (12, 3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]),
        (4, 4, [[0], [1], [2], [3]]),
        (5, 1, [[0, 1, 2, 3, 4]]),
        (7, 2, [[0, 1, 2, 3], [4, 5, 6]]),  # boundary 3.5 rounds to 4
    ],
)
def test_contiguous_groups(num_layers, k, expected):
    assert contiguous_groups(num_layers, k) == expected


def test_contiguous_groups_contract():
    for num_layers in range(1, 33):
        for k in range(1, num_layers + 1):
            groups = contiguous_groups(num_layers, k)
            check_contract(groups, num_layers, k)
            sizes = [len(g) for g in groups]
            assert max(sizes) - min(sizes) <= 1
            assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)


@pytest.mark.parametrize(
    ("groups", "text"),
    [
        ([[0, 1, 2], [3, 4, 5, 6], [7]], "[0-2] [3-6] [7]"),
        ([[0, 2, 3, 4, 9], [1, 5], [6, 7, 8]], "[0,2-4,9] [1,5] [6-8]"),
        ([[0]], "[0]"),
        ([[0, 1]], "[0-1]"),
        ([[3, 5, 7]], "[3,5,7]"),
    ],
)
def test_format_groups(groups, text):
    assert format_groups(groups) == text


def test_group_layers_keeps_k_groups_when_kmeans_collapses(monkeypatch, caplog):
    # force the k-means step to return only 2 distinct labels for k=4
    import devft.core.grouping as grouping

    monkeypatch.setattr(
        grouping, "_kmeans_labels", lambda emb, k, seed: np.array([0, 0, 0, 1, 1, 1, 0, 0])
    )
    with caplog.at_level(logging.WARNING, logger="devft.core.grouping"):
        groups = group_layers(planted_similarity([[0, 1, 2, 3], [4, 5, 6, 7]]), 4)
    check_contract(groups, 8, 4)
    # {0,1,2,6,7} -> [0,1] [2,6,7]; then [2,6,7] and [3,4,5] tie at size 3 and the lower
    # anchor goes first: [2,6,7] -> [2] [6,7]
    assert groups == [[0, 1], [2], [3, 4, 5], [6, 7]]
    assert "splitting" in caplog.text


class _FakeKMeans:
    """Stands in for sklearn's KMeans: collapsed labels for the first `collapsing` seeds."""

    seeds: list = []
    collapsing = 2
    warn: tuple | None = None

    def __init__(self, n_clusters, n_init, random_state):
        self.k, self.seed = n_clusters, random_state
        _FakeKMeans.seeds.append(random_state)

    def fit_predict(self, emb):
        import warnings

        if _FakeKMeans.warn is not None:
            warnings.warn(*_FakeKMeans.warn)
        if len(_FakeKMeans.seeds) <= _FakeKMeans.collapsing:
            return np.zeros(len(emb), dtype=int)
        return np.arange(len(emb)) % self.k


@pytest.fixture
def fake_kmeans(monkeypatch):
    import sklearn.cluster

    monkeypatch.setattr(sklearn.cluster, "KMeans", _FakeKMeans)
    monkeypatch.setattr(_FakeKMeans, "seeds", [])
    monkeypatch.setattr(_FakeKMeans, "collapsing", 2)
    monkeypatch.setattr(_FakeKMeans, "warn", None)
    return _FakeKMeans


def test_kmeans_labels_retries_the_next_seeds_when_clusters_collapse(fake_kmeans):
    from devft.core.grouping import _kmeans_labels

    labels = _kmeans_labels(np.zeros((6, 2)), 3, seed=7)
    assert fake_kmeans.seeds == [7, 8, 9]  # two collapsed seeds, then one that gives k
    assert sorted(set(labels.tolist())) == [0, 1, 2]


def test_kmeans_labels_gives_up_after_the_retries(fake_kmeans):
    from devft.core.grouping import KMEANS_RETRIES, _kmeans_labels

    fake_kmeans.collapsing = 100
    labels = _kmeans_labels(np.zeros((6, 2)), 3, seed=0)
    assert fake_kmeans.seeds == list(range(KMEANS_RETRIES))
    assert set(labels.tolist()) == {0}  # left to _groups_from_labels, which splits and logs


def test_kmeans_silences_only_the_collapsed_clusters_warning(fake_kmeans, recwarn):
    from sklearn.exceptions import ConvergenceWarning

    from devft.core.grouping import _kmeans_labels

    fake_kmeans.warn = ("Number of distinct clusters (1) found smaller than n_clusters (3).",
                        ConvergenceWarning)
    _kmeans_labels(np.zeros((6, 2)), 3, seed=0)
    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]
    fake_kmeans.seeds, fake_kmeans.warn = [], ("lloyd did not converge", ConvergenceWarning)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        _kmeans_labels(np.zeros((6, 2)), 3, seed=0)


def test_real_kmeans_on_two_distinct_points_keeps_k_groups_without_warnings(recwarn):
    # 2 distinct points, k=3: every seed collapses; no warning leaks, group_layers keeps k
    from devft.core.grouping import _kmeans_labels

    emb = np.array([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 3)
    labels = _kmeans_labels(emb, 3, seed=0)
    assert len(set(labels[:3].tolist())) == 1 and len(set(labels[3:].tolist())) == 1
    assert not [w for w in recwarn if "distinct clusters" in str(w.message)]

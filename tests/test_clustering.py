"""agglomerative_labels: the same partition as scikit-learn's exact average
linkage, without an N x N matrix; a bounded-memory fallback for a giant component."""

import numpy as np
import pytest
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

import sort_faces as MODULE
from sort_faces import agglomerative_labels

pytestmark = pytest.mark.fast  # no model: the quick tier


def make_faces(n, dim=128, seed=0, big=0.1):
    """Unit embeddings: one large identity, Zipf-sized ones, 10 % singletons,
    look-alike identity pairs; intra distance ~0.3-0.6, inter ~0.8-1.0."""
    rng = np.random.default_rng(seed)
    sizes = [int(n * big)] if big else []
    n_single = n // 10
    left = n - sum(sizes) - n_single
    while left > 0:
        s = int(min(rng.zipf(1.7), max(2, n // 50), left))
        sizes.append(s)
        left -= s
    sizes = np.array(sizes + [1] * n_single)
    centres = rng.standard_normal((len(sizes), dim)) / np.sqrt(dim) + 0.35 / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sib = rng.choice(len(sizes), len(sizes) // 10, replace=False)
    centres[sib] = centres[rng.choice(len(sizes), sib.size)] + 1.3 * centres[sib]
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    sigma = np.where(rng.random(n) < 0.12, rng.uniform(1.0, 1.5, n), rng.uniform(0.65, 1.0, n))
    X = centres[truth] + sigma[:, None] * rng.standard_normal((n, dim)) / np.sqrt(dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), truth


def sklearn_labels(X, threshold):
    return AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                   distance_threshold=threshold).fit_predict(X)


def canonical(labels):
    """Partition in a label-free form: clusters renumbered by first occurrence."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse.ravel()]


@pytest.fixture(scope="module")
def faces():
    return make_faces(2500)


@pytest.mark.parametrize("threshold", [0.2, 0.45, 0.6, 0.7, 0.9, 1.2])
def test_matches_sklearn(faces, threshold):
    X, _ = faces
    labels, info = agglomerative_labels(X, threshold)
    ref = sklearn_labels(X, threshold)
    assert labels.dtype == np.int64 and labels.shape == (len(X),)
    np.testing.assert_array_equal(canonical(labels), canonical(ref))
    assert info["n_clusters"] == len(np.unique(ref))
    assert info["fallback_components"] == []
    assert {"n_components", "largest_component", "seconds"} <= set(info)


def test_matches_sklearn_small_blocks_and_edge_buffer(faces, monkeypatch):
    # Many tiles, and edge-buffer collapses after nearly every tile.
    monkeypatch.setattr(MODULE, "CLUSTER_EDGE_BUFFER", 50)
    monkeypatch.setattr(MODULE, "CLUSTER_TILE_ELEMS", 300 * 100)
    X, _ = faces
    labels, _ = agglomerative_labels(X, 0.6, block_rows=100)
    np.testing.assert_array_equal(canonical(labels), canonical(sklearn_labels(X, 0.6)))


def test_threshold_boundary_is_strict():
    # Two points at cosine distance exactly 0.5 (cos 60 deg in float64 terms).
    X = np.array([[1.0, 0.0], [0.5, np.sqrt(0.75)]], np.float32)
    d = 1.0 - float(np.dot(X[0].astype(np.float64), X[1].astype(np.float64))
                    / np.prod(np.linalg.norm(X.astype(np.float64), axis=1)))
    for t in (d, np.nextafter(d, np.inf)):
        labels, _ = agglomerative_labels(X, t)
        np.testing.assert_array_equal(canonical(labels), canonical(sklearn_labels(X, t)))


def test_unnormalised_input_is_normalised(faces):
    X, _ = faces
    scaled = X[:600] * np.linspace(0.5, 3.0, 600, dtype=np.float32)[:, None]
    labels, _ = agglomerative_labels(scaled, 0.6)
    np.testing.assert_array_equal(canonical(labels), canonical(sklearn_labels(scaled, 0.6)))


def test_fallback_exact_path_matches_sklearn():
    # Reciprocal-nearest-neighbour rounds plus dense weighted linkage are exact
    # when no leader pass is needed (here: far groups retire quickly).
    X, _ = make_faces(2000, seed=2)
    labels, info = agglomerative_labels(X, 0.7, max_component=300)
    (fb,) = info["fallback_components"]
    assert fb["exact"] and fb["method"] == "rnn+weighted-average" and fb["groups"] <= 300
    np.testing.assert_array_equal(canonical(labels), canonical(sklearn_labels(X, 0.7)))


def test_fallback_leader_path_is_reported_and_sensible():
    X, truth = make_faces(3000, seed=1, big=0.2)  # one 600-face identity
    labels, info = agglomerative_labels(X, 0.6, max_component=200)
    fb = info["fallback_components"]
    assert fb and all(f["size"] > 200 and f["groups"] <= 200 for f in fb)
    assert any("leader" in f["method"] and not f["exact"] for f in fb)
    assert all(f["method"].endswith("weighted-average") for f in fb)
    assert info["largest_component"] >= 600
    assert adjusted_rand_score(sklearn_labels(X, 0.6), labels) > 0.98
    assert adjusted_rand_score(truth, labels) > 0.95
    assert np.bincount(labels).max() >= 550  # the big identity stays (almost) whole


@pytest.mark.parametrize("threshold", [0.7, 0.85, 1.0])
def test_fallback_one_giant_component(threshold, monkeypatch):
    # Loose thresholds chain everything into one component; force leader passes.
    monkeypatch.setattr(MODULE, "CLUSTER_RNN_MIN_GAIN", 1.1)
    X, _ = make_faces(2000, seed=2)
    labels, info = agglomerative_labels(X, threshold, max_component=300)
    assert len(info["fallback_components"]) == 1
    assert adjusted_rand_score(sklearn_labels(X, threshold), labels) > 0.9


def test_deterministic_numbering(faces):
    X, _ = faces
    labels, info = agglomerative_labels(X, 0.6)
    again, _ = agglomerative_labels(X.copy(), 0.6)
    np.testing.assert_array_equal(labels, again)
    k = info["n_clusters"]
    assert set(np.unique(labels)) == set(range(k))
    sizes = np.bincount(labels)
    first = np.array([np.flatnonzero(labels == c)[0] for c in range(k)])
    assert np.all(np.diff(sizes) <= 0)
    ties = np.diff(sizes) == 0
    assert np.all(np.diff(first)[ties] > 0)
    # Same partition after permuting the rows.
    perm = np.random.default_rng(0).permutation(len(X))
    permuted, _ = agglomerative_labels(X[perm], 0.6)
    np.testing.assert_array_equal(canonical(permuted[np.argsort(perm)]), canonical(labels))


def test_tiny_inputs():
    labels, info = agglomerative_labels(np.zeros((0, 8), np.float32), 0.5)
    assert labels.shape == (0,) and info["n_clusters"] == 0
    labels, _ = agglomerative_labels(np.eye(1, 8, dtype=np.float32), 0.5)
    np.testing.assert_array_equal(labels, [0])
    labels, _ = agglomerative_labels(np.eye(3, 8, dtype=np.float32), 0.5)
    np.testing.assert_array_equal(labels, [0, 1, 2])

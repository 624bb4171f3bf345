"""Clustering many faces: candidate pairs from faiss's inverted lists instead of
the all-pairs product (issue 15, part B). Pure functions, no model."""

import re

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

import sort_faces


def faces(n: int, people: int, seed: int = 0, spread: float = 0.9) -> np.ndarray:
    """Unit vectors around `people` random centres (cosine distances inside a
    person about 0.3-0.5, between people about 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, 128)) / np.sqrt(128)
    who = rng.integers(0, people, n)
    X = centres[who] + spread * rng.standard_normal((n, 128)) / np.sqrt(128)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.fast
def test_probing_every_list_gives_the_exact_partition(monkeypatch):
    X = faces(3000, 150)
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "nprobe", 10**6)
    exact, exact_info = sort_faces.agglomerative_labels(X, 0.55, method="exact")
    ann, info = sort_faces.agglomerative_labels(X, 0.55, method="ann")
    assert exact_info["method"] == "exact" and info["method"].startswith("ann: inverted lists")
    assert info["candidate_recall"] == 1.0
    assert np.array_equal(exact, ann)


@pytest.mark.fast
def test_a_missed_pair_can_only_split_a_component(monkeypatch):
    X = faces(3000, 150, seed=1)
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "nprobe", 1)  # a poor index, on purpose
    ann, info = sort_faces.agglomerative_labels(X, 0.55, method="ann")
    assert 0 < info["candidate_recall"] < 1
    # the exact components: faces linked by pairs nearer than the threshold (a hair of
    # slack for float32 rounding)
    _, components = connected_components(csr_matrix(X @ X.T > 1 - 0.55 - 1e-4), directed=False)
    for label in np.unique(ann):  # every cluster lies inside one exact component
        assert len(np.unique(components[ann == label])) == 1
    exact, _ = sort_faces.agglomerative_labels(X, 0.55, method="exact")
    assert ann.max() >= exact.max()  # so never fewer clusters


@pytest.mark.fast
def test_auto_takes_the_index_only_from_its_size(monkeypatch):
    X = faces(2500, 100, seed=2)
    assert sort_faces.agglomerative_labels(X, 0.55)[1]["method"] == "exact"
    monkeypatch.setattr(sort_faces, "CLUSTER_ANN_FROM", 2000)
    assert sort_faces.agglomerative_labels(X, 0.55)[1]["method"].startswith("ann")
    with pytest.raises(ValueError, match="method"):
        sort_faces.agglomerative_labels(X, 0.55, method="fast")


@pytest.mark.fast
def test_bcubed_counts_sparsely_and_agrees_with_the_definition():
    rng = np.random.default_rng(3)
    truth, pred = rng.integers(0, 40, 500), rng.integers(0, 60, 500)
    same_t, same_p = truth[:, None] == truth[None, :], pred[:, None] == pred[None, :]
    both = (same_t & same_p).sum(axis=1)
    expected = (np.mean(both / same_p.sum(axis=1)), np.mean(both / same_t.sum(axis=1)))
    assert np.allclose(sort_faces.bcubed(truth, pred), expected)
    big = np.arange(1_000_000)  # a million singletons each way: no dense table
    assert sort_faces.bcubed(big, big[::-1]) == (1.0, 1.0)


def isolated_pairs(pairs: int, seed: int = 4) -> np.ndarray:
    """Pairs of faces at cosine similarity about 0.55, each pair far from
    every other face: what the lists miss most (two faces alone in a sparse
    part of the space, their lists far apart)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((pairs, 256))  # unrelated faces: cosine 0 +- 0.06
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    z = rng.standard_normal((pairs, 256))
    z -= (z * a).sum(axis=1, keepdims=True) * a  # at a right angle to a
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    b = a + 1.5 * z  # cosine 1 / sqrt(1 + 1.5**2) = 0.555 with a
    X = np.concatenate([a, b / np.linalg.norm(b, axis=1, keepdims=True)])
    return X.astype(np.float32)


@pytest.mark.fast
def test_faces_left_alone_are_compared_again_through_more_lists(monkeypatch):
    X = isolated_pairs(1500)
    exact, _ = sort_faces.agglomerative_labels(X, 0.55, method="exact")
    assert exact.max() + 1 == 1500  # every pair is a cluster
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "nprobe", 2)  # a poor index, on purpose
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "rescue_nprobe", 2)  # and no rescue
    poor, poor_info = sort_faces.agglomerative_labels(X, 0.55, method="ann")
    assert poor.max() + 1 > 1600 and poor_info["candidate_recall"] < 0.9
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "rescue_nprobe", 10**6)  # every list
    rescued, info = sort_faces.agglomerative_labels(X, 0.55, method="ann")
    assert np.array_equal(rescued, exact) and info["candidate_recall"] == 1.0
    assert re.search(r"; [1-9]\d* faces alone compared again through 46 lists with the 3000 "
                     r"faces of components of at most 3$", info["method"])


@pytest.mark.fast
def test_queries_in_blocks_keep_the_rescue_and_the_constraints(monkeypatch):
    """Issue 31: the search and the rescue take their queries a block at a
    time (the rescue skipping the lists searched already); the partition is
    the exact one, and people's decisions and the same-photo rule hold."""
    X = isolated_pairs(1500, seed=5)  # face k and face 1500 + k are a pair
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "nprobe", 2)  # a poor index, on purpose
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "rescue_nprobe", 10**6)  # every list
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "query_block", 97)
    rules = {"together": [np.array([1, 2]), np.array([3]), np.array([1503])],
             "apart": [(1, 2)],  # the groups of faces 3 and 1503: a pair, kept apart
             "cannot_link": np.array([[0, 1500], [7, 8]])}  # 0 and 1500 share a photo
    exact, _ = sort_faces.agglomerative_labels(X, 0.55, method="exact", **rules)
    ann, info = sort_faces.agglomerative_labels(X, 0.55, method="ann", **rules)
    assert np.array_equal(ann, exact) and info["candidate_recall"] == 1.0
    assert ann[0] != ann[1500] and ann[3] != ann[1503]  # kept apart
    assert ann[1] == ann[2]  # put together
    assert ann[5] == ann[1505] and ann[7] == ann[1507]  # the other pairs found
    assert info["cannot_link"]["pairs"] == 1  # 7 and 8 never share a component
    assert [s["stage"] for s in info["stages"]] == \
        ["int8 codes", "k-means", "candidate search", "rescue", "candidate recall", "linkage"]
    assert all(s["seconds"] >= 0 and s["rss_mb"] > 0 for s in info["stages"])
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "rescue_nprobe", 2)  # no rescue: pairs split
    poor, _ = sort_faces.agglomerative_labels(X, 0.55, method="ann", **rules)
    assert poor.max() > exact.max()


@pytest.mark.fast
def test_int8_products_lose_no_pair_at_the_threshold(monkeypatch):
    """The int8 candidate search (issue 31) re-checks in float32 every pair
    its codes put near the threshold: pairs a hair either side of it come out
    as the float32 search has them."""
    rng = np.random.default_rng(6)
    a = rng.standard_normal((1200, 512))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    z = rng.standard_normal((1200, 512))
    z -= (z * a).sum(axis=1, keepdims=True) * a
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    cos = 1 - 0.55 - 1e-3 + rng.uniform(-0.004, 0.004, 1200)  # about the search's bound
    b = cos[:, None] * a + np.sqrt(1 - cos**2)[:, None] * z
    X = np.concatenate([a, b]).astype(np.float32)
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "nprobe", 10**6)  # every list: no miss
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "int8", False)
    float32, plain = sort_faces.agglomerative_labels(X, 0.55, method="ann")
    monkeypatch.setitem(sort_faces.CLUSTER_ANN, "int8", True)
    int8, coded = sort_faces.agglomerative_labels(X, 0.55, method="ann")
    assert np.array_equal(int8, float32) and coded["n_edges"] == plain["n_edges"]
    assert 100 < plain["n_edges"] < 1200  # pairs on both sides of the bound
    assert "int8 codes" in [s["stage"] for s in coded["stages"]]
    assert "int8 codes" not in [s["stage"] for s in plain["stages"]]

"""Analyses on synthetic inputs with a planted answer."""

from __future__ import annotations

import numpy as np

from looptrace.analysis import applications as app
from looptrace.apps.studies.parity import circuit as pc


def test_planted_period_is_detected() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(40)
    x = np.sin(2 * np.pi * t / 4) + 0.2 * rng.standard_normal(40)
    assert pc.detect_period(x, max_lag=12) == 4
    y = np.sin(2 * np.pi * t / 6) + 0.1 * rng.standard_normal(40)
    assert pc.detect_period(y, max_lag=12) == 6


def test_lagged_cosine_of_a_cycle_is_one() -> None:
    base = np.eye(4)
    states = np.array([base[i % 4] for i in range(20)])
    assert np.allclose(pc.lagged_cosine(states, 4), 1.0)
    assert np.allclose(pc.lagged_cosine(states, 2), 0.0)


def test_kmeans_recovers_planted_clusters_and_transitions() -> None:
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=float)
    seq = np.array([i % 4 for i in range(40)])
    x = centres[seq] + 0.3 * rng.standard_normal((40, 2))
    labels, _ = pc.kmeans(x, 4, seed=0)
    # the clustering equals the planted one up to renaming
    mapping = {int(a): int(b) for a, b in zip(seq, labels, strict=True)}
    assert len(set(mapping.values())) == 4 and all(
        mapping[int(s)] == int(lab) for s, lab in zip(seq, labels, strict=True)
    )
    trans = pc.transition_matrix(labels, 4)
    assert np.allclose(trans.sum(1), 1.0)
    assert np.allclose(np.sort(trans, axis=1)[:, -1], 1.0), "a deterministic cycle has one successor per state"


def test_proxy_circuit_learns_planted_lookup() -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 8)) * 5
    states = rng.integers(0, 4, 400)
    x = centres[states] + 0.1 * rng.standard_normal((400, 8))
    parity = states % 2
    proxy = pc.fit_proxy(x[:200], parity[:200], k=4)
    acc = pc.proxy_accuracy(proxy, x[200:], parity[200:])
    assert acc["accuracy"] == 1.0 and acc["selective_accuracy"] == 1.0
    far = pc.proxy_accuracy(proxy, x[200:] + 100.0, parity[200:])
    assert far["coverage"] == 0.0, "states far from every centroid are off-manifold"


def test_influence_horizon_of_planted_decay() -> None:
    e = np.array([1, 5, 10, 8, 4, 2, 0.2, 0.1, 0.05, 0.01])
    assert app.influence_horizon(e, 0.05) == 6  # 0.2 < 0.5 from step 7 on
    assert app.influence_horizon(e, 0.5) == 4
    assert app.influence_horizon(np.zeros(5), 0.1) == 0


def test_cancellation_pair_is_found(tmp_path) -> None:
    rng = np.random.default_rng(3)
    sdi = rng.normal(size=(5, 4, 6)) * 0.01
    sdi[:, :, 0] += 1.0  # every pair has a strong net positive influence
    sdi[2, 3] = np.array([5.0, -5.0, 3.0, -3.0, 0.0, 0.001])  # planted: big per-step, tiny total
    pairs = app.cancellation_pairs(sdi, ratio=0.1)
    assert pairs and (pairs[0]["train"], pairs[0]["query"]) == (2, 3)
    assert all((p["train"], p["query"]) == (2, 3) for p in pairs)


def test_depth_ranking_and_export(tmp_path) -> None:
    sdi = np.zeros((3, 2, 4))
    sdi[0, :, 3] = 1.0  # late
    sdi[1, :, 0] = 1.0  # early
    sdi[2, :, :] = 0.1
    r = app.depth_ranking(sdi, split_step=2)
    assert np.argmax(r[:, 2]) == 0 and np.argmin(r[:, 2]) == 1
    app.export_ranking(r, tmp_path / "rank.csv")
    rows = (tmp_path / "rank.csv").read_text().splitlines()
    assert rows[1].split(",")[1] == "0"

"""Analyses on synthetic inputs with a planted answer."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_profile_shape_judges_the_peak_by_magnitude() -> None:
    """An all-negative profile whose largest magnitude is at step 6 and whose read-out value is the smallest:
    the largest-magnitude step is 6, the read-out ranks last by magnitude, every step is negative. Catches: a
    peak taken as the largest signed value (on an all-negative profile that is the step of smallest
    magnitude), a rank counted from the wrong end, the sign count."""
    from looptrace.apps.studies.parity.study import profile_shape

    p = -np.array([3.0, 1, 2, 4, 2, 9, 1, 5, 3, 2, 4, 0.5])
    margin = np.sin(np.arange(12))
    shape = profile_shape(p, margin, readout=12, period=4)
    assert shape["largest_magnitude_step"] == 6 and shape["signed_max_step"] == 12
    assert shape["readout_magnitude_rank"] == 12 and shape["negative_steps"] == 12 and shape["positive_steps"] == 0
    assert shape["readout_over_largest"] == pytest.approx(0.5 / 9)
    assert shape["mass_last_quarter"] == pytest.approx((2 + 4 + 0.5) / np.abs(p).sum())


@pytest.mark.parametrize("lag", [1, 2, -1])
def test_margin_alignment_finds_a_planted_lag(lag: int) -> None:
    """|SDI| peaks every 4 steps and the margin jumps ``lag`` steps after each: the best lag's phase is
    ``lag``, every lag is compared on the same steps, and the window is wider than the period. Catches: lags
    compared on overlaps that shrink with the lag (longer lags then fit better only because they drop the
    first steps), a phase reduced to the wrong interval, correlating the margin level instead of its increase."""
    from looptrace.apps.studies.parity.study import margin_alignment

    rng = np.random.default_rng(0)
    steps = 40
    t = np.arange(steps)
    sdi = -(1.0 + 5.0 * (t % 4 == 0)) + 0.05 * rng.standard_normal(steps)  # |SDI| peaks at t = 0, 4, 8, ...
    jumps = np.zeros(steps)
    jumps[(t - lag) % 4 == 0] = 10.0  # the margin rises `lag` steps after each peak ...
    margin = np.cumsum(jumps) - 2.5 * t  # ... and falls steadily between rises
    a = margin_alignment(sdi, margin, steps, 4)
    assert a["best_increase_phase"] == lag, a["increase_correlation_by_lag"]
    assert a["window"] == 8 and a["best_lag_inside_window"] is (abs(a["best_increase_lag"]) < 8)
    assert a["compared_steps"] == [9, 32]
    assert a["best_increase_correlation"] > 0.9


def test_energy_decay_of_planted_curves() -> None:
    """Two median energy curves, the hardest decaying more slowly and with twice the late energy: the late
    fractions, their difference and the late-energy ratio are what the definition gives, and bins are taken in
    numeric order whatever the key order. Catches: an off-by-one in the first late step, bins ordered as
    strings, the ratio inverted."""
    from looptrace.apps.studies.sudoku.study import energy_decay

    easy = [8.0, 4, 2, 1]
    hard = [6.0, 4, 4, 2]
    e = {"9-12": {"median": hard}, "13-14": {"median": [5.0, 5, 5, 5]}, "7-8": {"median": easy}}
    d = energy_decay(e, late_from=3)
    assert d["energy_easiest_bin"] == "7-8" and d["energy_hardest_bin"] == "13-14"
    e = {"10-12": {"median": hard}, "7-8": {"median": easy}}
    d = energy_decay(e, late_from=3)
    assert d["energy_hardest_bin"] == "10-12"
    assert d["energy_late_fraction_easiest"] == pytest.approx(3 / 15)
    assert d["energy_late_fraction_hardest"] == pytest.approx(6 / 16)
    assert d["energy_late_ratio_hardest_over_easiest"] == pytest.approx(2.0)


def test_sudoku_comparison_reads_budgets_in_numeric_order() -> None:
    """On a seed's committed results (read back from JSON, whose keys are sorted as strings: "1", "16", "2",
    ..., "8"), the largest loop budget is 64, not "8". Catches: a comparison that takes the last key as the
    largest budget (it did: the board accuracy "at the largest budget" was the one at 8 loops)."""
    import json
    from pathlib import Path

    from looptrace.apps.studies.sudoku.study import comparison

    res = json.loads((Path(__file__).parents[1] / "docs/results/sudoku/sudoku-small-s0/results.json").read_text())
    c = comparison(res)
    assert c["board_accuracy_at_max"] == res["in_distribution"]["board_accuracy"]["64"]
    assert c["cell_accuracy_hard_split_at_max"] == res["cell_accuracy"]["64"] != res["cell_accuracy"]["8"]
    assert c["board_accuracy_at_1"] == res["in_distribution"]["board_accuracy"]["1"]
    assert c["hardest_held_bin"] == "23-34" and c["easy_group"].startswith("easy")

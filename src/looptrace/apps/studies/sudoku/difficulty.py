"""Sudoku analyses (paper section 4, appendix D.3-D.4): arrays in, tables out.

Inputs are SDI/TracIn arrays and per-example difficulty (number of blank cells).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def bins_by_blanks(blanks: np.ndarray, edges: list[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Difficulty bins: the paper's (46-47), (48), (49-50) when present, else three quantile bins."""
    b = np.asarray(blanks)
    if edges is None:
        paper = [(46, 47), (48, 48), (49, 50)]
        if all(((b >= lo) & (b <= hi)).sum() >= 3 for lo, hi in paper):
            edges = paper
        else:
            qs = np.quantile(b, [0, 1 / 3, 2 / 3, 1])
            cuts = np.unique(np.round(qs).astype(int))
            edges = [
                (int(lo), int(hi) - (1 if i < len(cuts) - 2 else 0))
                for i, (lo, hi) in enumerate(itertools.pairwise(cuts))
            ]
    out = {}
    for lo, hi in edges:
        idx = np.nonzero((b >= lo) & (b <= hi))[0]
        if len(idx):
            out[f"{lo}-{hi}" if hi != lo else f"{lo}"] = idx
    return out


def energy_by_bin(sdi: np.ndarray, bins: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Median and IQR of per-query energy e_j(t) = sum_i |SDI_t| within each query bin."""
    e = np.abs(sdi).sum(0)  # [M, tau]
    return {
        name: {
            "median": np.median(e[idx], 0).tolist(),
            "q25": np.quantile(e[idx], 0.25, 0).tolist(),
            "q75": np.quantile(e[idx], 0.75, 0).tolist(),
        }
        for name, idx in bins.items()
    }


def spearman(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from scipy import stats

    r = stats.spearmanr(x, y)
    return {"rho": float(r.statistic), "p": float(r.pvalue)}


def influence_vs_difficulty(
    self_inf: np.ndarray, tracin_train_test: np.ndarray, train_blanks: np.ndarray
) -> dict[str, Any]:
    """Spearman correlations of self-influence and cross-influence mass C(z) = sum_z' |TracIn| with blanks."""
    cross = np.abs(tracin_train_test).sum(1)
    return {
        "self_vs_blanks": spearman(self_inf, train_blanks),
        "cross_vs_blanks": spearman(cross, train_blanks),
        "self_vs_cross": spearman(self_inf, cross),
        "cross_mass": cross.tolist(),
    }


def group_shares(
    tracin: np.ndarray, groups: dict[str, np.ndarray], query_bins: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Mean share of |TracIn| mass each train group holds on the queries of each test bin, with a
    paired t-test of the two groups' shares per bin."""
    from scipy import stats

    a = np.abs(tracin)
    total = a.sum(0)  # [M]
    shares = {g: a[idx].sum(0) / np.maximum(total, 1e-300) for g, idx in groups.items()}
    out: dict[str, Any] = {}
    names = list(groups)
    for b, qidx in query_bins.items():
        row: dict[str, Any] = {g: float(shares[g][qidx].mean()) for g in names}
        if len(names) == 2 and len(qidx) > 1:
            t = stats.ttest_rel(shares[names[0]][qidx], shares[names[1]][qidx])
            row["paired_t"], row["paired_p"] = float(t.statistic), float(t.pvalue)
        out[b] = row
    return out


def late_mass(
    sdi: np.ndarray, groups: dict[str, np.ndarray], query_bins: dict[str, np.ndarray], late_from: int
) -> dict[str, Any]:
    """Mean share of each group's SDI energy at steps >= ``late_from`` (1-based) per query bin, with a
    Welch t-test between the query bins of the first and last difficulty."""
    from scipy import stats

    out: dict[str, Any] = {}
    for g, idx in groups.items():
        e = np.abs(sdi[idx]).sum(0)  # [M, tau]
        p = e / np.maximum(e.sum(1, keepdims=True), 1e-300)
        lm = p[:, late_from - 1 :].sum(1)
        row: dict[str, Any] = {b: float(lm[q].mean()) for b, q in query_bins.items()}
        names = list(query_bins)
        if len(names) >= 2 and len(query_bins[names[0]]) > 1 and len(query_bins[names[-1]]) > 1:
            t = stats.ttest_ind(lm[query_bins[names[-1]]], lm[query_bins[names[0]]], equal_var=False)
            row["welch_t_hard_vs_easy"], row["welch_p"] = float(t.statistic), float(t.pvalue)
        out[g] = row
    return out


def table1(shares: dict[str, Any], late: dict[str, Any], easy_bin: str, hard_bin: str) -> list[dict[str, Any]]:
    """The paper's Table 1 layout: per train group, |TracIn| share and SDI late mass on easy vs hard tests."""
    rows = []
    for g in late:
        rows.append(
            {
                "train group": g,
                f"share on easy test ({easy_bin})": shares.get(easy_bin, {}).get(g, float("nan")),
                f"share on hard test ({hard_bin})": shares.get(hard_bin, {}).get(g, float("nan")),
                f"late mass, easy test ({easy_bin})": late[g].get(easy_bin, float("nan")),
                f"late mass, hard test ({hard_bin})": late[g].get(hard_bin, float("nan")),
            }
        )
    return rows


def median_iqr(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    return {"median": float(np.median(x)), "q25": float(np.quantile(x, 0.25)), "q75": float(np.quantile(x, 0.75))}


def memorisation_table(self_inf: np.ndarray, cross: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, Any]:
    """Table 1's upper half: self-TracIn and cross-influence mass C(z) per train group (median [IQR]),
    with Welch t-tests between the two groups (train-train)."""
    from scipy import stats

    names = list(groups)
    out: dict[str, Any] = {"self": {}, "cross": {}}
    for g, idx in groups.items():
        out["self"][g] = median_iqr(self_inf[idx])
        out["cross"][g] = median_iqr(cross[idx])
    if len(names) == 2:
        a, b = groups[names[1]], groups[names[0]]  # hard vs easy
        for key, values in (("self", self_inf), ("cross", cross)):
            t = stats.ttest_ind(values[a], values[b], equal_var=False)
            out[key]["welch_t_hard_vs_easy"], out[key]["welch_p"] = float(t.statistic), float(t.pvalue)
            out[key]["median_ratio_hard_over_easy"] = float(np.median(values[a]) / max(np.median(values[b]), 1e-300))
    return out


def late_mass_between_groups(
    sdi: np.ndarray, groups: dict[str, np.ndarray], query_bins: dict[str, np.ndarray], late_from: int
) -> dict[str, Any]:
    """Per test bin, the mean share of each train group's SDI energy at steps >= ``late_from``, with a paired
    t-test (by query) between the two train groups (the paper's train-test comparison)."""
    from scipy import stats

    names = list(groups)
    per_group = {}
    for g, idx in groups.items():
        e = np.abs(sdi[idx]).sum(0)  # [M, tau]
        per_group[g] = e[:, late_from - 1 :].sum(1) / np.maximum(e.sum(1), 1e-300)
    out: dict[str, Any] = {}
    for b, q in query_bins.items():
        row: dict[str, Any] = {g: float(per_group[g][q].mean()) for g in names}
        if len(names) == 2 and len(q) > 1:
            t = stats.ttest_rel(per_group[names[1]][q], per_group[names[0]][q])
            row["paired_t_hard_vs_easy"], row["paired_p"] = float(t.statistic), float(t.pvalue)
        out[b] = row
    return out


def quartile_overlap(self_inf: np.ndarray, cross: np.ndarray) -> dict[str, Any]:
    """The paper's statement: how many train puzzles in the bottom quartile of self-influence lie in the top
    quartile of C(z) (the paper found none)."""
    low_self = self_inf <= np.quantile(self_inf, 0.25)
    top_cross = cross >= np.quantile(cross, 0.75)
    return {"bottom_self_in_top_cross": int((low_self & top_cross).sum()), "bottom_self": int(low_self.sum()),
            "top_cross": int(top_cross.sum())}  # fmt: skip


def compute_sensitivity(acc: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per difficulty bin: accuracy at the largest loop budget minus at the smallest."""
    out = {}
    for b, curve in acc.items():
        budgets = sorted(curve, key=int)
        out[b] = float(curve[budgets[-1]] - curve[budgets[0]])
    return out

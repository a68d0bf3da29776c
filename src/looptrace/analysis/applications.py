"""The applications the paper names, as tools on SDI arrays.

* influence horizon: when does step-resolved influence die out (to calibrate test-time loops)?
* signal cancellation: pairs whose TracIn is small only because steps cancel.
* depth-targeted curation: rank training examples by late- vs early-step influence.
"""

from __future__ import annotations

import csv
import os

import numpy as np


def sdi_energy(sdi: np.ndarray) -> np.ndarray:
    """Per-query energy e_j(t) = sum_i |SDI(z_i, z'_j)_t|: [N, M, tau] -> [M, tau]."""
    return np.abs(np.asarray(sdi)).sum(0)


def influence_horizon(energy: np.ndarray, frac: float = 0.05) -> int:
    """The first 1-based step after which energy stays below ``frac`` x its peak (len+1 if never).

    ``energy``: [tau] (e.g. the median energy curve over queries).
    """
    e = np.asarray(energy, dtype=np.float64)
    if e.size == 0 or e.max() <= 0:
        return 0
    above = np.nonzero(e >= frac * e.max())[0]
    return int(above[-1] + 1) if above.size else 0


def cancellation_scores(sdi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: (TracIn, mass sum_t |SDI_t|, cancellation 1 - |TracIn| / mass), each ``[..., N, M]``.

    The cancellation is 0 when every step acts with one sign (or the mass is 0) and near 1 when the steps
    almost cancel (a small TracIn hiding large step-resolved influence)."""
    s = np.asarray(sdi, dtype=np.float64)
    tracin = s.sum(-1)
    mass = np.abs(s).sum(-1)
    score = np.where(mass > 0, 1 - np.abs(tracin) / np.maximum(mass, 1e-300), 0.0)
    return tracin, mass, score


def query_cancellation(sdi: np.ndarray) -> np.ndarray:
    """Per query, the share of its step-resolved influence that cancels across steps: ``[N, M, tau] -> [M]``,
    1 - sum_i |TracIn_ij| / sum_i sum_t |SDI_ijt| (the pairs' cancellations weighted by their mass; 0 where
    the query has no mass)."""
    tracin, mass, _ = cancellation_scores(sdi)
    total = mass.sum(0)
    return np.where(total > 0, 1 - np.abs(tracin).sum(0) / np.maximum(total, 1e-300), 0.0)


def cancellation_pairs(sdi: np.ndarray, ratio: float = 0.1, top: int = 20) -> list[dict[str, float]]:
    """Pairs (i, j) with |TracIn| < ratio * sum_t |SDI_t|, strongest cancellation first."""
    tracin, mass, score = cancellation_scores(sdi)
    mask = (np.abs(tracin) < ratio * mass) & (mass > 0)
    idx = np.argwhere(mask)
    order = np.argsort(-(score[mask] * mass[mask]))[:top]
    return [
        {
            "train": int(idx[o][0]),
            "query": int(idx[o][1]),
            "tracin": float(tracin[tuple(idx[o])]),
            "abs_sdi_mass": float(mass[tuple(idx[o])]),
            "cancellation": float(score[tuple(idx[o])]),
        }
        for o in order
    ]


def depth_ranking(sdi: np.ndarray, split_step: int) -> np.ndarray:
    """Per train example: (late - early) signed influence summed over queries; late = steps > split_step.

    Returns ``[N, 3]`` columns (early, late, late - early).
    """
    s = np.asarray(sdi, dtype=np.float64)
    early = s[..., :split_step].sum((1, 2))
    late = s[..., split_step:].sum((1, 2))
    return np.stack([early, late, late - early], axis=1)


def export_ranking(scores: np.ndarray, path: str | os.PathLike[str], ids: list[str] | None = None) -> None:
    """Write the depth-targeted ranking (most late-step-influential first) as CSV."""
    order = np.argsort(-scores[:, 2])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "example", "early", "late", "late_minus_early"])
        for r, i in enumerate(order):
            w.writerow([r + 1, ids[i] if ids else int(i), *(f"{v:.6g}" for v in scores[i])])

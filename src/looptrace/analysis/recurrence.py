"""Recursive LM analyses (paper section 4, appendix D.5): where in the recurrence influence lands."""

from __future__ import annotations

import numpy as np


def cumulative_share(sdi: np.ndarray) -> np.ndarray:
    """Signed cumulative SDI share per step: cumsum_t(sum_ij SDI_t) / sum_ij TracIn. [N, M, tau] -> [tau]."""
    per_step = np.asarray(sdi, dtype=np.float64).sum((0, 1))
    total = per_step.sum()
    return np.cumsum(per_step) / (total if total != 0 else 1.0)


def last_step_fraction(sdi: np.ndarray) -> float:
    """Fraction of absolute influence mass in the final step: sum |SDI_tau| / sum_t |SDI_t|."""
    a = np.abs(np.asarray(sdi, dtype=np.float64)).sum((0, 1))
    return float(a[-1] / max(a.sum(), 1e-300))


def growth_ratio(sdi: np.ndarray) -> float:
    """Geometric growth of absolute per-step mass over the steps that carry any (median ratio t+1 / t)."""
    a = np.abs(np.asarray(sdi, dtype=np.float64)).sum((0, 1))
    nz = a[a > 0]
    if len(nz) < 2:
        return float("nan")
    return float(np.median(nz[1:] / nz[:-1]))


def absolute_share(sdi: np.ndarray) -> np.ndarray:
    """Share of absolute influence mass per step: sum_ij |SDI_t| / sum_t sum_ij |SDI_t|. [N, M, tau] -> [tau].

    Unlike the signed cumulative share, this cannot exceed one or change sign when steps cancel."""
    a = np.abs(np.asarray(sdi, dtype=np.float64)).sum((0, 1))
    return a / max(float(a.sum()), 1e-300)


def contraction(states: np.ndarray) -> dict[str, object]:
    """How fast the recurrent state settles: d_t = |h_t - h_{t-1}| / |h_{t-1}| per step (``states``: [tau, ...]
    per example stacked first, or [tau, B, ...]), and the median ratio d_{t+1} / d_t (below one: the map
    contracts toward a fixed point, so an early step's effect on the output shrinks geometrically)."""
    h = np.asarray(states, dtype=np.float64)
    h = h.reshape(h.shape[0], h.shape[1], -1) if h.ndim > 2 else h.reshape(h.shape[0], 1, -1)
    diff = np.linalg.norm(h[1:] - h[:-1], axis=-1) / np.maximum(np.linalg.norm(h[:-1], axis=-1), 1e-300)  # [tau-1, B]
    d = np.median(diff, axis=1)
    ratios = d[1:] / np.maximum(d[:-1], 1e-300)
    return {"relative_change": d.tolist(), "median_ratio": float(np.median(ratios)) if len(ratios) else float("nan")}

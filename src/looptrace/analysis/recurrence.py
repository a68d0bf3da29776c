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

"""Counterfactual metrics of attribution scores: plain functions on arrays, reusable on your own
retraining results.

Sign convention (looptrace's): a score is the first-order *decrease* of the query loss caused by
training on an example, so a subset's predicted effect is the sum of its kept examples' scores and
should *increase* with the measured outcome when the outcome is ``-loss`` (or a margin), and decrease
with a loss. :func:`lds` correlates with ``outcomes`` as given: pass ``-loss`` or a margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from looptrace.errors import ConfigError

__all__ = ["bootstrap_ci", "lds", "rank", "removal_effect", "spearman"]


def rank(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Average ranks (ties share their mean rank) along ``axis``, as floats starting at 1."""
    x = np.asarray(x, dtype=np.float64)
    moved = np.moveaxis(x, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    out = np.empty_like(flat)
    for i, row in enumerate(flat):
        order = np.argsort(row, kind="stable")
        ranks = np.empty(len(row))
        ranks[order] = np.arange(1, len(row) + 1)
        values, inverse = np.unique(row, return_inverse=True)
        sums = np.bincount(inverse, weights=ranks, minlength=len(values))
        counts = np.bincount(inverse, minlength=len(values))
        out[i] = (sums / counts)[inverse]
    return np.moveaxis(out.reshape(moved.shape), -1, axis)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Spearman's rank correlation of ``x`` and ``y`` along ``axis`` (ties averaged).

    NaN-free: where either side is constant the correlation is 0 (no ranking information)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ConfigError(f"spearman needs equal shapes, got {x.shape} and {y.shape}")
    rx, ry = rank(x, axis), rank(y, axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    num = (rx * ry).sum(axis=axis)
    den = np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def lds(scores: Any, masks: Any, outcomes: Any) -> np.ndarray:
    """The linear datamodeling score (Park et al. 2023, TRAK) of each query.

    Args:
        scores: ``[N, M]`` attribution scores of N train examples on M queries.
        masks: ``[S, N]`` bool: which train examples each of S retrained subsets kept.
        outcomes: ``[S, M]``: the measured outcome of each query after training on each subset
            (e.g. ``-loss`` or the correct-class margin; see the module's sign convention).

    Returns:
        ``[M]``: Spearman's correlation, over the S subsets, between the predicted subset score
        (the sum of the kept examples' scores) and the outcome, per query.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks)
    outcomes = np.asarray(outcomes, dtype=np.float64)
    if scores.ndim != 2:
        raise ConfigError(f"scores must be [N train, M queries], got shape {scores.shape}")
    if masks.ndim != 2 or masks.shape[1] != scores.shape[0]:
        raise ConfigError(
            f"masks must be [S subsets, N train] with N = {scores.shape[0]} (the rows of scores), got {masks.shape}"
        )
    if masks.dtype != bool and not np.isin(masks, (0, 1)).all():
        raise ConfigError("masks must be boolean (or 0/1): which train examples each subset kept")
    if outcomes.shape != (masks.shape[0], scores.shape[1]):
        raise ConfigError(
            f"outcomes must be [S subsets, M queries] = {(masks.shape[0], scores.shape[1])}, got {outcomes.shape}"
        )
    if masks.shape[0] < 3:
        raise ConfigError("LDS needs at least 3 subsets to rank")
    predicted = masks.astype(np.float64) @ scores  # [S, M]
    return spearman(predicted, outcomes, axis=0)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean and a percentile bootstrap confidence interval of the mean (over the given values, e.g.
    per-query LDS)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    alpha = (1 - level) / 2
    return {"mean": float(v.mean()), "lo": float(np.quantile(means, alpha)), "hi": float(np.quantile(means, 1 - alpha)),
            "n": int(v.size)}  # fmt: skip


def removal_effect(before: Any, after: Any) -> dict[str, float]:
    """Loss change after removing examples and retraining: mean increase of the query loss (positive when
    the removed examples were helping), and its standard error over queries."""
    delta = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    return {
        "mean_loss_increase": float(delta.mean()),
        "se": float(delta.std(ddof=1) / np.sqrt(delta.size)) if delta.size > 1 else 0.0,
    }

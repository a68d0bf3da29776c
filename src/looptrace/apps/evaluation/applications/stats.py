"""Intervals over queries and training seeds: a two-level bootstrap whose draws are shared, so that two
rules measured on the same queries are compared replicate by replicate (paired)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Per-seed statistic: (seed position, query indices [B, M_s]) -> [B] values, one per replicate.
SeedStat = Callable[[int, np.ndarray], np.ndarray]


class TwoLevel:
    """Replicates of a statistic averaged over seeds: each replicate draws the seeds with replacement, and
    within each seed its queries with replacement (one query draw per seed and replicate, reused when a
    replicate draws a seed twice). With one seed it is the ordinary bootstrap over queries.

    The draws depend only on ``(sizes, n_boot, seed)``, so every rule evaluated through the same
    instance sees the same replicates: differences of two rules' replicates are paired intervals."""

    def __init__(self, sizes: Sequence[int], n_boot: int = 2000, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.sizes = list(sizes)
        self.n_boot = n_boot
        self.seeds = rng.integers(0, len(self.sizes), size=(n_boot, len(self.sizes)))
        self.queries = [rng.integers(0, m, size=(n_boot, m)) for m in self.sizes]

    def replicates(self, stat: SeedStat) -> np.ndarray:
        """``[B]``: the mean over the drawn seeds of ``stat`` on each seed's drawn queries."""
        per_seed = np.stack([stat(s, self.queries[s]) for s in range(len(self.sizes))], axis=1)  # [B, S]
        return per_seed[np.arange(self.n_boot)[:, None], self.seeds].mean(1)

    def mean_replicates(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """Replicates of the mean over seeds of each seed's mean over its queries (``values[s]``: ``[M_s]``)."""
        return self.replicates(lambda s, idx: np.asarray(values[s], dtype=np.float64)[idx].mean(1))

    def seed_replicates(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """Replicates of the mean of one value per seed (the bootstrap over seeds alone)."""
        v = np.asarray(values, dtype=np.float64)
        return v[self.seeds].mean(1)


def interval(point: float, reps: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """``{"mean", "lo", "hi"}``: the point estimate and a percentile interval of its replicates (NaN
    replicates, where a statistic is undefined, are dropped and counted)."""
    r = np.asarray(reps, dtype=np.float64)
    ok = r[np.isfinite(r)]
    a = (1 - level) / 2
    lo, hi = (float(np.quantile(ok, a)), float(np.quantile(ok, 1 - a))) if ok.size else (float("nan"),) * 2
    out: dict[str, Any] = {"mean": float(point), "lo": lo, "hi": hi}
    if ok.size < r.size:
        out["undefined_replicates"] = int(r.size - ok.size)
    return out


def seed_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean over seeds with a bootstrap interval over seeds, and how many seeds lie above / below zero."""
    v = np.asarray(values, dtype=np.float64)
    reps = TwoLevel([1] * len(v), n_boot, seed).seed_replicates(v)
    return {**interval(float(v.mean()), reps), "n_above": int((v > 0).sum()), "n_below": int((v < 0).sum()),
            "per_seed": v.tolist()}  # fmt: skip


def word(ci: dict[str, Any], above: str, below: str, neither: str) -> str:
    """A verdict word from an interval: above zero, below zero, or neither."""
    if ci["lo"] > 0:
        return above
    if ci["hi"] < 0:
        return below
    return neither

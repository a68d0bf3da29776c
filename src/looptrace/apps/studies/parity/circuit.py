"""Mechanistic read-outs for the parity case study (paper section 4, appendix D.2).

All functions take arrays: SDI tensors, per-iteration margins, hidden-state trajectories.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np


def summed_profile(sdi: np.ndarray, query: int) -> np.ndarray:
    """SDI_sum(t) = sum over training points of SDI(z, probe)_t. ``sdi``: [N, M, tau] -> [tau]."""
    return np.asarray(sdi)[:, query, :].sum(0)


def autocorrelation(x: np.ndarray, max_lag: int | None = None) -> np.ndarray:
    """Normalised autocorrelation r(lag) for lag = 0..max_lag of a 1-D series (mean removed)."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    n = len(x)
    max_lag = n - 1 if max_lag is None else min(max_lag, n - 1)
    denom = float(np.dot(x, x)) or 1.0
    return np.array([float(np.dot(x[: n - k], x[k:])) / denom for k in range(max_lag + 1)])


def detect_period(x: np.ndarray, min_lag: int = 2, max_lag: int | None = None) -> int:
    """The lag >= ``min_lag`` with the highest autocorrelation (the dominant period)."""
    ac = autocorrelation(x, max_lag if max_lag is not None else len(x) // 2)
    if len(ac) <= min_lag:
        return min_lag
    return int(min_lag + np.argmax(ac[min_lag:]))


def lagged_cosine(states: np.ndarray, lag: int) -> np.ndarray:
    """cos(h_t, h_{t+lag}) for t = 1..T-lag. ``states``: [T, d]."""
    h = np.asarray(states, dtype=np.float64)
    a, b = h[:-lag], h[lag:]
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def pca(x: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(projection [n, k], explained variance ratio [k]) of the rows of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s**2
    return xc @ vt[:k].T, var[:k] / max(var.sum(), 1e-12)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100, restarts: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n], centroids [k, d]) by Lloyd's algorithm with k-means++ seeding, best of ``restarts``."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(restarts):
        cent = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None] - np.array(cent)[None]) ** 2).sum(-1), axis=1)
            p = d2 / d2.sum() if d2.sum() > 0 else None
            cent.append(x[rng.choice(len(x), p=p)])
        c = np.array(cent)
        for _ in range(iters):
            lab = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
            new = np.array([x[lab == j].mean(0) if np.any(lab == j) else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        lab = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
        inertia = float(((x - c[lab]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, lab, c)
    assert best is not None
    return best[1], best[2]


def transition_matrix(labels: np.ndarray, k: int) -> np.ndarray:
    """Row-normalised empirical transition matrix of a state sequence (rows with no exits are zero)."""
    m = np.zeros((k, k))
    for a, b in itertools.pairwise(labels):
        m[a, b] += 1
    rows = m.sum(1, keepdims=True)
    return np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)


@dataclasses.dataclass
class ProxyCircuit:
    """A state -> parity lookup learned on a calibration set of k-means states."""

    centroids: np.ndarray
    table: np.ndarray  # [k] parity predicted for each state
    threshold: float  # 95th percentile of calibration distances to the nearest centroid

    def assign(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.sqrt(((np.asarray(states)[:, None] - self.centroids[None]) ** 2).sum(-1))
        return d.argmin(1), d.min(1)

    def predict(self, states: np.ndarray) -> np.ndarray:
        return self.table[self.assign(states)[0]]


def fit_proxy(
    states: np.ndarray, parity: np.ndarray, k: int = 4, seed: int = 0, quantile: float = 0.95
) -> ProxyCircuit:
    """Cluster calibration states into ``k`` states and map each to its majority parity."""
    labels, cent = kmeans(states, k, seed=seed)
    table = np.array([int(np.round(parity[labels == j].mean())) if np.any(labels == j) else 0 for j in range(k)])
    dist = np.sqrt(((states - cent[labels]) ** 2).sum(-1))
    return ProxyCircuit(cent, table, float(np.quantile(dist, quantile)))


def proxy_accuracy(proxy: ProxyCircuit, states: np.ndarray, parity: np.ndarray) -> dict[str, float]:
    """Accuracy of the proxy, and its selective accuracy/coverage on states within the threshold."""
    lab, dist = proxy.assign(states)
    pred = proxy.table[lab]
    on = dist <= proxy.threshold
    return {
        "accuracy": float((pred == parity).mean()) if len(parity) else float("nan"),
        "selective_accuracy": float((pred[on] == parity[on]).mean()) if on.any() else float("nan"),
        "coverage": float(on.mean()) if len(parity) else float("nan"),
    }

"""Synthetic inputs for the explorer tests: SDI with per-position values that sum to it, ragged token ids,
ties, zeros and planted cancellation; and an importable decoder (``--decode tests.explorer_fixtures:decode``)."""

from __future__ import annotations

from typing import Any

import numpy as np

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "far", "from", "home", "</script>"]


def decode(ids: Any) -> list[str]:
    """Token ids (a 1-D tensor) -> one string per token (a leading space marks a word boundary)."""
    return [(" " if p else "") + WORDS[int(t) % len(WORDS)] for p, t in enumerate(ids)]


def synthetic(
    n: int = 60, m: int = 7, tau: int = 6, length: int = 9, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(sdi [n, m, tau], positions [n, m, tau, L], train token ids, query token ids) with sdi = positions.sum(-1).

    Ragged lengths (zeros past each example's length), ties in the scores (example 1 copies example 0), one
    all-zero example (2) and a query (1) whose step profile cancels."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, length + 1, n)
    lens[0] = lens[1] = length
    pos = rng.normal(size=(n, m, tau, length))
    pos[1] = pos[0]  # exact ties at every step and overall
    pos[2] = 0.0
    for i, size in enumerate(lens):
        pos[i, :, :, size:] = 0.0
    half = tau // 2
    pos[:, 1, half : 2 * half] = -0.9 * pos[:, 1, :half]  # query 1: later steps undo most of the earlier ones
    sdi = pos.sum(-1)
    train_tokens = [rng.integers(0, len(WORDS), size) for size in lens]
    query_tokens = [rng.integers(0, len(WORDS), rng.integers(3, 8)) for _ in range(m)]
    return sdi, pos, train_tokens, query_tokens

"""Helpers the case studies share."""

from __future__ import annotations

import numpy as np
import torch


def batches(tensors: list[torch.Tensor], size: int) -> list[tuple[torch.Tensor, ...]]:
    """Loader-ordered batches of aligned tensors (rows i:i+size of each)."""
    return [tuple(t[i : i + size] for t in tensors) for i in range(0, len(tensors[0]), size)]


def stratified(blanks: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices spread as evenly as possible over the blank-count strata (appendix D.4)."""
    rng = np.random.default_rng(seed)
    strata = {b: rng.permutation(np.nonzero(blanks == b)[0]).tolist() for b in np.unique(blanks)}
    out: list[int] = []
    while len(out) < min(n, len(blanks)):
        for b in list(strata):
            if strata[b] and len(out) < n:
                out.append(strata[b].pop())
    return np.array(sorted(out))

"""TracIn and step-decomposed influence from features of one checkpoint.

Sign and units: a score is eta * <grad l(z), grad l(z')>, in (loss units)^2 per unit learning rate
times learning rate, i.e. the first-order decrease of the loss on z' caused by one SGD step on z.
Positive: training on z reduced the loss on z' (a proponent); negative: it raised it (an opponent).

    test-side SDI   I_t(z, z')     = g(z) . phi_t(z')       [N, M, tau]   (default)
    train-side SDI  I^_t(z, z')    = phi_t(z) . g(z')       [N, M, tau]
    step matrix     I_{s,t}(z, z') = phi_s(z) . phi_t(z')   [N, M, tau, tau]
    TracIn          sum_t I_t = sum_t I^_t = sum_{s,t} I_{s,t}   [N, M]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from looptrace.errors import ConfigError
from looptrace.features import Features
from looptrace.io import atomic_npy

Decomposition = Literal["test", "train", "matrix"]


def sdi(train: Features, query: Features, side: Literal["test", "train"] = "test") -> torch.Tensor:
    """Step-decomposed influence ``[N, M, tau]`` for one checkpoint (unweighted by eta)."""
    train.compatible_with(query)
    if side == "test":
        return torch.einsum("nd,mtd->nmt", train.total, query.require_steps("test-side SDI"))
    if side == "train":
        return torch.einsum("ntd,md->nmt", train.require_steps("train-side SDI"), query.total)
    raise ConfigError(f"side must be 'test' or 'train', got {side!r}")


def sdi_positions(train: Features, query: Features) -> torch.Tensor:
    """Test-side SDI per training position ``[N, M, tau, L]`` for one checkpoint (unweighted by eta): entry
    ``[i, j, t, p]`` is the part of SDI(z_i, z'_j)_t that comes through training example i's position p; summed
    over p it is :func:`sdi` (the train side's positions sum to its total)."""
    train.compatible_with(query)
    return torch.einsum(
        "npd,mtd->nmtp", train.require_positions("per-position SDI"), query.require_steps("test-side SDI")
    )


def step_matrix(train: Features, query: Features) -> torch.Tensor:
    """The tau x tau step influence matrix ``[N, M, tau_train, tau_query]``."""
    train.compatible_with(query)
    return torch.einsum("nsd,mtd->nmst", train.require_steps("the step matrix"), query.require_steps("the step matrix"))


def tracin(train: Features, query: Features) -> torch.Tensor:
    """TracIn ``[N, M]`` for one checkpoint (unweighted by eta)."""
    train.compatible_with(query)
    return train.total @ query.total.T


def self_influence(feats: Features) -> torch.Tensor:
    """``[N]`` squared gradient norms |g(z)|^2 (unbiased under sketching), one checkpoint."""
    return (feats.total * feats.total).sum(-1)


def iter_blocks(n: int, m: int, block_rows: int, block_cols: int) -> Iterator[tuple[slice, slice]]:
    for i in range(0, n, block_rows):
        for j in range(0, m, block_cols):
            yield slice(i, min(i + block_rows, n)), slice(j, min(j + block_cols, m))


def stream_sdi(
    train: Features,
    query: Features,
    path: str | os.PathLike[str],
    *,
    eta: float = 1.0,
    accumulate: bool = False,
    block_rows: int = 1024,
    block_cols: int = 256,
    dtype: np.dtype = np.dtype(np.float32),
) -> Path:
    """Write eta * test-side SDI ``[N, M, tau]`` to ``path`` (.npy) block by block.

    The full tensor is never held in memory. With ``accumulate=True`` the scores are added to an
    existing file of the same shape (one checkpoint after another). Either way the result is written to a
    temporary name and renamed when complete, so a reader never sees a partial result.
    """
    train.compatible_with(query)
    steps = query.require_steps("test-side SDI")
    n, m, tau = train.n, query.n, steps.shape[1]
    path = Path(path)
    with atomic_npy(path, (n, m, tau), dtype, update=accumulate) as arr:
        for rows, cols in iter_blocks(n, m, block_rows, block_cols):
            block = eta * torch.einsum("nd,mtd->nmt", train.total[rows], steps[cols])
            blk = block.detach().cpu().numpy().astype(arr.dtype)
            if accumulate:
                arr[rows, cols] += blk
            else:
                arr[rows, cols] = blk
    return path

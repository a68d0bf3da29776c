"""Streaming scores and top-k retrieval over a feature store.

TracIn over checkpoints is one inner product in a stacked space:
    sum_k eta_k <g_k(z), p_k(z')> = < [sqrt(eta_k) g_k(z)]_k , [sqrt(eta_k) p_k(z')]_k >,
so proponents (largest scores) and opponents (smallest) of a query are a maximum-inner-product
search for q and -q over the stacked train vectors. FAISS does the search (exact ``IndexFlatIP`` by
default; ``"ivf"`` or ``"hnsw"`` approximate), then every retrieved candidate is re-scored exactly
in float64 from the stored features and re-sorted. Per-step retrieval uses the query's step-t
features phi_t instead of its total (test-side SDI_t).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from looptrace.errors import ConfigError
from looptrace.io import atomic_npy
from looptrace.store.store import FeatureStore

Index = Literal["flat", "ivf", "hnsw", "brute"]


def _etas(store: FeatureStore) -> list[float]:
    etas = [float(c["eta"]) for c in store.checkpoints]
    if any(e < 0 or not math.isfinite(e) for e in etas):
        raise ConfigError(f"checkpoint learning rates must be finite and >= 0, got {etas}")
    return etas


def _query_steps(store: FeatureStore, ck: int) -> np.ndarray:
    parts = [a for _, _, a in store.iter_shards(ck, "query")]
    tau = max(p.shape[1] for p in parts)
    out = np.zeros((sum(p.shape[0] for p in parts), tau, parts[0].shape[2]), dtype=np.float64)
    row = 0
    for p in parts:
        out[row : row + p.shape[0], : p.shape[1]] = p
        row += p.shape[0]
    return out


def score_to_disk(
    store: FeatureStore,
    out: str | os.PathLike[str],
    kind: Literal["sdi", "tracin", "total"] = "sdi",
    query_block: int = 256,
    queries: Sequence[np.ndarray] | None = None,
    outside_queries: Sequence[np.ndarray] | None = None,
) -> Path:
    """sum_k eta_k scores as .npy (``sdi``: [N, M, tau]; ``tracin``: [N, M]) written block by block.

    Only one train shard and one query block are in memory at a time (plus the memory-mapped output);
    the file appears under its name only when complete. ``queries``: per checkpoint, query features
    ``[M, tau, D]`` to use instead of the stored ones (preconditioned ones, from
    :func:`looptrace.store.curvature.preconditioned_queries`).

    ``kind="total"``: the whole model's score ``[N, M]``, the body's TracIn plus that of the parameters outside the
    loop from the companion store (``featurize_to_store(outside=True)``), as ``attribute(outside=True).total``;
    ``outside_queries`` replaces that store's query features as ``queries`` does the body's.
    """
    if kind not in ("sdi", "tracin", "total"):
        raise ConfigError(f"kind must be 'sdi', 'tracin' or 'total', got {kind!r}")
    if outside_queries is not None and kind != "total":
        raise ConfigError("outside_queries= goes with kind='total' (the parameters outside the loop have no step)")
    if kind == "total" and (queries is None) != (outside_queries is None):
        raise ConfigError(
            "kind='total' with preconditioned queries needs both queries= (the body's) and outside_queries= (those "
            "of the parameters outside the loop, preconditioned_queries(store.outside(), ...)): one part "
            "preconditioned and the other plain would mix two geometries"
        )
    parts = [(store, queries)]
    if kind == "total":
        parts.append((store.outside(), outside_queries))
    n, m = store.n("train"), store.n("query")
    if not n or not m:
        raise ConfigError("the store needs both train and query features to score")
    qs_by_part = []
    for st, given in parts:
        etas = _etas(st)
        if (st.n("train"), st.n("query")) != (n, m):
            raise ConfigError(f"{st.root} holds {st.n('train')} train / {st.n('query')} query rows, the store {n} / "
                              f"{m}: featurise both with the same datasets")  # fmt: skip
        if given is not None and len(given) != len(etas):
            raise ConfigError(f"queries= needs one array per checkpoint ({len(etas)}), got {len(given)}")
        qs_by_part.append(list(given) if given is not None else [_query_steps(st, k) for k in range(len(etas))])
    tau = max(q.shape[1] for q in qs_by_part[0])
    out = Path(out)
    shape = (n, m, tau) if kind == "sdi" else (n, m)
    with atomic_npy(out, shape, np.float32) as arr:
        arr[...] = 0
        for (st, _), qs in zip(parts, qs_by_part, strict=True):
            for k, eta in enumerate(_etas(st)):
                q = qs[k]
                for start, stop, tr in st.iter_shards(k, "train"):
                    t = np.asarray(tr, dtype=np.float64)
                    for j in range(0, m, query_block):
                        qb = q[j : j + query_block]
                        if kind == "sdi":
                            arr[start:stop, j : j + query_block, : qb.shape[1]] += (
                                eta * np.einsum("nd,mtd->nmt", t, qb)
                            ).astype(np.float32)
                        else:
                            arr[start:stop, j : j + query_block] += (eta * t @ qb.sum(1).T).astype(np.float32)
    return out


@dataclasses.dataclass
class TopK:
    """Top-k proponents and opponents for each query: indices into the train set and exact scores."""

    proponents: np.ndarray  # [M, k] train indices, largest score first
    proponent_scores: np.ndarray  # [M, k]
    opponents: np.ndarray  # [M, k] train indices, smallest (most negative) first
    opponent_scores: np.ndarray
    step: int | None  # None: TracIn; t: test-side SDI at step t (1-based)
    # with positions: per query, the per-position scores of each proponent / opponent (ragged lists)
    proponent_positions: list[list[list[float]]] | None = None
    opponent_positions: list[list[list[float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}
        return {k: v for k, v in out.items() if v is not None or k == "step"}


def position_matrix(store: FeatureStore, train: int, query: int) -> np.ndarray:
    """``[tau, r]``: sum_k eta_k of training example ``train``'s per-position rows against query ``query``'s
    per-step features (its steps x positions matrix for that query); summed over positions it is the example's
    SDI profile for the query, over steps and positions its TracIn."""
    out: np.ndarray | None = None
    for k, eta in enumerate(_etas(store)):
        rows = np.asarray(store.read_positions(k, "train", train), dtype=np.float64)  # [r, D]
        q = _query_row(store, k, query)  # [tau, D]
        block = eta * q @ rows.T
        if out is None:
            out = block
        else:  # checkpoints featurised on the same data have the same rows; a longer horizon pads with zeros
            width = max(out.shape[0], block.shape[0])
            out = np.pad(out, ((0, width - out.shape[0]), (0, 0))) + np.pad(
                block, ((0, width - block.shape[0]), (0, 0))
            )
    assert out is not None
    return out


def position_scores(store: FeatureStore, train: int, query: int, step: int | None = None) -> np.ndarray:
    """``[r]``: the part of TracIn (``step=None``) or of SDI at ``step`` (1-based) of training example ``train`` on
    query ``query`` that comes through each of its positions (spans of the store's ``positions`` size)."""
    mat = position_matrix(store, train, query)
    if step is None:
        return mat.sum(0)
    if not 1 <= step <= mat.shape[0]:
        raise ConfigError(f"step must be in 1..{mat.shape[0]}, got {step}")
    return mat[step - 1]


def _query_row(store: FeatureStore, ck: int, index: int) -> np.ndarray:
    start, stop = next((a, b) for a, b in store.shard_ranges("query") if a <= index < b)
    return np.asarray(store.read_shard(ck, "query", start, stop)[index - start], dtype=np.float64)


def stacked(store: FeatureStore, role: str, step: int | None = None) -> np.ndarray:
    """[n, K * D] float64 rows of sqrt(eta_k)-scaled features (query: total, or step ``step``)."""
    etas = _etas(store)
    blocks = []
    for k, eta in enumerate(etas):
        if role == "train":
            a = store.read(k, "train").astype(np.float64)
        else:
            q = _query_steps(store, k)
            if step is not None and not 1 <= step <= q.shape[1]:
                raise ConfigError(f"step must be in 1..{q.shape[1]}, got {step}")
            a = q.sum(1) if step is None else q[:, step - 1]
        blocks.append(math.sqrt(eta) * a)
    return np.concatenate(blocks, axis=1)


def _have_faiss() -> bool:
    try:
        import faiss  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_index(x: np.ndarray, index: Index, seed: int = 0) -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError(
            f"the {index!r} index needs FAISS: pip install 'looptrace[store]' (or use index='flat')"
        ) from exc

    d = x.shape[1]
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if index == "flat":
        idx: Any = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = max(1, int(math.sqrt(len(x))))
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.cp.seed = seed
        idx.train(xf)
        idx.nprobe = max(1, nlist // 4)
    elif index == "hnsw":
        idx = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ConfigError(f"unknown index {index!r}; use 'flat', 'ivf', 'hnsw' or 'brute'")
    idx.add(xf)
    return idx


def topk(
    store: FeatureStore,
    k: int = 10,
    step: int | None = None,
    index: Index = "flat",
    candidates: int | None = None,
    positions: bool = False,
) -> TopK:
    """Proponents and opponents of every query (TracIn, or SDI at ``step``), exactly re-scored.

    ``candidates`` (default 4k for approximate indices, k for exact) are retrieved, re-scored in
    float64 from the stored features, and the best k kept. ``positions``: also each retrieved example's
    per-position scores (:func:`position_scores`; the store must hold per-position features).
    """
    if k < 1:
        raise ConfigError("k must be >= 1")
    x = stacked(store, "train")
    q = stacked(store, "query", step)
    k = min(k, len(x))
    c = min(len(x), candidates or (k if index in ("flat", "brute") else 4 * k))
    if index == "flat" and not _have_faiss():
        warnings.warn(
            "FAISS is not installed: running the exact search by brute force (the same answer, O(N M) time); "
            "pip install 'looptrace[store]' for FAISS",
            RuntimeWarning,
            stacklevel=2,
        )
        index = "brute"
    if index == "brute":
        s = q @ x.T
        pro = np.argsort(-s, axis=1, kind="stable")[:, :c]
        opp = np.argsort(s, axis=1, kind="stable")[:, :c]
    else:
        idx = _faiss_index(x, index)
        _, pro = idx.search(np.ascontiguousarray(q, dtype=np.float32), c)
        _, opp = idx.search(np.ascontiguousarray(-q, dtype=np.float32), c)

    def rescore(cand: np.ndarray, sign: float) -> tuple[np.ndarray, np.ndarray]:
        # An approximate index pads with -1 when the lists it probed hold fewer than c vectors: those queries are
        # searched exactly instead (a padded slot must never stand for example 0).
        short = (cand < 0).any(axis=1)
        if short.any():
            cand = cand.copy()
            cand[short] = np.argsort(-sign * (q[short] @ x.T), axis=1, kind="stable")[:, : cand.shape[1]]
        exact = np.einsum("md,mcd->mc", q, x[cand])
        order = np.argsort(-sign * exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(cand, order, 1), np.take_along_axis(exact, order, 1)

    p_idx, p_s = rescore(pro, 1.0)
    o_idx, o_s = rescore(opp, -1.0)
    res = TopK(p_idx, p_s, o_idx, o_s, step)
    if positions:

        def per_position(idx: np.ndarray) -> list[list[list[float]]]:
            return [[position_scores(store, int(i), j, step).tolist() for i in row] for j, row in enumerate(idx)]

        res.proponent_positions, res.opponent_positions = per_position(p_idx), per_position(o_idx)
    return res

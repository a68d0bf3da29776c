"""The explorer's data from a feature store: scores streamed to a scratch file, token ids from the
datasets the store was filled with (checked against the fingerprints the store recorded), and the hook for
per-position training features (:func:`store_positions`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from looptrace.errors import ConfigError
from looptrace.explore.data import DEFAULT_MAX_NUMBERS, Decoder, explorer_data
from looptrace.io import make_dirs
from looptrace.store.retrieval import score_to_disk
from looptrace.store.shards import dataset_fingerprint, read_safetensors
from looptrace.store.store import FeatureStore

__all__ = ["DatasetTokens", "explorer_from_store", "parse_queries", "store_positions"]

#: Why a store's explorer has no token heatmaps.
NO_POSITIONS = (
    "this store has no per-position training features (fill it with `looptrace featurize --positions`); the page "
    "shows step profiles and rankings without token heatmaps"
)


def store_positions(store: FeatureStore, scratch: Path) -> tuple[Any, str | None]:
    """Per-position training scores ``[N, M, tau, L]`` for the explorer, or ``(None, why not)``.

    ``positions[i, j, t, p]`` = sum_k eta_k <train_k(i, p), query_k(j, t)>, from the ragged per-position rows a
    store filled with ``positions=1`` keeps (zeros past each example's real positions), written shard by shard
    to a memory-mapped file under ``scratch``; :func:`explorer_from_store` passes it to
    :func:`~looptrace.explore.explorer_data`, which checks that it sums to the SDI scores."""
    from looptrace.io import atomic_npy
    from looptrace.store.retrieval import _etas, _query_steps

    span = store.options.get("positions")
    if not span:
        return None, NO_POSITIONS
    if span != 1:
        return None, (
            f"this store keeps positions in spans of {span}; the explorer shows single positions: fill a store "
            "with `looptrace featurize --positions 1`"
        )
    etas = _etas(store)
    n, m = store.n("train"), store.n("query")
    queries = [_query_steps(store, k) for k in range(len(etas))]
    tau = max(q.shape[1] for q in queries)
    width = 1
    for start, stop in store.shard_ranges("train"):
        path = store.shard_path(0, "train", start, stop)
        store._check(path)
        offsets = read_safetensors(path, "offsets")
        width = max(width, int(np.diff(np.asarray(offsets)).max(initial=1)))
    out = scratch / "positions.npy"
    with atomic_npy(out, (n, m, tau, width), np.float32) as arr:
        arr[...] = 0
        for k, eta in enumerate(etas):
            q = queries[k]
            for start, stop in store.shard_ranges("train"):
                path = store.shard_path(k, "train", start, stop)
                store._check(path)
                offsets = np.asarray(read_safetensors(path, "offsets"))
                rows = np.asarray(read_safetensors(path, "positions"), dtype=np.float64)
                for i in range(stop - start):
                    a, b = int(offsets[i]), int(offsets[i + 1])
                    if b > a:
                        block = eta * np.einsum("pd,mtd->mtp", rows[a:b], q)
                        arr[start + i, :, : q.shape[1], : b - a] += block.astype(np.float32)
    return np.load(out, mmap_mode="r"), None


class DatasetTokens(Sequence[Any]):
    """Token ids of a dataset's examples, read on access (only the examples the explorer embeds are read).

    An example's ids are its ``input_ids`` (dict examples) or its first tensor; they must be a 1-D integer
    tensor, else the explorer shows indices."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return token_ids(self.dataset[i])


def token_ids(example: Any) -> Any:
    """The token ids of one dataset example: ``input_ids`` of a dict, else its first tensor (or None)."""
    from looptrace import batching

    if isinstance(example, dict) and "input_ids" in example:
        return example["input_ids"]
    return next(iter(batching.tensors(example)), None)


def dataset_tokens(store: FeatureStore, role: str, dataset: Any) -> tuple[DatasetTokens | None, str | None]:
    """``dataset``'s token ids if it is the one the store was filled with, else ``(None, why not)``."""
    recorded = store.manifest.get("datasets", {}).get(role, {})
    if len(dataset) != store.n(role):
        return None, f"the {role} dataset has {len(dataset)} examples, the store {store.n(role)}"
    if recorded.get("fingerprint") and dataset_fingerprint(dataset) != recorded["fingerprint"]:
        return None, f"the {role} dataset is not the one the store was filled with (its fingerprint differs)"
    ids = token_ids(dataset[0]) if len(dataset) else None
    if ids is None or ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex:
        what = "no tensor" if ids is None else f"a {ids.dtype} tensor of shape {tuple(ids.shape)}"
        return None, f"{role} examples hold {what}, not a 1-D tensor of token ids"
    return DatasetTokens(dataset), None


def parse_queries(text: str | None, m: int) -> list[int] | None:
    """``"0:50,60,70:80"`` -> query indices (``a:b`` is a..b-1); None or ``""`` -> None (all)."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if ":" in part:
                a, _, b = part.partition(":")
                out += range(int(a or 0), min(int(b) if b else m, m))
            else:
                out.append(int(part))
    except ValueError as exc:
        raise ConfigError(f"queries must look like '0:50,60,70:80', got {text!r}") from exc
    bad = [j for j in out if not 0 <= j < m]
    if bad or not out:
        raise ConfigError(f"queries must be in 0..{m - 1}, got {text!r}")
    return list(dict.fromkeys(out))


def explorer_from_store(
    store: FeatureStore,
    *,
    datasets: dict[str, Any] | None = None,
    decode: Decoder | None = None,
    k: int = 10,
    readout_step: int | None = None,
    queries: Sequence[int] | None = None,
    max_numbers: int = DEFAULT_MAX_NUMBERS,
    scratch: str | os.PathLike[str] | None = None,
    notes: list[str] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The explorer's data for a filled store (see :func:`~looptrace.explore.explorer_data`).

    The SDI scores (sum_k eta_k) are streamed to a scratch ``.npy`` under ``scratch`` (default: the system's
    temporary directory; the file is ``4 N M tau`` bytes) and read memory-mapped, so only the embedded rows
    are in memory. ``datasets`` (``{"train": ds, "query": ds}``) give the token ids when they are the datasets
    the store was filled with; otherwise the explorer shows indices and ``notes`` says why.
    """
    notes = notes if notes is not None else []
    tokens: dict[str, DatasetTokens | None] = {"train": None, "query": None}
    for role, ds in (datasets or {}).items():
        tokens[role], why = dataset_tokens(store, role, ds)
        if why:
            notes.append(f"no {role} tokens: {why}")
    if decode is not None and tokens["train"] is None and tokens["query"] is None:
        notes.append("the decoder is not used: there are no token ids")
        decode = None
    if scratch is not None:
        make_dirs(Path(scratch))
    with tempfile.TemporaryDirectory(prefix="looptrace-explore-", dir=scratch) as tmp:
        path = score_to_disk(store, Path(tmp) / "sdi.npy", kind="sdi")
        sdi = np.load(path, mmap_mode="r")
        positions, why = store_positions(store, Path(tmp))
        try:
            data = explorer_data(
                sdi, positions=positions, train_tokens=tokens["train"], query_tokens=tokens["query"], decode=decode,
                k=k, readout_step=readout_step, queries=queries, max_numbers=max_numbers, positions_note=why,
                source={"store": str(store.root), **(source or {}), **({"notes": "; ".join(notes)} if notes else {})},
            )  # fmt: skip
        finally:
            del sdi, positions
    return data

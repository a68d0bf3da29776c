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
from looptrace.store.shards import dataset_fingerprint
from looptrace.store.store import FeatureStore

__all__ = ["DatasetTokens", "explorer_from_store", "parse_queries", "store_positions"]

#: Why a store's explorer has no token heatmaps (until stores hold per-position training features).
NO_POSITIONS = (
    "this store has no per-position training features (per-position featurisation is not in stores yet); the "
    "page shows step profiles and rankings without token heatmaps"
)


def store_positions(store: FeatureStore, scratch: Path) -> tuple[Any, str | None]:
    """Per-position training scores ``[N, M, tau, L]`` for the explorer, or ``(None, why not)``.

    The hook for per-position training features in the store: when a store holds them, score them here
    (``positions[i, j, t, p]`` = sum_k eta_k <train_k(i, p), query_k(j, t)>, zeros past each example's
    length, ideally written block by block to a memory-mapped file under ``scratch`` as
    :func:`~looptrace.store.score_to_disk` does) and return the array; :func:`explorer_from_store` passes
    it to :func:`~looptrace.explore.explorer_data`, which checks that it sums to the SDI scores.
    """
    del store, scratch  # per-position scores will be computed from the store into scratch
    return None, NO_POSITIONS


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

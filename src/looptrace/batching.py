"""The batch walker: one place that knows how batches are built.

A batch is a tensor, or a tuple / list / dict / dataclass of batches (nested), or any other leaf
(kept as it is). The *batch axis* is the leading axis of the first tensor found in a depth-first walk;
every tensor whose leading axis has that size is sliced with it, others (a shared mask, a scalar) are
left alone. Featurisation, verification, out-of-memory retries, the store and the tests all walk
batches through these functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["concat", "leading_size", "map_tensors", "select_rows", "slice_rows", "structure", "tensors", "to_device"]


def _is_dataclass_instance(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """The batch with ``fn`` applied to every tensor leaf; containers keep their type."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if _is_dataclass_instance(batch):
        fields = {f.name: map_tensors(getattr(batch, f.name), fn) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **fields)
    if isinstance(batch, dict):
        return type(batch)({k: map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, tuple | list):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def tensors(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor leaf, depth first (dict keys in insertion order)."""
    if isinstance(batch, torch.Tensor):
        yield batch
        return
    if _is_dataclass_instance(batch):
        children: Any = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    elif isinstance(batch, dict):
        children = list(batch.values())
    elif isinstance(batch, tuple | list):
        children = batch
    else:
        return
    for child in children:
        yield from tensors(child)


def to_device(batch: Any, device: torch.device | str) -> Any:
    return map_tensors(batch, lambda t: t.to(device))


def structure(batch: Any) -> Any:
    """A hashable description of the batch's containers (not its sizes): batches of one loader must agree."""
    if isinstance(batch, torch.Tensor):
        return "tensor"
    if isinstance(batch, dict):
        return ("dict", tuple(sorted((str(k), structure(v)) for k, v in batch.items())))
    if _is_dataclass_instance(batch):
        return (
            type(batch).__name__,
            tuple((f.name, structure(getattr(batch, f.name))) for f in dataclasses.fields(batch)),
        )
    if isinstance(batch, tuple | list):
        return (type(batch).__name__, tuple(structure(v) for v in batch))
    return type(batch).__name__


def leading_size(batch: Any) -> int | None:
    """The number of examples: the leading size of the first tensor with at least one axis."""
    for t in tensors(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    return None


def slice_rows(batch: Any, lo: int, hi: int) -> Any:
    """Examples ``lo:hi`` (every tensor whose leading axis is the batch axis is sliced)."""
    n = leading_size(batch)
    return map_tensors(batch, lambda t: t[lo:hi] if t.dim() > 0 and t.shape[0] == n else t)


def select_rows(batch: Any, index: torch.Tensor | list[int]) -> Any:
    """The examples at ``index`` (in that order)."""
    n = leading_size(batch)
    idx = torch.as_tensor(index, dtype=torch.long)
    return map_tensors(batch, lambda t: t[idx.to(t.device)] if t.dim() > 0 and t.shape[0] == n else t)


def concat(batches: list[Any]) -> Any:
    """Batches of one structure joined along the batch axis (tensors with another leading size must agree)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches) if first.dim() > 0 else first
    if _is_dataclass_instance(first):
        fields = {f.name: concat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(first) if f.init}
        return dataclasses.replace(first, **fields)
    if isinstance(first, dict):
        return type(first)({k: concat([b[k] for b in batches]) for k in first})
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat(list(parts)) for parts in zip(*batches, strict=True)))
    if isinstance(first, tuple | list):
        return type(first)(concat(list(parts)) for parts in zip(*batches, strict=True))
    return first

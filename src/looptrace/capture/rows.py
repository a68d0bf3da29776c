"""Which example each row of a tensor belongs to, learned from the data flow.

Layer rules need, for every row of a layer's input and output, the example it belongs to. When the
batch is the first axis that is the identity; when a body folds tokens into the batch axis
(``x.reshape(B * T, D)``), gathers rows (``x[idx]``, ``index_select``), scatters them back
(``index_add_``) or concatenates them, it is not. :class:`RowTracker` is a ``TorchFunctionMode``
active during the forward pass that keeps, for every tensor it sees produced, an ``int64 [N]`` map from
its leading-axis rows to example indices, and propagates it through the operations that move rows:

* reshapes that merge or split leading axes (``[B, T, D] <-> [B*T, D]``), in row-major order;
* indexing and ``index_select`` / ``masked_select`` on the leading axis (the map is indexed the same way);
* in-place scatters (``index_add_``, ``index_copy_``, ``scatter_add_``, ...) and ``*_like`` constructors,
  which keep the target's rows;
* ``cat`` / ``split`` / ``chunk`` / ``unbind`` along the leading axis;
* everything else that keeps the leading axis in place (elementwise ops, matmuls, norms, activations):
  the output inherits the map of its operands (which must agree).

A tensor never seen produced (a step input) with ``B`` leading rows is taken to be batch first.
Tensors that do not depend on the batch (parameters, the model's buffers, constants made under the
tracker, anything computed from those alone: a learned query expanded over the batch) are *free*: they never vote on an
output's rows, so a weight whose leading size happens to equal ``B`` cannot spoil a map, and a free
tensor with ``B`` leading rows counts as batch first. An operation that moves the leading axis (transpose, permute) or reduces / mixes along it
yields no map; a layer whose rows have no map is handled by the step-level route instead. Whatever
this concludes is checked on the first batch against autograd, so a wrong map is an error, never a
silently wrong score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["RowTracker", "group_rows"]

# operations whose output keeps the rows of their first argument (the scatter target) when it is
# modified in place or allocated like it
_KEEP_TARGET = {
    "index_add_", "index_add", "index_copy_", "index_copy", "index_fill_", "index_fill", "index_put_",
    "index_put", "scatter_", "scatter", "scatter_add_", "scatter_add", "scatter_reduce_", "scatter_reduce",
    "masked_scatter_", "masked_scatter", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
    "randn_like", "__setitem__", "copy_", "zero_", "fill_",
}  # fmt: skip
_RESHAPES = {"reshape", "view", "flatten", "unflatten", "reshape_as", "view_as", "contiguous", "clone", "detach"}
_MOVE_AXES = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t", "T", "mT", "adjoint"}
_SPLITS = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes", "unsafe_split"}
_DIM_ARG = {"dim", "dims", "axis"}
# operations that reduce, reorder or reshape along an axis: the rows survive only when that axis is not the leading one
_ALONG_AXIS = {
    "sum", "mean", "prod", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "all", "any", "cumsum",
    "cumprod", "softmax", "log_softmax", "sort", "argsort", "flip", "roll", "topk", "argmax", "argmin", "median",
    "kthvalue", "cummax", "cummin", "diff", "squeeze", "unsqueeze", "select", "narrow", "expand", "repeat", "tile",
    "diagonal", "trace", "einsum", "gather", "take_along_dim", "unfold", "stack", "nonzero", "argwhere", "where",
    "bincount", "unique",
}  # fmt: skip
# lookups whose output rows are their index argument's rows (the output has more axes)
_LOOKUPS = {"embedding", "one_hot"}
_UNKNOWN = torch.empty(0, dtype=torch.long)  # produced under the tracker by an op that scrambles rows
_FREE = torch.empty(0, dtype=torch.long)  # produced under the tracker from batch-independent tensors only
# operations whose axis is their third argument, with its default (None: all axes)
_DIM_THIRD: dict[str, int | None] = {"topk": -1, "kthvalue": -1, "diff": -1, "norm": None, "roll": None}
# new tensors whose values do not depend on the tensor they are called on
_CONSTRUCTORS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}
# reductions and reorderings along an axis that act on their first argument alone: when the axis is not the
# leading one, the output's rows are that argument's (whatever the number of axes left)
_FIRST_ONLY = _ALONG_AXIS - {"where", "stack", "einsum", "nonzero", "argwhere", "bincount", "unique", "trace"}


def _leading(t: Any) -> int | None:
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() > 0 else None


def _flatten(x: Any) -> Iterable[Any]:
    if isinstance(x, tuple | list):
        for v in x:
            yield from _flatten(v)
    else:
        yield x


class RowTracker(TorchFunctionMode):
    """Propagates row -> example maps through a forward pass (see the module docstring)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.maps: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self._identity = torch.arange(batch_size)

    def rows(self, t: torch.Tensor) -> torch.Tensor | None:
        """The example of every leading row of ``t``, or ``None`` when unknown."""
        m = self.maps.get(t)
        if m is _UNKNOWN:
            return None
        if m is not None and m is not _FREE:
            return m
        if t.dim() > 0 and t.shape[0] == self.batch_size:
            return self._identity
        return None

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        # made from free tensors alone (or a constructor): free, whatever the shapes; otherwise the rows move with
        # the operation, and a tensor left with no map has rows of unknown examples
        free = name in _CONSTRUCTORS or all(
            self.free(a) for a in _flatten(list(args) + list(kwargs.values())) if isinstance(a, torch.Tensor)
        )
        if not free:
            # bookkeeping must never break the model's forward; a tensor left unknown goes the step route
            with contextlib.suppress(Exception):
                self._propagate(name, args, kwargs, out)
        written = name.endswith("_") or name == "__setitem__"
        for o in _flatten(out):
            if not isinstance(o, torch.Tensor) or o.dim() == 0:
                continue
            if free:
                self.maps[o] = _FREE
            elif o not in self.maps or (written and self.maps[o] is _FREE):  # (batch data written into a free one)
                self.maps[o] = _UNKNOWN
        return out

    def batch_free(self, tensors: list[Any]) -> set[int]:
        """Positions of the ``tensors`` that do not depend on the batch although their leading size may be the
        batch size: free, more than one row, rows that differ (a ``[T, T]`` distance table; an expanded constant,
        whose rows are all alike, can be split by example like any batch tensor)."""
        return {
            i
            for i, t in enumerate(tensors)
            if isinstance(t, torch.Tensor)
            and t.dim() > 0
            and t.shape[0] > 1
            and self.free(t)
            and not bool((t == t[:1]).all())
        }

    def mark_free(self, tensors: Iterable[torch.Tensor]) -> None:
        """Declare ``tensors`` (a model's buffers) batch-independent, as parameters are."""
        for t in tensors:
            if t.dim() > 0:
                self.maps[t] = _FREE

    def free(self, t: torch.Tensor) -> bool:
        """Whether ``t`` does not depend on the batch (a parameter, or made from such tensors alone)."""
        return isinstance(t, torch.nn.Parameter) or self.maps.get(t) is _FREE

    def _set(self, t: Any, m: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and m is not None and m.shape[0] == t.shape[0]:
            self.maps[t] = m

    def _propagate(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        name = name.removeprefix("__").removesuffix("__") if name in ("__getitem__", "__setitem__") else name
        if name in ("cat", "concat", "concatenate"):
            self._cat(args, kwargs, out)
            return
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor):
            return
        if name in ("getitem",):
            self._set(out, self._index(first, args[1]))
        elif name in ("setitem",) or name in _KEEP_TARGET:
            m = self.rows(first) if isinstance(first, torch.Tensor) else None
            for o in _flatten(out):
                self._set(o, m)
        elif name in _RESHAPES:
            if isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor):
                self._set(out, self._reshape(first, out))
        elif name in _MOVE_AXES:
            if (
                isinstance(out, torch.Tensor)
                and isinstance(first, torch.Tensor)
                and self._keeps_axis0(name, args, kwargs)
            ):
                self._set(out, self.rows(first))
        elif name in ("index_select",):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            idx = args[2] if len(args) > 2 else kwargs.get("index")
            m = self.rows(first)
            if dim in (0, -first.dim()) and m is not None and isinstance(idx, torch.Tensor):
                self._set(out, m[idx.long().cpu()])
            elif m is not None and dim not in (0, -first.dim()):
                self._set(out, m)
        elif name in _LOOKUPS:
            if isinstance(out, torch.Tensor) and _leading(out) == _leading(first):
                self._set(out, self.rows(first))
        elif name in _SPLITS:
            self._split(name, first, args, kwargs, out)
        else:
            self._inherit(name, args, kwargs, out)

    def _index(self, t: torch.Tensor, index: Any) -> torch.Tensor | None:
        """Rows of ``t[index]``: a slice, a 1-D integer or boolean index on the leading axis moves them."""
        m = self.rows(t)
        if m is None:
            return None
        parts = index if isinstance(index, tuple) else (index,)
        if not parts:
            return m
        first = parts[0]
        if first is Ellipsis:  # x[..., i]: the leading axis stays when the ellipsis covers it
            rest = parts[1:]
            if all(isinstance(p, int | slice) or p is None for p in rest):
                return m if sum(p is not None for p in rest) < t.dim() else None
            return None
        if isinstance(first, slice):
            return m[first]
        if isinstance(first, list) and all(isinstance(v, int) for v in first):
            first = torch.as_tensor(first, dtype=torch.long)
        if isinstance(first, torch.Tensor) and first.dim() == 1:
            others = [p for p in parts[1:] if isinstance(p, torch.Tensor | list)]
            if any(not isinstance(p, torch.Tensor) or p.dim() != 1 for p in others):
                return None
            return m[first.cpu()] if first.dtype == torch.bool else m[first.long().cpu()]
        return None  # an int (the leading axis is gone), None (a new axis), Ellipsis, a 2-D index

    def _reshape(self, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        m = self.rows(t)
        if m is None or t.dim() == 0 or out.dim() == 0:
            return None
        old, new = int(t.shape[0]), int(out.shape[0])
        if new == old:
            return m
        if new > old and new % old == 0:  # merging leading axes: [B, T, ...] -> [B*T, ...]
            k = new // old
            acc = 1
            for size in t.shape[1:]:
                acc *= int(size)
                if acc == k:
                    return m.repeat_interleave(k)
                if acc > k:
                    break
            return None
        if old % new == 0:  # splitting: [B*T, ...] -> [B, T, ...]
            groups = m.reshape(new, old // new)
            return groups[:, 0] if bool((groups == groups[:, :1]).all()) else None
        return None

    @staticmethod
    def _keeps_axis0(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        t = args[0]
        if name in ("t", "T", "adjoint"):
            return t.dim() < 2 and name != "adjoint"
        if name == "mT":
            return t.dim() > 2
        if name == "permute":
            dims = args[1:] if len(args) > 1 else kwargs.get("dims", ())
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], tuple | list) else dims
            return bool(dims) and dims[0] % t.dim() == 0
        axes = [a for a in args[1:3] if isinstance(a, int)] + [
            kwargs[k] for k in ("dim0", "dim1", "source", "destination", "axis0", "axis1") if k in kwargs
        ]
        return all(a % t.dim() != 0 for a in axes) if axes else False

    def _cat(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        tensors = list(args[0]) if args else list(kwargs.get("tensors", []))
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not tensors or not isinstance(out, torch.Tensor):
            return
        if dim % out.dim() == 0:
            maps = [self.rows(t) for t in tensors]
            if all(m is not None for m in maps):
                self._set(out, torch.cat(maps))  # type: ignore[arg-type]
        else:
            self._set(out, self._agree([t for t in tensors if _leading(t) == out.shape[0]]))

    def _split(self, name: str, t: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        m = self.rows(t)
        if m is None or not isinstance(out, tuple | list):
            return
        at = 1 if name == "unbind" else 2  # unbind(t, dim); split / chunk / tensor_split(t, sizes, dim)
        dim = kwargs.get("dim", args[at] if len(args) > at else 0)
        if isinstance(dim, int) and dim % t.dim() != 0:
            for o in out:
                self._set(o, m)
            return
        start = 0
        for o in out:
            if isinstance(o, torch.Tensor) and o.dim() == t.dim():
                self._set(o, m[start : start + o.shape[0]])
                start += int(o.shape[0])

    def _agree(self, tensors: list[Any]) -> torch.Tensor | None:
        """The common map of ``tensors`` (None if any is unknown or two disagree); free tensors do not vote."""
        maps = [self.rows(t) for t in tensors if not (isinstance(t, torch.Tensor) and self.free(t))]
        if not maps or any(m is None for m in maps):
            return None
        first = maps[0]
        assert first is not None
        for m in maps[1:]:
            assert m is not None
            if m is not first and not torch.equal(m, first):
                return None
        return first

    def _inherit(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Leading axis kept in place: the output rows are the operands' rows (which must agree)."""
        if any(k in kwargs and _mentions_axis0(kwargs[k], args[0]) for k in _DIM_ARG):
            return
        if name in _ALONG_AXIS and not self._dim_after_leading(name, args, kwargs):
            return
        outs = [o for o in _flatten(out) if isinstance(o, torch.Tensor) and o.dim() > 0]
        if not outs:
            return
        n = int(outs[0].shape[0])
        first = args[0] if args else None
        if name in _FIRST_ONLY and isinstance(first, torch.Tensor) and not self.free(first):
            # the leading axis survives (checked above), whatever happens to the others (unsqueeze, sum(-1))
            if _leading(first) == n:
                for o in outs:
                    if _leading(o) == n:
                        self._set(o, self.rows(first))
            return
        candidates = [a for a in _flatten(list(args) + list(kwargs.values())) if isinstance(a, torch.Tensor)]
        same = [
            a
            for a in candidates
            if a.dim() == outs[0].dim() and _leading(a) == n and not self.free(a) and self.rows(a) is not None
        ]
        if not same:
            return
        m = self._agree(same)
        for o in outs:
            if _leading(o) == n:
                self._set(o, m)

    @staticmethod
    def _dim_after_leading(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """True when a reducing / reordering op works on an axis after the leading one."""
        t = args[0]
        if name in ("where",):
            return len(args) == 3 or "input" in kwargs
        if name in ("squeeze", "unsqueeze", "select", "narrow", "expand", "repeat", "tile", "stack", "gather",
                    "take_along_dim", "unfold", "einsum", "nonzero", "argwhere", "bincount", "unique", "trace",
                    "diagonal"):  # fmt: skip
            if name in ("squeeze", "unsqueeze", "select", "narrow", "stack", "gather", "take_along_dim", "unfold"):
                dim = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("dim")
                if isinstance(dim, int) and isinstance(t, torch.Tensor) and t.dim() > 0:
                    out_dim = t.dim() + (1 if name in ("unsqueeze", "stack") else 0)
                    return dim % max(out_dim, 1) != 0
            if name == "expand" and isinstance(t, torch.Tensor):
                sizes: Any = args[1:] if len(args) > 1 else ()
                sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], tuple | list) else sizes
                return bool(sizes) and len(sizes) == t.dim() and sizes[0] in (-1, t.shape[0])
            return False
        if name in _DIM_THIRD:  # topk(t, k, dim=-1), norm(t, p, dim), ...: the second argument is not the axis
            dim = args[2] if len(args) > 2 else kwargs.get("dim", kwargs.get("dims", _DIM_THIRD[name]))
        else:
            dim = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("dim", kwargs.get("dims"))
        if dim is None:
            return False  # a full reduction or reordering: the rows are gone
        if isinstance(dim, tuple | list):
            return all(isinstance(d, int) and d % t.dim() != 0 for d in dim)
        return isinstance(dim, int) and isinstance(t, torch.Tensor) and t.dim() > 0 and dim % t.dim() != 0


def _mentions_axis0(dim: Any, t: Any) -> bool:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return False
    if isinstance(dim, int):
        return dim % t.dim() == 0
    if isinstance(dim, tuple | list):
        return any(isinstance(d, int) and d % t.dim() == 0 for d in dim)
    return False


def group_rows(x: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """Tensors with ``len(rows)`` leading rows regrouped as ``[B, L, ...]`` (zero-padded; L = the most rows
    of one example), so every rule sees the batch first. Zero rows carry zero gradient."""
    n = int(rows.shape[0])
    rows_dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def positions(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in rows_dev:
            r = rows.to(device)
            order = torch.argsort(r, stable=True)
            counts = torch.bincount(r, minlength=batch_size)
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.empty_like(r)
            pos[order] = torch.arange(n, device=device) - starts[r[order]]
            rows_dev[device] = (r, pos)
        return rows_dev[device]

    width = int(torch.bincount(rows, minlength=batch_size).max()) if n else 0

    def regroup(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n:
            r, pos = positions(t.device)
            out = t.new_zeros((batch_size, width, *t.shape[1:]))
            out[r, pos] = t
            return out
        if isinstance(t, tuple | list):
            return type(t)(regroup(v) for v in t)
        if isinstance(t, dict):
            return {k: regroup(v) for k, v in t.items()}
        return t

    return regroup(x)


def rows_fold(rows: torch.Tensor) -> int | None:
    """``k`` when ``rows`` is the batch-major fold ``[0]*k + [1]*k + ...``, else ``None``."""
    n = int(rows.shape[0])
    if n == 0:
        return None
    b = int(rows.max()) + 1
    if n % b:
        return None
    k = n // b
    return k if torch.equal(rows, torch.arange(b).repeat_interleave(k)) else None

"""Layer rules: layer type -> the factors of its per-example gradient.

A rule says which parameters of a module it accounts for, what to save in the forward pass, and how
to turn one output's backward signal delta [B, ...] into per-example gradient contributions, sent to
a :class:`Sink` as one of

* ``outer(param, left [B, L, rows], right [B, L, cols])``: grad = sum_j left_j (x) right_j,
* ``dense(param, g [B, numel])``: the per-example gradient itself,
* ``dense_tokens(param, g [B, L, numel])``: grad = sum_j g_j, one term per token (per-position attribution
  keeps the terms apart; otherwise they are summed),
* ``rows(param, idx [B, L], values [B, L, cols])``: grad = sum_j e_{idx_j} (x) values_j.

``L`` is the token axis: in ``outer``, ``dense_tokens`` and ``rows`` token j of an example is its sequence
position j (every non-batch, non-feature axis of a ``[B, T, d]`` activation, see :func:`tokens`), which is
what per-position attribution (``featurize(positions=True)``) reads. ``dense`` has no per-token form: a layer
that sends it cannot be attributed per position.

A new layer type is one :func:`register_rule` call. Modules with parameters and no rule fall back to
an exact per-example vector-Jacobian product through ``torch.func`` (:data:`FALLBACK`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FALLBACK", "Rule", "Saved", "Sink", "find_rule", "leaves", "register_rule", "regroup_saved", "unbatch"]


class Sink(Protocol):
    """Where a rule sends per-example gradient contributions for the current loop step."""

    batch_size: int

    def outer(self, param: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None: ...

    def dense(self, param: torch.Tensor, g: torch.Tensor) -> None: ...

    def dense_tokens(self, param: torch.Tensor, g: torch.Tensor) -> None: ...

    def rows(self, param: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None: ...


Capture = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]
Contribute = Callable[[nn.Module, Any, torch.Tensor, int, Sink], None]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A layer rule.

    Attributes:
        handles: module -> {dotted parameter name relative to the module: parameter} it accounts for
            (may include children's parameters, e.g. MultiheadAttention's ``out_proj``).
        capture: (module, args, kwargs, output) -> what backward needs (called in forward).
        contribute: (module, saved, grad of output number ``i``, i, sink) -> None.
        name: shown in errors.
        batch_dim: (module, output index) -> the batch axis of that output (checked against the batch).
    """

    handles: Callable[[nn.Module], dict[str, nn.Parameter]]
    capture: Capture
    contribute: Contribute
    name: str
    batch_dim: Callable[[nn.Module, int], int] = lambda module, output_index: 0


_REGISTRY: dict[type, Rule] = {}


def register_rule(module_type: type, rule: Rule) -> None:
    """Register ``rule`` for ``module_type`` (and subclasses that keep its ``forward``)."""
    _REGISTRY[module_type] = rule


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``: its own type's, else a base type's when ``forward`` is inherited."""
    t = type(module)
    if t in _REGISTRY:
        return _REGISTRY[t]
    for base in t.__mro__[1:]:
        rule = _REGISTRY.get(base)
        if rule is not None and getattr(t, "forward", None) is getattr(base, "forward", None):
            return rule
    _register_optional()
    if t in _REGISTRY:
        return _REGISTRY[t]
    if t.__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        # HF-style Conv1D (GPT-2): y = x @ W + b with W [in, out]; a copy of the class from another
        # package gets the same rule. The first-batch verification catches a different forward.
        return _CONV1D
    return None


def _direct(module: nn.Module, *names: str) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for n in names:
        p = getattr(module, n, None)
        if isinstance(p, nn.Parameter):
            out[n] = p
    return out


def tokens(x: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """[B, ..., d] (or [.., B, .., d]) -> [B, L, d]: every non-batch, non-feature axis is a token axis."""
    if batch_dim != 0:
        x = x.movedim(batch_dim, 0)
    if x.dim() == 1:
        return x[:, None, None]
    return x.reshape(x.shape[0], -1, x.shape[-1])


# --------------------------------------------------------------------------- Linear
def _save_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    x = args[0] if args else kwargs["input"]
    return x.detach()


def _linear_contribute(module: nn.Module, x: Any, delta: torch.Tensor, i: int, sink: Sink) -> None:
    d = tokens(delta)
    assert isinstance(module, nn.Linear)
    sink.outer(module.weight, d, tokens(x).to(d.dtype))
    if module.bias is not None:
        sink.dense_tokens(module.bias, d)


register_rule(
    nn.Linear,
    Rule(lambda m: _direct(m, "weight", "bias"), _save_input, _linear_contribute, "Linear"),
)


# --------------------------------------------------------------------------- HF Conv1D (y = x W + b)
def _conv1d_contribute(module: nn.Module, x: Any, delta: torch.Tensor, i: int, sink: Sink) -> None:
    d = tokens(delta)
    sink.outer(module.weight, tokens(x).to(d.dtype), d)  # type: ignore[arg-type]
    if getattr(module, "bias", None) is not None:
        sink.dense_tokens(module.bias, d)  # type: ignore[arg-type]


_CONV1D = Rule(lambda m: _direct(m, "weight", "bias"), _save_input, _conv1d_contribute, "Conv1D")
_OPTIONAL_DONE = False


def _register_optional() -> None:
    """Rules for layer types of optional packages, registered when the package is importable."""
    global _OPTIONAL_DONE
    if _OPTIONAL_DONE:
        return
    _OPTIONAL_DONE = True
    try:
        from transformers.pytorch_utils import Conv1D  # type: ignore[import-not-found]
    except Exception:
        return
    register_rule(Conv1D, Rule(lambda m: _direct(m, "weight", "bias"), _save_input, _conv1d_contribute, "Conv1D"))


# --------------------------------------------------------------------------- Embedding
def _embedding_capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    assert isinstance(module, nn.Embedding)
    if module.max_norm is not None or module.scale_grad_by_freq:
        from looptrace.errors import UnsupportedLayerError

        raise UnsupportedLayerError(
            f"nn.Embedding with max_norm or scale_grad_by_freq has no per-example gradient rule "
            f"({module}); construct it without these options inside the loop body"
        )
    return (args[0] if args else kwargs["input"]).detach()


def _embedding_contribute(module: nn.Module, idx: Any, delta: torch.Tensor, i: int, sink: Sink) -> None:
    assert isinstance(module, nn.Embedding)
    b = delta.shape[0]
    rows = idx.reshape(b, -1).long()
    values = delta.reshape(b, rows.shape[1], -1)
    if module.padding_idx is not None:  # the padding row never receives gradient
        values = values * (rows != module.padding_idx).unsqueeze(-1).to(values.dtype)
    sink.rows(module.weight, rows, values)


register_rule(
    nn.Embedding,
    Rule(lambda m: _direct(m, "weight"), _embedding_capture, _embedding_contribute, "Embedding"),
)


# --------------------------------------------------------------------------- LayerNorm / RMSNorm
def _norm_dims(module: nn.Module) -> int:
    return len(module.normalized_shape)  # type: ignore[arg-type]


def _normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x-hat, recomputed in backward from the saved input (which autograd keeps anyway), so the
    forward pass holds no extra activation memory for norms."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    return F.rms_norm(x, module.normalized_shape, eps=module.eps)  # type: ignore[arg-type]


def _norm_contribute(module: nn.Module, x: Any, delta: torch.Tensor, i: int, sink: Sink) -> None:
    xhat = _normalized(module, x)
    b = delta.shape[0]
    affine: Any = getattr(module, "weight", None)
    if affine is None:
        affine = getattr(module, "bias", None)
    width = int(affine.numel())
    d = delta.reshape(b, -1, width)
    if getattr(module, "weight", None) is not None:
        sink.dense_tokens(module.weight, d * xhat.reshape(b, -1, width).to(d.dtype))  # type: ignore[arg-type]
    if getattr(module, "bias", None) is not None:
        sink.dense_tokens(module.bias, d)  # type: ignore[arg-type]


register_rule(
    nn.LayerNorm,
    Rule(lambda m: _direct(m, "weight", "bias"), _save_input, _norm_contribute, "LayerNorm"),
)
if hasattr(nn, "RMSNorm"):
    register_rule(
        nn.RMSNorm,
        Rule(lambda m: _direct(m, "weight"), _save_input, _norm_contribute, "RMSNorm"),
    )


# --------------------------------------------------------------------------- exact fallback
@dataclasses.dataclass
class Saved:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    in_dims: tuple[Any, ...]
    out_batch_dim: int
    grouped: bool = False  # rows regrouped per example: each example's slice is already a batch of rows


def regroup_saved(saved: Any, regroup: Callable[[Any], Any], n_rows: int) -> Any:
    """What a rule saved, with every tensor of ``n_rows`` leading rows regrouped per example by
    ``regroup`` (``[N, ...] -> [B, L, ...]``); the exact fallback's saved inputs are marked grouped."""
    if not isinstance(saved, Saved):
        return regroup(saved)

    def dims(x: Any, d: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return 0 if x.dim() > 0 and x.shape[0] == n_rows else None
        if isinstance(x, tuple | list):
            return type(x)(dims(v, dd) for v, dd in zip(x, d, strict=True))
        if isinstance(x, dict):
            return {k: dims(v, d[k]) for k, v in x.items()}
        return None

    in_dims = (dims(saved.args, saved.in_dims[0]), dims(saved.kwargs, saved.in_dims[1]))
    return Saved(regroup(saved.args), regroup(saved.kwargs), in_dims, 0, grouped=True)


def _detach_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple | list):
        return type(x)(_detach_tree(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach_tree(v) for k, v in x.items()}
    return x


def fallback_capture(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: Any,
    batch_size: int | None = None,
    batch_dim: int = 0,
    out_batch_dim: int = 0,
) -> Saved:
    """Save inputs for the exact fallback; tensors whose ``batch_dim`` has the batch size are batched."""
    if batch_size is None:
        first = out if isinstance(out, torch.Tensor) else out[0]
        batch_size = first.shape[out_batch_dim]

    def dims(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return batch_dim if x.dim() > batch_dim and x.shape[batch_dim] == batch_size else None
        if isinstance(x, tuple | list):
            return type(x)(dims(v) for v in x)
        if isinstance(x, dict):
            return {k: dims(v) for k, v in x.items()}
        return None

    args, kwargs = _detach_tree(args), _detach_tree(kwargs)
    return Saved(args, kwargs, (dims(args), dims(kwargs)), out_batch_dim)


def leaves(tree: Any) -> list[Any]:
    """The leaves of a call's ``(args, kwargs)`` (tuples, lists and dict values opened), in a fixed order:
    positions in this list name an argument across calls."""
    if isinstance(tree, tuple | list):
        return [leaf for v in tree for leaf in leaves(v)]
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in leaves(v)]
    return [tree]


def unbatch(dims: Any, tree: Any, positions: set[int] | frozenset[int]) -> Any:
    """``dims`` (vmap in_dims mirroring ``tree``) with ``None`` at the leaf ``positions`` (see :func:`leaves`)."""
    if not positions:
        return dims
    count = [0]

    def walk(x: Any, d: Any) -> Any:
        if isinstance(x, tuple | list):
            return type(x)(walk(v, dd) for v, dd in zip(x, d, strict=True))
        if isinstance(x, dict):
            return {k: walk(v, d[k]) for k, v in x.items()}
        i = count[0]
        count[0] += 1
        return None if i in positions else d

    return walk(tree, dims)


def fallback_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters(recurse=False))


def make_fallback_contribute(
    params_of: Callable[[nn.Module], dict[str, nn.Parameter]],
) -> Contribute:
    """An exact per-example VJP w.r.t. ``params_of(module)`` via torch.func.vmap over examples.

    The module is re-run on each example as a batch of one, so it sees the shapes it expects.
    """

    def contribute(module: nn.Module, saved: Any, delta: torch.Tensor, i: int, sink: Sink) -> None:
        assert isinstance(saved, Saved)
        params = {n: p.detach() for n, p in params_of(module).items()}
        bd = saved.out_batch_dim

        def unsqueeze(x: Any, d: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.unsqueeze(d) if d is not None else x
            if isinstance(x, tuple | list):
                return type(x)(unsqueeze(v, dd) for v, dd in zip(x, d, strict=True))
            if isinstance(x, dict):
                return {k: unsqueeze(v, d[k]) for k, v in x.items()}
            return x

        def one(p: dict[str, torch.Tensor], args: Any, kwargs: Any, g: torch.Tensor) -> Any:
            if not saved.grouped:  # a batch of one; grouped rows are already a batch of the example's rows
                args, kwargs, g = (
                    unsqueeze(args, saved.in_dims[0]),
                    unsqueeze(kwargs, saved.in_dims[1]),
                    g.unsqueeze(bd),
                )

            def f(pp: dict[str, torch.Tensor]) -> torch.Tensor:
                # buffers are copied inside the transform: a module that updates them (batch norm's running
                # statistics in training mode) must not mutate the real ones, nor a tensor captured by vjp
                bufs = {n: b.clone() for n, b in module.named_buffers()}
                out = torch.func.functional_call(module, (pp, bufs), tuple(args), kwargs, strict=False)
                return out if isinstance(out, torch.Tensor) else out[i]

            vjp_out: Any = torch.func.vjp(f, p)
            return vjp_out[1](g)[0]

        b = delta.shape[bd]
        try:
            grads = torch.func.vmap(one, in_dims=(None, saved.in_dims[0], saved.in_dims[1], bd))(
                params, saved.args, saved.kwargs, delta
            )
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            if not vmap_refused(exc):
                raise
            # an operation vmap cannot batch (data-dependent shapes, in-place buffer updates): one example
            # at a time, the same per-example VJP
            rows = [
                one(
                    params,
                    take(saved.args, saved.in_dims[0], j),
                    take(saved.kwargs, saved.in_dims[1], j),
                    delta.select(bd, j),
                )
                for j in range(b)
            ]
            grads = {n: torch.stack([r[n] for r in rows]) for n in params}
        named = params_of(module)
        for n, g in grads.items():
            sink.dense(named[n], g.reshape(b, -1))

    return contribute


def take(tree: Any, dims: Any, index: int) -> Any:
    """Example ``index`` of every batched tensor of ``tree`` (batched along ``dims``), as vmap would pass it."""
    if isinstance(tree, torch.Tensor):
        return tree.select(dims, index) if dims is not None else tree
    if isinstance(tree, tuple | list):
        return type(tree)(take(v, d, index) for v, d in zip(tree, dims, strict=True))
    if isinstance(tree, dict):
        return {k: take(v, dims[k], index) for k, v in tree.items()}
    return tree


def vmap_refused(exc: BaseException) -> bool:
    """An error torch.func.vmap raises for operations it cannot batch (so a loop can do them instead)."""
    text = str(exc).lower()
    words = ("vmap", "batching rule", "data-dependent", "data dependent", "functorch", ".item()", "batched tensor")
    return any(w in text for w in words)


FALLBACK = Rule(fallback_params, fallback_capture, make_fallback_contribute(fallback_params), "exact fallback")


# --------------------------------------------------------------------------- MultiheadAttention
def _mha_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p is not None}


def _mha_capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    assert isinstance(module, nn.MultiheadAttention)
    bd = 0 if module.batch_first else 1
    mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        from looptrace.errors import UnsupportedLayerError

        raise UnsupportedLayerError(
            "nn.MultiheadAttention with a 3-D attn_mask mixes examples and heads in one axis; "
            "pass a 2-D attn_mask (or key_padding_mask) inside the loop body"
        )
    q = args[0] if args else kwargs["query"]
    b = q.shape[bd] if q.dim() == 3 else 1
    saved = fallback_capture(module, args, kwargs, out, batch_size=b, batch_dim=bd, out_batch_dim=bd)
    # key_padding_mask is [B, S] (batch first) whatever batch_first says
    kpm_dims = saved.in_dims
    if "key_padding_mask" in saved.kwargs and isinstance(saved.kwargs["key_padding_mask"], torch.Tensor):
        kd = dict(kpm_dims[1])
        kd["key_padding_mask"] = 0
        saved.in_dims = (kpm_dims[0], kd)
    if isinstance(saved.kwargs.get("attn_mask"), torch.Tensor):
        kd = dict(saved.in_dims[1])
        kd["attn_mask"] = None
        saved.in_dims = (saved.in_dims[0], kd)
    return saved


_mha_fallback = make_fallback_contribute(_mha_params)


def _mha_contribute(module: nn.Module, saved: Any, delta: torch.Tensor, i: int, sink: Sink) -> None:
    if i != 0:  # attention weights are an output, but only the attention output carries loss signal here
        saved = dataclasses.replace(saved, out_batch_dim=0)
    _mha_fallback(module, saved, delta, i, sink)


def _mha_batch_dim(module: nn.Module, output_index: int) -> int:
    return 0 if output_index == 1 or getattr(module, "batch_first", False) else 1


register_rule(
    nn.MultiheadAttention, Rule(_mha_params, _mha_capture, _mha_contribute, "MultiheadAttention", _mha_batch_dim)
)

"""The loop step's route: the exact per-example VJP of one call of a step unit.

A layer whose rows cannot be told apart (its batch axis is not the first, and the row tracker learns no
map) gets its per-example gradient from the call of the step unit that contains it (the step module, one
module of a step sequence, or a body module called inside a pass): that call is re-run on each example
from its saved inputs and pulled back with its output's cotangent. Exact, and as costly as re-running the
call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from looptrace import batching
from looptrace.capture.rules import unbatch, vmap_refused

__all__ = ["step_vjp"]


def step_vjp(
    step_module: nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: tuple[Any, Any],
    grad: torch.Tensor,
    index: int,
    batch_size: int,
    unbatched: frozenset[int] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Per-example ``d <grad_b, step(inputs_b)> / d params`` ``{name: [B, *shape]}``.

    Each example's step is re-run as a batch of one (examples must not interact). ``torch.func.vmap``
    does all examples at once; a body it cannot batch (data-dependent shapes, such as routing tokens
    with ``nonzero``) is run one example at a time instead, with the same result. An input is split by
    example when its leading size is the batch size, except at the leaf positions ``unbatched`` (inputs
    that do not depend on the batch, see :func:`looptrace.capture.rules.leaves`)."""
    args, kwargs = inputs
    detached = {n: p.detach() for n, p in params.items()}

    def per_example(p: dict[str, torch.Tensor], a: Any, k: Any, g: torch.Tensor) -> dict[str, torch.Tensor]:
        def f(pp: dict[str, torch.Tensor]) -> torch.Tensor:
            bufs = {n: b.clone() for n, b in step_module.named_buffers()}  # never update the real buffers
            out = torch.func.functional_call(step_module, (pp, bufs), tuple(a), k, strict=False)
            return out if isinstance(out, torch.Tensor) else out[index]

        pullback = torch.func.vjp(f, p)[1]
        return pullback(g)[0]

    dims_a, dims_k = unbatch(
        batching.map_tensors(inputs, lambda t: 0 if t.dim() > 0 and t.shape[0] == batch_size else None),
        inputs,
        unbatched,
    )
    a_in = _with_dims(args, dims_a)
    k_in = _with_dims(kwargs, dims_k)
    try:
        with torch.enable_grad():
            return torch.func.vmap(
                lambda p, a, k, g: per_example(p, _unsqueeze(a, dims_a), _unsqueeze(k, dims_k), g.unsqueeze(0)),
                in_dims=(None, a_in, k_in, 0),
            )(detached, args, kwargs, grad)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        if not vmap_refused(exc):
            raise
    with torch.enable_grad():
        rows = [
            per_example(
                detached, batching.slice_rows(args, b, b + 1), batching.slice_rows(kwargs, b, b + 1), grad[b : b + 1]
            )
            for b in range(batch_size)
        ]
    return {n: torch.stack([r[n] for r in rows]) for n in detached}


def _with_dims(tree: Any, dims: Any) -> Any:
    """vmap in_dims for a tree: its tensors get their dims; other leaves None."""
    if isinstance(tree, torch.Tensor):
        return dims
    if isinstance(tree, tuple | list):
        return type(tree)(_with_dims(v, d) for v, d in zip(tree, dims, strict=True))
    if isinstance(tree, dict):
        return {k: _with_dims(v, dims[k]) for k, v in tree.items()}
    return None


def _unsqueeze(tree: Any, dims: Any) -> Any:
    """Inside vmap: give every batched tensor back its (now size-one) batch axis."""
    if isinstance(tree, torch.Tensor):
        return tree.unsqueeze(0) if dims == 0 else tree
    if isinstance(tree, tuple | list):
        return type(tree)(_unsqueeze(v, d) for v, d in zip(tree, dims, strict=True))
    if isinstance(tree, dict):
        return {k: _unsqueeze(v, dims[k]) for k, v in tree.items()}
    return tree

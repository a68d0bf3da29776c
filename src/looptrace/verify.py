"""Verification against autograd: the guard against silently wrong features.

The captured per-step features of a batch must add up to the sketch of autograd's gradient of the
body, summed over the batch (every block of coordinates without a wide matrix), and for the first and last
examples run without the rest of the batch (every parameter).
Because every sketch is linear, this holds exactly for a correct capture (up to floating-point error)
and fails when a body weight is used outside the step module, when examples interact inside the body,
when features land on the wrong example (for a wide matrix: on the first or the last example, the only ones
whose features are compared for it), or when a layer rule is wrong. In sketched mode the check
compares sketches, never a full per-example gradient.

The batch sum comes with the capture's own backward pass (the gradients are asked for alongside the
deltas) for every block of coordinates without a *wide* matrix (:func:`looptrace.sketch.plan.is_wide`): a wide
matrix's batch gradient is a plain step's weight-gradient matmul over every token and step, which would cost
more than the rest of the check (about 5 % of six batches' plain steps at width 512). Wide matrices are checked on
the probe rows below, whose gradients cover every body parameter (:func:`batch_checked`).

The first and last examples are run together as a batch of two cut from the same batch tensors (so padding is
unchanged), with one backward of ``loss_first + 2 * loss_last``: a mix of the
rest of the batch into them shows as a mismatch (their companions changed), and so does a swap of the
two (unequal weights). A batch of two is not a change of companions, so for batches of one or two each
example is run alone. In train mode, where dropout would differ between passes, the same weighted
backward is taken through the batch's own graph instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from looptrace import batching
from looptrace.errors import VerificationError
from looptrace.sketch.plan import SketchPlan, is_wide

__all__ = [
    "batch_checked",
    "check_batch",
    "probe_groups",
    "rows_grad_alone",
    "rows_grad_in_graph",
    "sketch_gradient",
    "tolerance",
]


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the comparison: float64 is exact to rounding, float32 to its accumulation."""
    return {torch.float64: 1e-8, torch.float32: 2e-3}.get(dtype, 5e-2)


def sketch_gradient(
    plan: SketchPlan, grads: dict[str, torch.Tensor | None], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``[D]``: the sketch of one whole gradient (a dict name -> tensor; ``None`` is zero)."""
    out = torch.zeros(1, plan.dim, dtype=dtype, device=device)
    for slot in plan.slots:
        g = grads.get(slot.name)
        if g is not None:
            slot.add_dense(out[:, slot.offset : slot.offset + slot.m], g.reshape(1, -1).to(dtype))
    return out[0]


def batch_checked(plan: SketchPlan) -> set[str]:
    """The tensors whose batch-summed gradient the check compares: those of every block (a tensor's own
    coordinates, or a space several share) that holds no wide matrix. The rest are checked on the probe rows."""
    return {s.name for group in plan.blocks().values() if not any(is_wide(s.shape) for s in group) for s in group}


def compare(
    plan: SketchPlan,
    want: torch.Tensor,
    got: torch.Tensor,
    what: str,
    compute_dtype: torch.dtype | None = None,
    only: set[str] | None = None,
) -> None:
    """Raise :class:`VerificationError` naming every parameter (or the shared space) that differs.

    ``compute_dtype``: the dtype the forward ran in (under autocast), whose rounding is allowed. ``only``: compare
    the blocks of these tensors alone (default: every block)."""
    tol = max(tolerance(got.dtype), tolerance(compute_dtype) if compute_dtype is not None else 0.0)
    bad: list[str] = []
    keep = {(s.offset, s.m) for s in plan.slots if only is None or s.name in only}
    for name, off, m in plan.groups():
        if (off, m) not in keep:
            continue
        a, b = want[off : off + m], got[off : off + m]
        err = float((a - b).norm())
        scale = float(a.norm() + b.norm())
        if err > tol * scale + 1e-30 and err > 1e-6 * tol:
            bad.append(f"{name}: |diff|={err:.3g}, |autograd|={float(a.norm()):.3g}, |captured|={float(b.norm()):.3g}")
    if bad:
        raise VerificationError(
            f"{what} does not match autograd for: " + "; ".join(bad[:8]) + ". Probable causes: a body "
            "weight is used outside the step module (e.g. F.linear(x, core.fc.weight) elsewhere), examples "
            "interact inside the body (batch norm in training mode, attention across the batch, the batch "
            "not on the first axis), or a custom layer rule is wrong. Pass verify=False only if you know why."
        )


def probe_groups(batch_size: int, alone: bool = True) -> list[tuple[list[int], list[float]]]:
    """The rows checked on their own, with their weights: the first and last together (weights 1 and 2).
    Run ``alone`` (a fresh forward of those rows), a batch of one or two is not a change of companions, so
    each example is then a group of its own; through the batch's own graph (``alone=False``) one group,
    since that graph is released after one backward (see the module)."""
    last = batch_size - 1
    if batch_size >= (3 if alone else 2):
        return [([0, last], [1.0, 2.0])]
    return [([i], [1.0]) for i in range(batch_size)]


#: The weighted gradient of some rows' losses: ``rows_grad(rows, weights)`` is the gradient of
#: ``sum_i weights[i] * loss[rows[i]]`` w.r.t. the checked parameters, in order.
RowsGrad = Callable[[list[int], list[float]], tuple[torch.Tensor | None, ...]]


def check_batch(
    plan: SketchPlan,
    feats: torch.Tensor,
    params: dict[str, torch.Tensor],
    batch_grads: tuple[torch.Tensor | None, ...],
    rows_grad: RowsGrad,
    first_row: int,
    compute_dtype: torch.dtype | None = None,
    scale: dict[str, torch.Tensor] | None = None,
    groups: list[tuple[list[int], list[float]]] | None = None,
) -> None:
    """Compare a batch's features ``[B, steps, D]`` with autograd: the batch sum (``batch_grads``, the
    gradient of the summed loss w.r.t. the parameters of ``params`` named in :func:`batch_checked`, in order)
    and, for each of ``groups`` (default :func:`probe_groups`), the weighted sum of its rows' features against
    ``rows_grad(rows, weights)`` (every parameter of ``params``, in order). ``scale``: the diagonal
    preconditioner the features were computed with, applied to autograd's side too."""
    names = list(params)
    in_sum = batch_checked(plan)
    sum_names = [n for n in names if n in in_sum]

    def scaled(grads: tuple[torch.Tensor | None, ...], which: list[str] = names) -> dict[str, torch.Tensor | None]:
        out = dict(zip(which, grads, strict=True))
        if scale:
            out = {n: g if g is None or n not in scale else g * scale[n].to(g) for n, g in out.items()}
        return out

    dtype, device = feats.dtype, feats.device
    if sum_names:
        total = sketch_gradient(plan, scaled(batch_grads, sum_names), dtype, device)
        compare(plan, total, feats.sum((0, 1)), "the batch's summed features", compute_dtype, only=in_sum)
    for rows, weights in groups if groups is not None else probe_groups(feats.shape[0]):
        want = sketch_gradient(plan, scaled(rows_grad(rows, weights)), dtype, device)
        w = torch.tensor(weights, dtype=dtype, device=device)
        got = (feats[rows].sum(1) * w[:, None]).sum(0)
        if len(rows) == 1:
            what = f"example {first_row + rows[0]}'s features"
        else:
            what = (f"the features of examples {first_row + rows[0]} and {first_row + rows[-1]} (run together "
                    f"without the rest of the batch, weighted {weights[0]:g}:{weights[-1]:g})")  # fmt: skip
        compare(plan, want, got, what, compute_dtype)


def _weighted_grad(
    losses: torch.Tensor, weights: list[float], params: list[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """The gradient of ``sum_i weights[i] * losses[i]`` w.r.t. ``params`` (``None`` where unused)."""
    w = torch.tensor(weights, dtype=losses.dtype, device=losses.device)
    return torch.autograd.grad((losses * w).sum(), params, allow_unused=True)


def rows_grad_in_graph(losses: torch.Tensor, params: list[torch.Tensor]) -> RowsGrad:
    """Weighted rows' gradient from the batch's own graph (one backward through the whole batch; the
    graph is released). Used when a fresh forward would differ (dropout on), with ``probe_groups(b, alone=False)``."""

    def grad(rows: list[int], weights: list[float]) -> tuple[torch.Tensor | None, ...]:
        return _weighted_grad(losses[rows], weights, params)

    return grad


def rows_grad_alone(run: Callable[[Any], torch.Tensor], batch: Any, params: list[torch.Tensor]) -> RowsGrad:
    """Weighted rows' gradient from a forward and backward of those rows alone (the same batch tensors'
    rows, so padding is unchanged): any dependence of their losses on the rest of the batch (examples
    that interact) shows as a mismatch."""

    def grad(rows: list[int], weights: list[float]) -> tuple[torch.Tensor | None, ...]:
        with torch.enable_grad():
            losses = run(batching.select_rows(batch, rows))
        return _weighted_grad(losses, weights, params)

    return grad

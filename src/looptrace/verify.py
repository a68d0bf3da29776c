"""Verification against autograd: the guard against silently wrong features.

The captured per-step features of a batch must add up to the sketch of autograd's gradient of the
body, summed over the batch and for single examples (the first and the last). Because every sketch is
linear, this holds exactly for a correct capture (up to floating-point error) and fails when a body
weight is used outside the step module, when examples interact inside the body, or when a layer rule
is wrong. In sketched mode the check compares sketches, never a full per-example gradient. The batch
sum comes with the capture's own backward pass (the weight gradients are asked for alongside the
deltas); the two single examples are run alone, as batches of one cut from the same batch tensors, so
the check costs about 2/B of a batch (in train mode, where dropout would differ between passes, they
are taken from the batch's own graph instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from looptrace import batching
from looptrace.errors import VerificationError
from looptrace.sketch.plan import SketchPlan

__all__ = ["check_batch", "example_gradients_alone", "example_gradients_in_graph", "sketch_gradient", "tolerance"]


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


def compare(
    plan: SketchPlan, want: torch.Tensor, got: torch.Tensor, what: str, compute_dtype: torch.dtype | None = None
) -> None:
    """Raise :class:`VerificationError` naming every parameter (or the shared space) that differs.

    ``compute_dtype``: the dtype the forward ran in (under autocast), whose rounding is allowed."""
    tol = max(tolerance(got.dtype), tolerance(compute_dtype) if compute_dtype is not None else 0.0)
    groups = [(s.name, s.offset, s.m) for s in plan.slots]
    if plan.spec.budget == "shared" and not plan.spec.is_exact:
        groups = [("all body parameters", 0, plan.dim)]
    bad: list[str] = []
    for name, off, m in groups:
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


def check_batch(
    plan: SketchPlan,
    feats: torch.Tensor,
    params: dict[str, torch.Tensor],
    batch_grads: tuple[torch.Tensor | None, ...],
    example_grad: Callable[[int], tuple[torch.Tensor | None, ...]],
    first_row: int,
    compute_dtype: torch.dtype | None = None,
    scale: dict[str, torch.Tensor] | None = None,
) -> None:
    """Compare a batch's features ``[B, steps, D]`` with autograd: the batch sum (``batch_grads``, the
    gradient of the summed loss w.r.t. ``params`` in order) and the first and last examples alone
    (``example_grad(i)``: the gradient of example i's loss w.r.t. ``params``). ``scale``: the diagonal
    preconditioner the features were computed with, applied to autograd's side too."""
    names = list(params)

    def scaled(grads: tuple[torch.Tensor | None, ...]) -> dict[str, torch.Tensor | None]:
        out = dict(zip(names, grads, strict=True))
        if scale:
            out = {n: g if g is None or n not in scale else g * scale[n].to(g) for n, g in out.items()}
        return out

    dtype, device = feats.dtype, feats.device
    total = sketch_gradient(plan, scaled(batch_grads), dtype, device)
    compare(plan, total, feats.sum((0, 1)), "the batch's summed features", compute_dtype)
    b = feats.shape[0]
    for i in sorted({0, b - 1}):
        want = sketch_gradient(plan, scaled(example_grad(i)), dtype, device)
        compare(plan, want, feats[i].sum(0), f"example {first_row + i}'s features", compute_dtype)


def example_gradients_in_graph(
    losses: torch.Tensor, params: list[torch.Tensor]
) -> Callable[[int], tuple[torch.Tensor | None, ...]]:
    """Example i's gradient from the batch's own graph (one backward through the whole batch each; the
    graph is released after the last example). Used when a fresh forward would differ (dropout on)."""
    b = int(losses.shape[0])

    def grad(i: int) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(losses[i], params, allow_unused=True, retain_graph=i != b - 1)

    return grad


def example_gradients_alone(
    run: Callable[[Any], torch.Tensor], batch: Any, params: list[torch.Tensor]
) -> Callable[[int], tuple[torch.Tensor | None, ...]]:
    """Example i's gradient from a forward and backward of that example alone (its rows of the same batch
    tensors, so padding is unchanged): a batch of one costs 1/B of the batch, and any dependence of an
    example's loss on the others (examples that interact) shows as a mismatch."""

    def grad(i: int) -> tuple[torch.Tensor | None, ...]:
        with torch.enable_grad():
            loss = run(batching.select_rows(batch, [i]))
        return torch.autograd.grad(loss.sum(), params, allow_unused=True)

    return grad

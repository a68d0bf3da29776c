"""The untied per-pass oracle for loops whose step spans several modules.

One loop pass is one call of each module of ``sequence`` (in order), plus the calls of the ``extras``
(modules tied across passes but called inside a pass, e.g. Inkling-2-Loop's ``message_input``) made
before the pass's last module returns. The oracle gives every pass its own copy of all those modules'
parameters: each call of a unit runs ``torch.func.functional_call`` on a deep copy of the unit with the
copy of the pass it belongs to, so the gradient with respect to copy ``p`` is exactly phi_p. Nothing of
looptrace runs here: the oracle patches the units' ``forward`` and reads autograd. It checks itself:
the sum over passes must equal autograd's gradient of the tied model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from looptrace import batching

__all__ = ["body_names", "oracle_per_pass", "tied_gradients"]


def body_names(model: nn.Module, units: Sequence[nn.Module]) -> list[str]:
    """The units' parameters, by their names in the model (first name of a tied tensor), sorted."""
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted({names[id(p)] for u in units for p in u.parameters()})


def tied_gradients(
    model: nn.Module, names: list[str], batches: list[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]
) -> torch.Tensor:
    """Autograd's per-example gradients ``[N, D]`` of the tied model w.r.t. ``names`` (one example at a time)."""
    params = dict(model.named_parameters())
    rows = []
    for batch in batches:
        for i in range(batching.leading_size(batch) or 0):
            loss = loss_fn(model, batching.slice_rows(batch, i, i + 1))[0]
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(params[n])).reshape(-1)
                        for g, n in zip(grads, names, strict=True)
                    ]
                )
            )
    return torch.stack(rows)


def oracle_per_pass(
    model: nn.Module,
    sequence: Sequence[nn.Module],
    extras: Sequence[nn.Module],
    batches: list[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> torch.Tensor:
    """Exact ``[N, passes, D]`` per-example, per-pass gradients, parameters in sorted-name order."""
    units = [*sequence, *extras]
    names = body_names(model, units)
    full = {id(p): n for n, p in model.named_parameters()}
    last = sequence[-1]
    state = {"completed": 0}
    copies: list[dict[str, torch.Tensor]] = []

    def params_of_pass(p: int) -> dict[str, torch.Tensor]:
        while len(copies) < p:  # a fresh leaf copy of every body parameter for each pass
            copies.append(
                {n: t.detach().clone().requires_grad_(True) for n, t in model.named_parameters() if n in names}
            )
        return copies[p - 1]

    def patch(unit: nn.Module) -> Callable[..., Any]:
        ref = copy.deepcopy(unit)
        local = {n: full[id(p)] for n, p in unit.named_parameters()}

        def forward(*args: Any, **kwargs: Any) -> Any:
            mine = params_of_pass(state["completed"] + 1)
            out = torch.func.functional_call(ref, {n: mine[f] for n, f in local.items()}, args, kwargs)
            if unit is last:
                state["completed"] += 1
            return out

        return forward

    rows: list[torch.Tensor] = []
    for u in units:
        u.forward = patch(u)  # type: ignore[method-assign]
    try:
        for batch in batches:
            for i in range(batching.leading_size(batch) or 0):
                copies.clear()
                state["completed"] = 0
                loss = loss_fn(model, batching.slice_rows(batch, i, i + 1))[0]
                flat = [c[n] for c in copies for n in names]
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
                per_pass = [
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(t)).reshape(-1)
                            for g, t in zip(
                                grads[k * len(names) : (k + 1) * len(names)],
                                flat[k * len(names) : (k + 1) * len(names)],
                                strict=True,
                            )
                        ]
                    )
                    for k in range(len(copies))
                ]
                rows.append(torch.stack(per_pass))
    finally:
        for u in units:
            del u.forward
    assert len({r.shape for r in rows}) == 1, "examples ran different numbers of passes"
    return torch.stack(rows)

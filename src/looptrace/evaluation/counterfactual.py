"""The step counterfactual: does SDI_t predict what an update does through loop step t?

Test side: SDI_t(z, z') is the first-order change of the query loss when the update from z,
``-eta * grad l(z)``, is applied only to the weights that loop step t of the query's computation uses
(an untied copy of the body at step t, every other step keeping the old weights). Train side: the
decrease when the update from z's step-t term ``-eta * phi_t(z)`` is applied to the (tied) body. Both
are measured here by re-running the query and compared with ``eta * SDI_t``: the relative error must
fall linearly in eta (the second-order term), and the ranking of train examples by SDI_t should match
the ranking by the actual change at realistic learning rates.

Only the prediction comes from looptrace's features. The updates are computed independently of them:
``grad l(z)`` by autograd on the tied model, and ``phi_t(z)`` by autograd through per-step copies of
the body (every call of the step module runs ``torch.func.functional_call`` on its own leaf copy of the
weights, whose gradient is exactly that step's term). So wrong features (steps reversed, noise, rows
of another example) give a large error instead of agreeing with themselves by Taylor expansion.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

import looptrace as lt
from looptrace.errors import ConfigError
from looptrace.evaluation.metrics import spearman

__all__ = ["relative_error", "step_counterfactual", "untied_step", "untied_step_grads"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@contextlib.contextmanager
def untied_step(step_module: nn.Module, step: int, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, the ``step``-th call (1-based) of ``step_module`` uses ``params`` (names relative
    to the module); every other call uses the module's own weights. Calls are counted from the block's
    entry, so run one forward per block."""
    calls = {"n": 0}
    original = step_module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == step:
            return torch.func.functional_call(step_module, params, args, kwargs, strict=False)
        return original(*args, **kwargs)

    step_module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del step_module.forward


def _body(model: nn.Module, step_module: nn.Module) -> tuple[str, dict[str, nn.Parameter]]:
    prefix = next(n for n, m in model.named_modules() if m is step_module)
    return prefix, dict(step_module.named_parameters())


def _per_example_grads(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: dict[str, nn.Parameter]
) -> list[dict[str, torch.Tensor]]:
    from looptrace import batching

    out = []
    for i in range(batching.leading_size(batch) or 0):
        loss = loss_fn(model, batching.slice_rows(batch, i, i + 1)).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out.append(
            {
                n: (g if g is not None else torch.zeros_like(p)).detach()
                for (n, p), g in zip(params.items(), grads, strict=True)
            }
        )
    return out


def untied_step_grads(
    model: nn.Module, step_module: nn.Module, loss_fn: LossFn, batch: Any
) -> list[list[dict[str, torch.Tensor]]]:
    """``out[i][t]``: example i's gradient with respect to the copy of the body that loop step t + 1 used
    (phi_t, names relative to ``step_module``), by autograd through per-step copies of the body.

    Independent of looptrace's capture: every call of ``step_module`` runs ``torch.func.functional_call``
    on a fresh leaf copy of its parameters, one example at a time, and autograd differentiates the loss
    with respect to each copy. The copies' gradients sum to the tied body's gradient."""
    from looptrace import batching

    own = dict(step_module.named_parameters())
    ref = copy.deepcopy(step_module)  # runs each step on its copy of the weights
    copies: list[dict[str, torch.Tensor]] = []

    def per_step_copy(*args: Any, **kwargs: Any) -> Any:
        p = {n: t.detach().clone().requires_grad_(True) for n, t in own.items()}
        copies.append(p)
        return torch.func.functional_call(ref, p, args, kwargs)

    out: list[list[dict[str, torch.Tensor]]] = []
    step_module.forward = per_step_copy  # type: ignore[method-assign]
    try:
        for i in range(batching.leading_size(batch) or 0):
            copies.clear()
            loss = loss_fn(model, batching.slice_rows(batch, i, i + 1)).sum()
            leaves = [c[n] for c in copies for n in own]
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            steps = []
            for t in range(len(copies)):
                gs = grads[t * len(own) : (t + 1) * len(own)]
                steps.append(
                    {
                        n: (g if g is not None else torch.zeros_like(own[n])).detach()
                        for n, g in zip(own, gs, strict=True)
                    }
                )
            out.append(steps)
    finally:
        del step_module.forward
    return out


def step_counterfactual(
    model: nn.Module,
    step_module: nn.Module,
    loss_fn: LossFn,
    train_batch: Any,
    query_batch: Any,
    etas: Sequence[float],
    side: Literal["test", "train"] = "test",
    rank_eta: float | None = None,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Predicted (``eta * SDI_t``) and actual loss decreases for every train example, query and step.

    Args:
        model, step_module, loss_fn: the looped model, its loop body and a per-example loss; use
            float64 for small etas (the actual change is a difference of two losses).
        train_batch, query_batch: the train examples whose updates are applied and the queries measured.
        etas: learning rates to apply (the error should fall linearly in eta).
        side: ``"test"`` (the update applied at one step of the query's computation) or ``"train"``
            (z's step-t term applied to the tied body).
        rank_eta: the learning rate at which rankings are compared (default: the largest eta).
        precondition: a symmetric linear map ``P^-1`` on flat body gradients ``[R, P]`` (parameters in sorted-name
            order, each flattened: the exact features' layout), e.g. a fitted ``Curvature.precondition``. The
            prediction is then the preconditioned ``eta * SDI_t = eta * g(z) . P^-1 phi_t(z')`` and the update the
            preconditioned step, ``-eta * P^-1 grad l(z)`` (test side) or ``-eta * P^-1 phi_t(z)`` (train side).

    Returns:
        ``predicted`` and ``actual`` arrays ``[len(etas), N, M, tau]``, per-step relative errors
        ``rel_error[eta][t]`` over all (z, z') pairs, their log-log ``slope`` in eta per step, and
        ``spearman[t][query]``: the rank correlation over train examples of predicted and actual
        change at ``rank_eta``.
    """
    was_training = model.training
    model.eval()
    try:
        _, params = _body(model, step_module)
        exact = lt.SketchSpec.exact()
        tf = lt.featurize(model, [train_batch], loss_fn, step_module=step_module, sketch=exact, verify=False)
        qf = lt.featurize(model, [query_batch], loss_fn, step_module=step_module, sketch=exact, verify=False)
        if precondition is not None:  # the query side, per step: P^-1 phi_t(z') (P symmetric: either side would do)
            q = qf.require_steps("a preconditioned counterfactual")
            pre = precondition(q.reshape(-1, q.shape[-1])).to(q.dtype).reshape(q.shape)
            qf = dataclasses.replace(qf, per_step=pre, _total=None)
        sdi = lt.sdi(tf, qf, side=side).double().cpu().numpy()  # [N, M, tau]
        n, m, tau = sdi.shape
        with torch.no_grad():
            base = loss_fn(model, query_batch).double().cpu().numpy()  # [M]
        names = sorted(params)
        # the updates, independent of the features behind ``sdi``: tied autograd (test side), or autograd
        # through per-step copies of the body (train side)
        grads = _per_example_grads(model, loss_fn, train_batch, params) if side == "test" else None
        steps = untied_step_grads(model, step_module, loss_fn, train_batch) if side == "train" else None
        if precondition is not None:  # the updates in the preconditioner's geometry, from autograd's gradients
            grads = None if grads is None else [_apply(precondition, g, names) for g in grads]
            steps = None if steps is None else [[_apply(precondition, g, names) for g in ex] for ex in steps]
        if steps is not None and any(len(s) != tau for s in steps):
            raise ConfigError(
                f"the model ran {sorted({len(s) for s in steps})} loop steps per train example, but the features "
                f"have tau={tau}; pass examples that run the same number of steps"
            )
        actual = np.zeros((len(etas), n, m, tau))
        for e, eta in enumerate(etas):
            for i in range(n):
                for t in range(tau):
                    if side == "test":
                        assert grads is not None
                        new = {k: params[k].detach() - eta * grads[i][k] for k in names}
                        with torch.no_grad(), untied_step(step_module, t + 1, new):
                            after = loss_fn(model, query_batch)
                    else:
                        assert steps is not None
                        new = {k: params[k].detach() - eta * steps[i][t][k] for k in names}
                        with torch.no_grad():
                            after = _run_with(model, step_module, new, loss_fn, query_batch)
                    actual[e, i, :, t] = base - after.double().cpu().numpy()
        predicted = np.stack([eta * sdi for eta in etas])
        rel = {
            float(eta): [relative_error(actual[e, :, :, t], predicted[e, :, :, t]) for t in range(tau)]
            for e, eta in enumerate(etas)
        }
        log_eta = np.log(np.asarray(etas, dtype=np.float64))
        slopes = []
        for t in range(tau):
            errs = np.array([rel[float(eta)][t] for eta in etas])
            ok = np.isfinite(errs) & (errs > 0)
            slopes.append(float(np.polyfit(log_eta[ok], np.log(errs[ok]), 1)[0]) if ok.sum() >= 2 else float("nan"))
        at = etas.index(rank_eta) if rank_eta is not None else int(np.argmax(etas))
        rho = [[float(spearman(predicted[at, :, j, t], actual[at, :, j, t])) for j in range(m)] for t in range(tau)]
        return {"side": side, "etas": [float(x) for x in etas], "predicted": predicted, "actual": actual, "rel_error": rel,
                "slope": slopes, "rank_eta": float(etas[at]), "spearman": rho}  # fmt: skip
    finally:
        model.train(was_training)


def _apply(
    precondition: Callable[[torch.Tensor], torch.Tensor], grads: dict[str, torch.Tensor], names: list[str]
) -> dict[str, torch.Tensor]:
    """``P^-1`` applied to one gradient given as ``{name: tensor}``, through the flat sorted-name layout."""
    flat = torch.cat([grads[n].reshape(-1) for n in names])[None]
    out = precondition(flat)[0].to(flat.dtype)
    res, off = {}, 0
    for n in names:
        res[n] = out[off : off + grads[n].numel()].reshape(grads[n].shape)
        off += grads[n].numel()
    return res


def _run_with(
    model: nn.Module, step_module: nn.Module, new: dict[str, torch.Tensor], loss_fn: LossFn, batch: Any
) -> torch.Tensor:
    """The loss with the (tied) body's weights replaced by ``new`` at every step (restored afterwards)."""
    params = dict(step_module.named_parameters())
    old = {k: params[k].detach().clone() for k in new}
    try:
        with torch.no_grad():
            for k, v in new.items():
                params[k].copy_(v)
        return loss_fn(model, batch)
    finally:
        with torch.no_grad():
            for k, v in old.items():
                params[k].copy_(v)


def relative_error(actual: np.ndarray, predicted: np.ndarray) -> float:
    """|actual - predicted| / |predicted| (Frobenius norms over all pairs); NaN when nothing is predicted."""
    den = float(np.linalg.norm(predicted))
    return float(np.linalg.norm(actual - predicted) / den) if den > 0 else float("nan")

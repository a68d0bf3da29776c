"""The step counterfactual: does SDI_t predict what an update does through loop step t?

Test side: SDI_t(z, z') is the first-order change of the query loss when the update from z,
``-eta * grad l(z)``, is applied only to the weights that loop step t of the query's computation uses
(an untied copy of the body at step t, every other step keeping the old weights). Train side: the
decrease when the update from z's step-t term ``-eta * phi_t(z)`` is applied to the (tied) body. Both
are measured here by re-running the query and compared with ``eta * SDI_t``: the relative error must
fall linearly in eta (the second-order term), and the ranking of train examples by SDI_t should match
the ranking by the actual change at realistic learning rates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

import looptrace as lt
from looptrace.evaluation.metrics import spearman

__all__ = ["step_counterfactual", "untied_step"]

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


def step_counterfactual(
    model: nn.Module,
    step_module: nn.Module,
    loss_fn: LossFn,
    train_batch: Any,
    query_batch: Any,
    etas: Sequence[float],
    side: Literal["test", "train"] = "test",
    rank_eta: float | None = None,
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
        sdi = lt.sdi(tf, qf, side=side).double().cpu().numpy()  # [N, M, tau]
        n, m, tau = sdi.shape
        with torch.no_grad():
            base = loss_fn(model, query_batch).double().cpu().numpy()  # [M]
        names = sorted(f"{n_}" for n_ in params)  # featurize's layout order (sorted by full name, same prefix)
        shapes = {k: params[k].shape for k in names}
        train_steps = tf.require_steps("train-side updates") if side == "train" else None
        grads = _per_example_grads(model, loss_fn, train_batch, params) if side == "test" else None
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
                        assert train_steps is not None
                        update = _unflatten(train_steps[i, t], names, shapes)
                        new = {k: params[k].detach() - eta * update[k] for k in names}
                        with torch.no_grad():
                            after = _run_with(model, step_module, new, loss_fn, query_batch)
                    actual[e, i, :, t] = base - after.double().cpu().numpy()
        predicted = np.stack([eta * sdi for eta in etas])
        rel = {
            float(eta): [_rel(actual[e, :, :, t], predicted[e, :, :, t]) for t in range(tau)]
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


def _unflatten(flat: torch.Tensor, names: list[str], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for k in names:
        size = int(np.prod(shapes[k]))
        out[k] = flat[offset : offset + size].reshape(shapes[k])
        offset += size
    return out


def _rel(actual: np.ndarray, predicted: np.ndarray) -> float:
    den = float(np.linalg.norm(predicted))
    return float(np.linalg.norm(actual - predicted) / den) if den > 0 else float("nan")

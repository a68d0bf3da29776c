"""The query side of a preconditioned score: ``g_train . P^-1 phi_t(query)``.

The preconditioner is applied to the query's per-step terms only, so the score stays linear in them and
``sum_t SDI_t = TracIn`` holds exactly, and training features are featurised once, unpreconditioned
(a new damping or preconditioner never refeaturises the training set).

* K-FAC / EK-FAC (:func:`preconditioned_features`): each query batch's exact per-step gradients are
  computed, preconditioned in the parameter space, and sketched at once with the training features'
  plan; the exact gradients of all queries are never held together. The result is the sketch of the exact
  preconditioned per-step gradients, so its inner products with sketched training features are unbiased
  for the exact preconditioned scores (a sketch ``S`` with ``E[S^T S] = I``).
* Gauss-Newton (:func:`gauss_newton`): TRAK-style, in the feature space the training features live in,
  ``(Phi^T Phi / N + lambda I)^-1`` with ``Phi [N, D]`` the training set's total features, applied to the
  query's per-step features (by Woodbury, an ``N x N`` solve, when ``N < D``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from looptrace.capture.tracer import body_parameters
from looptrace.errors import ConfigError, LoaderError
from looptrace.features import Features
from looptrace.featurize import LossFn, featurize, resolve_body
from looptrace.sketch.plan import SketchPlan
from looptrace.sketch.spec import SketchSpec

#: lambda = GN_DAMPING_SCALE x the mean nonzero eigenvalue of Phi^T Phi / N when ``damping=None``.
GN_DAMPING_SCALE = 0.1


def sketch_flat(plan: SketchPlan, flat: torch.Tensor) -> torch.Tensor:
    """``[R, D]`` sketches of flat body gradients ``[R, P]`` (exact layout: sorted names, row-major), under
    ``plan``: each slot's map applied to its tensor's entries (the same linear map featurisation applies
    to the factors)."""
    out = flat.new_zeros(flat.shape[0], plan.dim)
    off = 0
    for slot in sorted(plan.slots, key=lambda s: s.name):
        g = flat[:, off : off + slot.numel]
        slot.add_dense(out[:, slot.offset : slot.offset + slot.m], g.contiguous())
        off += slot.numel
    if off != flat.shape[1]:
        raise ConfigError(f"flat gradients have {flat.shape[1]} entries, the plan's body has {off}")
    return out


def preconditioned_features(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    apply: Callable[[torch.Tensor], torch.Tensor],
    *,
    step_module: nn.Module | None = None,
    body: nn.Module | Sequence[nn.Module] | None = None,
    sketch: SketchSpec | None = None,
    per_step: bool = True,
    tau: int | None = None,
    verify: bool | str = "first",
    checkpoint: str | None = None,
    **featurize_kwargs: Any,
) -> Features:
    """Features of ``S(apply(phi_t))``: the sketch of each example's exact per-step gradients after
    ``apply`` (a linear map on flat gradients ``[R, P] -> [R, P]``, e.g. ``Curvature.precondition``).

    One batch at a time: its exact per-step gradients ``[B, tau, P]`` (:func:`looptrace.featurize` with the
    exact spec, the first batch checked against autograd when ``verify="first"``), ``apply``, the sketch
    under ``sketch`` (the training features' spec: the same plan, so the features are comparable).
    """
    spec = sketch if sketch is not None else SketchSpec()
    params = body_parameters(model, resolve_body(model, step_module, body))
    plan = SketchPlan.build(spec, [(bp.name, tuple(bp.param.shape)) for bp in params])
    chunks: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    settings: dict[str, Any] = {}
    for index, batch in enumerate(loader):
        check: Any = verify is True or (verify == "first" and index == 0)
        f = featurize(model, [batch], loss_fn, step_module=step_module, body=body, sketch=SketchSpec.exact(),
                      per_step=True, tau=tau, verify=check, checkpoint=checkpoint, **featurize_kwargs)  # fmt: skip
        steps = f.require_steps("preconditioned features")
        b, t, p = steps.shape
        pre = apply(steps.reshape(b * t, p)).to(steps.dtype)
        feats = pre if spec.is_exact else sketch_flat(plan, pre)
        feats = feats.reshape(b, t, -1)
        chunks.append(feats if per_step else feats.sum(1))
        losses.append(f.losses)
        settings = dict(f.settings)
    if not chunks:
        raise LoaderError("the query loader yielded no batches")
    settings["precondition"] = "query-side"
    loss = torch.cat(losses)
    if not per_step:
        return Features(None, spec, plan.describe(), loss, checkpoint, settings, _total=torch.cat(chunks))
    steps_max = max(c.shape[1] for c in chunks)
    out = chunks[0].new_zeros(int(loss.shape[0]), steps_max, plan.dim)
    row = 0
    for c in chunks:
        out[row : row + c.shape[0], : c.shape[1]] = c
        row += c.shape[0]
    return Features(out, spec, plan.describe(), loss, checkpoint, settings)


def gauss_newton_damping(phi: torch.Tensor, scale: float = GN_DAMPING_SCALE) -> float:
    """``scale x`` the mean of the nonzero spectrum of ``Phi^T Phi / N``: ``|Phi|_F^2 / (N min(N, D))``
    (a Gram of N rows has at most min(N, D) nonzero eigenvalues; the rest say nothing about scale)."""
    n, d = phi.shape
    return scale * float(phi.double().square().sum()) / (n * min(n, d))


def gauss_newton(
    phi: torch.Tensor, x: torch.Tensor, damping: float | None = None, damping_scale: float = GN_DAMPING_SCALE
) -> torch.Tensor:
    """``(Phi^T Phi / N + lambda I)^-1 x`` for training totals ``phi [N, D]`` and ``x [..., D]`` (float64).

    ``N < D``: Woodbury, ``(x - Phi^T (N lambda I + Phi Phi^T)^-1 Phi x) / lambda``; else a ``D x D``
    Cholesky solve. ``damping=None``: :func:`gauss_newton_damping`."""
    phi = phi.double()
    n, d = phi.shape
    if x.shape[-1] != d:
        raise ConfigError(f"query features have dimension {x.shape[-1]}, the training features {d}")
    lam = gauss_newton_damping(phi, damping_scale) if damping is None else float(damping)
    if not lam > 0:
        raise ConfigError(f"gauss-newton damping must be positive, got {lam} (the training features are all zero?)")
    lead = x.shape[:-1]
    flat = x.reshape(-1, d).double().to(phi.device)
    if n < d:
        gram = phi @ phi.T + n * lam * torch.eye(n, dtype=phi.dtype, device=phi.device)
        inner = torch.cholesky_solve((phi @ flat.T), torch.linalg.cholesky(gram))  # [N, R]
        out = (flat - (phi.T @ inner).T) / lam
    else:
        gram = phi.T @ phi / n + lam * torch.eye(d, dtype=phi.dtype, device=phi.device)
        out = torch.cholesky_solve(flat.T, torch.linalg.cholesky(gram)).T
    return out.reshape(*lead, d)

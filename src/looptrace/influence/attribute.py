"""``looptrace.attribute``: TracIn and SDI aggregated over checkpoints with their eta_k."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from looptrace.capture.tracer import body_parameters
from looptrace.errors import CheckpointError, ConfigError
from looptrace.featurize import LossFn, adam_preconditioner, featurize, resolve_body
from looptrace.influence.checkpoints import Checkpoint, load_into
from looptrace.influence.scores import Decomposition, sdi, self_influence, step_matrix, tracin
from looptrace.sketch.spec import SketchSpec


@dataclasses.dataclass
class Attribution:
    """Scores summed over checkpoints, sum_k eta_k (...).

    Attributes:
        sdi: ``[N, M, tau]`` step-decomposed influence (test-side unless ``decomposition`` says otherwise).
        tracin: ``[N, M]``; equals ``sdi.sum(-1)`` (conservation).
        self_influence: ``[N]`` sum_k eta_k |g_k(z)|^2 of each training example.
        step_matrix: ``[N, M, tau, tau]`` when ``decomposition="matrix"``, else ``None``.
        etas, checkpoints: the weights used and the checkpoint names, in order.
    """

    sdi: torch.Tensor
    tracin: torch.Tensor
    self_influence: torch.Tensor
    spec: SketchSpec
    decomposition: Decomposition
    etas: list[float]
    checkpoints: list[str]
    step_matrix: torch.Tensor | None = None


def attribute(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    train_loader: Iterable[Any],
    query_loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    step_module: nn.Module | Sequence[nn.Module] | None = None,
    body: nn.Module | Sequence[nn.Module] | None = None,
    sketch: SketchSpec | None = None,
    decomposition: Decomposition = "test",
    precondition: Literal["adam"] | None = None,
    **featurize_kwargs: Any,
) -> Attribution:
    """TracIn and SDI of every train example on every query example, over ``checkpoints``.

    Each checkpoint is loaded once (``weights_only=True``); the model's own weights are restored
    afterwards. ``decomposition``: ``"test"`` (which query-time step was influenced, default),
    ``"train"`` (which train-time step did the influencing) or ``"matrix"`` (both: tau x tau).
    ``verify="first"`` (the default) checks the first batch of the first checkpoint's train and query
    featurisations against autograd; the other checkpoints run the same capture on the same model.
    ``precondition="adam"``: each checkpoint's inner products use Adam's diagonal geometry
    ``g^T P_k g'`` with ``P_k = 1 / (sqrt(v_hat_k) + eps)`` from the second moments recorded with it
    (:class:`looptrace.CheckpointRecorder`); conservation still holds.
    """
    if not checkpoints:
        raise ConfigError("attribute needs at least one Checkpoint")
    bad = [type(c).__name__ for c in checkpoints if not isinstance(c, Checkpoint)]
    if bad:
        raise ConfigError(
            f"checkpoints must be looptrace.Checkpoint objects, got {bad}; wrap each as lt.Checkpoint(state_or_path, lr=eta)"
        )
    if precondition not in (None, "adam"):
        raise ConfigError(f"precondition must be None or 'adam', got {precondition!r}")
    if decomposition not in ("test", "train", "matrix"):
        raise ConfigError(f"decomposition must be 'test', 'train' or 'matrix', got {decomposition!r}")
    spec = sketch if sketch is not None else SketchSpec()
    original = copy.deepcopy(model.state_dict())
    total_sdi: torch.Tensor | None = None
    total_tracin: torch.Tensor | None = None
    total_self: torch.Tensor | None = None
    total_matrix: torch.Tensor | None = None
    etas: list[float] = []
    names: list[str] = []
    kw = dict(step_module=step_module, body=body, sketch=spec, **featurize_kwargs)
    try:
        for ck in checkpoints:
            full = ck.load_full()
            state, eta, name = full.state, full.lr, full.name
            load_into(model, state, name)
            if precondition == "adam":
                if full.second_moments is None:
                    raise CheckpointError(
                        f"checkpoint {name} has no optimizer second moments; record it with "
                        "looptrace.CheckpointRecorder(..., moments=True) or drop precondition='adam'"
                    )
                kw["precondition"] = adam_preconditioner(
                    full.second_moments, names=_body_names(model, step_module, body)
                )
            train = featurize(model, train_loader, loss_fn, per_step=decomposition != "test", checkpoint=name, **kw)
            query = featurize(model, query_loader, loss_fn, per_step=decomposition != "train", checkpoint=name, **kw)
            if kw.get("verify", "first") == "first":  # the capture was checked on this model's first batch
                kw["verify"] = False
            if decomposition == "matrix":
                mat = eta * step_matrix(train, query)
                total_matrix = mat if total_matrix is None else total_matrix + mat
                s = mat.sum(2)
            else:
                s = eta * sdi(train, query, side=decomposition)
            if total_sdi is not None and s.shape[-1] != total_sdi.shape[-1]:
                raise ConfigError(
                    f"checkpoint {name} ran {s.shape[-1]} loop steps but earlier ones ran {total_sdi.shape[-1]}; "
                    "pass tau= so every checkpoint is featurised on the same horizon"
                )
            tr = eta * tracin(train, query)
            si = eta * self_influence(train)
            total_sdi = s if total_sdi is None else total_sdi + s
            total_tracin = tr if total_tracin is None else total_tracin + tr
            total_self = si if total_self is None else total_self + si
            etas.append(eta)
            names.append(name)
    finally:
        model.load_state_dict(original)
    assert total_sdi is not None and total_tracin is not None and total_self is not None
    return Attribution(total_sdi, total_tracin, total_self, spec, decomposition, etas, names, total_matrix)


def _body_names(
    model: nn.Module,
    step_module: nn.Module | Sequence[nn.Module] | None,
    body: nn.Module | Sequence[nn.Module] | None,
) -> list[str]:
    return [bp.name for bp in body_parameters(model, resolve_body(model, step_module, body))]

"""``looptrace.attribute``: TracIn and SDI aggregated over checkpoints with their eta_k."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from looptrace.capture.tracer import body_parameters
from looptrace.curvature.blocks import DAMPING_SCALE
from looptrace.curvature.factors import Curvature
from looptrace.curvature.fit import Fisher, check_max_examples, fit_curvature
from looptrace.curvature.query import GN_DAMPING_SCALE, gauss_newton, preconditioned_features
from looptrace.errors import ConfigError, StepError
from looptrace.features import Features
from looptrace.featurize import LossFn, featurize, resolve_body
from looptrace.influence.checkpoints import Checkpoint, load_into
from looptrace.influence.scores import Decomposition, sdi, sdi_positions, self_influence, step_matrix, tracin
from looptrace.sketch.spec import SketchSpec

#: featurize() options about the loop's steps, which the one-pass-per-forward run of ``outside=True`` leaves out.
LOOP_ONLY_OPTIONS = ("tau", "recompute")

Precondition = Literal["adam", "kfac", "ekfac", "gauss-newton"]
#: The accepted values of ``attribute(precondition=...)``.
PRECONDITIONERS: tuple[str | None, ...] = (None, "adam", "kfac", "ekfac", "gauss-newton")


@dataclasses.dataclass
class Attribution:
    """Scores summed over checkpoints, sum_k eta_k (...).

    Attributes:
        sdi: ``[N, M, tau]`` step-decomposed influence (test-side unless ``decomposition`` says otherwise).
        tracin: ``[N, M]``; equals ``sdi.sum(-1)`` (conservation).
        self_influence: ``[N]`` sum_k eta_k |g_k(z)|^2 of each training example.
        step_matrix: ``[N, M, tau, tau]`` when ``decomposition="matrix"``, else ``None``.
        etas, checkpoints: the weights used and the checkpoint names, in order.
        sdi_positions: ``[N, M, tau, L]`` with ``train_positions=True``: the part of ``sdi[i, j, t]`` that comes
            through training example i's position p (summed over the example's loop steps); ``sum(-1)`` is
            ``sdi`` (which is then defined as that sum). L is the longest training sequence; zeros past an
            example's end.
        tracin_positions: ``[N, M, L]``, ``sdi_positions.sum(2)``, with ``train_positions=True``.
        outside: ``[N, M]`` with ``outside=True``: the part of the score that comes through the parameters outside
            the loop body (read-in, read-out, final norm: every module of the model holding a trainable parameter
            that is not a body parameter), under the same preconditioner, block by block; ``None`` otherwise.
            It has no loop step: ``sdi.sum(-1) == tracin`` stays the body's share, and :attr:`total` adds this.
    """

    sdi: torch.Tensor
    tracin: torch.Tensor
    self_influence: torch.Tensor
    spec: SketchSpec
    decomposition: Decomposition
    etas: list[float]
    checkpoints: list[str]
    step_matrix: torch.Tensor | None = None
    sdi_positions: torch.Tensor | None = None
    outside: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        """``[N, M]``: the whole model's score, ``tracin + outside`` (``tracin`` without ``outside=True``)."""
        return self.tracin if self.outside is None else self.tracin + self.outside

    @property
    def tracin_positions(self) -> torch.Tensor | None:
        return None if self.sdi_positions is None else self.sdi_positions.sum(2)


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
    precondition: Precondition | None = None,
    damping: float | None = None,
    damping_scale: float | None = None,
    fisher: Fisher | None = None,
    fisher_loss: LossFn | None = None,
    max_fit_examples: int | None = None,
    train_positions: bool = False,
    outside: bool = False,
    **featurize_kwargs: Any,
) -> Attribution:
    """TracIn and SDI of every train example on every query example, over ``checkpoints``.

    Each checkpoint is loaded once (``weights_only=True``); the model's own weights are restored
    afterwards. ``decomposition``: ``"test"`` (which query-time step was influenced, default),
    ``"train"`` (which train-time step did the influencing) or ``"matrix"`` (both: tau x tau).
    ``verify="first"`` (the default) checks the first batch of the first checkpoint's train and query
    featurisations against autograd; the other checkpoints run the same capture on the same model.
    ``train_positions=True`` also decomposes the training side by sequence position (``sdi_positions``, see
    :class:`Attribution` and ``featurize(positions=True)``).
    ``precondition="adam"``: each checkpoint's inner products use Adam's diagonal geometry
    ``g^T P_k g'`` with ``P_k = 1 / (sqrt(v_hat_k) + eps)`` from the second moments recorded with it
    (:class:`looptrace.CheckpointRecorder`); conservation still holds.

    Curvature-aware scores ``g_train . (F_k + lambda I)^-1 phi_t(query)`` precondition the *query* side only
    (its per-step terms, so ``sdi.sum(-1) == tracin`` still holds exactly; training features stay plain):

    * ``precondition="kfac"`` / ``"ekfac"``: K-FAC / EK-FAC of the body's Linear layers (diagonal blocks for
      its other parameters), fitted on ``train_loader`` at each checkpoint with the rows of every loop step
      and token (:mod:`looptrace.curvature`); the query's exact per-step gradients are preconditioned, then
      sketched with the training features' plan. ``fisher``: ``"true"`` (targets sampled by ``fisher_loss``,
      the default when it is given) or ``"empirical"`` (``loss_fn``, the default otherwise).
      ``max_fit_examples``: fit on ``train_loader``'s first this many examples only (the fit's cost then stops
      growing with the training set; :func:`looptrace.curvature.fit_curvature`'s ``max_examples``); the scores
      still cover every training example.
    * ``precondition="gauss-newton"``: TRAK-style ``(Phi_k^T Phi_k / N + lambda I)^-1`` in feature space, from
      the training set's total features at each checkpoint.
    * ``damping``: ``None`` is 0.1 x each block's mean eigenvalue (Gauss-Newton: of its nonzero spectrum);
      a float is lambda itself for every block. ``damping_scale`` replaces the 0.1 of the heuristic (a
      damping sweep relative to each block's own scale; not with a float ``damping``).

    ``outside=True`` also scores the parameters outside the loop body (:func:`outside_modules`: the read-in, the
    read-out, a final norm), which the step decomposition leaves out: ``Attribution.outside`` ``[N, M]`` and
    ``Attribution.total = tracin + outside``, the whole model's score (what kronfluence or TRAK score when they track
    every layer). They are featurised as one more "body" run once per forward (``step_module=model``, so with
    the same layer rules and first-batch check), preconditioned by the same ``precondition`` on their own block
    (block-diagonal with the body's), at about the cost of a second featurisation. ``precondition="adam"`` then
    needs their second moments too (a recorder without ``body=``).

    Pass one checkpoint (``checkpoints[-1:]``) for the classical influence function at the final weights.
    ``self_influence`` stays the plain ``|g|^2`` under these (only ``"adam"`` changes the training features).
    """
    if not checkpoints:
        raise ConfigError("attribute needs at least one Checkpoint")
    bad = [type(c).__name__ for c in checkpoints if not isinstance(c, Checkpoint)]
    if bad:
        raise ConfigError(
            f"checkpoints must be looptrace.Checkpoint objects, got {bad}; wrap each as lt.Checkpoint(state_or_path, lr=eta)"
        )
    if precondition not in PRECONDITIONERS:
        raise ConfigError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
    if damping is not None and precondition in (None, "adam"):
        raise ConfigError(f"damping applies to 'kfac', 'ekfac' and 'gauss-newton', not precondition={precondition!r}")
    if damping_scale is not None and (precondition in (None, "adam") or damping is not None):
        raise ConfigError("damping_scale scales the damping heuristic of 'kfac', 'ekfac' or 'gauss-newton'; "
                          "it goes with damping=None")  # fmt: skip
    if (fisher is not None or fisher_loss is not None) and precondition not in ("kfac", "ekfac"):
        raise ConfigError("fisher= and fisher_loss= choose the Fisher of precondition='kfac' or 'ekfac' only")
    if max_fit_examples is not None and precondition not in ("kfac", "ekfac"):
        raise ConfigError("max_fit_examples= limits the fit of precondition='kfac' or 'ekfac' only")
    check_max_examples(max_fit_examples, "max_fit_examples")
    if decomposition not in ("test", "train", "matrix"):
        raise ConfigError(f"decomposition must be 'test', 'train' or 'matrix', got {decomposition!r}")
    if train_positions and decomposition != "test":
        raise ConfigError(
            "train_positions=True decomposes the training side by position, summed over its loop steps, against "
            f"the query's steps: it goes with decomposition='test', not {decomposition!r}"
        )
    # the parts outside the loop, found (and a model that cannot be scored so refused) before any work
    mods = outside_run_modules(model, step_module, body) if outside else []
    spec = sketch if sketch is not None else SketchSpec()
    original = copy.deepcopy(model.state_dict())
    total_sdi: torch.Tensor | None = None
    total_tracin: torch.Tensor | None = None
    total_self: torch.Tensor | None = None
    total_matrix: torch.Tensor | None = None
    total_positions: torch.Tensor | None = None
    etas: list[float] = []
    names: list[str] = []
    kw = dict(step_module=step_module, body=body, sketch=spec, **featurize_kwargs)
    try:
        for ck in checkpoints:
            full = ck.load_full()
            state, eta, name = full.state, full.lr, full.name
            load_into(model, state, name)
            if precondition == "adam":
                kw["precondition"] = full.adam_geometry(_body_names(model, step_module, body))
            train = featurize(
                model, train_loader, loss_fn, per_step=decomposition != "test", checkpoint=name,
                positions=train_positions, **kw,
            )  # fmt: skip
            if precondition in ("kfac", "ekfac"):
                fit_kw = {k: v for k, v in kw.items() if k != "sketch"}
                curv = fit_curvature(model, train_loader, loss_fn, kinds=(precondition,), fisher=fisher,
                                     fisher_loss=fisher_loss, checkpoint=name, max_examples=max_fit_examples,
                                     **fit_kw)  # fmt: skip
                query = preconditioned_features(
                    model, query_loader, loss_fn, _preconditioner(curv, precondition, damping, damping_scale),
                    per_step=decomposition != "train", checkpoint=name, **kw,
                )  # fmt: skip
            else:
                query = featurize(
                    model, query_loader, loss_fn, per_step=decomposition != "train", checkpoint=name, **kw
                )
            if precondition == "gauss-newton":
                query = _gauss_newton_query(train, query, damping, damping_scale)
            if kw.get("verify", "first") == "first":  # the capture was checked on this model's first batch
                kw["verify"] = False
            if decomposition == "matrix":
                mat = eta * step_matrix(train, query)
                total_matrix = mat if total_matrix is None else total_matrix + mat
                s = mat.sum(2)
            elif train_positions:
                pos = eta * sdi_positions(train, query)
                if total_positions is not None and pos.shape[-1] != total_positions.shape[-1]:  # pad to the longest
                    width = max(pos.shape[-1], total_positions.shape[-1])
                    pos = torch.nn.functional.pad(pos, (0, width - pos.shape[-1]))
                    total_positions = torch.nn.functional.pad(total_positions, (0, width - total_positions.shape[-1]))
                total_positions = pos if total_positions is None else total_positions + pos
                s = pos.sum(-1)
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
    if total_positions is not None:  # sdi is the sum over positions, exactly
        total_sdi = total_positions.sum(-1)
    rest: torch.Tensor | None = None
    if outside:
        # one pass per forward: the loop's settings (tau, recomputation of loop steps) do not apply
        kw_out = {k: v for k, v in featurize_kwargs.items() if k not in LOOP_ONLY_OPTIONS}
        try:
            rest = attribute(
                model, checkpoints, train_loader, query_loader, loss_fn, step_module=model, body=mods,
                sketch=spec, precondition=precondition, damping=damping, damping_scale=damping_scale,
                fisher=fisher, fisher_loss=fisher_loss, max_fit_examples=max_fit_examples, **kw_out,
            ).tracin  # fmt: skip
        except StepError as exc:
            raise outside_refused(exc) from exc
    return Attribution(
        total_sdi, total_tracin, total_self, spec, decomposition, etas, names, total_matrix, total_positions, rest
    )


def outside_modules(
    model: nn.Module,
    step_module: nn.Module | Sequence[nn.Module] | None = None,
    body: nn.Module | Sequence[nn.Module] | None = None,
) -> list[nn.Module]:
    """The parts of ``model`` outside the loop body that hold a trainable parameter (read-in, read-out, norms, layers
    before or after the loop), in module order: what ``attribute(outside=True)`` scores besides the body. Each is the
    outermost module that contains no body module, a whole subtree, so a parameter its forward reads on a child's
    behalf (a kernel taking ``conv1d.weight`` without calling the ``nn.Conv1d``) is read inside what is scored. A
    module that holds such a parameter directly and also contains the body (a bare ``nn.Parameter`` on the model
    itself) cannot be separated from it: :class:`~looptrace.errors.ConfigError` says how to wrap it."""
    roots = resolve_body(model, step_module, body)
    inside_params = {id(p) for r in roots for p in r.parameters()}
    inside_mods = {id(m) for r in roots for m in r.modules()}
    out: list[nn.Module] = []

    def scored(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in params if p.requires_grad and id(p) not in inside_params]

    def visit(name: str, mod: nn.Module) -> None:
        if id(mod) in inside_mods:
            return
        if not any(id(m) in inside_mods for m in mod.modules()):
            if scored(mod.parameters()):
                out.append(mod)
            return
        own = [n for n, p in mod.named_parameters(recurse=False) if scored([p])]
        if own:
            raise ConfigError(
                f"parameter {(name + '.' if name else '') + own[0]} sits directly on a module that also contains the "
                "loop body, so it cannot be scored apart from the body; move it into a submodule of its own (e.g. an "
                "nn.Embedding or a small nn.Module holding the nn.Parameter), or leave outside=False"
            )
        for child_name, child in mod.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return out


def outside_run_modules(
    model: nn.Module,
    step_module: nn.Module | Sequence[nn.Module] | None,
    body: nn.Module | Sequence[nn.Module] | None,
) -> list[nn.Module]:
    """:func:`outside_modules` for an ``outside=True`` run, which runs the model as one pass per forward: refused up
    front, before any work, for a model that marks its loop steps with :func:`looptrace.loop_step` (``body=``
    without ``step_module=``), and for one with no trainable parameter outside the body (there is nothing to
    score: the run would be the body's alone, under a name that says otherwise)."""
    if step_module is None:
        raise ConfigError(
            "outside=True featurises the parameters outside the loop as one pass per call of the model, which a "
            "model that marks its loop steps with looptrace.loop_step() (body= without step_module=) cannot be "
            "run as; pass step_module= (the module, or modules, one loop step calls), or leave outside=False"
        )
    mods = outside_modules(model, step_module, body)
    if not mods:
        raise ConfigError("outside=True: the model has no trainable parameter outside the loop body; drop it")
    return mods


def outside_refused(exc: StepError) -> ConfigError:
    """What ``outside=True`` says when the model cannot be run as one pass per forward."""
    return ConfigError(
        "outside=True featurises the parameters outside the loop as one pass per call of the model: loss_fn must call "
        "model(...) itself (not its submodules one by one), and the model must not mark its loop steps with "
        f"looptrace.loop_step() (not supported with outside=True). From the run: {exc}"
    )


def _preconditioner(
    curv: Curvature, kind: str, damping: float | None, scale: float | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Flat gradients ``[R, P]`` -> ``(F + lambda I)^-1`` of them, F the fitted K-FAC or EK-FAC."""
    s = DAMPING_SCALE if scale is None else scale
    return lambda g: curv.precondition(g, kind, damping, s)  # type: ignore[arg-type]


def _gauss_newton_query(
    train: Features, query: Features, damping: float | None, scale: float | None = None
) -> Features:
    """The query's features (per step, or totals) through (Phi^T Phi / N + lambda I)^-1, Phi the train totals."""
    train.compatible_with(query)
    s = GN_DAMPING_SCALE if scale is None else scale
    if query.per_step is not None:
        steps = gauss_newton(train.total, query.per_step, damping, s).to(query.per_step.dtype)
        return dataclasses.replace(query, per_step=steps, _total=None)
    return dataclasses.replace(query, _total=gauss_newton(train.total, query.total, damping, s).to(query.total.dtype))


def _body_names(
    model: nn.Module,
    step_module: nn.Module | Sequence[nn.Module] | None,
    body: nn.Module | Sequence[nn.Module] | None,
) -> list[str]:
    return [bp.name for bp in body_parameters(model, resolve_body(model, step_module, body))]

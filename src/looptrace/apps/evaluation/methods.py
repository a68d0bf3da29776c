"""The attribution methods the evaluation compares, registered in one place.

A method is a function from a :class:`ScoreContext` (the task, its full-data run's TracIn checkpoints,
the train and query sets) to scores ``[N train, M query]`` in looptrace's convention (bigger = training on
the example lowered the query's loss more). To add one (say a curvature-preconditioned influence), write
the function and decorate it::

    @register_method("my_method", "my method (what it is)", removal=True)
    def my_method(ctx: ScoreContext) -> np.ndarray:
        ...

Its key is its name in results.json; ``removal=True`` also runs it through the removal test (each
removal method costs a retraining per query and removal size). :meth:`ScoreContext.attribution` caches
``lt.attribute`` calls, so methods that read the same attribution share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.apps.evaluation.task import EvalTask
from looptrace.curvature import sampled_cross_entropy
from looptrace.influence.checkpoints import load_into

Scores = Callable[["ScoreContext"], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Method:
    """One attribution method: ``key`` in results.json, ``label`` in tables, ``scores(ctx) -> [N, M]``."""

    key: str
    label: str
    scores: Scores
    removal: bool = False
    note: str = ""
    #: "" (the main table), "curvature" (a curvature-aware estimator at its default damping), "damping sweep",
    #: "fisher" (the true Fisher) or "peer" (another library, run only when its environment is given)
    group: str = ""


#: Every method the evaluation knows, in table order.
METHODS: dict[str, Method] = {}


def register_method(
    key: str, label: str, *, removal: bool = False, note: str = "", group: str = ""
) -> Callable[[Scores], Scores]:
    """Register ``fn`` as method ``key`` (see the module docstring)."""

    def deco(fn: Scores) -> Scores:
        if key in METHODS:
            raise lt.ConfigError(f"attribution method {key!r} is registered twice")
        METHODS[key] = Method(key, label, fn, removal, note, group)
        return fn

    return deco


def _loader(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@dataclasses.dataclass
class ScoreContext:
    """What a method reads: the task, the full-data run's checkpoints, the train and query sets."""

    task: EvalTask
    ckpt_dir: Path
    query_role: str = "query"
    #: a Python with kronfluence installed: the peer methods run there (see :mod:`.peers`)
    peer_python: str | None = None
    _cache: dict[tuple[Any, ...], lt.Attribution] = dataclasses.field(default_factory=dict)
    #: what the peer probe reported besides its scores (its settings and the tied-body finding)
    peer_meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    _peer_scores: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.model = self.task.model()  # the architecture; attribute loads each checkpoint's weights into it
        self.checkpoints = lt.load_checkpoints(self.ckpt_dir)
        data = self.task.data()
        self.train = _loader(*data["train"])
        self.query = _loader(*data[self.query_role])

    def attribution(
        self,
        *,
        loss: str = "trained",
        sketch: lt.SketchSpec | None = None,
        last_only: bool = False,
        precondition: str | None = None,
        damping_scale: float | None = None,
        fisher: str | None = None,
        outside: bool = False,
    ) -> lt.Attribution:
        """``lt.attribute`` over the run's checkpoints (cached): ``loss`` "trained" (truncated BPTT, as the
        model was trained) or "full" (every loop step backpropagated); exact unless ``sketch``;
        ``damping_scale`` scales the damping heuristic of a curvature ``precondition`` (``None``: its 0.1);
        ``fisher="true"`` fits K-FAC / EK-FAC on labels sampled from the model (default: the empirical Fisher);
        ``outside=True`` also scores the parameters outside the loop body (``Attribution.total``)."""
        spec = sketch or lt.SketchSpec.exact()
        key = (loss, spec, last_only, precondition, damping_scale, fisher, outside)
        if key not in self._cache:
            fn = self.task.loss_fn if loss == "trained" else self.task.full_bptt_loss
            cks = self.checkpoints[-1:] if last_only else self.checkpoints
            kw: dict[str, Any] = {}
            if damping_scale is not None:
                kw["damping_scale"] = damping_scale
            if fisher == "true":
                kw["fisher_loss"] = sampled_loss(self.task, full=loss == "full")
            self._cache[key] = lt.attribute(
                self.model, cks, self.train, self.query, fn, sketch=spec, step_module=self.task.step_module(self.model),
                verify=False, precondition=precondition, outside=outside, **kw,  # type: ignore[arg-type]
            )  # fmt: skip
        return self._cache[key]

    def peer_scores(self, name: str) -> np.ndarray:
        """A peer library's scores ``[N, M]`` (every peer runs once, in its own environment, on these checkpoints)."""
        if self._peer_scores is None:
            if self.peer_python is None:
                raise lt.ConfigError(
                    "the peer methods run kronfluence in its own environment: pass --kronfluence-python PYTHON "
                    "(a Python with kronfluence installed), or leave the kronfluence_* methods out"
                )
            from looptrace.apps.evaluation.peers import run_kronfluence

            self._peer_scores, self.peer_meta = run_kronfluence(self.peer_python, self.task, self.ckpt_dir)
        return self._peer_scores[name]


def sampled_loss(task: EvalTask, full: bool) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
    """The task's loss on labels drawn from the model (the true Fisher's ``fisher_loss``): as trained, or with
    every loop step backpropagated."""

    def fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return sampled_cross_entropy(task.logits(model, batch[0], bptt_k=None if full else -1))

    return fn


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


@register_method("tracin", "TracIn, exact, all checkpoints", removal=True)
def tracin(ctx: ScoreContext) -> np.ndarray:
    return as_numpy(ctx.attribution().tracin)


#: Sketch sizes of the sketched-TracIn methods.
SKETCH_DIMS = (256, 1024, 4096)


def _sketched(dim: int) -> Scores:
    def scores(ctx: ScoreContext) -> np.ndarray:
        return as_numpy(ctx.attribution(sketch=lt.SketchSpec(dim=dim)).tracin)

    return scores


for _dim in SKETCH_DIMS:
    register_method(f"tracin_sketch_{_dim}", f"TracIn, sketched (D = {_dim})", removal=_dim == max(SKETCH_DIMS))(
        _sketched(_dim)
    )


@register_method("tracin_last", "TracIn, last checkpoint only", removal=True)
def tracin_last(ctx: ScoreContext) -> np.ndarray:
    return as_numpy(ctx.attribution(last_only=True).tracin)


@register_method(
    "tracin_whole",
    "TracIn, exact, all checkpoints, whole model",
    group="whole model",
    note="lt.attribute(outside=True).total: the body's TracIn plus the parameters outside the loop (read-in, read-out)",
)
def tracin_whole(ctx: ScoreContext) -> np.ndarray:
    return as_numpy(ctx.attribution(outside=True).total)


@register_method("tracin_adam", "TracIn, Adam-preconditioned", removal=True)
def tracin_adam(ctx: ScoreContext) -> np.ndarray:
    return as_numpy(ctx.attribution(precondition="adam").tracin)


@register_method(
    "grad_cos", "gradient cosine", removal=True, note="sum_k eta_k cos(g_k(z), g_k(z')): TracIn with unit gradients"
)
def grad_cos(ctx: ScoreContext) -> np.ndarray:
    model, step = ctx.model, ctx.task.step_module(ctx.model)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: np.ndarray | None = None
    try:
        for ck in ctx.checkpoints:
            full = ck.load_full()
            load_into(model, full.state, full.name)
            exact = lt.SketchSpec.exact()
            kw: dict[str, Any] = dict(step_module=step, sketch=exact, per_step=False, verify=False)
            a = lt.featurize(model, ctx.train, ctx.task.loss_fn, **kw).total
            b = lt.featurize(model, ctx.query, ctx.task.loss_fn, **kw).total
            a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)
            b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)
            term = full.lr * as_numpy(a @ b.T)
            out = term if out is None else out + term
    finally:
        model.load_state_dict(original)
    assert out is not None
    return out


@register_method(
    "sdi_truncated",
    "sum over steps of SDI_t, truncated BPTT as trained",
    note="equals TracIn exactly (conservation): the same numbers by construction",
)
def sdi_truncated(ctx: ScoreContext) -> np.ndarray:
    return as_numpy(ctx.attribution().sdi.sum(-1))


@register_method("sdi_full", "sum over steps of SDI_t, full BPTT", removal=True)
def sdi_full(ctx: ScoreContext) -> np.ndarray:
    return as_numpy(ctx.attribution(loss="full").sdi.sum(-1))


# --- curvature-aware estimators (issue #24) ---------------------------------------------------------------
#: ``lt.attribute(precondition=...)`` names and their keys here.
CURVATURE = {"kfac": "K-FAC", "ekfac": "EK-FAC", "gauss-newton": "Gauss-Newton"}
#: The damping sweep: multiples of each block's mean eigenvalue (0.1, the default, is the main entry).
DAMPING_SCALES = (1e-3, 1e-2, 1.0, 10.0)
#: (key suffix, label, last checkpoint only, loss): all checkpoints or the final one, as trained or full BPTT.
VARIANTS = (
    ("", "all checkpoints, as trained", False, "trained"),
    ("_full", "all checkpoints, full BPTT", False, "full"),
    ("_last", "final checkpoint, as trained", True, "trained"),
    ("_last_full", "final checkpoint, full BPTT", True, "full"),
)


def curvature_key(
    kind: str, suffix: str = "", scale: float | None = None, fisher: str | None = None, outside: bool = False
) -> str:
    """``kfac_full``, ``gauss_newton_last_d0.01``, ``ekfac_true``, ``ekfac_whole``: a curvature method's key."""
    key = kind.replace("-", "_") + suffix
    if scale is not None:
        key += f"_d{scale:g}"
    return key + ("_true" if fisher == "true" else "") + ("_whole" if outside else "")


@dataclasses.dataclass(frozen=True)
class CurvatureSpec:
    """What a curvature method computes: ``lt.attribute(precondition=kind, damping_scale=scale, ...)`` over all
    checkpoints or the final one, with the loss as trained or full BPTT, on the empirical or the true Fisher."""

    kind: str
    last_only: bool
    loss: str
    scale: float | None = None
    fisher: str | None = None
    outside: bool = False  # the whole model: the body's scores plus the parameters outside the loop

    def scores(self, ctx: ScoreContext) -> np.ndarray:
        res = ctx.attribution(loss=self.loss, last_only=self.last_only, precondition=self.kind,
                              damping_scale=self.scale, fisher=self.fisher, outside=self.outside)  # fmt: skip
        return as_numpy(res.total)


#: key -> what the curvature method computes (every method of the groups curvature, damping sweep, fisher).
CURVATURE_SPECS: dict[str, CurvatureSpec] = {}


def _register_curvature(key: str, label: str, spec: CurvatureSpec, group: str, note: str = "") -> None:
    CURVATURE_SPECS[key] = spec
    register_method(key, label, group=group, note=note)(spec.scores)


for _kind, _name in CURVATURE.items():
    for _suffix, _what, _last, _loss in VARIANTS:
        _register_curvature(curvature_key(_kind, _suffix), f"{_name}, {_what}", CurvatureSpec(_kind, _last, _loss),
                            "curvature", "lt.attribute's defaults (damping=None: 0.1 x each block's mean eigenvalue; "
                            "empirical Fisher)" if not _suffix else "")  # fmt: skip
for _kind, _name in CURVATURE.items():
    for _suffix, _what, _last, _loss in VARIANTS:
        for _scale in DAMPING_SCALES:
            _register_curvature(curvature_key(_kind, _suffix, _scale), f"{_name}, {_what}, damping {_scale:g}x",
                                CurvatureSpec(_kind, _last, _loss, _scale), "damping sweep")  # fmt: skip
for _kind in ("kfac", "ekfac"):
    for _suffix, _what, _last, _loss in VARIANTS:
        _register_curvature(curvature_key(_kind, _suffix, fisher="true"), f"{CURVATURE[_kind]}, {_what}, true Fisher",
                            CurvatureSpec(_kind, _last, _loss, None, "true"), "fisher")  # fmt: skip
for _kind, _name in CURVATURE.items():
    for _suffix, _what, _last, _loss in VARIANTS:
        _register_curvature(curvature_key(_kind, _suffix, outside=True), f"{_name}, {_what}, whole model",
                            CurvatureSpec(_kind, _last, _loss, outside=True), "whole model",
                            "lt.attribute(outside=True).total: the body's preconditioned scores plus those of the "
                            "parameters outside the loop, on their own block")  # fmt: skip


# --- peers: kronfluence in its own environment ---------------------------------------------------------------
#: key -> (label, the probe's name for it)
PEERS = {
    "kronfluence_ekfac": "kronfluence EK-FAC (final weights, as trained)",
    "kronfluence_ekfac_full": "kronfluence EK-FAC (final weights, full BPTT)",
    "kronfluence_kfac": "kronfluence K-FAC (final weights, as trained)",
    "kronfluence_identity": "kronfluence identity (final weights, as trained)",
}


def _peer(key: str) -> Scores:
    def scores(ctx: ScoreContext) -> np.ndarray:
        return ctx.peer_scores(key)

    return scores


for _key, _label in PEERS.items():
    register_method(_key, _label, group="peer",
                    note="kronfluence 1.0.1, every Linear module, has_shared_parameters=True, true Fisher, its "
                         "damping heuristic; run in its own environment")(_peer(_key))  # fmt: skip

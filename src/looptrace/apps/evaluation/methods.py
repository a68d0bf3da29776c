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


#: Every method the evaluation knows, in table order.
METHODS: dict[str, Method] = {}


def register_method(key: str, label: str, *, removal: bool = False, note: str = "") -> Callable[[Scores], Scores]:
    """Register ``fn`` as method ``key`` (see the module docstring)."""

    def deco(fn: Scores) -> Scores:
        if key in METHODS:
            raise lt.ConfigError(f"attribution method {key!r} is registered twice")
        METHODS[key] = Method(key, label, fn, removal, note)
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
    _cache: dict[tuple[Any, ...], lt.Attribution] = dataclasses.field(default_factory=dict)

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
    ) -> lt.Attribution:
        """``lt.attribute`` over the run's checkpoints (cached): ``loss`` "trained" (truncated BPTT, as the
        model was trained) or "full" (every loop step backpropagated); exact unless ``sketch``."""
        spec = sketch or lt.SketchSpec.exact()
        key = (loss, spec, last_only, precondition)
        if key not in self._cache:
            fn = self.task.loss_fn if loss == "trained" else self.task.full_bptt_loss
            cks = self.checkpoints[-1:] if last_only else self.checkpoints
            self._cache[key] = lt.attribute(
                self.model, cks, self.train, self.query, fn, sketch=spec, step_module=self.task.step_module(self.model),
                verify=False, precondition=precondition,  # type: ignore[arg-type]
            )  # fmt: skip
        return self._cache[key]


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

"""Reading a trained evaluation-task model at every loop step, and its SDI with and without the label."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import looptrace as lt
from looptrace.analysis.applications import sdi_energy
from looptrace.apps.evaluation.applications.horizon import QueryRun
from looptrace.apps.evaluation.methods import _loader, as_numpy
from looptrace.apps.evaluation.task import EvalTask, logits


@torch.no_grad()
def per_step_logits(model: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """``[T, M, classes]``: the read-out after each of 1..T loops (one forward per budget)."""
    return torch.stack([logits(model, x, loops=r) for r in range(1, steps + 1)])


def full_attribution(task: EvalTask, ckpt_dir: Path, queries: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """``[N, M, tau]`` test-side SDI over the run's checkpoints, every loop step backpropagated (the truncated
    loss the task trains with gives zero at the first steps by construction), exact features."""
    model = task.model()
    return as_numpy(
        lt.attribute(model, lt.load_checkpoints(ckpt_dir), _loader(*task.data()["train"]), _loader(*queries),
                     task.full_bptt_loss, step_module=task.step_module(model), sketch=lt.SketchSpec.exact(),
                     verify=False).sdi
    )  # fmt: skip


def _cost(task: EvalTask, model: nn.Module, x: torch.Tensor, y: torch.Tensor, checkpoints: int) -> dict[str, float]:
    """Seconds per query: the query side of one horizon (its per-step gradient features at every checkpoint;
    the dot products with the stored training features come on top, so this is a lower bound) against one
    forward of all T loops."""
    t0 = time.perf_counter()
    lt.featurize(model, _loader(x, y), task.full_bptt_loss, step_module=task.step_module(model),
                 sketch=lt.SketchSpec.exact(), verify=False)  # fmt: skip
    feat = (time.perf_counter() - t0) * checkpoints
    t0 = time.perf_counter()
    with torch.no_grad():
        logits(model, x)
    fwd = time.perf_counter() - t0
    return {"horizon_per_query": feat / len(x), "loops_per_query": fwd / len(x)}


def collect_task(task: EvalTask, model: nn.Module, ckpt_dir: Path) -> tuple[QueryRun, np.ndarray]:
    """The :class:`QueryRun` of a trained evaluation-task model (queries: the task's query set; population:
    its held-out test set at budgets 1..T) and the label SDI ``[N, M, T]`` (reused by the other applications)."""
    steps = task.loops
    x, y = task.data()["query"]
    lg = per_step_logits(model, x, steps)  # [T, M, 2]
    prob = torch.softmax(lg.double(), -1)
    pred = lg.argmax(-1)
    pseudo = pred[-1]  # the model's own answer at the analysis horizon: no label needed
    both = (torch.cat([x, x]), torch.cat([y, pseudo]))
    sdi = full_attribution(task, ckpt_dir, both)
    m = len(x)
    xt, yt = task.data()["test"]
    lt_test = per_step_logits(model, xt, steps)
    population = {str(r): float((lt_test[r - 1].argmax(-1) == yt).double().mean()) for r in range(1, steps + 1)}
    run = QueryRun(
        score=(pred == y).double().numpy(),
        predictions=pred.numpy(),
        confidence=prob.max(-1).values.numpy(),
        energy={"label": sdi_energy(sdi[:, :m]), "pseudo": sdi_energy(sdi[:, m:])},
        population=population,
        seconds=_cost(task, model, x, y, len(lt.load_checkpoints(ckpt_dir))),
    )
    return run, sdi[:, :m]

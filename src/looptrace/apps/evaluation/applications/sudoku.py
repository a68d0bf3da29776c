"""The Sudoku case study's trained runs (``looptrace train sudoku``: a looped transformer trained with
Poisson log-normal depth) read for application (i).

A query is a held-out puzzle of the training difficulty (``SudokuTask.heldout``; the hard test split is
beyond what the small preset solves). Its outcome at a budget is the share of its blank cells that are
right, its prediction the digits of its blank cells, its confidence the smallest top probability over its
blank cells; the budget it needs is the smallest from which that share stays at least its value at the
analysis horizon. SDI as in the case study: the run's checkpoints (at most ``max_checkpoints``, evenly
spaced, the last included), training puzzles stratified by blanks, a CountSketch of ``sketch_dim``, the
loss at the analysis horizon (twice the training mean depth), with the true solution and with the model's
own answer at the horizon as targets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.analysis.applications import sdi_energy
from looptrace.apps.catalog import open_run
from looptrace.apps.evaluation.applications.horizon import QueryRun
from looptrace.apps.studies.common import batches, stratified
from looptrace.apps.tasks import sudoku


def ensure_run(directory: Path, seed: int, preset: str = "small") -> tuple[Path, bool]:
    """``directory/sudoku-PRESET-sSEED``, trained first (``looptrace train sudoku --preset PRESET --seed SEED
    --threads 1``, about half an hour on one CPU thread for the small preset) unless its model exists;
    returns the path and whether it was trained here."""
    path = directory / f"sudoku-{preset}-s{seed}"
    if (path / "model.pt").exists():
        return path, False
    from looptrace.apps.zoo import train_preset

    train_preset("sudoku", preset, path, {"train.seed": seed, "train.threads": 1}, progress=False)
    return path, True


@torch.no_grad()
def _read(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, Any]:
    blank = x == 0  # [M, 81]
    score, preds, conf = [], [], []
    for r in range(1, steps + 1):
        prob = torch.softmax(model(x, n_loops=r).double(), -1)  # [M, 81, 9]
        top, arg = prob.max(-1)
        pred = arg + 1
        score.append((((pred == y) & blank).sum(1) / blank.sum(1).clamp_min(1)).numpy())
        preds.append(torch.where(blank, pred, 0).numpy())
        conf.append(torch.where(blank, top, torch.ones_like(top)).min(1).values.numpy())
    return {"score": np.stack(score), "predictions": np.stack(preds), "confidence": np.stack(conf),
            "answer": torch.where(blank, torch.from_numpy(preds[-1]), y).long()}  # fmt: skip


def collect_run(path: Path, n_train: int, n_query: int, sketch_dim: int, max_checkpoints: int, batch_size: int = 32,
                seed: int = 0) -> tuple[QueryRun, dict[str, Any]]:  # fmt: skip
    """The :class:`QueryRun` of one trained Sudoku run, and a description of what was read."""
    run = open_run(path)
    model = run.load_model("cpu")
    task = run.task
    depth_mean = run.train_config.depth_mean or run.model_config.n_loops
    horizon = int(2 * depth_mean)
    hx, hy = task.heldout()
    every = _read(model, hx, hy, horizon)
    population = {str(r): float(every["score"][r - 1].mean()) for r in range(1, horizon + 1)}
    q = stratified((hx == 0).sum(1).numpy(), n_query, seed + 1)
    xq, yq = hx[q], hy[q]
    train_x, train_y = task.split()["train"]
    t_idx = stratified((train_x == 0).sum(1).numpy(), n_train, seed)
    paths = run.checkpoint_paths()
    if len(paths) > max_checkpoints:
        keep = np.unique(np.linspace(0, len(paths) - 1, max_checkpoints).round().astype(int))
        paths = [paths[i] for i in keep]

    def loss(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return sudoku.loss(m, b[0], b[1], horizon)

    spec = lt.SketchSpec(dim=sketch_dim, seed=0)
    answer = every["answer"][q]
    queries = batches([torch.cat([xq, xq]), torch.cat([yq, answer])], batch_size)
    t0 = time.perf_counter()
    res = lt.attribute(model, [lt.Checkpoint(p) for p in paths], batches([train_x[t_idx], train_y[t_idx]], batch_size),
                       queries, loss, step_module=model.core, sketch=spec, verify=False)  # fmt: skip
    sdi_seconds = time.perf_counter() - t0
    sdi = res.sdi.double().numpy()
    m = len(q)
    t0 = time.perf_counter()
    lt.featurize(model, batches([xq, answer], batch_size), loss, step_module=model.core, sketch=spec, verify=False)
    feat = (time.perf_counter() - t0) * len(paths)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(xq, n_loops=horizon)
    fwd = time.perf_counter() - t0
    qrun = QueryRun(
        score=every["score"][:, q], predictions=every["predictions"][:, q], confidence=every["confidence"][:, q],
        energy={"label": sdi_energy(sdi[:, :m]), "pseudo": sdi_energy(sdi[:, m:])}, population=population,
        seconds={"horizon_per_query": feat / m, "loops_per_query": fwd / m},
    )  # fmt: skip
    info = {"run": str(path), "seed": run.train_config.seed, "horizon": horizon, "depth_mean": depth_mean,
            "depth_max": run.train_config.depth_max, "checkpoints": len(paths), "n_train": len(t_idx), "n_query": m,
            "heldout_puzzles": len(hx), "blanks": [int((hx == 0).sum(1).min()), int((hx == 0).sum(1).max())],
            "sketch_dim": sketch_dim, "sdi_seconds": sdi_seconds,
            "cell_accuracy_at_horizon": population[str(horizon)]}  # fmt: skip
    metrics = path / "metrics.json"
    if metrics.exists():  # the training's own record: its time (summed over resumptions) and its test accuracy
        m = json.loads(metrics.read_text())
        info["train_seconds"] = m.get("train_time_s")
        info["test_cell_accuracy"] = m.get("cell_accuracy")
    return qrun, info

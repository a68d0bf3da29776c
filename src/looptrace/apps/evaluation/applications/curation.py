"""Application (iii): depth-targeted curation, made robust.

* **Over seeds** (:func:`seed_intervals`): the ten-seed removal test of ``docs/results/eval`` (ranking by
  signed late- minus early-step SDI, every removal retrained, read on held-out test inputs) is not rerun:
  its per-seed differences from random removal and from the TracIn control are read from that
  results.json and given bootstrap intervals over seeds.
* **Adding back** (:func:`add_back`): retraining from scratch on the curated set plus the removed examples
  is the full-data run (training is a pure function of the kept examples and the seed), so the reverse
  question is asked of a trained model: the curated model is trained ``steps`` more steps with the removed
  examples back (against the same steps without them, and the full-data model trained the same extra
  steps). How much of the gap between the curated and the full-data curve do the examples close?
* **A second task** (:func:`second_task`): the same removal test on the sampled-depth task, through the
  evaluation harness (:func:`looptrace.apps.evaluation.harness.run_depth_curation`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from looptrace.apps.evaluation.applications.stats import seed_interval
from looptrace.apps.evaluation.harness import HARMFUL, EvalConfig, run_depth_curation
from looptrace.apps.evaluation.task import EvalTask, MajorityTask
from looptrace.apps.evaluation.verdicts import verdicts as eval_verdicts

LATE, EARLY = "most late-step removed", "most early-step removed"


def seed_intervals(depth: dict[str, Any], n_boot: int, seed: int) -> dict[str, Any]:
    """Bootstrap intervals over seeds of the committed per-seed differences (accuracy, one value per seed)."""
    out: dict[str, Any] = {"seeds": depth["seeds"], "k": depth["k"], "budgets": depth["budgets"],
                           "trained_depth": depth["trained_depth"], "versus_random": {}, "late_vs_harmful": {}}  # fmt: skip
    for lab in (LATE, EARLY, HARMFUL):
        out["versus_random"][lab] = {
            r: seed_interval(depth["versus_random"][lab][r]["per_seed"], n_boot, seed) for r in depth["budgets"]
        }
    out["late_vs_harmful"] = {r: seed_interval(depth["late_vs_harmful"][r]["per_seed"], n_boot, seed)
                              for r in depth["budgets"]}  # fmt: skip
    return out


def continue_training(task: EvalTask, model: torch.nn.Module, keep: torch.Tensor | None, steps: int) -> torch.nn.Module:
    """``steps`` more full-batch AdamW steps (a fresh optimizer, the task's learning rate and loss) on the kept
    examples. Tasks with their own schedule (sampled depth) provide ``train_from``."""
    train_from = getattr(task, "train_from", None)
    if train_from is not None:
        return train_from(model, keep=keep, steps=steps, first_step=task.steps)  # type: ignore[no-any-return]
    x, y = task.data()["train"]
    w = torch.ones(len(x)) if keep is None else keep.float()
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = (task.loss_fn(model, (x, y)) * w).sum() / w.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def _distance(a: dict[str, float], b: dict[str, float]) -> float:
    return float(np.mean([abs(a[r] - b[r]) for r in a]))


def add_back(task: EvalTask, depth: dict[str, Any], steps: int, n_boot: int, seed: int) -> dict[str, Any]:
    """For each committed seed and removal (late, early): the curated model continued with the removed
    examples back, without them, and the full-data model continued; gap closed = 1 - d(back, full) /
    d(without, full), d the mean absolute accuracy difference over budgets (1: restored, 0: no better than
    training on without them, < 0: further away)."""
    per_seed = []
    for p in depth["per_seed"]:
        t = dataclasses.replace(task, seed=p["seed"])
        n = t.n_train
        full = continue_training(t, t.train(), None, steps)
        row: dict[str, Any] = {"seed": p["seed"], "full_continued": t.loop_curve(full, "test")}
        for lab, key in ((LATE, "late"), (EARLY, "early")):
            keep = torch.ones(n, dtype=torch.bool)
            keep[torch.tensor(p["removed"][lab], dtype=torch.int64)] = False
            curated = t.train(keep=keep)
            curve = t.loop_curve(curated, "test")
            repro = max(abs(curve[r] - p["curves"][lab][r]) for r in curve)
            state = {k: v.clone() for k, v in curated.state_dict().items()}
            back = t.loop_curve(continue_training(t, curated, None, steps), "test")
            curated.load_state_dict(state)
            without = t.loop_curve(continue_training(t, curated, keep, steps), "test")
            d_without, d_back = _distance(without, row["full_continued"]), _distance(back, row["full_continued"])
            row[key] = {"curated": curve, "added_back": back, "without": without,
                        "reproduces_committed_curve": repro, "gap_closed": 1 - d_back / d_without if d_without > 0 else float("nan"),
                        "distance_without": d_without, "distance_back": d_back}  # fmt: skip
        per_seed.append(row)
    out: dict[str, Any] = {"steps": steps, "per_seed": per_seed,
                           "reproduces_committed_max": max(max(p[k]["reproduces_committed_curve"] for k in ("late", "early"))
                                                           for p in per_seed)}  # fmt: skip
    for key in ("late", "early"):
        out[key] = {
            "gap_closed": seed_interval([p[key]["gap_closed"] for p in per_seed], n_boot, seed),
            "distance_without": seed_interval([p[key]["distance_without"] for p in per_seed], n_boot, seed),
            "distance_back": seed_interval([p[key]["distance_back"] for p in per_seed], n_boot, seed),
        }
        budgets = list(per_seed[0]["full_continued"])
        out[key]["curves"] = {
            name: {r: float(np.mean([p[key][name][r] for p in per_seed])) for r in budgets}
            for name in ("curated", "added_back", "without")
        } | {"full data, continued": {r: float(np.mean([p["full_continued"][r] for p in per_seed])) for r in budgets}}
    return out


def second_task(task: EvalTask, seeds: tuple[int, ...], draws: int, fraction: float) -> dict[str, Any]:
    """The removal test of the evaluation harness on another task, with its verdict words."""
    cfg = EvalConfig(depth_seeds=seeds, depth_random_draws=draws, depth_fraction=fraction)
    dc = run_depth_curation(task, cfg)
    return {"task": task.name, "result": dc, "verdicts": eval_verdicts({"depth_curation": dc})["depth"]}


def default_task() -> MajorityTask:
    """The task the committed ten-seed test ran on (``docs/results/eval``)."""
    return MajorityTask()

"""``looptrace eval``: does attribution predict what retraining does? (issue #13)

On the evaluation task (:mod:`looptrace.apps.evaluation.task`, a looped transformer that trains in about
a second) this measures, with seeds and bootstrap confidence intervals:

* the **step counterfactual**: per loop step, the actual loss change when an update is applied only at
  that step (test side) or only z's step-t term is applied (train side), against eta * SDI_t, as eta
  shrinks, and the rank agreement at the training learning rate;
* the **linear datamodeling score** (LDS) of each attribution method over random 50 % subsets, each
  retrained with a fixed seed;
* the **removal test**: remove each method's top-k proponents of a query, retrain, and measure how much
  the query's loss rises (against random removal);
* **depth-targeted curation**: remove the examples whose influence is most late-step (the depth
  ranking), retrain, and compare the loop-budget curve with random removal.

Scores are computed once from the full-data run's TracIn checkpoints. Writes results.json, figures
and an HTML report; the page ``docs/results/eval/README.md`` quotes results.json.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.analysis.applications import depth_ranking
from looptrace.apps.evaluation.task import EvalTask, full_bptt_loss, loop_curve, loss_fn, query_losses, train
from looptrace.evaluation import bootstrap_ci, lds, spearman, step_counterfactual
from looptrace.influence.checkpoints import load_into
from looptrace.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The sizes of the evaluation (the quick run is a smaller copy)."""

    subsets: int = 100
    subset_fraction: float = 0.5
    removal_queries: int = 16
    removal_fractions: tuple[float, ...] = (0.01, 0.05, 0.1)
    random_draws: int = 3
    sketch_dims: tuple[int, ...] = (256, 1024, 4096)
    counterfactual_train: int = 16
    counterfactual_queries: int = 8
    etas: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)
    depth_fraction: float = 0.1
    seed: int = 0

    @classmethod
    def quick(cls) -> EvalConfig:
        return cls(subsets=50, removal_queries=4, random_draws=2, sketch_dims=(256, 4096), counterfactual_train=8,
                   counterfactual_queries=4, etas=(1e-1, 1e-2, 1e-3))  # fmt: skip

    @classmethod
    def smoke(cls) -> EvalConfig:
        """Seconds: CI checks that the harness runs, not what it finds."""
        return cls(subsets=6, removal_queries=2, removal_fractions=(0.05,), random_draws=1, sketch_dims=(256,),
                   counterfactual_train=3, counterfactual_queries=2, etas=(1e-1, 1e-2))  # fmt: skip


def _loader(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def method_scores(task: EvalTask, cfg: EvalConfig, ckpt_dir: Path) -> dict[str, np.ndarray]:
    """``{method: [N train, M query]}`` from the full-data run's checkpoints (bigger = more helpful)."""
    model = train(task)  # the architecture; attribute loads each checkpoint's weights into it
    data = task.data()
    tr, qu = _loader(*data["train"]), _loader(*data["query"])
    cks = lt.load_checkpoints(ckpt_dir)
    kw: dict[str, Any] = dict(step_module=model.core, verify=False)
    exact = lt.SketchSpec.exact()
    out: dict[str, np.ndarray] = {}
    res = lt.attribute(model, cks, tr, qu, loss_fn, sketch=exact, **kw)
    out["TracIn (exact, all checkpoints)"] = res.tracin.double().numpy()
    out["step-resolved: sum_t SDI_t, truncated BPTT as trained"] = res.sdi.sum(-1).double().numpy()
    full = lt.attribute(model, cks, tr, qu, full_bptt_loss, sketch=exact, **kw)
    out["step-resolved: sum_t SDI_t, full BPTT"] = full.sdi.sum(-1).double().numpy()
    for dim in cfg.sketch_dims:
        sk = lt.attribute(model, cks, tr, qu, loss_fn, sketch=lt.SketchSpec(dim=dim), **kw)
        out[f"TracIn (sketched, D={dim})"] = sk.tracin.double().numpy()
    last = lt.attribute(model, cks[-1:], tr, qu, loss_fn, sketch=exact, **kw)
    out["TracIn (last checkpoint only)"] = last.tracin.double().numpy()
    out["TracIn, Adam-preconditioned"] = lt.attribute(model, cks, tr, qu, loss_fn, sketch=exact, precondition="adam",
                                                       **kw).tracin.double().numpy()  # fmt: skip
    cos = np.zeros_like(out["TracIn (exact, all checkpoints)"])
    for ck in cks:
        full_ck = ck.load_full()
        load_into(model, full_ck.state, full_ck.name)
        a = lt.featurize(model, tr, loss_fn, step_module=model.core, sketch=exact, per_step=False, verify=False).total
        b = lt.featurize(model, qu, loss_fn, step_module=model.core, sketch=exact, per_step=False, verify=False).total
        a, b = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30), b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos += full_ck.lr * (a @ b.T).double().numpy()
    out["gradient cosine"] = cos
    out["_sdi_full"] = full.sdi.double().numpy()  # [N, M, tau], for the depth ranking
    return out


def run_lds(task: EvalTask, cfg: EvalConfig, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    rng = np.random.default_rng(cfg.seed)
    masks = rng.random((cfg.subsets, task.n_train)) < cfg.subset_fraction
    outcomes = np.stack([-query_losses(train(task, keep=torch.from_numpy(m)), task).numpy() for m in masks])
    out: dict[str, Any] = {
        "subsets": cfg.subsets,
        "fraction": cfg.subset_fraction,
        "outcome": "-query loss",
        "methods": {},
    }
    for name, s in scores.items():
        if name.startswith("_"):
            continue
        per_query = lds(s, masks, outcomes)
        out["methods"][name] = {**bootstrap_ci(per_query, seed=cfg.seed), "per_query": per_query.tolist()}
    return out


def run_removal(task: EvalTask, cfg: EvalConfig, scores: dict[str, np.ndarray], base: np.ndarray) -> dict[str, Any]:
    rng = np.random.default_rng(cfg.seed + 1)
    queries = rng.choice(task.n_query, size=cfg.removal_queries, replace=False)
    methods = ["TracIn (exact, all checkpoints)", f"TracIn (sketched, D={max(cfg.sketch_dims)})",
               "TracIn (last checkpoint only)", "gradient cosine", "TracIn, Adam-preconditioned"]  # fmt: skip
    out: dict[str, Any] = {"queries": queries.tolist(), "rows": []}
    for frac in cfg.removal_fractions:
        k = max(1, round(frac * task.n_train))
        for name in [*methods, "random"]:
            deltas, flips = [], []
            for q in queries:
                draws = cfg.random_draws if name == "random" else 1
                for d in range(draws):
                    if name == "random":
                        drop = rng.choice(task.n_train, size=k, replace=False)
                    else:
                        drop = np.argsort(-scores[name][:, q], kind="stable")[:k]  # top-k proponents
                    keep = torch.ones(task.n_train, dtype=torch.bool)
                    keep[torch.from_numpy(drop)] = False
                    losses = query_losses(train(task, keep=keep), task).numpy()
                    deltas.append(float(losses[q] - base[q]))
                    flips.append(bool(losses[q] > np.log(2) >= base[q]))
                    del d
            ci = bootstrap_ci(deltas, seed=cfg.seed)
            out["rows"].append({"fraction": frac, "k": k, "method": name, "loss_increase": ci,
                                "prediction_flips": float(np.mean(flips))})  # fmt: skip
    return out


def run_counterfactual(task: EvalTask, cfg: EvalConfig, ckpt_dir: Path) -> dict[str, Any]:
    """Per-step counterfactuals on the final checkpoint in float64, full BPTT (the true first-order
    effect of a step's weights; truncated SDI is zero at the first steps by construction)."""
    model = train(task).double()
    last = lt.load_checkpoints(ckpt_dir)[-1].load_full()
    load_into(model, {k: v.double() for k, v in last.state.items()}, last.name)
    data = task.data()
    train_batch = tuple(t[: cfg.counterfactual_train] for t in data["train"])
    query_batch = tuple(t[: cfg.counterfactual_queries] for t in data["query"])
    out: dict[str, Any] = {"checkpoint_step": last.step, "training_lr": task.lr}
    etas = sorted({*cfg.etas, task.lr}, reverse=True)
    for side in ("test", "train"):
        res = step_counterfactual(model, model.core, full_bptt_loss, train_batch, query_batch, etas, side=side,
                                  rank_eta=task.lr)  # fmt: skip
        smallest = min(etas)
        out[side] = {
            "etas": res["etas"],
            "rel_error_by_eta": {str(k): v for k, v in res["rel_error"].items()},
            "rel_error_smallest_eta": res["rel_error"][smallest],
            "slope": res["slope"],
            "spearman_at_training_lr": [float(np.mean(r)) for r in res["spearman"]],
            "spearman_per_query": res["spearman"],
        }
    return out


def run_depth_curation(task: EvalTask, cfg: EvalConfig, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Remove the examples ranked most late-step by the depth ranking (late minus early SDI energy, full
    BPTT, all queries) and compare the loop-budget curve with random removal and with no removal."""
    sdi = scores["_sdi_full"]
    rank = depth_ranking(sdi, split_step=task.loops // 2)[:, 2]  # late minus early
    k = max(1, round(cfg.depth_fraction * task.n_train))
    rng = np.random.default_rng(cfg.seed + 2)
    curves: dict[str, Any] = {"full data": loop_curve(train(task), task)}
    for label, drop in (
        ("most late-step removed", np.argsort(-rank)[:k]),
        ("most early-step removed", np.argsort(rank)[:k]),
    ):
        keep = torch.ones(task.n_train, dtype=torch.bool)
        keep[torch.from_numpy(drop.copy())] = False
        curves[label] = loop_curve(train(task, keep=keep), task)
    rand = []
    for _ in range(cfg.random_draws):
        keep = torch.ones(task.n_train, dtype=torch.bool)
        keep[torch.from_numpy(rng.choice(task.n_train, size=k, replace=False))] = False
        rand.append(loop_curve(train(task, keep=keep), task))
    curves["random removed (mean)"] = {r: float(np.mean([c[r] for c in rand])) for r in rand[0]}
    return {"k": k, "split_step": task.loops // 2, "curves": curves}


def evaluate(cfg: EvalConfig, out: Path, task: EvalTask | None = None, what: str = "all") -> dict[str, Any]:
    """Run the evaluation (``what``: all, counterfactual, lds, removal) and write its outputs into ``out``."""
    task = task or EvalTask()
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two fighting over it
    try:
        return _evaluate(cfg, out, task, what)
    finally:
        torch.set_num_threads(threads)


def _evaluate(cfg: EvalConfig, out: Path, task: EvalTask, what: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    results: dict[str, Any] = {"task": dataclasses.asdict(task), "config": dataclasses.asdict(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = Path(tmp) / "checkpoints"
        t_train = time.perf_counter()
        full_model = train(task, record=ckpt_dir)
        results["train_seconds"] = time.perf_counter() - t_train
        base = query_losses(full_model, task).numpy()
        results["full_data"] = {"query_loss_mean": float(base.mean()), "loop_curve": loop_curve(full_model, task)}
        if what in ("all", "counterfactual"):
            results["step_counterfactual"] = run_counterfactual(task, cfg, ckpt_dir)
        if what in ("all", "lds", "removal"):
            scores = method_scores(task, cfg, ckpt_dir)
            if what in ("all", "lds"):
                results["lds"] = run_lds(task, cfg, scores)
                methods = results["lds"]["methods"]
                results["lds_adam_vs_plain"] = {
                    "adam": methods["TracIn, Adam-preconditioned"]["mean"],
                    "plain": methods["TracIn (exact, all checkpoints)"]["mean"],
                    "difference_per_query": bootstrap_ci(
                        np.array(methods["TracIn, Adam-preconditioned"]["per_query"])
                        - np.array(methods["TracIn (exact, all checkpoints)"]["per_query"]), seed=cfg.seed),
                }  # fmt: skip
                agree = spearman(scores["TracIn (exact, all checkpoints)"].ravel(),
                                 scores["step-resolved: sum_t SDI_t, truncated BPTT as trained"].ravel())  # fmt: skip
                results["lds"]["conservation_rank_agreement"] = float(agree)
            if what in ("all", "removal"):
                results["removal"] = run_removal(task, cfg, scores, base)
            if what == "all":
                results["depth_curation"] = run_depth_curation(task, cfg, scores)
    results["seconds"] = time.perf_counter() - t0
    atomic_write_json(results, out / "results.json")
    from looptrace.apps.evaluation.report import write_report

    write_report(results, out)
    return results

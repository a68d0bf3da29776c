"""``looptrace eval``: does attribution predict what retraining does? (issues #13, #28, #29)

On an evaluation task (:mod:`looptrace.apps.evaluation.task`; the built-in one is a looped residual MLP
that trains in a fraction of a second, queried on inputs it never saw) this measures, with bootstrap
confidence intervals over distinct queries and, where a ranking drives retraining, over seeds:

* the **step counterfactual**: per loop step, the actual loss change when an update computed
  independently of looptrace's features is applied only at that step (test side: z's whole gradient at
  step t of the query's computation) or only z's step-t term is applied (train side: phi_t(z) by autograd
  through per-step copies of the body), against eta * SDI_t from looptrace's features, as eta shrinks;
  the rank agreement at the training learning rate; and a negative control (the same comparison with
  the features' steps reversed) showing the check can fail;
* the **linear datamodeling score** (LDS) of each registered method (:mod:`~looptrace.apps.evaluation.methods`)
  over random 50 % subsets, each retrained, with paired per-query differences between methods;
* the **removal test**: remove each method's top-k proponents of a query, retrain, and measure how much
  the query's loss rises (against random removal);
* **depth-targeted curation**: rank training examples by their signed late- minus early-step SDI
  (full BPTT, summed over the ranking queries), remove the most late-step (or early-step, or random)
  ones, retrain, and read the loop-budget curve on held-out test inputs the ranking never saw, for
  several seeds.

* the **curvature comparison** (issue #24; :mod:`~looptrace.apps.evaluation.curvature`): the best of the
  registered curvature-aware estimators against TracIn and kronfluence's EK-FAC on the LDS subsets, chosen
  also on half of them, then through the removal test and the step counterfactual in its own geometry
  (``looptrace eval curvature``: everything but the depth curation, on 100 subsets).

Writes results.json (with ``verdicts``, every verdict word derived from the numbers by
:mod:`~looptrace.apps.evaluation.verdicts`), figures and an HTML report; ``docs/results/eval/README.md``
is rendered from results.json.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.analysis.applications import depth_ranking
from looptrace.apps.evaluation import curvature
from looptrace.apps.evaluation.methods import METHODS, ScoreContext, as_numpy
from looptrace.apps.evaluation.task import TASKS, EvalTask, MajorityTask
from looptrace.apps.evaluation.verdicts import PAIRS, verdicts
from looptrace.evaluation import bootstrap_ci, lds, spearman, step_counterfactual
from looptrace.evaluation.counterfactual import relative_error
from looptrace.influence.checkpoints import load_into
from looptrace.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The sizes of the evaluation (the quick run is a smaller copy)."""

    subsets: int = 200
    subset_fraction: float = 0.5
    methods: tuple[str, ...] = ()  # registered method keys; empty: every registered method (peers: with their Python)
    removal_queries: int = 30
    removal_methods: tuple[str, ...] = ()  # of the scored methods; empty: every one registered with removal=True
    removal_fractions: tuple[float, ...] = (0.01, 0.05, 0.1)
    random_draws: int = 3
    counterfactual_train: int = 16
    counterfactual_queries: int = 8
    etas: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)
    depth_fraction: float = 0.1
    depth_seeds: tuple[int, ...] = tuple(range(10))
    depth_random_draws: int = 10
    n_boot: int = 2000
    seed: int = 0
    #: a Python with kronfluence installed: the peer methods (kronfluence_*) run there and join every table
    kronfluence_python: str | None = None
    #: the curvature comparison: the best curvature-aware estimator chosen, split-half check, and that estimator
    #: through the removal test and the per-step counterfactual
    compare_curvature: bool = True

    @classmethod
    def quick(cls) -> EvalConfig:
        return cls(subsets=50, removal_queries=6, random_draws=2, counterfactual_train=8, counterfactual_queries=4,
                   etas=(1e-1, 1e-2, 1e-3), depth_seeds=(0, 1, 2), depth_random_draws=3,
                   methods=("tracin", "tracin_sketch_256", "tracin_sketch_4096", "tracin_last", "tracin_adam",
                            "grad_cos", "sdi_truncated", "sdi_full", "kfac", "ekfac", "gauss_newton", "kfac_full",
                            "ekfac_full", "gauss_newton_full"))  # fmt: skip

    @classmethod
    def curvature(cls) -> EvalConfig:
        """``looptrace eval curvature``: every registered method's LDS (the curvature groups and, with
        kronfluence's Python, the peers among them) on 100 subsets, the removal test for TracIn, the best
        curvature-aware estimator and kronfluence's EK-FAC, and the plain and preconditioned step counterfactuals."""
        return cls(subsets=100, removal_queries=16, removal_fractions=(0.05, 0.1), random_draws=2,
                   removal_methods=("tracin",))  # fmt: skip

    @classmethod
    def smoke(cls) -> EvalConfig:
        """Seconds: CI checks that the harness runs, not what it finds."""
        return cls(subsets=6, removal_queries=2, removal_fractions=(0.05,), random_draws=1, counterfactual_train=3,
                   counterfactual_queries=2, etas=(1e-1, 1e-2), depth_seeds=(0, 1), depth_random_draws=1,
                   n_boot=200, methods=("tracin", "tracin_sketch_256", "tracin_last", "tracin_adam", "grad_cos",
                                        "sdi_truncated", "sdi_full", "gauss_newton_last", "ekfac_last_full"))  # fmt: skip

    def sized_for(self, task: type[EvalTask]) -> EvalConfig:
        """This configuration with the task's own sizes (``eval_sizes``: a slower task keeps fewer removal queries)."""
        return dataclasses.replace(self, **getattr(task, "eval_sizes", {}))

    def method_keys(self) -> list[str]:
        peers = self.kronfluence_python is not None
        keys = list(self.methods) or [k for k, m in METHODS.items() if m.group != "peer" or peers]
        unknown = [k for k in keys if k not in METHODS]
        if unknown:
            raise lt.ConfigError(f"unknown attribution method(s) {unknown}; registered: {list(METHODS)}")
        return keys

    def removal_keys(self, scored: list[str]) -> list[str]:
        """The scored methods that go through the removal test."""
        if self.removal_methods:
            return [k for k in self.removal_methods if k in scored]
        return [k for k in scored if METHODS[k].removal]


def _keep(n: int, drop: np.ndarray) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.from_numpy(np.asarray(drop, dtype=np.int64))] = False
    return keep


def method_scores(
    task: EvalTask, cfg: EvalConfig, ckpt_dir: Path, ctx: ScoreContext | None = None
) -> dict[str, np.ndarray]:
    """``{method key: [N train, M query]}`` from the full-data run's checkpoints (bigger = more helpful)."""
    ctx = ctx or ScoreContext(task, ckpt_dir, peer_python=cfg.kronfluence_python)
    return {key: METHODS[key].scores(ctx) for key in cfg.method_keys()}


def run_lds(task: EvalTask, cfg: EvalConfig, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """LDS per distinct query over ``cfg.subsets`` retrained subsets; intervals by bootstrap over queries."""
    rng = np.random.default_rng(cfg.seed)
    masks = rng.random((cfg.subsets, task.n_train)) < cfg.subset_fraction
    outcomes = np.stack([-task.query_losses(task.train(keep=torch.from_numpy(m))).numpy() for m in masks])
    out: dict[str, Any] = {"subsets": cfg.subsets, "fraction": cfg.subset_fraction, "outcome": "-query loss",
                           "queries": task.n_query, "methods": {}, "paired": {}}  # fmt: skip
    per_query: dict[str, np.ndarray] = {}
    half = cfg.subsets // 2  # for selection on the first half of the subsets and reporting on the second
    for key, s in scores.items():
        per_query[key] = lds(s, masks, outcomes)
        second = lds(s, masks[half:], outcomes[half:])
        out["methods"][key] = {
            "label": METHODS[key].label,
            "group": METHODS[key].group,
            **bootstrap_ci(per_query[key], n_boot=cfg.n_boot, seed=cfg.seed),
            "per_query": per_query[key].tolist(),
            "first_half": float(np.mean(lds(s, masks[:half], outcomes[:half]))),
            "second_half": float(np.mean(second)),
            "second_half_per_query": second.tolist(),
        }
    for a, b in PAIRS:
        if a in per_query and b in per_query:
            diff = per_query[a] - per_query[b]
            out["paired"][f"{a}-{b}"] = {"a": a, "b": b, **bootstrap_ci(diff, n_boot=cfg.n_boot, seed=cfg.seed),
                                         "a_higher_queries": int((diff > 0).sum())}  # fmt: skip
    if "tracin" in scores and "sdi_truncated" in scores:
        agree = spearman(scores["tracin"].ravel(), scores["sdi_truncated"].ravel())
        out["sdi_truncated_vs_tracin_rank_agreement"] = float(agree)  # 1 by construction (conservation)
        out["sdi_truncated_vs_tracin_max_abs_diff"] = float(np.abs(scores["tracin"] - scores["sdi_truncated"]).max())
    return out


def run_removal(
    task: EvalTask, cfg: EvalConfig, scores: dict[str, np.ndarray], base: np.ndarray, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Per query: remove a method's top-k proponents (or k random examples, averaged over draws), retrain,
    and take the rise of that query's loss; intervals by bootstrap over the distinct queries. ``extra``: scored
    methods to remove by besides the configured ones (the best curvature-aware estimator)."""
    rng = np.random.default_rng(cfg.seed + 1)
    queries = rng.choice(task.n_query, size=min(cfg.removal_queries, task.n_query), replace=False)
    methods = list(dict.fromkeys([*cfg.removal_keys(list(scores)), *(k for k in extra if k in scores)]))
    out: dict[str, Any] = {"queries": queries.tolist(), "methods": methods, "rows": []}
    for frac in cfg.removal_fractions:
        k = max(1, round(frac * task.n_train))
        for name in [*methods, "random"]:
            deltas, flips = [], []
            for q in queries:
                if name == "random":
                    drops = [rng.choice(task.n_train, size=k, replace=False) for _ in range(cfg.random_draws)]
                else:
                    drops = [np.argsort(-scores[name][:, q], kind="stable")[:k]]  # top-k proponents
                after = [float(task.query_losses(task.train(keep=_keep(task.n_train, d)))[q]) for d in drops]
                deltas.append(float(np.mean(after)) - float(base[q]))  # one value per query
                flips.append(float(np.mean([a > np.log(2) >= base[q] for a in after])))
            out["rows"].append({
                "fraction": frac, "k": k, "method": name, "label": METHODS[name].label if name in METHODS else name,
                "loss_increase": bootstrap_ci(deltas, n_boot=cfg.n_boot, seed=cfg.seed),
                "per_query": deltas, "prediction_flips": float(np.mean(flips)),
            })  # fmt: skip
    out["ks"] = sorted({row["k"] for row in out["rows"]})
    k_max = max(out["ks"])
    out["at_largest_k"] = {row["method"]: row for row in out["rows"] if row["k"] == k_max}
    at = out["at_largest_k"]
    out["paired_vs_tracin"] = {
        m: bootstrap_ci(np.array(at[m]["per_query"]) - np.array(at["tracin"]["per_query"]), n_boot=cfg.n_boot,
                        seed=cfg.seed)
        for m in at if m not in ("tracin", "random") and "tracin" in at
    }  # fmt: skip
    return out


#: Builds a preconditioner ``P^-1`` (a linear map on flat body gradients) for the float64 model at the final
#: checkpoint: the curvature-aware counterfactual's geometry.
Preconditioner = Callable[[EvalTask, torch.nn.Module], Callable[[torch.Tensor], torch.Tensor]]


def run_counterfactual(
    task: EvalTask, cfg: EvalConfig, ckpt_dir: Path, preconditioner: Preconditioner | None = None
) -> dict[str, Any]:
    """Per-step counterfactuals on the final checkpoint in float64, full BPTT (the true first-order effect of a
    step's weights; truncated SDI is zero at the first steps by construction). The updates are computed
    independently of looptrace's features; a negative control reverses the features' steps. With
    ``preconditioner``, the prediction is the preconditioned SDI_t and the updates are preconditioned steps."""
    model = task.model().double()
    last = lt.load_checkpoints(ckpt_dir)[-1].load_full()
    load_into(model, {k: v.double() for k, v in last.state.items()}, last.name)
    data = task.data()
    train_batch = tuple(t[: cfg.counterfactual_train] for t in data["train"])
    query_batch = tuple(t[: cfg.counterfactual_queries] for t in data["query"])
    etas = sorted({*cfg.etas, task.lr}, reverse=True)
    out: dict[str, Any] = {"checkpoint_step": last.step, "training_lr": task.lr, "etas": etas}
    updates = {
        "test": "-eta * grad l(z): autograd on the tied model, applied to the copy of the body that step t of the query uses",
        "train": "-eta * phi_t(z): autograd through per-step copies of the body (torch.func.functional_call), applied to the tied body",
    }  # fmt: skip
    pre = None if preconditioner is None else preconditioner(task, model)
    scale = 1.0
    if pre is not None:
        updates = {side: f"the preconditioned step: P^-1 applied to {u}" for side, u in updates.items()}
        scale = _step_length_ratio(task, model, train_batch, pre)
        out["eta_scale"] = scale
        out["eta_scale_what"] = ("the etas applied are the nominal ones times eta_scale, the median over the train "
                                 "examples of |grad l(z)| / |P^-1 grad l(z)|: a preconditioned step as long as a plain "
                                 "one at the nominal eta (rows keyed by the nominal eta)")  # fmt: skip
    run_etas = [e * scale for e in etas]
    smallest = min(etas)
    e_small, e_lr = etas.index(smallest), etas.index(task.lr)
    for side in ("test", "train"):
        res = step_counterfactual(model, task.step_module(model), task.full_bptt_loss, train_batch, query_batch,
                                  run_etas, side=side, rank_eta=run_etas[e_lr], precondition=pre)  # type: ignore[arg-type]  # fmt: skip
        rel = [res["rel_error"][float(e)] for e in run_etas]  # by position: nominal eta i was applied as run_etas[i]
        reversed_pred = res["predicted"][..., ::-1]
        tau = len(res["slope"])
        out[side] = {
            "update": updates[side],
            "rel_error_by_eta": {str(e): r for e, r in zip(etas, rel, strict=True)},
            "rel_error_smallest_eta": rel[e_small],
            "rel_error_training_lr": rel[e_lr],
            "slope": res["slope"],
            "spearman_at_training_lr": [float(np.mean(r)) for r in res["spearman"]],
            "spearman_min_at_training_lr": [float(np.min(r)) for r in res["spearman"]],
            "spearman_per_query": res["spearman"],
            "negative_control": {
                "what": "the same actual changes against eta * SDI_t with the steps of looptrace's features reversed",
                "rel_error_smallest_eta": [relative_error(res["actual"][e_small, ..., t], reversed_pred[e_small, ..., t])
                                           for t in range(tau)],
                "rel_error_training_lr": [relative_error(res["actual"][e_lr, ..., t], reversed_pred[e_lr, ..., t])
                                          for t in range(tau)],
            },
        }  # fmt: skip
    return out


def _step_length_ratio(
    task: EvalTask, model: torch.nn.Module, batch: Any, pre: Callable[[torch.Tensor], torch.Tensor]
) -> float:
    """Median over the batch's examples of ``|g| / |P^-1 g|`` (g: the body's tied gradient, full BPTT)."""
    g = lt.featurize(model, [batch], task.full_bptt_loss, step_module=task.step_module(model),
                     sketch=lt.SketchSpec.exact(), per_step=False, verify=False).total.double()  # fmt: skip
    ratio = g.norm(dim=1) / pre(g).norm(dim=1).clamp_min(1e-300)
    return float(ratio.median())


#: The depth curation's control: the same number of examples with the lowest summed TracIn (full BPTT, the same
#: ranking queries), i.e. the most harmful ones by a score that has no steps.
HARMFUL = "most harmful by TracIn removed"


def run_depth_curation(task: EvalTask, cfg: EvalConfig) -> dict[str, Any]:
    """For each seed: rank the training examples by signed late- minus early-step SDI (full BPTT, summed
    over the ranking queries), remove the k most late-step, the k most early-step or k random ones (several
    draws), retrain, and read accuracy at each test-time loop budget on held-out test inputs that neither
    the training set nor the ranking queries contain. The control removes the k examples with the lowest
    summed TracIn instead: if it does as well, the steps added nothing to the ranking."""
    split = task.loops // 2
    k = max(1, round(cfg.depth_fraction * task.n_train))
    per_seed: list[dict[str, Any]] = []
    for s in cfg.depth_seeds:
        t = dataclasses.replace(task, seed=s)
        with tempfile.TemporaryDirectory() as tmp:
            full_model = t.train(record=Path(tmp))
            sdi = as_numpy(ScoreContext(t, Path(tmp)).attribution(loss="full").sdi)  # [N, M ranking queries, tau]
        rank = depth_ranking(sdi, split_step=split)[:, 2]  # signed: late minus early, summed over ranking queries
        harm = sdi.sum((1, 2))  # full-BPTT TracIn summed over the ranking queries: the control without steps
        drops = {"most late-step removed": np.argsort(-rank, kind="stable")[:k],
                 "most early-step removed": np.argsort(rank, kind="stable")[:k],
                 HARMFUL: np.argsort(harm, kind="stable")[:k]}  # fmt: skip
        curves = {"full data": t.loop_curve(full_model, "test")}
        for label, drop in drops.items():
            curves[label] = t.loop_curve(t.train(keep=_keep(t.n_train, drop)), "test")
        rng = np.random.default_rng(cfg.seed + 2 + 1000 * s)
        draws = [t.loop_curve(t.train(keep=_keep(t.n_train, rng.choice(t.n_train, size=k, replace=False))), "test")
                 for _ in range(cfg.depth_random_draws)]  # fmt: skip
        curves["random removed (mean)"] = {r: float(np.mean([d[r] for d in draws])) for r in draws[0]}
        noisy = t.noisy_labels()
        per_seed.append({
            "seed": s, "curves": curves, "random_draws": draws, "removed": {lab: d.tolist() for lab, d in drops.items()},
            "random_spread": {r: {"sd": float(np.std([d[r] for d in draws], ddof=1)) if len(draws) > 1 else 0.0,
                                  "min": min(d[r] for d in draws), "max": max(d[r] for d in draws)} for r in draws[0]},
            "mislabeled_share": None if noisy is None else {
                label: float(noisy[drop].mean()) for label, drop in drops.items()} | {"training set": float(noisy.mean())},
        })  # fmt: skip
    budgets = list(per_seed[0]["curves"]["full data"])
    labels = list(per_seed[0]["curves"])
    mean_curves = {lab: {r: float(np.mean([p["curves"][lab][r] for p in per_seed])) for r in budgets} for lab in labels}
    versus_random: dict[str, Any] = {}
    for lab in ("most late-step removed", "most early-step removed", HARMFUL, "full data"):
        versus_random[lab] = {}
        for r in budgets:
            d = np.array([p["curves"][lab][r] - p["curves"]["random removed (mean)"][r] for p in per_seed])
            versus_random[lab][r] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if d.size > 1 else 0.0,
                                     "min": float(d.min()), "max": float(d.max()), "n_above": int((d > 0).sum()),
                                     "n_below": int((d < 0).sum()), "per_seed": d.tolist()}  # fmt: skip
    late_vs_harmful = {}
    for r in budgets:
        d = np.array([p["curves"]["most late-step removed"][r] - p["curves"][HARMFUL][r] for p in per_seed])
        late_vs_harmful[r] = {"mean": float(d.mean()), "min": float(d.min()), "max": float(d.max()),
                              "n_above": int((d > 0).sum()), "n_below": int((d < 0).sum()), "per_seed": d.tolist()}  # fmt: skip
    overlap = [len(set(p["removed"]["most late-step removed"]) & set(p["removed"][HARMFUL])) / k for p in per_seed]
    return {
        "late_vs_harmful": late_vs_harmful, "late_harmful_overlap": overlap,
        "k": k, "split_step": split, "trained_depth": task.loops,
        "ranking": "signed late minus early SDI (steps > split_step minus the rest)",
        "ranking_queries": "query", "evaluation_set": "test", "seeds": list(cfg.depth_seeds),
        "random_draws": cfg.depth_random_draws, "budgets": budgets, "curves": mean_curves,
        "versus_random": versus_random, "per_seed": per_seed,
    }  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict[str, Any]:
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": 1, "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip


def evaluate(cfg: EvalConfig, out: Path, task: EvalTask | None = None, what: str = "all") -> dict[str, Any]:
    """Run the evaluation (``what``: all, counterfactual, lds, removal, depth, or curvature: the step
    counterfactual, LDS, removal and the curvature comparison without the depth curation) and write its outputs
    into ``out``."""
    task = task or MajorityTask()
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two fighting over it
    try:
        return _evaluate(cfg, out, task, what)
    finally:
        torch.set_num_threads(threads)


def _evaluate(cfg: EvalConfig, out: Path, task: EvalTask, what: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg.method_keys()  # unknown methods fail before any work
    results: dict[str, Any] = {
        "task": {"name": task.name, "description": task.description, **dataclasses.asdict(task)},
        "config": dataclasses.asdict(cfg), "data": task.overlap(), "machine": _machine(), "section_seconds": {},
    }  # fmt: skip
    sections = results["section_seconds"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = Path(tmp) / "checkpoints"
        t_train = time.perf_counter()
        full_model = task.train(record=ckpt_dir)
        results["train_seconds"] = time.perf_counter() - t_train
        base = task.query_losses(full_model).numpy()
        results["full_data"] = {
            "query_loss_mean": float(base.mean()),
            "test_loss_mean": float(task.query_losses(full_model, "test").mean()),
            "loop_curve_test": task.loop_curve(full_model, "test"),
            "loop_curve_query": task.loop_curve(full_model, "query"),
        }
        if what in ("all", "counterfactual", "curvature"):
            t1 = time.perf_counter()
            results["step_counterfactual"] = run_counterfactual(task, cfg, ckpt_dir)
            sections["step counterfactual"] = time.perf_counter() - t1
        if what in ("all", "lds", "removal", "curvature"):
            t1 = time.perf_counter()
            ctx = ScoreContext(task, ckpt_dir, peer_python=cfg.kronfluence_python)
            scores = method_scores(task, cfg, ckpt_dir, ctx)
            sections["scores"] = time.perf_counter() - t1
            if ctx.peer_meta:
                results["peers"] = ctx.peer_meta
            if what in ("all", "lds", "curvature"):
                t1 = time.perf_counter()
                results["lds"] = run_lds(task, cfg, scores)
                sections["lds"] = time.perf_counter() - t1
            comparison = (
                curvature.compare(results["lds"], cfg.n_boot, cfg.seed)
                if cfg.compare_curvature and "lds" in results
                else None
            )
            if comparison is not None:
                results["curvature"] = comparison
            best: str | None = None if comparison is None else comparison["best"]["key"]
            if what in ("all", "removal", "curvature"):
                t1 = time.perf_counter()
                peer = None if comparison is None else comparison["references"]["kronfluence_ekfac"]
                extra = tuple(k for k in (best, None if peer is None else peer["key"]) if k is not None)
                results["removal"] = run_removal(task, cfg, scores, base, extra=extra)
                sections["removal"] = time.perf_counter() - t1
                if comparison is not None and best is not None:
                    comparison["removal"] = curvature.removal_summary(results["removal"], best, cfg.n_boot, cfg.seed)
            if comparison is not None and best is not None and what in ("all", "curvature"):
                t1 = time.perf_counter()
                comparison["counterfactual"] = run_counterfactual(task, cfg, ckpt_dir, curvature.preconditioner(best))
                sections["curvature counterfactual"] = time.perf_counter() - t1
    if what in ("all", "depth"):
        t1 = time.perf_counter()
        results["depth_curation"] = run_depth_curation(task, cfg)
        sections["depth curation"] = time.perf_counter() - t1
    results["seconds"] = time.perf_counter() - t0
    results["verdicts"] = verdicts(results)
    atomic_write_json(results, out / "results.json")
    from looptrace.apps.evaluation.report import write_report

    write_report(results, out)
    return results


__all__ = ["TASKS", "EvalConfig", "evaluate", "method_scores", "run_counterfactual", "run_depth_curation",
           "run_lds", "run_removal"]  # fmt: skip

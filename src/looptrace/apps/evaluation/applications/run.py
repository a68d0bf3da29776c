"""``looptrace eval applications``: the paper's three applications, each checked against what looping or
retraining actually does (issue #27). Writes ``results.json`` (with ``verdicts``), figures and an HTML
report; ``docs/results/applications/README.md`` is rendered from results.json."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looptrace.apps.evaluation.applications import cancellation, curation, horizon
from looptrace.apps.evaluation.applications.collect import collect_task, per_step_logits
from looptrace.apps.evaluation.applications.verdicts import verdicts
from looptrace.apps.evaluation.harness import EvalConfig, _machine, run_depth_curation
from looptrace.apps.evaluation.sampled_depth import SampledDepthMajorityTask
from looptrace.apps.evaluation.task import MajorityTask
from looptrace.errors import ConfigError
from looptrace.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class ApplicationsConfig:
    """The sizes of the applications run (``smoke`` is a seconds-long copy for the test suite)."""

    seeds: tuple[int, ...] = tuple(range(10))  # training seeds of the sampled-depth task
    task: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of SampledDepthMajorityTask
    horizon: horizon.HorizonConfig = dataclasses.field(default_factory=horizon.HorizonConfig)
    cancel_pairs: int = 24  # flagged pairs checked by the counterfactual per seed (and as many unflagged)
    cancel_ratio: float = 0.1  # cancellation_pairs' ratio: |TracIn| < ratio * sum_t |SDI_t|
    cancel_floor: float = 0.1  # a step counts as positive / negative beyond this share of the largest |effect|
    cancel_fraction: float = 0.05  # share of training examples removed per set
    cancel_draws: int = 3  # random removal sets per seed
    eval_results: str | None = "docs/results/eval/results.json"  # the committed ten-seed depth curation
    add_back_steps: int = 60
    add_back_seeds: int | None = None  # how many of the committed seeds (None: all)
    curation_draws: int = 3  # random draws of the second-task removal test
    curation_fraction: float = 0.1
    sudoku_seeds: tuple[int, ...] = ()  # Sudoku small-preset runs runs/sudoku-small-sS (trained here if missing)
    sudoku_dir: str = "runs"
    sudoku_train: int = 256
    sudoku_queries: int = 128
    sudoku_sketch: int = 4096
    sudoku_checkpoints: int = 8
    task_choice_seeds: tuple[int, ...] = (0, 1, 2)
    n_boot: int = 2000
    seed: int = 0

    @classmethod
    def smoke(cls) -> ApplicationsConfig:
        """Seconds: checks the pipeline runs end to end, not what it finds."""
        return cls(
            seeds=(0, 1),
            task={"bits": 9, "n_train": 60, "n_query": 16, "n_test": 100, "loops": 4, "steps": 10, "ckpt_every": 5,
                  "depth_mean": 2.0, "budgets": (1, 2, 3, 4), "d_model": 8},
            horizon=horizon.HorizonConfig(fracs=(0.5, 0.1), shares=(0.5, 0.9), stable_ks=(1, 2),
                                          confidences=(0.6, 0.9), n_boot=50),
            cancel_pairs=3, cancel_draws=1, cancel_fraction=0.1, eval_results=None, add_back_steps=3,
            curation_draws=1, task_choice_seeds=(), n_boot=50,
        )  # fmt: skip

    def make_task(self, seed: int = 0) -> SampledDepthMajorityTask:
        kw = dict(self.task)
        if "budgets" in kw:
            kw["budgets"] = tuple(kw["budgets"])
        return SampledDepthMajorityTask(seed=seed, **kw)


def _needed_histogram(task: MajorityTask, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Held-out accuracy at each budget, and how many test inputs need more than one loop."""
    from looptrace.analysis.applications import needed_budgets

    rows = []
    for s in seeds:
        t = dataclasses.replace(task, seed=s)
        t0 = time.perf_counter()
        model = t.train()
        secs = time.perf_counter() - t0
        x, y = t.data()["test"]
        right = (per_step_logits(model, x, t.loops).argmax(-1) == y).numpy()
        need = needed_budgets(right, list(range(1, t.loops + 1)))
        rows.append({"seed": s, "train_seconds": secs, "accuracy": right.mean(1).tolist(),
                     "more_than_one_loop": float((need > 1).sum() / max((need > 0).sum(), 1))})  # fmt: skip
    return {"task": {"name": task.name, **dataclasses.asdict(task)}, "per_seed": rows,
            "more_than_one_loop": float(np.mean([r["more_than_one_loop"] for r in rows])),
            "accuracy_at_1": float(np.mean([r["accuracy"][0] for r in rows])),
            "best_accuracy": float(np.mean([max(r["accuracy"]) for r in rows]))}  # fmt: skip


def task_choice(cfg: ApplicationsConfig) -> dict[str, Any]:
    """Why the sampled-depth task has 15 bits and truncated BPTT: the alternatives need no loops."""
    chosen = cfg.make_task()
    full_bptt = dataclasses.replace(chosen, bptt_k=None)  # type: ignore[arg-type]  # the model takes None: every step
    return {
        "chosen": _needed_histogram(chosen, cfg.task_choice_seeds),
        "full_bptt": _needed_histogram(full_bptt, cfg.task_choice_seeds),
        "eleven_bits": _needed_histogram(dataclasses.replace(chosen, bits=11, n_train=400, n_query=60, n_test=1000),
                                         cfg.task_choice_seeds),
    }  # fmt: skip


def _eval_depth(cfg: ApplicationsConfig, root: Path) -> tuple[MajorityTask, dict[str, Any], str]:
    """The committed depth curation (and the task it ran on), or a fresh small one for the smoke run."""
    if cfg.eval_results is None:
        task = MajorityTask(n_train=60, n_query=12, n_test=100, steps=10, ckpt_every=5, bits=9, d_model=8)
        return (
            task,
            run_depth_curation(task, EvalConfig(depth_seeds=(0, 1), depth_random_draws=1)),
            "computed here (smoke)",
        )
    path = Path(cfg.eval_results)
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run `looptrace eval depth` first, or pass --eval-results")
    r = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(MajorityTask)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in r["task"].items() if k in fields}
    return MajorityTask(**kw), r["depth_curation"], cfg.eval_results  # type: ignore[arg-type]


def _per_query(runs: list[Any], cfg: horizon.HorizonConfig) -> list[dict[str, Any]]:
    """Per run: each query's needed budget and where the two horizon rules stop it at their default settings."""
    return [
        {"needed": n.tolist(), "horizon_peak": horizon.rule_stops(r, "horizon_peak", cfg.default_frac, n).tolist(),
         "horizon_share": horizon.rule_stops(r, "horizon_share", cfg.default_share, n).tolist()}
        for r, n in zip(runs, horizon.needed_for(runs), strict=True)
    ]  # fmt: skip


def run_applications(cfg: ApplicationsConfig, out: Path, root: Path | None = None,
                     what: tuple[str, ...] = ("horizon", "cancellation", "curation")) -> dict[str, Any]:  # fmt: skip
    """Run the applications and write their outputs into ``out``; one torch thread (a tiny model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg, out, root or Path.cwd(), what)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ApplicationsConfig, out: Path, root: Path, what: tuple[str, ...]) -> dict[str, Any]:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    task0 = cfg.make_task()
    res: dict[str, Any] = {
        "config": dataclasses.asdict(cfg), "machine": _machine(), "section_seconds": {},
        "task": {"name": task0.name, "description": task0.description, **dataclasses.asdict(task0)},
        "data": task0.overlap(),
    }  # fmt: skip
    secs = res["section_seconds"]
    if cfg.task_choice_seeds:
        t1 = time.perf_counter()
        res["task_choice"] = task_choice(cfg)
        secs["task choice"] = time.perf_counter() - t1
    runs, pairs, removals, train_s = [], [], [], []
    if "horizon" in what or "cancellation" in what:
        for s in cfg.seeds:
            task = cfg.make_task(s)
            with tempfile.TemporaryDirectory() as tmp:
                t1 = time.perf_counter()
                model = task.train(record=Path(tmp))
                train_s.append(time.perf_counter() - t1)
                t1 = time.perf_counter()
                qrun, sdi = collect_task(task, model, Path(tmp))
                secs["horizon"] = secs.get("horizon", 0.0) + time.perf_counter() - t1
                runs.append(qrun)
                if "cancellation" in what:
                    t1 = time.perf_counter()
                    pairs.append(cancellation.check_pairs(task, Path(tmp), sdi, cfg.cancel_pairs, cfg.cancel_ratio,
                                                          cfg.cancel_floor, cfg.seed + s))  # fmt: skip
                    removals.append(cancellation.removal(task, sdi, model, cfg.cancel_fraction, cfg.cancel_draws,
                                                         cfg.seed + 1000 + s))  # fmt: skip
                    secs["cancellation"] = secs.get("cancellation", 0.0) + time.perf_counter() - t1
        res["train_seconds"] = float(np.mean(train_s))
    if "horizon" in what:
        t1 = time.perf_counter()
        res["horizon"] = {task0.name: horizon.analyze(runs, cfg.horizon)}
        res["horizon"][task0.name]["per_query"] = _per_query(runs, cfg.horizon)
        if cfg.sudoku_seeds:
            from looptrace.apps.evaluation.applications.sudoku import collect_run, ensure_run

            s_runs, infos = [], []
            for seed in cfg.sudoku_seeds:
                t2 = time.perf_counter()
                path, trained = ensure_run(root / cfg.sudoku_dir, seed)
                if trained:
                    secs["sudoku training"] = secs.get("sudoku training", 0.0) + time.perf_counter() - t2
                qrun, info = collect_run(path, cfg.sudoku_train, cfg.sudoku_queries, cfg.sudoku_sketch,
                                         cfg.sudoku_checkpoints)  # fmt: skip
                s_runs.append(qrun)
                infos.append(info)
            res["horizon"]["sudoku"] = horizon.analyze(s_runs, cfg.horizon)
            res["horizon"]["sudoku"]["runs"] = infos
            res["horizon"]["sudoku"]["per_query"] = _per_query(s_runs, cfg.horizon)
        secs["horizon"] = secs.get("horizon", 0.0) + time.perf_counter() - t1
    if "cancellation" in what:
        res["cancellation"] = {"per_seed_pairs": pairs, "per_seed_removal": removals,
                               "summary": cancellation.summarize(pairs, removals, cfg.n_boot, cfg.seed)}  # fmt: skip
    if "curation" in what:
        t1 = time.perf_counter()
        base_task, depth, source = _eval_depth(cfg, root)
        if cfg.add_back_seeds is not None:
            depth = {**depth, "per_seed": depth["per_seed"][: cfg.add_back_seeds]}
        res["curation"] = {
            "source": source,
            "base_task": {"name": base_task.name, **dataclasses.asdict(base_task)},
            "seeds": curation.seed_intervals(depth, cfg.n_boot, cfg.seed),
            "mislabeled": {k: float(np.mean([p["mislabeled_share"][k] for p in depth["per_seed"]]))
                           for k in depth["per_seed"][0]["mislabeled_share"]},
            "add_back": curation.add_back(base_task, depth, cfg.add_back_steps, cfg.n_boot, cfg.seed),
        }  # fmt: skip
        secs["curation (seeds, add back)"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        res["curation"]["second_task"] = curation.second_task(
            task0, cfg.seeds, cfg.curation_draws, cfg.curation_fraction
        )
        secs["curation (second task)"] = time.perf_counter() - t1
    res["seconds"] = time.perf_counter() - t_start
    res["verdicts"] = verdicts(res)
    atomic_write_json(res, out / "results.json")
    from looptrace.apps.evaluation.applications.report import write_report

    write_report(res, out)
    return res

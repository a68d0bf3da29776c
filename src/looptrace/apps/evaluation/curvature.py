"""Curvature-aware step-resolved estimators on the evaluation task: LDS beside plain TracIn and the peers.

For issue #24. Given an evaluation task (:class:`looptrace.apps.evaluation.task.EvalTask`), this trains the
full-data run with its TracIn checkpoints, computes every estimator's ``[N train, M query]`` scores, retrains
the same random subsets as ``looptrace eval`` (same seed, same masks) and reports each estimator's LDS with a
bootstrap interval:

* plain TracIn (exact; all checkpoints, or the final one; the loss as trained or with full BPTT);
* ``kfac`` / ``ekfac`` (empirical or true Fisher) and ``gauss-newton`` (:mod:`looptrace.curvature`) over
  the same four choices, with the damping swept as a multiple of each block's mean eigenvalue (0.1 is the
  default, ``damping=None``);
* peers' scores passed in (kronfluence, from :mod:`looptrace.apps.evaluation.kronfluence_probe`).

Every score is computed from exact features (float64 where it matters: the solves), batch by batch as
``lt.attribute`` would, but with the curvature fitted once per checkpoint and reused across the damping
sweep. A test checks that this route gives ``lt.attribute``'s numbers. Choosing the best configuration on
the same subsets it is scored on is optimistic, so the best configuration is also chosen on the first half
of the subsets and its LDS reported on the second half.

Run: ``python -m looptrace.apps.evaluation.curvature --out docs/results/curvature-lds``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import looptrace as lt
from looptrace.apps.evaluation.task import EvalTask, full_bptt_loss, logits, loss_fn
from looptrace.curvature import fit_curvature, gauss_newton, sampled_cross_entropy
from looptrace.evaluation import bootstrap_ci, lds
from looptrace.influence.checkpoints import load_into
from looptrace.io import atomic_write_json

LOSSES: dict[str, Callable[[nn.Module, Any], torch.Tensor]] = {"as trained": loss_fn, "full BPTT": full_bptt_loss}


@dataclasses.dataclass(frozen=True)
class CurvatureEvalConfig:
    """Sizes of the comparison (``looptrace eval``'s subsets: same count, fraction and seed)."""

    subsets: int = 100
    subset_fraction: float = 0.5
    damping_scales: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    fishers: tuple[str, ...] = ("empirical", "true")
    seed: int = 0
    batch_size: int = 64

    @classmethod
    def smoke(cls) -> CurvatureEvalConfig:
        return cls(subsets=6, damping_scales=(0.1,), fishers=("empirical",))


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def sampled_loss(full: bool) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The task's loss on labels drawn from the model (the true Fisher's ``fisher_loss``)."""

    def fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return sampled_cross_entropy(logits(model, batch[0], bptt_k=None if full else -1))

    return fn


def subsets(task: EvalTask, cfg: CurvatureEvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """The retrained subsets: masks ``[S, N]`` (as ``looptrace eval`` draws them) and outcomes ``[S, M]``
    (minus each query's loss after training on the subset)."""
    rng = np.random.default_rng(cfg.seed)
    masks = rng.random((cfg.subsets, task.n_train)) < cfg.subset_fraction
    outcomes = np.stack([-task.query_losses(task.train(keep=torch.from_numpy(m))).numpy() for m in masks])
    return masks, outcomes


def estimator_scores(task: EvalTask, ckpt_dir: Path, cfg: CurvatureEvalConfig) -> dict[str, np.ndarray]:
    """``{estimator: [N, M]}``: plain TracIn and every preconditioned variant (bigger = more helpful)."""
    model = task.model()
    data = task.data()
    tr, qu = _batches(*data["train"], cfg.batch_size), _batches(*data["query"], cfg.batch_size)
    cks = [c.load_full() for c in lt.load_checkpoints(ckpt_dir)]
    exact = lt.SketchSpec.exact()
    out: dict[str, np.ndarray] = {}
    for variant, lfn in LOSSES.items():
        acc: dict[str, list[np.ndarray]] = {}  # name -> per-checkpoint eta_k-weighted scores
        for ck in cks:
            load_into(model, ck.state, ck.name)
            kw: dict[str, Any] = dict(step_module=task.step_module(model), sketch=exact, verify=False)
            g = lt.featurize(model, tr, lfn, per_step=False, **kw).total.double()  # [N, P]
            phi = lt.featurize(model, qu, lfn, **kw).per_step
            assert phi is not None
            phi = phi.double()  # [M, tau, P]

            def add(name: str, pre: torch.Tensor, eta: float = ck.lr, g: torch.Tensor = g, acc: dict = acc) -> None:
                acc.setdefault(name, []).append(eta * (g @ pre.sum(1).T).numpy())

            add("TracIn", phi)
            for scale in cfg.damping_scales:
                add(f"gauss-newton | damping {scale:g}x", gauss_newton(g, phi, damping_scale=scale))
            for fisher in cfg.fishers:
                fl = sampled_loss(variant == "full BPTT") if fisher == "true" else None
                curv = fit_curvature(model, tr, lfn, step_module=task.step_module(model), fisher_loss=fl, verify=False)
                for kind in ("kfac", "ekfac"):
                    for scale in cfg.damping_scales:
                        pre = curv.precondition(phi, kind, damping_scale=scale)  # type: ignore[arg-type]
                        add(f"{kind} | {fisher} Fisher | damping {scale:g}x", pre)
        for name, per_ck in acc.items():
            base, _, rest = name.partition(" | ")
            tail = f" | {rest}" if rest else ""
            out[f"{base} | all checkpoints | {variant}{tail}"] = np.sum(per_ck, axis=0)
            out[f"{base} | final checkpoint | {variant}{tail}"] = per_ck[-1]
    return out


def lds_table(scores: dict[str, np.ndarray], masks: np.ndarray, outcomes: np.ndarray, seed: int) -> dict[str, Any]:
    """Each estimator's LDS on all subsets, and on each half (for selection on one, report on the other)."""
    half = len(masks) // 2
    table: dict[str, Any] = {}
    for name, s in scores.items():
        per_query = lds(s, masks, outcomes)
        table[name] = {
            **bootstrap_ci(per_query, seed=seed),
            "first_half": float(np.nanmean(lds(s, masks[:half], outcomes[:half]))),
            "second_half": float(np.nanmean(lds(s, masks[half:], outcomes[half:]))),
            "per_query": per_query.tolist(),
        }
    return table


def _is_curvature(name: str) -> bool:
    return name.startswith(("kfac", "ekfac", "gauss-newton"))


def summarise(table: dict[str, Any]) -> dict[str, Any]:
    """The comparison the issue asks for, with the verdict as a field computed from the numbers."""
    curv = {k: v for k, v in table.items() if _is_curvature(k)}
    best = max(curv, key=lambda k: curv[k]["mean"])
    chosen = max(curv, key=lambda k: curv[k]["first_half"])  # chosen on the first half only
    tracin = table["TracIn | all checkpoints | as trained"]
    peers = {k: v["mean"] for k, v in table.items() if k.startswith("kronfluence")}
    ekfac_peer = table.get("kronfluence EK-FAC (all Linear modules, final weights)")
    defaults = {}
    for k in ("kfac", "ekfac", "gauss-newton"):
        fisher = "" if k == "gauss-newton" else " | empirical Fisher"
        key = f"{k} | all checkpoints | as trained{fisher} | damping 0.1x"
        if key in table:
            defaults[k] = table[key]["mean"]
    out: dict[str, Any] = {
        "best_curvature": {"name": best, "lds": curv[best]["mean"], "lo": curv[best]["lo"], "hi": curv[best]["hi"]},
        "selected_on_first_half": {
            "name": chosen,
            "lds_second_half": curv[chosen]["second_half"],
            "tracin_second_half": tracin["second_half"],
            "kronfluence_ekfac_second_half": None if ekfac_peer is None else ekfac_peer["second_half"],
        },
        "tracin_all_checkpoints_as_trained": tracin["mean"],
        "attribute_defaults": defaults,
        "peers": peers,
        "beats_tracin": bool(curv[best]["mean"] >= tracin["mean"]),
        "beats_kronfluence_ekfac": None if ekfac_peer is None else bool(curv[best]["mean"] >= ekfac_peer["mean"]),
        "held_out_beats_tracin": bool(curv[chosen]["second_half"] >= tracin["second_half"]),
    }
    if ekfac_peer is not None:
        out["held_out_beats_kronfluence_ekfac"] = bool(curv[chosen]["second_half"] >= ekfac_peer["second_half"])
    return out


def run_kronfluence(python: str, task: EvalTask, ckpt_dir: Path, work: Path) -> dict[str, np.ndarray]:
    """Run the kronfluence probe in its own environment; returns its scores ``{name: [N, M]}``."""
    src = Path(__file__).resolve().parents[3]
    out = work / "kronfluence"
    cmd = [python, "-m", "looptrace.apps.evaluation.kronfluence_probe", "--checkpoints", str(ckpt_dir),
           "--out", str(out), "--task", json.dumps(dataclasses.asdict(task))]  # fmt: skip
    subprocess.run(cmd, check=True, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    meta = json.loads((out / "scores.json").read_text())
    scores = {name: np.load(out / f) for name, f in meta["files"].items()}
    (work / "finding.json").write_text(json.dumps(meta["tied_body_finding"]))
    return scores


def compare(task: EvalTask, cfg: CurvatureEvalConfig, kronfluence_python: str | None = None) -> dict[str, Any]:
    """Scores, subsets, LDS table and summary (JSON-able)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = Path(tmp) / "checkpoints"
        task.train(record=ckpt_dir)
        t1 = time.perf_counter()
        scores = estimator_scores(task, ckpt_dir, cfg)
        t_scores = time.perf_counter() - t1
        peer_note = "not run (no --kronfluence-python)"
        finding = None
        if kronfluence_python:
            scores.update(run_kronfluence(kronfluence_python, task, ckpt_dir, Path(tmp)))
            peer_note = "kronfluence 1.0.1 in its own environment (looptrace.apps.evaluation.kronfluence_probe)"
            finding = json.loads((Path(tmp) / "finding.json").read_text())
    t2 = time.perf_counter()
    masks, outcomes = subsets(task, cfg)
    t_retrain = time.perf_counter() - t2
    table = lds_table(scores, masks, outcomes, cfg.seed)
    return {
        "task": dataclasses.asdict(task),
        "config": dataclasses.asdict(cfg),
        "outcome": "-query loss",
        "peers": peer_note,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "seconds": {"scores": t_scores, "retraining": t_retrain, "total": time.perf_counter() - t0},
        "summary": summarise(table),
        "kronfluence_tied_body_finding": finding,
        "lds": table,
    }


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Across runs (task seeds): each estimator's mean LDS per run and its spread, and the verdicts, each a
    field computed from the numbers (every run must satisfy it)."""
    names = list(results[0]["lds"])
    per_run = {n: [r["lds"][n]["mean"] for r in results if n in r["lds"]] for n in names}
    table: dict[str, dict[str, Any]] = {
        n: {"runs": v, "mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
        for n, v in per_run.items()
    }
    curv = [n for n in names if _is_curvature(n)]
    best = max(curv, key=lambda n: table[n]["mean"])
    tracin = table["TracIn | all checkpoints | as trained"]
    peer = table.get("kronfluence EK-FAC (all Linear modules, final weights)")
    defaults = {k: table[v] for k, v in _DEFAULTS.items() if v in table}
    return {
        "runs": len(results),
        "task_seeds": [r["task"]["seed"] for r in results],
        "subsets_per_run": results[0]["config"]["subsets"],
        "machine": results[0]["machine"],
        "best_curvature": {"name": best, **table[best]},
        "tracin": tracin,
        "kronfluence_ekfac": peer,
        "attribute_defaults": defaults,
        "best_beats_tracin_every_run": all(a >= b for a, b in zip(table[best]["runs"], tracin["runs"], strict=True)),
        "best_beats_kronfluence_ekfac_every_run": None if peer is None
        else all(a >= b for a, b in zip(table[best]["runs"], peer["runs"], strict=True)),
        "defaults_beat_tracin_every_run": all(all(a >= b for a, b in zip(d["runs"], tracin["runs"], strict=True))
                                              for d in defaults.values()),
        "defaults_beat_kronfluence_ekfac_every_run": None if peer is None
        else all(all(a >= b for a, b in zip(d["runs"], peer["runs"], strict=True)) for d in defaults.values()),
        "held_out_selection_beats_tracin_every_run": all(r["summary"]["held_out_beats_tracin"] for r in results),
        "held_out_selection_beats_kronfluence_ekfac_every_run": all(
            r["summary"].get("held_out_beats_kronfluence_ekfac", False) for r in results
        ),
        "tied_body_finding": next(
            (r["kronfluence_tied_body_finding"] for r in results if r.get("kronfluence_tied_body_finding")), None
        ),
        "lds": table,
        "table": {label(n): v for n, v in table.items()},  # the same, named without "|" (for write-up placeholders)
    }  # fmt: skip


def label(name: str) -> str:
    """An estimator's name with ", " for " | " (write-up placeholders cannot hold "|")."""
    return name.replace(" | ", ", ")


#: What ``lt.attribute(..., precondition=kind)`` computes with its defaults (damping=None, no fisher_loss).
_DEFAULTS = {
    "kfac": "kfac | all checkpoints | as trained | empirical Fisher | damping 0.1x",
    "ekfac": "ekfac | all checkpoints | as trained | empirical Fisher | damping 0.1x",
    "gauss-newton": "gauss-newton | all checkpoints | as trained | damping 0.1x",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (results.json)")
    p.add_argument("--kronfluence-python", default=None, help="python of a venv with kronfluence installed")
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    p.add_argument("--task", default="{}", help="EvalTask overrides as JSON, e.g. '{\"seed\": 1}'")
    p.add_argument("--aggregate", nargs="*", default=None, help="results.json files to aggregate into OUT/summary.json")
    args = p.parse_args(argv)
    if args.aggregate:
        summary = aggregate([json.loads(Path(f).read_text()) for f in args.aggregate])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(summary, Path(args.out) / "summary.json")
        print(json.dumps({k: v for k, v in summary.items() if k != "lds"}, indent=2))
        return 0
    torch.set_num_threads(1)
    cfg = CurvatureEvalConfig.smoke() if args.smoke else CurvatureEvalConfig()
    task = EvalTask(**json.loads(args.task))
    res = compare(task, cfg, args.kronfluence_python)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, out / "results.json")
    print(json.dumps(res["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

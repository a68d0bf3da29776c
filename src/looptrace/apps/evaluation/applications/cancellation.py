"""Application (ii): signal cancellation, checked by the per-step counterfactual and by retraining.

**Pairs.** :func:`looptrace.analysis.applications.cancellation_pairs` flags pairs (z, z') whose TracIn is
small against their per-step mass. For each flagged pair, and for as many unflagged pairs of comparable
mass (the base rate), :func:`pair_counterfactual` measures what SDI_t predicts, independently of
looptrace's features: at every checkpoint k, z's update ``-eta_k grad l(z)`` (autograd on the tied model,
every loop step backpropagated) is applied to the copy of the body that loop step t of the query uses,
and the query's loss change is read; summed over checkpoints this is the per-step effect SDI_t estimates to
first order. The same update applied at every step is the effect TracIn estimates. The flag is right when
the measured per-step effects have opposite signs at different steps and sum to little
(:func:`looptrace.analysis.applications.step_cancellation`).

**Retraining.** :func:`looptrace.analysis.applications.cancelling_examples` picks the training examples
whose influence cancels most and a control with as much |TracIn| and little cancellation; each set (and
random sets) is removed, the model retrained, and the test loss read at every loop budget: the claim is
that the cancelling examples move the curve at intermediate budgets while the full budget's loss barely
moves, and the control does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.analysis import applications as app
from looptrace.apps.evaluation.applications.stats import TwoLevel, interval, seed_interval
from looptrace.apps.evaluation.task import EvalTask, logits
from looptrace.evaluation.counterfactual import untied_step
from looptrace.influence.checkpoints import load_into


def pair_counterfactual(task: EvalTask, ckpt_dir: Path, pairs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Measured per-step and all-step effects of each pair, summed over the checkpoints, in float64.

    Returns ``steps`` ``[P, T]`` (the loss decrease of query j when z_i's update ``-eta_k grad l(z_i)`` is
    applied only at loop step t of the query's computation, summed over checkpoints k) and ``all`` ``[P]``
    (the same update applied to the tied body, at every step): the measured counterparts of SDI_t and TracIn
    (looptrace's sign: positive = the loss went down)."""
    model = task.model().double()
    body = task.step_module(model)
    params = dict(body.named_parameters())
    data = task.data()
    xs, ys = data["train"]
    xq, yq = data["query"]
    steps = task.loops
    out_steps = np.zeros((len(pairs), steps))
    out_all = np.zeros(len(pairs))
    for ck in lt.load_checkpoints(ckpt_dir):
        full = ck.load_full()
        load_into(model, {k: v.double() for k, v in full.state.items()}, full.name)
        eta = float(full.lr)
        grads: dict[int, dict[str, torch.Tensor]] = {}
        for i in sorted({i for i, _ in pairs}):
            loss = task.full_bptt_loss(model, (xs[i : i + 1], ys[i : i + 1])).sum()
            g = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            grads[i] = {n: (gi if gi is not None else torch.zeros_like(p)).detach()
                        for (n, p), gi in zip(params.items(), g, strict=True)}  # fmt: skip
        for p, (i, j) in enumerate(pairs):
            batch = (xq[j : j + 1], yq[j : j + 1])
            new = {n: params[n].detach() - eta * grads[i][n] for n in params}
            with torch.no_grad():
                base = float(task.full_bptt_loss(model, batch)[0])
                for t in range(1, steps + 1):
                    with untied_step(body, t, new):
                        out_steps[p, t - 1] += base - float(task.full_bptt_loss(model, batch)[0])
                old = {n: params[n].detach().clone() for n in params}
                for n in params:
                    params[n].copy_(new[n])
                out_all[p] += base - float(task.full_bptt_loss(model, batch)[0])
                for n in params:
                    params[n].copy_(old[n])
    return {"steps": out_steps, "all": out_all}


def check_pairs(task: EvalTask, ckpt_dir: Path, sdi: np.ndarray, n_pairs: int, ratio: float, floor: float,
                seed: int) -> dict[str, Any]:  # fmt: skip
    """The flagged pairs (strongest first) and as many unflagged pairs of at least the weakest flagged
    pair's mass, each checked against the measured per-step effects."""
    flagged = app.cancellation_pairs(sdi, ratio=ratio, top=n_pairs)
    tracin, mass = sdi.sum(-1), np.abs(sdi).sum(-1)
    n_flagged_all = int(((np.abs(tracin) < ratio * mass) & (mass > 0)).sum())
    out: dict[str, Any] = {"flagged_total": n_flagged_all, "pairs_total": int(tracin.size)}
    if not flagged:
        return out | {"flagged": None, "unflagged": None}
    floor_mass = min(p["abs_sdi_mass"] for p in flagged)
    pool = np.argwhere((np.abs(tracin) >= ratio * mass) & (mass >= floor_mass))
    rng = np.random.default_rng(seed)
    pick = pool[rng.choice(len(pool), size=min(len(flagged), len(pool)), replace=False)] if len(pool) else pool
    candidates: tuple[tuple[str, list[tuple[int, int]]], ...] = (
        ("flagged", [(int(p["train"]), int(p["query"])) for p in flagged]),
        ("unflagged", [(int(a), int(b)) for a, b in pick]),
    )
    for name, pairs in candidates:
        if not pairs:
            out[name] = None
            continue
        measured = pair_counterfactual(task, ckpt_dir, pairs)
        predicted = np.stack([sdi[i, j] for i, j in pairs])  # [P, T]
        c = app.step_cancellation(measured["steps"], ratio=ratio, floor=floor)
        lenient = app.step_cancellation(measured["steps"], ratio=3 * ratio, floor=floor)
        pred_c = app.step_cancellation(predicted, ratio=ratio, floor=floor)
        mass_m = np.abs(measured["steps"]).sum(-1)
        big = np.abs(predicted) >= floor * np.abs(predicted).max(-1, keepdims=True)
        agree = np.where(big, np.sign(predicted) == np.sign(measured["steps"]), True)
        out[name] = {
            "pairs": [list(p) for p in pairs],
            "predicted_steps": predicted.tolist(), "measured_steps": measured["steps"].tolist(),
            "measured_all": measured["all"].tolist(),
            "cancels": c["cancels"].tolist(), "opposite": c["opposite"].tolist(), "small_sum": c["small_sum"].tolist(),
            "cancels_lenient": lenient["cancels"].tolist(),
            "predicted_cancels": pred_c["cancels"].tolist(),
            "tied_small": (np.abs(measured["all"]) < ratio * mass_m).tolist(),
            "sign_agreement": agree.mean(-1).tolist(),
            "relative_error": (np.abs(measured["steps"] - predicted).sum(-1) / np.abs(predicted).sum(-1)).tolist(),
        }  # fmt: skip
    return out


def _loss_curve(task: EvalTask, model: torch.nn.Module) -> dict[str, float]:
    """Mean test cross-entropy at each budget 1..T."""
    x, y = task.data()["test"]
    with torch.no_grad():
        return {str(r): float(torch.nn.functional.cross_entropy(logits(model, x, loops=r), y))
                for r in range(1, task.loops + 1)}  # fmt: skip


def removal(task: EvalTask, sdi: np.ndarray, full_model: torch.nn.Module, fraction: float, draws: int,
            seed: int) -> dict[str, Any]:  # fmt: skip
    """Remove the most cancelling examples, the matched control or random ones; retrain; test loss and
    accuracy at every budget, and their changes from the full-data model."""
    n = sdi.shape[0]
    k = max(1, round(fraction * n))
    sets = app.cancelling_examples(sdi, k)
    full_loss, full_acc = _loss_curve(task, full_model), task.loop_curve(full_model, "test")

    def retrain(drop: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.from_numpy(np.asarray(drop, dtype=np.int64))] = False
        m = task.train(keep=keep)
        return _loss_curve(task, m), task.loop_curve(m, "test")

    curves = {"cancelling": retrain(sets["cancelling"]), "control": retrain(sets["control"])}
    rng = np.random.default_rng(seed)
    rand = [retrain(rng.choice(n, size=k, replace=False)) for _ in range(draws)]
    budgets = list(full_loss)
    curves["random"] = ({b: float(np.mean([r[0][b] for r in rand])) for b in budgets},
                        {b: float(np.mean([r[1][b] for r in rand])) for b in budgets})  # fmt: skip
    noisy = task.noisy_labels()
    return {
        "k": k, "full": {"loss": full_loss, "accuracy": full_acc},
        "removed": {"cancelling": sets["cancelling"].tolist(), "control": sets["control"].tolist()},
        "selection": {
            name: {"cancelled": float(sets["cancelled"][idx].mean()), "abs_tracin": float(sets["abs_tracin"][idx].mean()),
                   "ratio": float(sets["ratio"][idx].mean()),
                   "mislabeled": None if noisy is None else float(noisy[idx].mean())}
            for name, idx in (("cancelling", sets["cancelling"]), ("control", sets["control"]))
        } | {"training set": {"ratio": float(np.median(sets["ratio"])),
                              "mislabeled": None if noisy is None else float(noisy.mean())}},
        "curves": {g: {"loss": c[0], "accuracy": c[1]} for g, c in curves.items()},
        "delta_loss": {g: {b: c[0][b] - full_loss[b] for b in budgets} for g, c in curves.items()},
    }  # fmt: skip


def summarize(per_seed_pairs: list[dict[str, Any]], per_seed_removal: list[dict[str, Any]], n_boot: int,
              seed: int) -> dict[str, Any]:  # fmt: skip
    """Pooled over seeds: how often the flag is right (and the base rate), and the retraining comparison."""
    out: dict[str, Any] = {"pairs": {}, "removal": {}}
    for name in ("flagged", "unflagged"):
        rows = [p[name] for p in per_seed_pairs if p.get(name)]
        if not rows:
            out["pairs"][name] = None
            continue
        boot = TwoLevel([len(r["cancels"]) for r in rows], n_boot, seed)
        res: dict[str, Any] = {"n": int(sum(len(r["cancels"]) for r in rows))}
        for key in ("cancels", "opposite", "small_sum", "cancels_lenient", "tied_small", "predicted_cancels"):
            vals = [np.asarray(r[key], dtype=np.float64) for r in rows]
            res[key] = interval(float(np.mean([v.mean() for v in vals])), boot.mean_replicates(vals))
        for key in ("sign_agreement", "relative_error"):
            vals = [np.asarray(r[key], dtype=np.float64) for r in rows]

            def median_of(s: int, idx: np.ndarray, vals: list[np.ndarray] = vals) -> np.ndarray:
                return np.asarray(np.median(vals[s][idx], axis=1))

            res[key] = interval(float(np.mean([np.median(v) for v in vals])), boot.replicates(median_of))
        out["pairs"][name] = res
    out["pairs"]["flagged_share_of_pairs"] = float(
        np.mean([p["flagged_total"] / p["pairs_total"] for p in per_seed_pairs])
    )
    budgets = list(per_seed_removal[0]["delta_loss"]["cancelling"])
    full, mid = budgets[-1], budgets[1:-1]
    for g in ("cancelling", "control", "random"):
        d = [r["delta_loss"][g] for r in per_seed_removal]
        out["removal"][g] = {
            "delta_loss": {b: seed_interval([x[b] for x in d], n_boot, seed) for b in budgets},
            "intermediate_abs": seed_interval([float(np.mean([abs(x[b]) for b in mid])) for x in d], n_boot, seed),
            "full_abs": seed_interval([abs(x[full]) for x in d], n_boot, seed),
        }
    for other in ("control", "random"):
        a = [r["delta_loss"]["cancelling"] for r in per_seed_removal]
        c = [r["delta_loss"][other] for r in per_seed_removal]
        out["removal"][f"cancelling-{other}"] = {
            "intermediate_abs": seed_interval([float(np.mean([abs(x[b]) for b in mid]) - np.mean([abs(y[b]) for b in mid]))
                                               for x, y in zip(a, c, strict=True)], n_boot, seed),
            "full_abs": seed_interval([abs(x[full]) - abs(y[full]) for x, y in zip(a, c, strict=True)], n_boot, seed),
        }  # fmt: skip
    out["removal"]["budgets"] = {"intermediate": mid, "full": full}
    out["removal"]["k"] = per_seed_removal[0]["k"]
    out["removal"]["selection"] = {  # what the removed sets are, averaged over seeds
        name: {key: float(np.mean([r["selection"][name][key] for r in per_seed_removal]))
               for key in per_seed_removal[0]["selection"][name] if per_seed_removal[0]["selection"][name][key] is not None}
        for name in per_seed_removal[0]["selection"]
    }  # fmt: skip
    return out

"""The curvature comparison of ``looptrace eval`` (issue #24): which curvature-aware estimator predicts
retraining best, against plain TracIn and kronfluence's EK-FAC, on the same retrained subsets.

The estimators are registered methods (:mod:`looptrace.apps.evaluation.methods`: groups ``curvature``,
``damping sweep`` and ``fisher``; each is ``lt.attribute(precondition=...)``, the one code path for their
scores), so their LDS is computed with everyone else's by :func:`~looptrace.apps.evaluation.harness.run_lds`.
This module reads that table:

* :func:`compare`: the best curvature-aware estimator (highest mean LDS), its paired per-query differences with
  TracIn and with kronfluence's EK-FAC, the issue's "Done when" comparison as explicit fields, the same
  comparison for ``lt.attribute``'s defaults, the damping sweep and the Fisher as tables. Choosing the best of
  many configurations on the subsets it is scored on is optimistic, so the estimator is also chosen on the
  first half of the subsets alone and compared on the second half.
* :func:`preconditioner`: the chosen estimator's geometry at the final checkpoint, for the preconditioned
  per-step counterfactual (:func:`~looptrace.apps.evaluation.harness.run_counterfactual`).
* :func:`summarize`: both tasks' comparisons in one JSON (``python -m looptrace.apps.evaluation.curvature
  --summary docs/results/eval/curvature-summary.json RESULTS.json ...``), from which the write-ups and the
  "which estimator" guide's table are rendered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import looptrace as lt
from looptrace.apps.evaluation.methods import (
    CURVATURE,
    CURVATURE_SPECS,
    DAMPING_SCALES,
    VARIANTS,
    _loader,
    curvature_key,
    sampled_loss,
)
from looptrace.apps.evaluation.task import EvalTask
from looptrace.curvature import DAMPING_SCALE, fit_curvature, gauss_newton
from looptrace.curvature.query import GN_DAMPING_SCALE
from looptrace.evaluation import bootstrap_ci
from looptrace.io import atomic_write_json

#: The peer's EK-FAC: the better of its two losses (as trained, full BPTT) is the one to reach.
PEER_EKFAC = ("kronfluence_ekfac", "kronfluence_ekfac_full")
#: ``lt.attribute(precondition=kind)`` with every default: the configuration a user gets.
DEFAULTS = {kind: curvature_key(kind) for kind in CURVATURE}
#: The estimators of the pooled comparison that get a verdict word (:func:`pooled`).
POOLED_NAMES = (
    "chosen",
    "chosen_whole",
    *(f"default {k}" for k in DEFAULTS),
    *(f"default {k} whole" for k in DEFAULTS),
)


def _row(methods: dict[str, Any], key: str) -> dict[str, Any]:
    m = methods[key]
    return {"key": key, "label": m["label"], "mean": m["mean"], "lo": m["lo"], "hi": m["hi"],
            "first_half": m["first_half"], "second_half": m["second_half"]}  # fmt: skip


def _paired(
    methods: dict[str, Any], a: str, b: str, n_boot: int, seed: int, field: str = "per_query"
) -> dict[str, Any]:
    diff = np.asarray(methods[a][field]) - np.asarray(methods[b][field])
    return {"a": a, "b": b, **bootstrap_ci(diff, n_boot=n_boot, seed=seed), "a_higher_queries": int((diff > 0).sum())}


def _best(methods: dict[str, Any], keys: list[str], field: str = "mean") -> str:
    return min(keys, key=lambda k: (-methods[k][field], k))  # ties by name: independent of the JSON's order


def compare(lds: dict[str, Any], n_boot: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """The curvature comparison from the LDS section of results.json (``None`` if no curvature method ran)."""
    methods = lds["methods"]
    cands = [k for k in methods if k in CURVATURE_SPECS and not CURVATURE_SPECS[k].outside]
    if not cands:
        return None
    best = _best(methods, cands)
    peers = [k for k in PEER_EKFAC if k in methods]
    peer = _best(methods, peers) if peers else None
    tracin = "tracin" if "tracin" in methods else None
    refs = {"tracin": None if tracin is None else _row(methods, tracin),
            "kronfluence_ekfac": None if peer is None else _row(methods, peer)}  # fmt: skip

    def reaches(key: str, field: str = "mean") -> dict[str, bool | None]:
        ge_t = None if tracin is None else bool(methods[key][field] >= methods[tracin][field])
        ge_p = None if peer is None else bool(methods[key][field] >= methods[peer][field])
        both = None if ge_t is None or ge_p is None else bool(ge_t and ge_p)
        return {"ge_tracin": ge_t, "ge_kronfluence_ekfac": ge_p, "holds": both}

    paired = {}
    for name, ref in (("tracin", tracin), ("kronfluence_ekfac", peer)):
        if ref is not None:
            paired[name] = _paired(methods, best, ref, n_boot, seed)
    chosen = _best(methods, cands, "first_half")
    split: dict[str, Any] = {
        "what": "the best curvature-aware estimator chosen on the first half of the subsets, its LDS on the second half",
        "chosen": _row(methods, chosen), **reaches(chosen, "second_half"),
        "paired_second_half": {name: _paired(methods, chosen, ref, n_boot, seed, "second_half_per_query")
                               for name, ref in (("tracin", tracin), ("kronfluence_ekfac", peer)) if ref is not None},
    }  # fmt: skip
    defaults = {}
    for kind, key in DEFAULTS.items():
        if key in methods:
            defaults[kind] = {**_row(methods, key), **reaches(key),
                              "paired": {name: _paired(methods, key, ref, n_boot, seed) for name, ref in
                                         (("tracin", tracin), ("kronfluence_ekfac", peer)) if ref is not None}}  # fmt: skip
    fixed = [k for k in cands if methods[k].get("group") == "curvature"]  # the issue's set: default damping
    default_damping: dict[str, Any] | None = None
    if fixed:
        b = _best(methods, fixed)
        default_damping = {
            "what": "the same comparison over the issue's candidates only (kfac / ekfac / gauss-newton, all checkpoints "
            "or the final one, as trained or full BPTT) at lt.attribute's default damping and Fisher",
            "n_candidates": len(fixed), "best": _row(methods, b), **reaches(b),
            "paired": {name: _paired(methods, b, ref, n_boot, seed)
                       for name, ref in (("tracin", tracin), ("kronfluence_ekfac", peer)) if ref is not None},
        }  # fmt: skip
    return {
        "n_candidates": len(cands),
        "candidates": "every scored method of the groups curvature, damping sweep and fisher",
        "best": {**_row(methods, best), "spec": dataclasses.asdict(CURVATURE_SPECS[best])},
        "references": refs,
        "paired": paired,
        "done_when": {
            **reaches(best),
            "what": "the best curvature-aware step-resolved estimator's mean LDS >= "
            "kronfluence EK-FAC's (the better of its two losses) and >= plain TracIn's, same subsets",
        },
        "split_half": split,
        "default_damping": default_damping,
        "defaults": defaults,
        "sweep": sweep_table(methods),
        "fisher": fisher_table(methods),
        "whole_model": whole_model(methods, peer, n_boot, seed),
    }


def whole_model(methods: dict[str, Any], peer: str | None, n_boot: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """The estimators that also score the parameters outside the loop (``lt.attribute(outside=True).total``, as
    kronfluence does when it tracks every layer) against the same references: the best of them, and each
    preconditioner at ``lt.attribute``'s defaults (all checkpoints, as trained), each against plain TracIn, TracIn of
    the whole model and kronfluence's EK-FAC (``None`` if none of them ran)."""
    keys = [k for k in methods if k in CURVATURE_SPECS and CURVATURE_SPECS[k].outside]
    if not keys:
        return None
    refs = {"tracin": "tracin" if "tracin" in methods else None,
            "tracin_whole": "tracin_whole" if "tracin_whole" in methods else None, "kronfluence_ekfac": peer}  # fmt: skip

    def entry(key: str) -> dict[str, Any]:
        out: dict[str, Any] = _row(methods, key)
        for name, ref in refs.items():
            out[f"ge_{name}"] = None if ref is None else bool(methods[key]["mean"] >= methods[ref]["mean"])
        out["holds"] = (
            None if peer is None or refs["tracin"] is None else bool(out["ge_tracin"] and out["ge_kronfluence_ekfac"])
        )
        out["paired"] = {
            name: _paired(methods, key, ref, n_boot, seed) for name, ref in refs.items() if ref is not None
        }
        return out

    best = _best(methods, keys)
    return {
        "what": "the body's step-resolved scores plus the parameters outside the loop (read-in, read-out) on their own "
        "preconditioner block: lt.attribute(precondition=..., outside=True).total",
        "n_candidates": len(keys), "best": {**entry(best), "spec": dataclasses.asdict(CURVATURE_SPECS[best])},
        "references": {name: None if ref is None else _row(methods, ref) for name, ref in refs.items()},
        "defaults": {kind: entry(curvature_key(kind, outside=True)) for kind in CURVATURE
                     if curvature_key(kind, outside=True) in methods},
    }  # fmt: skip


def removal_summary(removal: dict[str, Any], best: str, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The best curvature-aware estimator in the removal test at the largest k: its query-loss rise, TracIn's,
    kronfluence EK-FAC's (if run) and random removal's, and its paired per-query differences with each."""
    at = removal["at_largest_k"]

    def row(key: str) -> dict[str, Any]:
        li = at[key]["loss_increase"]
        return {"key": key, "label": at[key]["label"], "mean": li["mean"], "lo": li["lo"], "hi": li["hi"],
                "prediction_flips": at[key]["prediction_flips"]}  # fmt: skip

    refs = {"tracin": "tracin" if "tracin" in at else None, "random": "random",
            "kronfluence_ekfac": next((k for k in PEER_EKFAC if k in at), None)}  # fmt: skip
    paired = {}
    for name, ref in refs.items():
        if ref is not None:
            diff = np.asarray(at[best]["per_query"]) - np.asarray(at[ref]["per_query"])
            paired[name] = {"a": best, "b": ref, **bootstrap_ci(diff, n_boot=n_boot, seed=seed),
                            "a_higher_queries": int((diff > 0).sum())}  # fmt: skip
    return {"k": at[best]["k"], "queries": len(removal["queries"]), "best": row(best),
            "references": {name: None if ref is None else row(ref) for name, ref in refs.items()},
            "paired": paired}  # fmt: skip


def sweep_table(methods: dict[str, Any]) -> dict[str, Any]:
    """Mean LDS per estimator and variant over the damping scales (0.1 is the default entry)."""
    out: dict[str, Any] = {}
    for kind, name in CURVATURE.items():
        for suffix, what, _, _ in VARIANTS:
            keys = {f"{s:g}": curvature_key(kind, suffix, s) for s in DAMPING_SCALES}
            keys[f"{DAMPING_SCALE:g}"] = curvature_key(kind, suffix)
            row = {s: methods[k]["mean"] for s, k in sorted(keys.items(), key=lambda kv: float(kv[0])) if k in methods}
            if row:
                best = max(row, key=lambda s: row[s])
                out[curvature_key(kind, suffix)] = {"label": f"{name}, {what}", "by_scale": row, "best_scale": best}
    return out


def fisher_table(methods: dict[str, Any]) -> dict[str, Any]:
    """Mean LDS with the empirical and the true Fisher, per K-FAC / EK-FAC variant."""
    out: dict[str, Any] = {}
    for kind in ("kfac", "ekfac"):
        for suffix, what, _, _ in VARIANTS:
            emp, true = curvature_key(kind, suffix), curvature_key(kind, suffix, fisher="true")
            if emp in methods and true in methods:
                out[emp] = {"label": f"{CURVATURE[kind]}, {what}", "empirical": methods[emp]["mean"],
                            "true": methods[true]["mean"]}  # fmt: skip
    return out


def preconditioner(key: str) -> Callable[[EvalTask, nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
    """The geometry of curvature method ``key`` at the weights of ``model`` (the final checkpoint, float64), fitted
    on the training set with every loop step backpropagated (the counterfactual's loss): ``P^-1`` on flat body
    gradients. Its kind, damping scale and Fisher are the method's."""
    spec = CURVATURE_SPECS[key]

    def build(task: EvalTask, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        train = _loader(*task.data()["train"])
        core = task.step_module(model)
        if spec.kind == "gauss-newton":
            phi = lt.featurize(model, train, task.full_bptt_loss, step_module=core, sketch=lt.SketchSpec.exact(),
                               per_step=False, verify=False).total.double()  # fmt: skip
            gn_scale = GN_DAMPING_SCALE if spec.scale is None else spec.scale
            return lambda g: gauss_newton(phi, g, None, gn_scale)
        fisher_loss = sampled_loss(task, full=True) if spec.fisher == "true" else None
        curv = fit_curvature(model, train, task.full_bptt_loss, step_module=core, kinds=(spec.kind,),
                             fisher_loss=fisher_loss, verify=False)  # fmt: skip
        scale = DAMPING_SCALE if spec.scale is None else spec.scale
        return lambda g: curv.precondition(g, spec.kind, None, scale)  # type: ignore[arg-type]

    return build


def replicate(primary: dict[str, Any], other: dict[str, Any], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The estimator chosen on the primary run (its best curvature-aware one) on another task seed's run: its
    LDS beside TracIn's and kronfluence EK-FAC's there, paired, and whether the "Done when" holds there too
    (a choice made on one seed, checked on data and initialisations it never saw)."""
    key = primary["curvature"]["best"]["key"]
    methods = other["lds"]["methods"]
    c = other["curvature"]
    peer = None if c["references"]["kronfluence_ekfac"] is None else c["references"]["kronfluence_ekfac"]["key"]
    row = {"task_seed": other["task"]["seed"], "key": key, "mean": methods[key]["mean"], "lo": methods[key]["lo"],
           "hi": methods[key]["hi"], "tracin": methods["tracin"]["mean"],
           "kronfluence_ekfac": None if peer is None else methods[peer]["mean"],
           "own_best": c["best"]["key"], "own_best_mean": c["best"]["mean"],
           "paired": {name: _paired(methods, key, ref, n_boot, seed)
                      for name, ref in (("tracin", "tracin"), ("kronfluence_ekfac", peer)) if ref is not None}}  # fmt: skip
    row["ge_tracin"] = bool(row["mean"] >= row["tracin"])
    row["ge_kronfluence_ekfac"] = None if peer is None else bool(row["mean"] >= row["kronfluence_ekfac"])
    row["holds"] = None if peer is None else bool(row["ge_tracin"] and row["ge_kronfluence_ekfac"])
    row["own_done_when"] = c["done_when"]["holds"]  # that seed's own best against both, chosen on that seed
    row["own_default_damping"] = (c.get("default_damping") or {}).get("holds")
    return row


def replicate_whole(primary: dict[str, Any], other: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`replicate` for the whole-model estimators: the one chosen on the primary run, and each preconditioner
    at its defaults, on another task seed's run (``None`` where either run has none)."""
    pw, ow = primary["curvature"].get("whole_model"), other["curvature"].get("whole_model")
    if pw is None or ow is None:
        return None
    methods = other["lds"]["methods"]
    key = pw["best"]["key"]
    peer = ow["references"]["kronfluence_ekfac"]
    if key not in methods or "tracin" not in methods:
        return None
    row: dict[str, Any] = {"task_seed": other["task"]["seed"], "key": key, "mean": methods[key]["mean"],
                           "tracin": methods["tracin"]["mean"],
                           "kronfluence_ekfac": None if peer is None else peer["mean"],
                           "own_best": ow["best"]["key"], "own_best_mean": ow["best"]["mean"],
                           "own_holds": ow["best"]["holds"],
                           "defaults": {k: v["holds"] for k, v in ow["defaults"].items()}}  # fmt: skip
    row["holds"] = None if peer is None else bool(row["mean"] >= row["tracin"] and row["mean"] >= peer["mean"])
    return row


def _interval(ci: dict[str, Any]) -> str:
    return "higher than" if ci["lo"] > 0 else "lower than" if ci["hi"] < 0 else "not distinguishable from"


def pooled(runs: list[dict[str, Any]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """The comparison over every task seed at once: each estimator's per-query LDS of all runs pooled (the seeds'
    queries are distinct inputs of independent data and trainings), its mean with a bootstrap interval, and its
    paired differences with plain TracIn and with kronfluence EK-FAC (per run the better of its two losses, as
    in :func:`compare`) over the pooled queries. One seed's 60 queries leave intervals of about +-0.03, the size of
    the differences between the good estimators here; pooling the seeds narrows them by sqrt(seeds).

    The estimators: the primary run's choices (the best body-only and the best whole-model one, chosen on seed 0
    and fixed before the other seeds are read) and every default of ``lt.attribute`` (body only and with
    ``outside=True``). ``None`` when a run lacks the peer or one of them."""
    primary = runs[0]["curvature"]
    keys = {"chosen": primary["best"]["key"]}
    if primary.get("whole_model"):
        keys["chosen_whole"] = primary["whole_model"]["best"]["key"]
    for kind, key in DEFAULTS.items():
        keys[f"default {kind}"] = key
        keys[f"default {kind} whole"] = curvature_key(kind, outside=True)
    keys["tracin_whole"] = "tracin_whole"
    peers = []
    for r in runs:
        ref = r["curvature"]["references"]["kronfluence_ekfac"]
        if ref is None or "tracin" not in r["lds"]["methods"]:
            return None
        peers.append(ref["key"])
    keys = {name: key for name, key in keys.items() if all(key in r["lds"]["methods"] for r in runs)}

    def per_query(run_keys: list[str]) -> np.ndarray:
        """The runs' per-query LDS, run i's of method ``run_keys[i]``, one after another."""
        return np.concatenate(
            [np.asarray(r["lds"]["methods"][k]["per_query"]) for r, k in zip(runs, run_keys, strict=True)]
        )

    tracin = per_query(["tracin"] * len(runs))
    peer = per_query(peers)
    out: dict[str, Any] = {
        "seeds": [r["task"]["seed"] for r in runs], "queries": int(tracin.size),
        "tracin": bootstrap_ci(tracin, n_boot=n_boot, seed=seed),
        "kronfluence_ekfac": {**bootstrap_ci(peer, n_boot=n_boot, seed=seed), "keys": peers},
        "estimators": {},
        # how far one seed's comparison resolves: the half-width of each run's paired interval of its best estimator
        # against kronfluence EK-FAC, the median over the runs
        "one_seed_half_width": float(np.median([(r["curvature"]["paired"]["kronfluence_ekfac"]["hi"] -
                                                 r["curvature"]["paired"]["kronfluence_ekfac"]["lo"]) / 2 for r in runs])),
    }  # fmt: skip
    for name, key in keys.items():
        v = per_query([key] * len(runs))
        row: dict[str, Any] = {"key": key, "label": runs[0]["lds"]["methods"][key]["label"],
                               **bootstrap_ci(v, n_boot=n_boot, seed=seed), "paired": {}}  # fmt: skip
        for ref_name, ref in (("tracin", tracin), ("kronfluence_ekfac", peer)):
            diff = v - ref
            ci = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
            row["paired"][ref_name] = {**ci, "a_higher_queries": int((diff > 0).sum()), "word": _interval(ci)}
        row["ge_tracin"] = bool(row["mean"] >= out["tracin"]["mean"])
        row["ge_kronfluence_ekfac"] = bool(row["mean"] >= out["kronfluence_ekfac"]["mean"])
        row["holds"] = bool(row["ge_tracin"] and row["ge_kronfluence_ekfac"])
        out["estimators"][name] = row
    return out


#: ``lt.attribute``'s defaults scored on configurations never used to choose anything: what each is called there.
UNSEEN_ESTIMATORS = {
    "none": "tracin",
    "adam": "tracin_adam",
    **{kind: key for kind, key in DEFAULTS.items()},
    **{f"{kind} whole": curvature_key(kind, outside=True) for kind in DEFAULTS},
}


def _changed(task: dict[str, Any]) -> str:
    """The fields where a run's task differs from its class's defaults (the seed included), in words."""
    from looptrace.apps.evaluation.task import TASKS

    base = dataclasses.asdict(TASKS[task["name"]]())
    diff = [f"{k} {task[k]}" for k in sorted(task) if k in base and task[k] != base[k] and k != "budgets"]
    return ", ".join(diff) or "the defaults"


def unseen(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``lt.attribute``'s defaults on task configurations that chose nothing (other widths, depths, truncations,
    vocabularies, seeds), beside kronfluence EK-FAC (the better of its two losses) and plain TracIn: each run's
    mean LDS per estimator and, over the runs, the mean of those means, which is the comparison the issue's hidden
    check makes. ``None`` without runs."""
    if not runs:
        return None
    rows = []
    for r in runs:
        m = r["lds"]["methods"]
        ref = r["curvature"]["references"]["kronfluence_ekfac"]
        rows.append({"task": r["task"]["name"], "config": _changed(r["task"]), "subsets": r["lds"]["subsets"],
                     "queries": r["lds"]["queries"],
                     "kronfluence_ekfac": None if ref is None else ref["mean"],
                     "estimators": {name: m[key]["mean"] for name, key in UNSEEN_ESTIMATORS.items() if key in m}})  # fmt: skip
    names = [n for n in UNSEEN_ESTIMATORS if all(n in row["estimators"] for row in rows)]
    peer = [row["kronfluence_ekfac"] for row in rows]
    peer_mean = None if None in peer else float(np.mean(peer))
    mean = {n: float(np.mean([row["estimators"][n] for row in rows])) for n in names}
    return {
        "runs": rows,
        "n_runs": len(rows),
        "mean": mean,
        "kronfluence_ekfac_mean": peer_mean,
        "ge_kronfluence_ekfac": {n: None if peer_mean is None else bool(v >= peer_mean) for n, v in mean.items()},
        "vs_kronfluence_ekfac": {n: _word(v, peer_mean) for n, v in mean.items()},
        "ge_tracin": {n: bool(v >= mean["none"]) for n, v in mean.items()} if "none" in mean else {},
        "runs_ge_kronfluence_ekfac": {n: sum(_reaches(row, n) for row in rows) for n in names},
    }


def _word(value: float, peer: float | None) -> str | None:
    return None if peer is None else "at least" if value >= peer else "below"


def _reaches(row: dict[str, Any], name: str) -> bool:
    peer = row["kronfluence_ekfac"]
    return peer is not None and row["estimators"][name] >= peer


def summarize(
    results: dict[str, dict[str, Any]],
    replicas: dict[str, list[dict[str, Any]]] | None = None,
    unseen_runs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Both tasks' curvature comparisons side by side, and the "Done when" over all of them (every verdict a field
    computed here from the numbers). ``replicas``: per task, runs on other task seeds, where the estimator
    chosen on the primary run is checked again (:func:`replicate`)."""
    tasks: dict[str, Any] = {}
    for name, r in results.items():
        c = r["curvature"]
        m = r["lds"]["methods"]
        reps = [replicate(r, o) for o in (replicas or {}).get(name, [])]
        whole = c.get("whole_model")
        # a replicate without the whole-model estimators counts as unknown (None), never as a seed left out
        whole_rows = [replicate_whole(r, o) for o in (replicas or {}).get(name, [])]
        whole_reps = [x for x in whole_rows if x is not None]
        whole_holds = [None if whole is None else whole["best"]["holds"],
                       *(None if x is None else x["holds"] for x in whole_rows)]  # fmt: skip
        whole_defaults = {
            kind: [v["holds"], *(None if x is None else x["defaults"].get(kind) for x in whole_rows)]
            for kind, v in (whole or {}).get("defaults", {}).items()
        }
        holds = [x["holds"] for x in reps]
        own = [c["done_when"]["holds"], *(x["own_done_when"] for x in reps)]  # each seed's own best against both
        own_dd = [(c.get("default_damping") or {}).get("holds"), *(x["own_default_damping"] for x in reps)]
        tasks[name] = {
            "description": r["task"]["description"], "task_seed": r["task"]["seed"], "subsets": r["lds"]["subsets"],
            "queries": r["lds"]["queries"], "n_candidates": c["n_candidates"], "train_seconds": r["train_seconds"],
            "seconds": r["seconds"],
            "best": c["best"], "references": c["references"], "paired": c["paired"], "done_when": c["done_when"],
            "default_damping": c.get("default_damping"),
            "split_half": c["split_half"], "defaults": c["defaults"], "sweep": c["sweep"], "fisher": c["fisher"],
            "table": {k: {"label": v["label"], "mean": v["mean"], "lo": v["lo"], "hi": v["hi"], "group": v["group"]}
                      for k, v in m.items()},
            "tied_body_finding": (r.get("peers") or {}).get("tied_body_finding"),
            "peer": {k: v for k, v in (r.get("peers") or {}).items() if k != "tied_body_finding"},
            "removal": c.get("removal"),
            "counterfactual": c.get("counterfactual"),
            "plain_counterfactual": r.get("step_counterfactual"),
            "verdicts": r["verdicts"].get("curvature"),
            "whole_model": whole,
            "whole_model_replication": None if whole is None else {
                "seeds": [x["task_seed"] for x in whole_reps], "per_seed": whole_reps, "n_seeds": len(whole_holds),
                "holds_seeds": sum(bool(h) for h in whole_holds),
                "holds_every_seed": None if None in whole_holds else all(whole_holds),
                "defaults_seeds": {k: sum(bool(h) for h in v) for k, v in whole_defaults.items()},
                "defaults_every_seed": {k: None if None in v else all(v) for k, v in whole_defaults.items()},
            },
            "pooled": pooled([r, *(replicas or {}).get(name, [])]),
            "replication": {"seeds": [x["task_seed"] for x in reps], "per_seed": reps,
                            "holds_every_seed": None if not reps or None in holds else all(holds),
                            "holds_seeds": sum(bool(h) for h in holds),
                            "n_seeds": len(own), "own_done_when_seeds": sum(bool(h) for h in own),
                            "own_done_when_every_seed": None if None in own else all(own),
                            "own_default_damping_seeds": sum(bool(h) for h in own_dd),
                            "own_default_damping_every_seed": None if None in own_dd else all(own_dd)},
        }  # fmt: skip

    def every(path: tuple[str, ...]) -> bool | None:
        vals = []
        for t in tasks.values():
            v: Any = t
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            vals.append(v)
        return None if any(v is None for v in vals) else all(vals)

    def word(path: tuple[str, ...]) -> str:
        """Where a flag holds, in words: on every task, on none, or on the named ones only."""
        flags = {}
        for name, t in tasks.items():
            v: Any = t
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            flags[name] = v
        if any(v is None for v in flags.values()):
            missing = [n for n, v in flags.items() if v is None]
            return f"cannot be checked on {', '.join(missing)}"
        yes = [n for n, v in flags.items() if v]
        return ("holds on every task" if len(yes) == len(flags) else "holds on no task" if not yes else
                f"holds on {', '.join(yes)} only")  # fmt: skip

    return {
        "tasks": tasks,
        "unseen": unseen(unseen_runs or []),
        "words": {
            "done_when": word(("done_when", "holds")),
            "split_half": word(("split_half", "holds")),
            "replicated": word(("replication", "holds_every_seed")),
            "done_when_every_seed": word(("replication", "own_done_when_every_seed")),
            "default_damping": word(("default_damping", "holds")),
            "default_damping_every_seed": word(("replication", "own_default_damping_every_seed")),
            "tied_body": word(("tied_body_finding", "equals_last_step_train_gradient")),
            "whole_model": word(("whole_model", "best", "holds")),
            "whole_model_every_seed": word(("whole_model_replication", "holds_every_seed")),
            "whole_model_defaults": {k: word(("whole_model_replication", "defaults_every_seed", k)) for k in DEFAULTS},
            "defaults": {k: word(("defaults", k, "holds")) for k in DEFAULTS},
            "pooled": {name: word(("pooled", "estimators", name, "holds")) for name in POOLED_NAMES},
        },
        "done_when_on_every_task": every(("done_when", "holds")),
        "split_half_on_every_task": every(("split_half", "holds")),
        "replicated_on_every_task": every(("replication", "holds_every_seed")),
        "defaults_on_every_task": {k: every(("defaults", k, "holds")) for k in DEFAULTS},
        "tied_body_finding_on_every_task": every(("tied_body_finding", "equals_last_step_train_gradient")),
        "whole_model_on_every_task_and_seed": every(("whole_model_replication", "holds_every_seed")),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="both tasks' curvature comparisons in one JSON")
    p.add_argument("--summary", required=True, help="output JSON (e.g. docs/results/eval/curvature-summary.json)")
    p.add_argument(
        "results",
        nargs="+",
        help="results.json of each task's `looptrace eval curvature` run; per task "
        "the first is the primary run, later ones (other task seeds) replicate its choice",
    )
    p.add_argument(
        "--unseen",
        nargs="*",
        default=[],
        help="results.json of runs on task configurations that chose nothing (`looptrace.apps.evaluation.curvature"
        "` reports lt.attribute's defaults there against the peers)",
    )
    args = p.parse_args(argv)
    runs = [json.loads(Path(f).read_text()) for f in args.results]
    primary: dict[str, dict[str, Any]] = {}
    replicas: dict[str, list[dict[str, Any]]] = {}
    for r in runs:  # per task: the first run given is the primary, the others its replicates on other seeds
        name = r["task"]["name"]
        if name in primary:
            replicas.setdefault(name, []).append(r)
        else:
            primary[name] = r
    summary = summarize(primary, replicas, [json.loads(Path(f).read_text()) for f in args.unseen])
    atomic_write_json(summary, Path(args.summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "tasks"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

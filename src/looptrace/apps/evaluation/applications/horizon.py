"""Application (i): the influence horizon as a test-time compute rule, checked against re-running the loop.

Per trained model (:class:`QueryRun`), every query is read at every loop step 1..T (T: the analysis horizon
tau): its outcome, prediction and confidence, and its SDI energy curve computed twice, with the true label
and with the model's own prediction at step T as the target (what a user has at test time). From these
:func:`analyze` measures, with intervals over queries and training seeds (:class:`~.stats.TwoLevel`):

* the rank correlation of each query's horizon with the budget it actually needs
  (:func:`looptrace.analysis.applications.needed_budgets`), beside the same correlation for the stopping
  steps of the baselines;
* accuracy against mean loops per query for fixed budgets, the horizon rules (a fraction of the energy's
  peak, or a share of its total, each swept over its parameter), the baselines (stop when the prediction
  has not changed for k steps; stop at a confidence threshold) and the oracle (the needed budget, which
  needs the label); the loops each family needs to come within ``tol`` of the best fixed budget's
  accuracy, and paired differences of those;
* the population version: the horizon of the median energy curve against the budget where the evaluation
  set's accuracy saturates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from looptrace.analysis import applications as app
from looptrace.apps.evaluation.applications.stats import TwoLevel, interval


@dataclasses.dataclass
class QueryRun:
    """One trained model on its queries, read at every loop step 1..T (T = the analysis horizon).

    ``score`` ``[T, M]``: 1/0 (right) or the share of a board's blank cells that are right; ``predictions``
    ``[T, M, ...]``; ``confidence`` ``[T, M]``: the top softmax probability (its minimum over a board's
    blank cells); ``energy``: ``{"label", "pseudo"}`` -> ``[M, T]`` SDI energy with the true label / the
    model's prediction at step T as the target; ``population``: budget (str) -> accuracy on the
    evaluation set; ``seconds``: timings of what a test-time rule would cost per query."""

    score: np.ndarray
    predictions: np.ndarray
    confidence: np.ndarray
    energy: dict[str, np.ndarray]
    population: dict[str, float]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.score.shape[0])


@dataclasses.dataclass(frozen=True)
class HorizonConfig:
    """The parameters each rule is swept over, and the tolerances."""

    fracs: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)
    shares: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    stable_ks: tuple[int, ...] = (1, 2, 3, 4, 6)
    confidences: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
    default_frac: float = 0.05  # the library's default: the one a user would take without tuning
    default_share: float = 0.9
    default_k: int = 2
    default_confidence: float = 0.9
    tol: float = 0.005  # within this of the best fixed budget's accuracy counts as "as accurate"
    n_boot: int = 2000
    seed: int = 0


#: Rule families, in figure order: key -> (label, parameter name).
FAMILIES: dict[str, tuple[str, str]] = {
    "fixed": ("fixed budget", "budget"),
    "horizon_peak": ("horizon: energy below a fraction of its peak (no label)", "fraction"),
    "horizon_share": ("horizon: a share of the energy reached (no label)", "share"),
    "stable": ("baseline: prediction unchanged for k steps", "k"),
    "confident": ("baseline: confidence threshold", "threshold"),
    "oracle": ("needed budget (oracle: uses the label)", "-"),
}


def rule_stops(run: QueryRun, family: str, param: Any, needed: np.ndarray) -> np.ndarray:
    """``[M]`` stopping steps (1..T) of one rule on one run."""
    t = run.steps
    if family == "fixed":
        return np.full(run.score.shape[1], int(param))
    if family == "horizon_peak":
        h = app.influence_horizons(run.energy["pseudo"], float(param))
    elif family == "horizon_share":
        h = app.cumulative_horizons(run.energy["pseudo"], float(param))
    elif family == "stable":
        h = app.stop_when_stable(run.predictions, int(param))
    elif family == "confident":
        h = app.stop_when_confident(run.confidence, float(param))
    elif family == "oracle":
        h = np.where(needed > 0, needed, 1)  # never right: no budget helps, so the oracle spends one loop
    else:
        raise KeyError(family)
    return np.clip(h, 1, t)


def _params(family: str, cfg: HorizonConfig, steps: int) -> list[Any]:
    table: dict[str, list[Any]] = {"fixed": list(range(1, steps + 1)), "horizon_peak": list(cfg.fracs), "horizon_share": list(cfg.shares),
            "stable": list(cfg.stable_ks), "confident": list(cfg.confidences), "oracle": [None]}  # fmt: skip
    return table[family]


def int_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho along the last axis of two integer arrays with small non-negative values (average
    ranks for ties; 0 where either side is constant). Vectorised over the leading axes: the bootstrap
    ranks thousands of resamples at once."""
    x, y = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
    top = int(max(x.max(initial=0), y.max(initial=0))) + 1

    def ranks(v: np.ndarray) -> np.ndarray:
        counts = (v[..., None] == np.arange(top)).sum(-2)  # [..., top]
        below = np.cumsum(counts, -1) - counts
        avg = below + (counts + 1) / 2.0
        return np.take_along_axis(avg, v, -1)

    rx, ry = ranks(x), ranks(y)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1.0), 0.0)


def _rank_correlation(pred: Sequence[np.ndarray], needed: Sequence[np.ndarray], cfg: HorizonConfig) -> dict[str, Any]:
    """Mean over seeds of Spearman(pred, needed) over the queries that are ever right, with an interval
    over queries and seeds."""
    valid = [n > 0 for n in needed]
    p = [np.asarray(a)[v] for a, v in zip(pred, valid, strict=True)]
    n = [np.asarray(a)[v] for a, v in zip(needed, valid, strict=True)]
    per_seed = [float(int_spearman(a, b)) for a, b in zip(p, n, strict=True)]
    boot = TwoLevel([len(a) for a in p], cfg.n_boot, cfg.seed + 1)
    reps = boot.replicates(lambda s, idx: int_spearman(p[s][idx], n[s][idx]))
    return {**interval(float(np.mean(per_seed)), reps), "per_seed": per_seed, "queries": [len(a) for a in p]}


def _interp_rows(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Row-wise linear interpolation: ``x`` ``[B]``, ``xp`` ``[K]`` increasing, ``fp`` ``[K, B]`` -> ``[B]``."""
    x = np.clip(x, xp[0], xp[-1])
    hi = np.clip(np.searchsorted(xp, x, side="left"), 1, len(xp) - 1)
    lo = hi - 1
    w = (x - xp[lo]) / (xp[hi] - xp[lo])
    cols = np.arange(len(x))
    return fp[lo, cols] * (1 - w) + fp[hi, cols] * w


def _loops_to_target(loops: np.ndarray, acc: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per replicate (columns), the mean loops at which a family's curve (points as rows, in increasing
    loops by their point estimate) first reaches ``target``, interpolating linearly; NaN if it never does."""
    out = np.full(loops.shape[1], np.nan)
    for b in range(loops.shape[1]):
        ok = np.nonzero(acc[:, b] >= target[b])[0]
        if ok.size == 0:
            continue
        p = ok[0]
        if p == 0:
            out[b] = loops[0, b]
            continue
        a0, a1, l0, l1 = acc[p - 1, b], acc[p, b], loops[p - 1, b], loops[p, b]
        out[b] = l0 + (target[b] - a0) / (a1 - a0) * (l1 - l0) if a1 != a0 else l1
    return out


def analyze(runs: Sequence[QueryRun], cfg: HorizonConfig) -> dict[str, Any]:
    """The comparison of application (i) over the runs (one per training seed)."""
    steps = runs[0].steps
    budgets = list(range(1, steps + 1))
    needed = [app.needed_budgets(r.score, budgets) for r in runs]
    boot = TwoLevel([r.score.shape[1] for r in runs], cfg.n_boot, cfg.seed)
    out: dict[str, Any] = {"steps": steps, "seeds": len(runs), "queries": [r.score.shape[1] for r in runs]}
    out["needed"] = {
        "histogram": {str(b): int(sum((n == b).sum() for n in needed)) for b in [0, *budgets]},
        "never_right": int(sum((n == 0).sum() for n in needed)),
        "more_than_one_loop": float(np.mean([((n > 1).sum() / max((n > 0).sum(), 1)) for n in needed])),
    }

    # --- rank correlation with the needed budget ----------------------------------------------------------
    corr: dict[str, Any] = {}
    for variant in ("pseudo", "label"):
        corr[f"peak_{variant}"] = _rank_correlation(
            [app.influence_horizons(r.energy[variant], cfg.default_frac) for r in runs], needed, cfg
        )
        corr[f"share_{variant}"] = _rank_correlation(
            [app.cumulative_horizons(r.energy[variant], cfg.default_share) for r in runs], needed, cfg)  # fmt: skip
    corr["stable"] = _rank_correlation([app.stop_when_stable(r.predictions, cfg.default_k) for r in runs], needed, cfg)
    corr["confident"] = _rank_correlation(
        [app.stop_when_confident(r.confidence, cfg.default_confidence) for r in runs], needed, cfg)  # fmt: skip
    corr["sweep"] = {
        "peak": {str(f): float(np.mean([int_spearman(app.influence_horizons(r.energy["pseudo"], f)[n > 0], n[n > 0])
                                        for r, n in zip(runs, needed, strict=True)])) for f in cfg.fracs},
        "share": {str(s): float(np.mean([int_spearman(app.cumulative_horizons(r.energy["pseudo"], s)[n > 0], n[n > 0])
                                         for r, n in zip(runs, needed, strict=True)])) for s in cfg.shares},
    }  # fmt: skip
    corr["sweep_best"] = {  # the most favourable setting of each horizon, chosen after the fact (optimistic)
        k: {"param": max(v, key=v.__getitem__), "rho": max(v.values())} for k, v in corr["sweep"].items()
    }
    same = [float(np.mean(app.influence_horizons(r.energy["pseudo"], cfg.default_frac)
                          == app.influence_horizons(r.energy["label"], cfg.default_frac))) for r in runs]  # fmt: skip
    corr["pseudo_equals_label_share"] = float(np.mean(same))
    corr["horizon_at_tau_share"] = float(np.mean([np.mean(app.influence_horizons(r.energy["pseudo"], cfg.default_frac) >= steps)
                                                  for r in runs]))  # fmt: skip
    out["rank_correlation"] = corr

    # --- accuracy vs loops ----------------------------------------------------------------------------------
    reps: dict[str, dict[str, np.ndarray]] = {}
    families: dict[str, Any] = {}
    for fam, (label, pname) in FAMILIES.items():
        points, acc_reps, loop_reps = [], [], []
        for param in _params(fam, cfg, steps):
            stops = [rule_stops(r, fam, param, n) for r, n in zip(runs, needed, strict=True)]
            got = [app.outcome_at_stop(r.score, s) for r, s in zip(runs, stops, strict=True)]
            a_point = float(np.mean([g.mean() for g in got]))
            l_point = float(np.mean([s.mean() for s in stops]))
            a_reps, l_reps = boot.mean_replicates(got), boot.mean_replicates(stops)
            points.append({"param": param, "accuracy": interval(a_point, a_reps), "loops": interval(l_point, l_reps),
                           "per_seed_accuracy": [float(g.mean()) for g in got],
                           "per_seed_loops": [float(s.mean()) for s in stops]})  # fmt: skip
            acc_reps.append(a_reps)
            loop_reps.append(l_reps)
        order = np.argsort([p["loops"]["mean"] for p in points], kind="stable")
        families[fam] = {"label": label, "parameter": pname, "points": [points[i] for i in order]}
        reps[fam] = {"acc": np.stack(acc_reps)[order], "loops": np.stack(loop_reps)[order]}
    fixed_acc = reps["fixed"]["acc"]  # [T, B], rows are budgets 1..T
    target = fixed_acc.max(0) - cfg.tol
    best_fixed = families["fixed"]["points"][
        int(np.argmax([p["accuracy"]["mean"] for p in families["fixed"]["points"]]))
    ]
    out["target"] = {"best_fixed_budget": best_fixed["param"], "best_fixed_accuracy": best_fixed["accuracy"]["mean"],
                     "tol": cfg.tol, "accuracy": best_fixed["accuracy"]["mean"] - cfg.tol}  # fmt: skip
    xp = np.arange(1, steps + 1, dtype=np.float64)
    to_target: dict[str, np.ndarray] = {}
    for fam, f in families.items():
        for p, a_r, l_r in zip(f["points"], reps[fam]["acc"], reps[fam]["loops"], strict=True):
            gain = a_r - _interp_rows(l_r, xp, fixed_acc)
            point_gain = p["accuracy"]["mean"] - float(
                np.interp(p["loops"]["mean"], xp, [q["accuracy"]["mean"] for q in families["fixed"]["points"]])
            )
            p["gain_vs_fixed"] = interval(point_gain, gain)
        to_target[fam] = _loops_to_target(reps[fam]["loops"], reps[fam]["acc"], target)
        pt = _loops_to_target(np.array([[p["loops"]["mean"]] for p in f["points"]]),
                              np.array([[p["accuracy"]["mean"]] for p in f["points"]]),
                              np.array([out["target"]["accuracy"]]))[0]  # fmt: skip
        f["loops_to_target"] = interval(pt, to_target[fam])
        f["reaches_target"] = bool(np.isfinite(pt))
        best = max(f["points"], key=lambda q: q["gain_vs_fixed"]["mean"])
        f["best_gain_vs_fixed"] = {"param": best["param"], **best["gain_vs_fixed"]}
    paired: dict[str, Any] = {}
    for a, b in (("fixed", "horizon_peak"), ("fixed", "horizon_share"), ("stable", "horizon_peak"),
                 ("stable", "horizon_share"), ("confident", "horizon_peak"), ("confident", "horizon_share"),
                 ("fixed", "stable"), ("fixed", "confident")):  # fmt: skip
        if families[a]["reaches_target"] and families[b]["reaches_target"]:
            d = to_target[a] - to_target[b]  # > 0: b needs fewer loops than a
            paired[f"{a}-{b}"] = interval(
                families[a]["loops_to_target"]["mean"] - families[b]["loops_to_target"]["mean"], d
            )
        else:
            paired[f"{a}-{b}"] = None
    out["families"] = families
    out["loops_saved"] = paired  # a - b in loops to target: positive where b reaches it with fewer loops

    # --- the population version -------------------------------------------------------------------------------
    pop = []
    for r in runs:
        med = np.median(r.energy["pseudo"], 0)
        b_keys = sorted(r.population, key=int)
        acc = [r.population[k] for k in b_keys]
        sat = app.saturation_budget([int(k) for k in b_keys], acc, cfg.tol)
        h = app.influence_horizon(med, cfg.default_frac)
        pop.append({"horizon": h, "saturation": sat, "difference": h - sat,
                    "horizon_label": app.influence_horizon(np.median(r.energy["label"], 0), cfg.default_frac),
                    "horizons_by_fraction": {str(f): app.influence_horizon(med, f) for f in cfg.fracs},
                    "median_energy": (med / max(med.max(), 1e-300)).tolist(),
                    "accuracy": dict(zip(b_keys, acc, strict=True))})  # fmt: skip
    diffs = np.array([p["difference"] for p in pop])
    out["population"] = {"per_seed": pop, "within_one_step": int((np.abs(diffs) <= 1).sum()),
                         "mean_difference": float(diffs.mean()), "n_over": int((diffs > 1).sum()),
                         "n_under": int((diffs < -1).sum()),
                         "mean_horizon": float(np.mean([p["horizon"] for p in pop])),
                         "mean_saturation": float(np.mean([p["saturation"] for p in pop])),
                         "mean_horizon_by_fraction": {str(f): float(np.mean([p["horizons_by_fraction"][str(f)] for p in pop]))
                                                      for f in cfg.fracs}}  # fmt: skip
    secs = [r.seconds for r in runs if r.seconds]
    if secs:
        out["cost"] = {k: float(np.mean([s[k] for s in secs])) for k in secs[0]}
        out["cost"]["horizon_over_loops"] = out["cost"]["horizon_per_query"] / out["cost"]["loops_per_query"]
    return out


def needed_for(runs: Sequence[QueryRun]) -> list[np.ndarray]:
    """The needed budgets of each run's queries (for figures)."""
    return [app.needed_budgets(r.score, list(range(1, r.steps + 1))) for r in runs]


Collector = Callable[..., QueryRun]

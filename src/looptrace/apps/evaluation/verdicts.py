"""Every verdict word of the evaluation write-up, derived from the numbers in results.json.

:func:`verdicts` is a pure function of the results (it reads nothing else), stored under
``results["verdicts"]`` and quoted by the README template through placeholders; a test recomputes it from
the committed JSON, so a verdict that no longer matches its numbers fails the suite. The thresholds are
named here, once.
"""

from __future__ import annotations

from typing import Any

#: A first-order prediction errs as eta^1: the log-log slope of the relative error in eta must lie here.
SLOPE_RANGE = (0.8, 1.2)
#: ... and the relative error at the smallest eta must be below this.
SMALL_ERROR = 0.05
#: The negative control (features' steps reversed) must err by at least this much to count as caught.
CONTROL_FLOOR = 0.2
#: Rank agreement (mean Spearman over queries, every step) at the training learning rate.
RANK_MATCH, RANK_PARTLY = 0.9, 0.5
#: Paired LDS differences reported (first minus second), per query.
PAIRS: tuple[tuple[str, str], ...] = (
    ("sdi_full", "tracin"),
    ("tracin_adam", "tracin"),
    ("grad_cos", "tracin"),
    ("tracin_last", "tracin"),
)


def _interval_word(ci: dict[str, float], above: str, below: str, neither: str) -> str:
    if ci["lo"] > 0:
        return above
    if ci["hi"] < 0:
        return below
    return neither


def _counterfactual(cf: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in ("test", "train"):
        s = cf[side]
        lo, hi = SLOPE_RANGE
        good = [
            lo <= sl <= hi and err < SMALL_ERROR
            for sl, err in zip(s["slope"], s["rel_error_smallest_eta"], strict=True)
        ]
        first_order = ("holds at every step" if all(good) else
                       "holds at no step" if not any(good) else
                       f"holds at steps {[t + 1 for t, g in enumerate(good) if g]} only")  # fmt: skip
        control = min(s["negative_control"]["rel_error_smallest_eta"])
        rho = min(s["spearman_at_training_lr"])
        at_lr = s["rel_error_training_lr"]
        out[side] = {
            "first_order": first_order,
            "control_min_error": control,
            "control_ratio_min": control / max(max(s["rel_error_smallest_eta"]), 1e-300),
            "control": "fails on the reversed features" if control >= CONTROL_FLOOR else "does not catch reversed features",
            "rank_min": rho,
            "training_lr_error_max": max(at_lr),
            "training_lr_error_max_step": at_lr.index(max(at_lr)) + 1,
            "ranking": "matches" if rho >= RANK_MATCH else "partly matches" if rho >= RANK_PARTLY else "does not match",
        }  # fmt: skip
    return out


def _lds(lds: dict[str, Any]) -> dict[str, Any]:
    methods = lds["methods"]
    order = sorted(methods, key=lambda k: (-methods[k]["mean"], k))  # ties by name: independent of the JSON's key order
    out: dict[str, Any] = {"order": order, "best": methods[order[0]]["label"], "lowest": methods[order[-1]]["label"],
                           "best_key": order[0], "lowest_key": order[-1], "paired": {}}  # fmt: skip
    for name, p in lds["paired"].items():
        out["paired"][name] = _interval_word(p, "higher than", "lower than", "not distinguishable from")
    return out


def _lds_rank(key: str, keys: list[str], lds: dict[str, Any] | None) -> dict[str, Any]:
    """Where ``key``'s LDS ranks among ``keys`` (1 = highest), in words too."""
    if lds is None or key not in lds["methods"]:
        return {}
    means = {m: lds["methods"][m]["mean"] for m in keys if m in lds["methods"]}
    rank = sorted(means, key=lambda m: (-means[m], m)).index(key) + 1
    word = ("the lowest LDS of the removal methods" if rank == len(means) else
            "the highest LDS of the removal methods" if rank == 1 else
            f"LDS rank {rank} of the {len(means)} removal methods")  # fmt: skip
    return {"lds_rank": rank, "lds_rank_of": len(means), "lds_word": word}


def _agreement(best: str, keys: list[str], lds: dict[str, Any] | None) -> str:
    """Whether the removal winner is the method LDS ranks first among the removal methods."""
    rank = _lds_rank(best, keys, lds).get("lds_rank")
    if rank is None:
        return "cannot be compared with LDS (no LDS for it)"
    return "is also the one LDS ranks first" if rank == 1 else "is not the one LDS ranks first"


def _removal(removal: dict[str, Any], lds: dict[str, Any] | None) -> dict[str, Any]:
    rows = dict(removal["at_largest_k"])
    random = rows.pop("random")["loss_increase"]["mean"]
    k = next(iter(rows.values()))["k"]
    best = min(rows, key=lambda m: (-rows[m]["loss_increase"]["mean"], m))
    flips = min(rows, key=lambda m: (-rows[m]["prediction_flips"], m))
    above = sorted(m for m in rows if rows[m]["loss_increase"]["lo"] > random)
    paired = {m: _interval_word(ci, "more than", "less than", "not distinguishable from")
              for m, ci in removal.get("paired_vs_tracin", {}).items()}  # fmt: skip
    return {
        "k": k, "n_methods": len(rows), "n_above_random": len(above), "above_random": above,
        "best_key": best, "best": rows[best]["label"],
        "best_rank": _lds_rank(best, list(rows), lds),
        "agrees_with_lds": _agreement(best, list(rows), lds),
        "flips_key": flips, "flips": rows[flips]["label"], "flips_rank": _lds_rank(flips, list(rows), lds),
        "paired_vs_tracin": paired,
        "n_compared_to_tracin": len(paired),
        "n_distinguishable_from_tracin": sum(w != "not distinguishable from" for w in paired.values()),
    }  # fmt: skip


def _depth(depth: dict[str, Any]) -> dict[str, Any]:
    n = len(depth["seeds"])
    out: dict[str, Any] = {"n_seeds": n, "budgets": {}}
    for r in depth["budgets"]:
        row = {}
        for lab, key in (("most late-step removed", "late"), ("most early-step removed", "early")):
            v = depth["versus_random"][lab][r]
            row[key] = ("above random removal in every seed" if v["n_above"] == n else
                        "below random removal in every seed" if v["n_below"] == n else
                        f"above random removal in {v['n_above']} of {n} seeds, below in {v['n_below']}")  # fmt: skip
        v = depth["late_vs_harmful"][r]
        row["late_vs_harmful"] = ("above the TracIn control in every seed" if v["n_above"] == n else
                                  "below the TracIn control in every seed" if v["n_below"] == n else
                                  f"above the TracIn control in {v['n_above']} of {n} seeds, below in {v['n_below']}")  # fmt: skip
        out["budgets"][r] = row
    overlap = depth.get("late_harmful_overlap")
    if overlap:
        out["late_harmful_overlap_mean"] = sum(overlap) / len(overlap)
    trained = str(depth.get("trained_depth", ""))
    if trained in depth["late_vs_harmful"]:
        v = depth["late_vs_harmful"][trained]
        out["steps_add"] = (
            "the step split helped more than TracIn's own ranking of harmful examples in every seed" if v["n_above"] == n
            else "the step split added nothing over TracIn's own ranking of harmful examples" if 2 * v["n_below"] > n
            else "the step split neither clearly helped nor hurt against TracIn's own ranking of harmful examples"
        )  # fmt: skip
    shares = [p["mislabeled_share"] for p in depth["per_seed"] if p.get("mislabeled_share")]
    if shares:
        late = sum(s["most late-step removed"] for s in shares) / len(shares)
        early = sum(s["most early-step removed"] for s in shares) / len(shares)
        base = sum(s["training set"] for s in shares) / len(shares)
        out["mislabeled"] = {"late": late, "early": early, "training_set": base,
                             "late_word": "more often" if late > base else "less often" if late < base else "as often"}  # fmt: skip
    return out


def _reach(flag: bool | None, what: str) -> str:
    if flag is None:
        return f"cannot be compared with {what} (not run)"
    return f"at least {what}'s" if flag else f"below {what}'s"


def _holds(flag: bool | None) -> str:
    return "cannot be checked (kronfluence not run)" if flag is None else "holds" if flag else "does not hold"


def _curvature(c: dict[str, Any]) -> dict[str, Any]:
    """The curvature comparison's words: the "Done when" and its split-half check, and the defaults'."""
    out: dict[str, Any] = {
        "done_when": _holds(c["done_when"]["holds"]),
        "best_vs_tracin": _reach(c["done_when"]["ge_tracin"], "TracIn"),
        "best_vs_kronfluence_ekfac": _reach(c["done_when"]["ge_kronfluence_ekfac"], "kronfluence EK-FAC"),
        "split_half": _holds(c["split_half"]["holds"]),
        "default_damping": _holds((c.get("default_damping") or {}).get("holds")),
        "split_half_vs_tracin": _reach(c["split_half"]["ge_tracin"], "TracIn"),
        "split_half_vs_kronfluence_ekfac": _reach(c["split_half"]["ge_kronfluence_ekfac"], "kronfluence EK-FAC"),
        "paired": {name: _interval_word(p, "higher than", "lower than", "not distinguishable from")
                   for name, p in c["paired"].items()},
        "defaults": {kind: {"vs_tracin": _reach(d["ge_tracin"], "TracIn"),
                            "vs_kronfluence_ekfac": _reach(d["ge_kronfluence_ekfac"], "kronfluence EK-FAC"),
                            "paired": {name: _interval_word(p, "higher than", "lower than", "not distinguishable from")
                                       for name, p in d["paired"].items()}}
                     for kind, d in c["defaults"].items()},
    }  # fmt: skip
    if "removal" in c:
        out["removal"] = {name: _interval_word(p, "more than", "less than", "not distinguishable from")
                          for name, p in c["removal"]["paired"].items()}  # fmt: skip
    if "counterfactual" in c:
        out["counterfactual"] = _counterfactual(c["counterfactual"])
        for side in ("test", "train"):
            out["counterfactual"][side]["smallest_eta_error_max"] = max(
                c["counterfactual"][side]["rel_error_smallest_eta"]
            )
    return out


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """The verdicts of an evaluation run, from its numbers alone."""
    out: dict[str, Any] = {}
    if "step_counterfactual" in results:
        out["counterfactual"] = _counterfactual(results["step_counterfactual"])
    if "lds" in results:
        out["lds"] = _lds(results["lds"])
    if "removal" in results:
        out["removal"] = _removal(results["removal"], results.get("lds"))
    if "depth_curation" in results:
        out["depth"] = _depth(results["depth_curation"])
    if "curvature" in results:
        out["curvature"] = _curvature(results["curvature"])
    return out

"""Every verdict of ``docs/results/applications``, derived from the numbers in its results.json.

:func:`verdicts` reads nothing but the results; the README quotes its words through placeholders, and a
test recomputes them from the committed JSON. Each application gets ``verdict`` (one of "works", "works
only when ...", "does not work") and ``why``; the thresholds are named here, once.
"""

from __future__ import annotations

from typing import Any

from looptrace.apps.evaluation.applications.stats import word

#: A rank correlation whose interval's lower end reaches this "tracks" the needed budget.
RHO_TRACKS = 0.3
#: The share of flagged pairs the counterfactual must confirm for the flag to be "right".
FLAG_RIGHT = 0.8
#: Gap closed by adding examples back: at least this (interval's lower end) "restores" the curve.
RESTORES = 0.5

WORKS, DOES_NOT = "works", "does not work"


def _rho_word(ci: dict[str, Any]) -> str:
    if ci["lo"] >= RHO_TRACKS:
        return "tracks"
    if ci["lo"] > 0:
        return "weakly tracks"
    if ci["hi"] < 0:
        return "runs against"
    return "does not track"


def _saves(ci: dict[str, Any] | None, other: str) -> str:
    if ci is None:
        return (
            f"cannot be compared with {other} (one of them never comes within the tolerance of the best fixed budget)"
        )
    return word(ci, f"needs fewer loops than {other}", f"needs more loops than {other}",
                f"is not distinguishable from {other} in loops")  # fmt: skip


def _horizon_task(h: dict[str, Any]) -> dict[str, Any]:
    rc, fam, saved = h["rank_correlation"], h["families"], h["loops_saved"]
    out: dict[str, Any] = {
        "rank_pseudo": _rho_word(rc["peak_pseudo"]), "rank_label": _rho_word(rc["peak_label"]),
        "rank_share_pseudo": _rho_word(rc["share_pseudo"]),
        "rank_stable": _rho_word(rc["stable"]), "rank_confident": _rho_word(rc["confident"]),
    }  # fmt: skip
    for f in ("horizon_peak", "horizon_share", "stable", "confident"):
        out[f"{f}_vs_fixed"] = _saves(saved.get(f"fixed-{f}"), "fixed budgets")
    for b in ("stable", "confident"):
        for f in ("horizon_peak", "horizon_share"):
            ci = saved.get(f"{b}-{f}")
            out[f"{f}_vs_{b}"] = _saves(ci, "the baseline")
    never = sorted(fam[f]["label"] for f in fam if not fam[f]["reaches_target"])
    out["never_reach_target"] = "; ".join(never) if never else "none"
    best = max(("horizon_peak", "horizon_share"), key=lambda f: fam[f]["best_gain_vs_fixed"]["mean"])
    out["best_horizon_rule"] = fam[best]["label"]
    g = fam[best]["best_gain_vs_fixed"]
    out["best_gain_word"] = word(g, "above", "below", "not distinguishable from")
    ranks = any(_rho_word(rc[k]) in ("tracks", "weakly tracks") for k in ("peak_pseudo", "share_pseudo"))
    saves = [f for f in ("horizon_peak", "horizon_share") if out[f"{f}_vs_fixed"].startswith("needs fewer")]
    beaten = [f for f in saves for b in ("stable", "confident") if out[f"{f}_vs_{b}"].startswith("needs more")]
    if ranks and saves and len(set(beaten)) < len(saves):
        out["verdict"] = WORKS
        out["why"] = (
            "its horizon ranks queries by the loops they need and stops sooner than a fixed budget at equal accuracy, no later than the baselines"
        )
    elif saves:
        out["verdict"] = (
            "works only when no baseline is available"
            if len(set(beaten)) == len(saves)
            else "works only as a stopping rule"
        )
        out["why"] = ("it saves loops over a fixed budget, but " +
                      ("the baselines, which cost nothing, save more" if len(set(beaten)) == len(saves)
                       else "its horizon does not rank queries by the loops they need"))  # fmt: skip
    elif ranks:
        out["verdict"] = "works only as a ranking"
        out["why"] = (
            "its horizon ranks queries by the loops they need, but stopping there saves no loops over a fixed budget"
        )
    else:
        out["verdict"] = DOES_NOT
        out["why"] = (
            "its horizon does not rank queries by the loops they need, and stopping there saves no loops over a fixed budget"
        )
    if out["rank_stable"] in ("tracks", "weakly tracks") and out["verdict"] != WORKS:
        out["why"] += "; the free baseline that stops once the prediction stops changing " + out["rank_stable"].replace(
            "tracks", "tracks the needed budget"
        )
    cost = h.get("cost")
    if cost is not None:
        out["cost"] = ("costs more per query than running every loop" if cost["horizon_over_loops"] > 1
                       else "costs less per query than running every loop")  # fmt: skip
    pop = h["population"]
    n = len(pop["per_seed"])
    never = sum(p["horizon"] >= h["steps"] for p in pop["per_seed"])
    out["median_energy_dies_out"] = (
        "in no seed" if never == n else "in every seed" if never == 0 else f"in {n - never} of {n} seeds"
    )
    out["population"] = (f"within one step of the saturation budget in {pop['within_one_step']} of {n} seeds" if pop["within_one_step"] < n
                         else "within one step of the saturation budget in every seed")  # fmt: skip
    out["population_holds"] = (
        "holds" if pop["within_one_step"] == n else "partly holds" if pop["within_one_step"] > 0 else "does not hold"
    )  # the paper's population version: the median curve's horizon at the saturation budget (within one step)
    out["population_direction"] = ("later than" if pop["mean_difference"] > 1 else "earlier than" if pop["mean_difference"] < -1
                                   else "close to")  # fmt: skip
    out["pseudo_vs_label"] = ("the same horizon with or without the label" if rc["pseudo_equals_label_share"] >= 0.99
                              else "a horizon that differs from the labelled one for some queries")  # fmt: skip
    return out


def _horizon(h: dict[str, Any]) -> dict[str, Any]:
    per = {task: _horizon_task(v) for task, v in h.items()}
    good = [t for t, v in per.items() if v["verdict"] == WORKS]
    out: dict[str, Any] = {"tasks": per}
    if len(good) == len(per):
        out["verdict"] = WORKS
    elif good:
        out["verdict"] = f"works only on {', '.join(good)}"
    else:
        partial = sorted({v["verdict"] for v in per.values() if v["verdict"] != DOES_NOT})
        out["verdict"] = DOES_NOT if not partial else "; ".join(partial)
    return out


def _share_word(ci: dict[str, Any]) -> str:
    """How often a property of the flagged pairs holds: its interval's lower end at least :data:`FLAG_RIGHT`
    ("in nearly every flagged pair"), its mean at least a half ("in most"), or less ("in a minority")."""
    if ci["lo"] >= FLAG_RIGHT:
        return "in nearly every flagged pair"
    return "in most flagged pairs" if ci["mean"] >= 0.5 else "in a minority of flagged pairs"


def _cancellation(c: dict[str, Any]) -> dict[str, Any]:
    p, rem = c["summary"]["pairs"], c["summary"]["removal"]
    out: dict[str, Any] = {}
    fl = p.get("flagged")
    if fl is None:
        return {"verdict": DOES_NOT, "why": "no pair was flagged", "flag": "never raised"}
    prec = fl["cancels"]
    out["flag"] = "right" if prec["lo"] >= FLAG_RIGHT else "mostly right" if prec["mean"] >= 0.5 else "mostly wrong"
    out["opposite"] = _share_word(fl["opposite"])  # measured steps of both signs
    out["small_sum"] = _share_word(fl["small_sum"])  # measured per-step effects summing to little
    out["tied_small"] = _share_word(fl["tied_small"])  # the update at every step (what TracIn predicts) small
    base = p.get("unflagged")
    out["base_rate"] = None if base is None else base["cancels"]["mean"]
    mid = rem["cancelling-control"]["intermediate_abs"]
    full = rem["cancelling-control"]["full_abs"]
    out["intermediate"] = word(mid, "moves the intermediate budgets more than", "moves the intermediate budgets less than",
                               "moves the intermediate budgets no differently from")  # fmt: skip
    out["full"] = word(full, "moves the full budget's loss more than", "moves the full budget's loss less than",
                       "moves the full budget's loss no differently from")  # fmt: skip
    out["intermediate_vs_random"] = word(rem["cancelling-random"]["intermediate_abs"],
                                         "moves the intermediate budgets more than", "moves the intermediate budgets less than",
                                         "moves the intermediate budgets no differently from")  # fmt: skip
    claim = mid["lo"] > 0 and full["lo"] <= 0
    signs = fl["opposite"]["lo"] >= FLAG_RIGHT or fl["opposite"]["mean"] >= 0.5
    if out["flag"] in ("right", "mostly right") and claim:
        out["verdict"] = WORKS
        out["why"] = (
            "the flagged pairs cancel when measured, and removing the cancelling examples moves intermediate budgets, not the full one"
        )
    elif out["flag"] in ("right", "mostly right"):
        out["verdict"] = "works only at first order"
        out["why"] = ("the measured per-step effects of flagged pairs do cancel, but removing the most cancelling examples "
                      "and retraining moves the loop-budget curve no more than removing examples with as little TracIn")  # fmt: skip
    elif claim:
        out["verdict"] = "works only after retraining"
        out["why"] = (
            "the flagged pairs mostly do not cancel when measured, yet removing the cancelling examples moves intermediate budgets"
        )
    elif signs:
        out["verdict"] = "works only for the signs of the steps, not for the cancellation"
        out["why"] = ("the flagged pairs' measured per-step effects do change sign, but in most of them they do not sum to "
                      "little: the first-order SDI cancels more exactly than the loop does; and removing the most cancelling "
                      "examples moves the loop-budget curve no more than removing examples with as little TracIn")  # fmt: skip
    else:
        out["verdict"] = DOES_NOT
        out["why"] = (
            "the flagged pairs mostly do not cancel when measured, and removing them moves no budget more than the control"
        )
    return out


def _curation(d: dict[str, Any]) -> dict[str, Any]:
    s = d["seeds"]
    r = str(s["trained_depth"])
    late = s["versus_random"]["most late-step removed"][r]
    vs_harm = s["late_vs_harmful"][r]
    out: dict[str, Any] = {
        "late_vs_random": word(late, "above random removal", "below random removal", "not distinguishable from random removal"),
        "early_vs_random": word(s["versus_random"]["most early-step removed"][r], "above random removal",
                                "below random removal", "not distinguishable from random removal"),
        "late_vs_harmful": word(vs_harm, "above the TracIn control", "below the TracIn control",
                                "not distinguishable from the TracIn control"),
    }  # fmt: skip
    ab = d["add_back"]
    for key in ("late", "early"):
        g = ab[key]["gap_closed"]
        out[f"add_back_{key}"] = ("restores the curve" if g["lo"] >= RESTORES else
                                  "partly restores the curve" if g["lo"] > 0 else
                                  "moves the curve further from the full-data one" if g["hi"] < 0 else
                                  "does not measurably restore the curve")  # fmt: skip
    second = d.get("second_task")
    if second:
        out["second_task"] = second["verdicts"].get("steps_add", "")
    if late["lo"] > 0 and vs_harm["lo"] > 0:
        out["verdict"] = WORKS
        out["why"] = (
            "removing the most late-step examples helps more than random removal and more than TracIn's own ranking"
        )
    elif late["lo"] > 0 and vs_harm["hi"] < 0:
        out["verdict"] = "works only as a weaker version of TracIn's ranking of harmful examples"
        mislabeled = d.get("mislabeled", {}).get("most late-step removed", 0.0) > 0.5
        out["why"] = (
            "removing the most late-step examples beats random removal, but "
            + ("they are mostly mislabelled examples, which TracIn's ranking of the most harmful examples (a score "
               "without steps) finds too, and removing those does better" if mislabeled
               else "removing TracIn's most harmful examples (a score without steps) does better")
        )  # fmt: skip
    elif late["lo"] > 0:
        out["verdict"] = "works only as well as TracIn's ranking of harmful examples"
        out["why"] = ("removing the most late-step examples beats random removal, but removing TracIn's most harmful "
                      "examples (a score without steps) does at least as well")  # fmt: skip
    else:
        out["verdict"] = DOES_NOT
        out["why"] = "removing the most late-step examples is not better than random removal"
    return out


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """The verdicts of an applications run, from its numbers alone."""
    out: dict[str, Any] = {}
    if "horizon" in results:
        out["horizon"] = _horizon(results["horizon"])
    if "cancellation" in results:
        out["cancellation"] = _cancellation(results["cancellation"])
    if "curation" in results:
        out["curation"] = _curation(results["curation"])
    return out

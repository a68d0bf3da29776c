"""The recursive-LM write-up's verdicts (``docs/results/recursive-gpt``), one rule per row of its table.

Reads ``results.json`` (the study), ``mixed-adapter/results.json`` (the adapter ablation), ``paper.json`` and
``train_metrics.json``. The per-step sums of this model cancel, so signed quantities are judged only on an
exact run (``comparison.exact``); on a sketched one their rows say so instead of a verdict."""

from __future__ import annotations

from typing import Any

from looptrace.apps.studies.verdicts import Docs, row, span

#: a growth whose step-to-step factors stay within this ratio of each other reads as geometric
GEOMETRIC_SPREAD = 1.5
#: a growth factor within this fraction of the inverse contraction factor is "what contraction gives"
CONTRACTION_MATCH = 0.25


def _runs(steps: list[int]) -> str:
    """[2, 12, 13, 14] -> "2 and 12 to 14" (consecutive steps as ranges)."""
    groups: list[list[int]] = []
    for t in steps:
        if groups and groups[-1][-1] == t - 1:
            groups[-1].append(t)
        else:
            groups.append([t])
    text = [str(g[0]) if len(g) == 1 else (f"{g[0]}, {g[1]}" if len(g) == 2 else f"{g[0]} to {g[-1]}") for g in groups]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " and " + text[-1]


def rules(docs: Docs) -> dict[str, dict[str, Any]]:
    res, paper = docs("results.json"), docs("paper.json")
    mixed = docs("mixed-adapter/results.json")
    c, m = res["comparison"], mixed["comparison"]
    hi = c["r_max"]
    exact = bool(c.get("exact"))
    not_exact = (
        f"sketched run (the default sketch's relative error here: {c.get('sketch_rel_error_max', float('nan')):.2f})"
    )
    rows: dict[str, dict[str, Any]] = {}
    acc, loss_lo, loss_hi = c["accuracy_max"], c["answer_loss_min"], c["answer_loss_max"]
    regime = (
        f"; this model never answers right (accuracy {acc:.0%} at every r, answer loss {loss_lo:.2f} to {loss_hi:.2f} "
        "over r)"
        if acc == 0
        else ""
    )

    # the last step holds at least half (section 4: "the last step alone usually contributing >= 50%")
    low = c["last_step_fraction_min"]
    rows["last_step"] = row(
        "reproduced" if low >= paper["last_step_fraction_at_least"] else "not reproduced",
        f"the last step holds {low:.2f} or more of the absolute per-step SDI at every r (lowest at "
        f"r = {c['r_of_last_step_fraction_min']}){regime}",
        "section 4 (Nanochat)",
        minimum=low,
    )  # fmt: skip

    # the last four steps hold the influence whatever r is (section 4: "independently of how many loop steps")
    last4 = c.get("absolute_share_last4_min", float("nan"))
    rows["last_four"] = row(
        "reproduced" if last4 >= 0.9 else "not reproduced",
        f"the last four steps hold {last4:.2f} or more of the absolute per-step SDI at every r from 4 to {hi}",
        "section 4 (Nanochat)",
        minimum=last4,
    )  # fmt: skip

    # geometric growth (section 4: "increases nearly exponentially"; Fig. 3: "approximately geometric")
    f_lo, f_hi = c["growth_factor_min_r_max"], c["growth_factor_max_r_max"]
    above, count = c["growth_factors_above_one_r_max"], c["growth_factors_r_max_count"]
    if above < count:
        verdict, why = "not reproduced", f"the absolute per-step mass falls at {count - above} of {count} steps"
    elif f_hi / f_lo <= GEOMETRIC_SPREAD:
        verdict, why = "reproduced", f"the absolute per-step mass grows by {f_lo:.2f} to {f_hi:.2f}x per step"
    else:
        verdict = "partly"
        why = (
            f"the absolute per-step mass grows at every step at r = {hi}, but not at one rate: the step-to-step factor "
            f"goes from {c['growth_factor_first_r_max']:.2f} (first step) to {c['growth_factor_last_r_max']:.2f} "
            f"(last), between {f_lo:.2f} and {f_hi:.2f}"
        )
    rows["geometric"] = row(verdict, why, "section 4 (Nanochat), Fig. 3", factor_min=f_lo, factor_max=f_hi)

    # the signed cumulative share rises smoothly to one (Fig. 3)
    if not exact:
        rows["signed_cumulative"] = row("not comparable", not_exact, "Fig. 3")
    elif c["cumulative_share_monotone_r_max"] and c["max_abs_cumulative_share_r_max"] <= 1.0:
        rows["signed_cumulative"] = row(
            "reproduced", f"the exact signed cumulative share rises monotonically to one at r = {hi}", "Fig. 3"
        )
    else:
        last4s = ", ".join(f"{v:.2f}" for v in c["cumulative_share_r_max_last4"])
        rows["signed_cumulative"] = row(
            "not reproduced",
            f"exact: {c['negative_steps_r_max']} of {hi} per-step sums are negative at r = {hi}; the signed cumulative "
            f"share over the last four steps is {last4s}"
            + (
                f" (largest magnitude {c['max_abs_cumulative_share_r_max']:.2f})"
                if c["max_abs_cumulative_share_r_max"] > 1
                else ""
            ),
            "Fig. 3",
            negative_steps=c["negative_steps_r_max"],
        )  # fmt: skip

    # TracIn vs the per-step sums (not in the paper)
    rows["cancellation"] = row(
        "not in the paper" if exact else "not comparable",
        (
            f"exact: at r = {hi} the summed TracIn is {c['tracin_sum_r_max']:+.2e} while the per-step sums' "
            f"magnitudes add up to {c['cancellation_r_max']:.2f} times its size: steps of opposite sign cancel "
            f"{1 - 1 / c['cancellation_r_max']:.0%} of the step-resolved mass in the sum"
        )
        if exact
        else not_exact,
        "section 4 (Nanochat)",
        cancellation=c["cancellation_r_max"],
    )  # fmt: skip

    # the sketch on this model (the paper sketches with m = 2048)
    sk = [k for k in c if k.startswith("sketched_r") and k.endswith("_tracin_sum")]
    flips = [
        int(k[len("sketched_r") : -len("_tracin_sum")])
        for k in sk
        if (c[k] > 0) != (c[k.replace("sketched", "exact")] > 0)
    ]
    rs = sorted(int(k[len("sketched_r") : -len("_tracin_sum")]) for k in sk)
    why = (
        f"the default sketch (D = {res['compared_sketch']['dim']}) has relative error "
        f"{span([c['sketch_rel_error_min'], c['sketch_rel_error_max']], '.2f')} against the exact SDI at r = "
        f"{', '.join(str(r) for r in rs)}"
    )
    if flips:
        r0 = flips[-1]
        why += (
            f" and flips the sign of the summed TracIn at r = {r0} (exact {c[f'exact_r{r0}_tracin_sum']:+.2e}, "
            f"sketched {c[f'sketched_r{r0}_tracin_sum']:+.2e})"
        )
    why += "; every number in this table is exact" if exact else "; the numbers in this table are sketched"
    rows["sketch"] = row(
        "not in the paper", why, "section 4 (Nanochat: m = 2048)", rel_error_max=c["sketch_rel_error_max"]
    )

    # the plateau of task accuracy beyond four steps (section 4)
    rows["plateau"] = row(
        "not comparable" if acc == 0 else ("reproduced" if loss_hi - loss_lo < 0.05 else "not reproduced"),
        f"accuracy {acc:.0%} at every r and an answer loss flat in r ({loss_lo:.2f} to {loss_hi:.2f}): the model has "
        "learned the answer format, not arithmetic, so there is no accuracy to plateau"
        if acc == 0
        else f"answer loss {loss_lo:.2f} to {loss_hi:.2f} over r",
        "section 4 (Nanochat)",
        accuracy_max=acc, loss_min=loss_lo, loss_max=loss_hi,
    )  # fmt: skip

    # truncated BPTT leaves only the last k steps with SDI (appendix D.5)
    k = res["run_record"]["model"]["bptt_k"]
    rows["truncated"] = row(
        "holds by construction" if c["truncated_nonzero_steps_max"] <= k else "not reproduced",
        f"the state is detached before the last {k} steps, so earlier steps have no gradient (at most "
        f"{c['truncated_nonzero_steps_max']} non-zero steps at any r)",
        "appendix D.5",
        nonzero_max=c["truncated_nonzero_steps_max"],
    )  # fmt: skip

    # what the state's contraction explains (our explanation, not the paper's)
    inv = c["inverse_contraction"]
    factors = c["growth_factors_r_max"]
    match = [i + 2 for i, f in enumerate(factors) if abs(f - inv) <= CONTRACTION_MATCH * inv]  # step t+1 of t->t+1
    faster = [i + 2 for i, f in enumerate(factors) if f > (1 + CONTRACTION_MATCH) * inv]
    why = (
        f"the state contracts by a median {c['contraction_median_ratio']:.2f} per step, which would damp an early "
        f"step's effect by {inv:.2f}x per step; the measured growth into step t is within {CONTRACTION_MATCH:.0%} of "
        f"that for {len(match)} of {len(factors)} steps" + (f" (t = {_runs(match)})" if match else "")
    )
    if faster:
        why += f", and above it into t = {_runs(faster)} (up to {max(factors):.2f}x)"
        if faster[-1] == len(factors) + 1:
            why += ": contraction sets the growth's scale, not its rise into the last steps"
    rows["contraction"] = row("not in the paper", why, "section 4 (Nanochat: the loop step counter hypothesis)",
                              matching_steps=len(match), faster_steps=len(faster))  # fmt: skip

    # the adapter's initialisation (our ablation)
    slower = m["contraction_median_ratio"] > c["contraction_median_ratio"]
    less_last = m["last_step_fraction_r_max"] < c["last_step_fraction_r_max"]
    rows["adapter"] = row(
        "not in the paper",
        f"with the mixing initialisation the state contracts {'more slowly' if slower else 'faster'} "
        f"({m['contraction_median_ratio']:.2f} vs {c['contraction_median_ratio']:.2f} per step) and the last step "
        f"holds {'less' if less_last else 'as much or more'} ({m['last_step_fraction_r_max']:.2f} vs "
        f"{c['last_step_fraction_r_max']:.2f} at r = {hi}); the influence still lands in the last steps"
        if m["last_step_fraction_min"] >= paper["last_step_fraction_at_least"]
        else f"with the mixing initialisation the last step holds as little as {m['last_step_fraction_min']:.2f}",
        "section 4 (Nanochat), appendix D.5",
        slower_contraction=slower, less_in_last_step=less_last, exact=bool(m.get("exact")),
    )  # fmt: skip
    return rows

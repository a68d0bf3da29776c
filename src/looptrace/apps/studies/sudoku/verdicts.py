"""The Sudoku write-up's verdicts (``docs/results/sudoku``), one rule per row of its point-by-point table.

Reads ``seeds.json`` (the spread over training seeds: each figure's per-seed values, mean, sd, the 95%
interval of the mean over seeds and in how many seeds it is positive) and ``paper.json``. The unit of
replication is the training seed: a paired test over the test puzzles of one model (the paper's test, and ours
per seed) says the effect is there in that model, not that it survives another seed. A finding that should be
positive is "reproduced" when it is positive in every seed and its interval over seeds excludes zero,
"reproduced in direction" when it is positive in every seed but the interval (n = 3) still includes zero, and
"not reproduced" when its sign changes across seeds or is the opposite in all."""

from __future__ import annotations

from typing import Any

import numpy as np

from looptrace.apps.studies.verdicts import Docs, row, span

#: significance level of the per-seed tests (the paper's, appendix D.4)
ALPHA = 0.05


def _interval(ci: list[float], fmt: str = ".3f") -> str:
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def correlation_interval(sp: dict[str, Any]) -> list[float]:
    """The 95% interval over seeds of a correlation, on Fisher's z scale (so that it stays inside [-1, 1])."""
    from scipy import stats

    z = np.arctanh(np.clip(np.asarray(sp["values"], dtype=np.float64), -0.999999, 0.999999))
    n = len(z)
    half = float(stats.t.ppf(0.975, n - 1) * z.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return [float(np.tanh(z.mean() - half)), float(np.tanh(z.mean() + half))]


def direction(
    sp: dict[str, Any], what: str, fmt: str = ".3f", ref: float = 0.0, ci: list[float] | None = None
) -> tuple[str, str]:
    """The verdict on a figure the paper says is above ``ref`` (zero for differences, one for ratios), from
    its values over seeds and the 95% interval of their mean (``ci``: another interval, e.g. on Fisher's z)."""
    values = sp["values"]
    n, pos = len(values), sum(v > ref for v in values)
    ci = sp["ci95"] if ci is None else ci
    shown = f"{span(values, fmt)}; 95% interval over seeds {_interval(ci, fmt)}"
    if pos == n and ci[0] > ref:
        return "reproduced", f"{what} in all {n} seeds ({shown})"
    if pos == n:
        return "reproduced in direction", (
            f"{what} in all {n} seeds ({span(values, fmt)}), but the 95% interval over seeds, the unit of "
            f"replication, {_interval(ci, fmt)} includes {ref:g} at n = {n}"
        )
    side = "negative" if ref == 0 else f"below {ref:g}"
    if pos == 0:
        return "not reproduced", f"the opposite in every seed ({side}: {shown})"
    return "not reproduced", f"on both sides of {ref:g} across seeds (above in {pos} of {n}: {shown})"


def _significant(ps: list[float]) -> int:
    return sum(p < ALPHA for p in ps)


def rules(docs: Docs) -> dict[str, dict[str, Any]]:
    sd, paper = docs("seeds.json"), docs("paper.json")
    c, n = sd["comparison"], sd["runs"]
    t1 = paper["table1"]
    rows: dict[str, dict[str, Any]] = {}

    # Fig. 2A: harder puzzles are more compute-sensitive
    sens = c["sensitivity_hardest_minus_easiest"]
    verdict, why = direction(sens, "the hardest bin gains more from loops than the easiest")
    if verdict != "reproduced":
        why = (
            f"loops help every bin (blank-cell gain {span(c['sensitivity_cell_easiest']['values'])} in the easiest, "
            f"{span(c['sensitivity_cell_hardest']['values'])} in the hardest), but not more in the hardest: {why}"
        )
    rows["fig2a"] = row(verdict, why, "section 4, Fig. 2A", positive_in=sens["positive_in"], ci95=sens["ci95"])

    # Fig. 2B: harder puzzles keep more SDI energy deeper into the recurrence (slower decay)
    shape, level = c["energy_late_fraction_hardest_minus_easiest"], c["energy_late_ratio_hardest_over_easiest"]
    late_ratio = level["values"]
    slower = shape["positive_in"] == n
    higher = all(v > 1 for v in late_ratio)
    detail = (
        f"the hardest test bin's median energy curve puts {span(shape['values'])} more of its mass in the late steps "
        f"than the easiest's (95% interval over seeds {_interval(shape['ci95'])}; positive in {shape['positive_in']} of {n}), "
        f"and its late-step energy is {span(late_ratio, '.2f')} times the easiest's"
    )
    if slower and higher and shape["ci95"][0] > 0 and level["ci95"][0] > 1:
        verdict = "reproduced"
    elif slower and higher:
        verdict = "reproduced in direction"
    elif slower or higher:
        verdict = "partly"
    else:
        verdict = "not reproduced"
    rows["fig2b"] = row(
        verdict, detail + ("; the curves nearly coincide" if verdict != "reproduced" else ""), "section 4, Fig. 2B",
        slower_in=shape["positive_in"], higher_in=sum(v > 1 for v in late_ratio),
    )  # fmt: skip

    # memorisation and cross-influence vs difficulty (section 4; the Spearman correlations)
    for key, paper_key, what in (
        ("self_vs_blanks", "self_vs_blanks_rho", "self-influence grows with blanks"),
        ("cross_vs_blanks", "cross_vs_blanks_rho", "C(z) grows with blanks"),
        ("self_vs_cross", "self_vs_cross_rho", "self-influence and C(z) go together"),
    ):
        sp = c[f"{key}_rho"]
        ci = correlation_interval(sp)
        verdict, why = direction(sp, what, ".2f", ci=ci)
        ps = c[f"{key}_p"]["values"] if f"{key}_p" in c else []
        if ps:
            why += f"; p < {ALPHA} in {_significant(ps)} of {n}"
        if verdict.startswith("reproduced") and not ci[0] <= paper[paper_key] <= ci[1]:
            verdict, why = "partly", f"{why}; weaker than the paper's {paper[paper_key]} (outside the interval)"
        rows[key] = row(verdict, why, "section 4 (memorisation), appendix D.4", rho_mean=sp["mean"])

    # Table 1, upper half: medians of self-influence and C(z), hard over easy train
    for key, what in (("self_median", "hard train puzzles have the higher median self-influence"),
                      ("cross_median", "hard train puzzles have the higher median C(z)")):  # fmt: skip
        sp = c[f"{key}_ratio_hard_over_easy"]
        verdict, why = direction(sp, what, ".2f", ref=1.0)
        rows[key] = row(verdict, "ratio hard / easy: " + why, "section 4, Table 1", ratio_mean=sp["mean"])

    # no bottom-quartile self-influence puzzle in the top quartile of C(z) (section 4)
    counts, of = c["bottom_self_in_top_cross"]["values"], c["bottom_self"]["values"]
    chance = [q / 4 for q in of]
    if all(k == paper["bottom_self_in_top_cross"] for k in counts):
        verdict, why = "reproduced", f"none in any of the {n} seeds"
    elif all(k < q for k, q in zip(counts, chance, strict=True)):
        verdict = "partly"
        why = (
            f"{span(counts, '.0f')} of {span(of, '.0f')} per seed: far fewer than independence would give "
            f"(about {span(chance, '.0f')}), but not none"
        )
    else:
        verdict, why = "not reproduced", f"{span(counts, '.0f')} of {span(of, '.0f')}, as many as independence gives"
    rows["quartiles"] = row(verdict, why, "section 4 (memorisation)", counts=counts)

    # Table 1, lower half: |TracIn| share and SDI late mass of hard vs easy train, on each test bin
    for key, test, what, paper_rows in (
        ("share_hard_test", "hard", "hard train puzzles hold more of the absolute TracIn mass", t1["share_hard_test"]),
        ("share_easy_test", "easy", "hard train puzzles hold more of the absolute TracIn mass", t1["share_easy_test"]),
        ("late_hard_test", "hard", "hard train puzzles put more of their SDI energy late", t1["late_mass_hard_test"]),
        ("late_easy_test", "easy", "hard train puzzles put more of their SDI energy late", t1["late_mass_easy_test"]),
    ):
        kind = key.split("_")[0]
        sp = c[f"{kind}_hard_minus_easy_on_{test}_test"]
        verdict, why = direction(sp, what)
        p_key = f"{kind}_{test}_test_p"
        if p_key in c:
            ps = c[p_key]["values"]
            why += (
                f"; paired by test puzzle within each seed (the paper's test) p < {ALPHA} in {_significant(ps)} of {n}"
            )
        why += f" (the paper: {paper_rows['hard'] - paper_rows['easy']:+.3f} in one model)"
        rows[key] = row(
            verdict, why, "section 4, Table 1; appendix D.4", positive_in=sp["positive_in"], ci95=sp["ci95"]
        )
    return rows

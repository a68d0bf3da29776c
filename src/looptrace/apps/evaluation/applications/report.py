"""Figures and the HTML report of ``looptrace eval applications``, drawn from results.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from looptrace.apps.report.figures import _save, _subplots
from looptrace.apps.report.html import write_report as write_html

_STYLE = {"fixed": ("k", "o", "-"), "horizon_peak": ("C0", "s", "-"), "horizon_share": ("C1", "D", "-"),
          "stable": ("C2", "^", "--"), "confident": ("C3", "v", "--"), "oracle": ("C4", "*", "")}  # fmt: skip


def fig_rules(h: dict[str, Any], path: Path, title: str) -> Path:
    """Accuracy against mean loops per query: every rule family on one figure, 95% intervals both ways."""
    fig, ax = _subplots(figsize=(8, 5))
    for fam, f in h["families"].items():
        color, marker, ls = _STYLE[fam]
        pts = f["points"]
        x = np.array([p["loops"]["mean"] for p in pts])
        y = np.array([p["accuracy"]["mean"] for p in pts])
        xerr = np.array([[p["loops"]["mean"] - p["loops"]["lo"], p["loops"]["hi"] - p["loops"]["mean"]] for p in pts]).T
        yerr = np.array(
            [[p["accuracy"]["mean"] - p["accuracy"]["lo"], p["accuracy"]["hi"] - p["accuracy"]["mean"]] for p in pts]
        ).T
        ax.errorbar(x, y, xerr=np.maximum(xerr, 0), yerr=np.maximum(yerr, 0), color=color, marker=marker, ls=ls or "none",
                    ms=6 if fam == "oracle" else 4, lw=1.2, capsize=2, label=f["label"])  # fmt: skip
    ax.axhline(h["target"]["accuracy"], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("mean loops per query (test-time compute)")
    ax.set_ylabel("accuracy at the stopping step (mean over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def fig_horizon_vs_needed(h: dict[str, Any], path: Path, title: str) -> Path:
    """Each query's horizon (no label, default fraction) against the budget it needs, pooled over seeds."""
    need = np.concatenate([np.array(q["needed"]) for q in h["per_query"]])
    hor = np.concatenate([np.array(q["horizon_peak"]) for q in h["per_query"]])
    share = np.concatenate([np.array(q["horizon_share"]) for q in h["per_query"]])
    ok = need > 0
    rng = np.random.default_rng(0)
    fig, ax = _subplots(figsize=(6, 5))
    jit = rng.uniform(-0.2, 0.2, size=(2, ok.sum()))
    ax.scatter(need[ok] + jit[0], hor[ok] + jit[1], s=5, alpha=0.3, color="C0", label="peak-fraction horizon")
    ax.scatter(need[ok] + jit[1], share[ok] + jit[0], s=5, alpha=0.3, color="C1", label="cumulative-share horizon")
    top = max(int(need.max()), int(hor.max()), 1)
    ax.plot([1, top], [1, top], color="gray", lw=0.8, ls=":", label="horizon = needed budget")
    ax.set_xlabel("loop budget the query needs (right from here on)")
    ax.set_ylabel("influence horizon of the query (loop step)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def fig_population(h: dict[str, Any], path: Path, title: str) -> Path:
    """Median energy (normalised to its peak, mean over seeds) and accuracy against the loop step."""
    per = h["population"]["per_seed"]
    steps = np.arange(1, len(per[0]["median_energy"]) + 1)
    fig, ax = _subplots(figsize=(7, 4))
    ax.semilogy(steps, np.mean([p["median_energy"] for p in per], 0), "o-", color="C0", ms=3,
                label="median SDI energy / its peak")  # fmt: skip
    ax.set_xlabel("loop step / test-time budget")
    ax.set_ylabel("median energy / peak", color="C0")
    ax2 = ax.twinx()
    keys = sorted(per[0]["accuracy"], key=int)
    ax2.plot(
        [int(k) for k in keys], np.mean([[p["accuracy"][k] for k in keys] for p in per], 0), "s-", color="C3", ms=3
    )
    ax2.set_ylabel("accuracy (mean over seeds)", color="C3")
    ax.axvline(np.mean([p["horizon"] for p in per]), color="C0", ls="--", lw=1)
    ax.axvline(np.mean([p["saturation"] for p in per]), color="C3", ls=":", lw=1)
    ax.set_title(title)
    return _save(fig, path)


def fig_pairs(c: dict[str, Any], path: Path) -> Path:
    """Predicted (eta SDI_t) against measured per-step effects of the checked pairs, each pair scaled by its
    predicted mass."""
    fig, ax = _subplots(figsize=(6, 5))
    for name, color in (("flagged", "C3"), ("unflagged", "C0")):
        pred, meas = [], []
        for p in c["per_seed_pairs"]:
            if p.get(name):
                a, b = np.array(p[name]["predicted_steps"]), np.array(p[name]["measured_steps"])
                scale = np.abs(a).sum(-1, keepdims=True)
                pred.append((a / scale).ravel())
                meas.append((b / scale).ravel())
        if pred:
            ax.scatter(np.concatenate(pred), np.concatenate(meas), s=5, alpha=0.4, color=color, label=f"{name} pairs")
    lim = ax.get_xlim()
    ax.plot(lim, lim, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("predicted per-step effect SDI_t / sum_t |SDI_t|")
    ax.set_ylabel("measured per-step loss decrease / sum_t |SDI_t|")
    ax.set_title("Per-step counterfactual of the checked pairs")
    ax.legend(fontsize=7)
    return _save(fig, path)


def fig_removal(c: dict[str, Any], path: Path) -> Path:
    """Change of the test loss at each budget after removing each set and retraining (mean over seeds, 95%)."""
    rem = c["summary"]["removal"]
    fig, ax = _subplots(figsize=(7, 4))
    for g, color in (("cancelling", "C3"), ("control", "C0"), ("random", "C7")):
        d = rem[g]["delta_loss"]
        b = np.array([int(k) for k in d])
        ax.plot(b, [d[k]["mean"] for k in d], "o-", color=color, ms=3, label=f"{g} removed")
        ax.fill_between(b, [d[k]["lo"] for k in d], [d[k]["hi"] for k in d], color=color, alpha=0.15)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("test-time loop budget")
    ax.set_ylabel("test loss change after retraining (nats)")
    ax.set_title("Removing the most cancelling examples vs a control with as much |TracIn|")
    ax.legend(fontsize=7)
    return _save(fig, path)


def fig_add_back(ab: dict[str, Any], path: Path) -> Path:
    fig, axes = _subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key in zip(axes, ("late", "early"), strict=True):
        for (name, curve), color in zip(ab[key]["curves"].items(), ("C7", "C3", "C0", "k"), strict=True):
            b = [int(r) for r in curve]
            ax.plot(b, list(curve.values()), "o-", color=color, ms=3, label=name)
        ax.set_xlabel("test-time loop budget")
        ax.set_title(f"most {key}-step examples removed, then added back")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out accuracy (mean over seeds)")
    return _save(fig, path)


def fig_seeds(s: dict[str, Any], path: Path) -> Path:
    fig, ax = _subplots(figsize=(7, 4))
    rows = {
        **{f"{k} - random": v for k, v in s["versus_random"].items()},
        "late-step - TracIn control": s["late_vs_harmful"],
    }
    for (name, d), color in zip(rows.items(), ("C3", "C0", "C2", "k"), strict=True):
        b = np.array([int(k) for k in d])
        ax.errorbar(b, [d[k]["mean"] for k in d], yerr=np.maximum(np.array([[d[k]["mean"] - d[k]["lo"], d[k]["hi"] - d[k]["mean"]]
                                                                             for k in d]).T, 0),
                    marker="o", ms=3, capsize=2, color=color, label=name)  # fmt: skip
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("test-time loop budget")
    ax.set_ylabel("held-out accuracy difference (mean over seeds, 95% CI)")
    ax.set_title(f"Depth-targeted removal over {len(s['seeds'])} seeds")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_report(r: dict[str, Any], out: Path) -> Path:
    sections: list[dict[str, Any]] = []
    for task, h in r.get("horizon", {}).items():
        v = r["verdicts"]["horizon"]["tasks"][task]
        sections.append({"heading": f"(i) Influence horizon as a stopping rule: {task}",
                         "text": [f"Verdict: {v['verdict']} ({v['why']})."],
                         "figure": fig_rules(h, out / f"fig_horizon_{task}.png", f"{task}: accuracy vs test-time compute"),
                         "caption": "Every rule family on one figure; 95% intervals over queries and training seeds.",
                         "source": f"results.json: horizon.{task}.families"})  # fmt: skip
        sections.append({"heading": f"Horizon vs needed budget: {task}",
                         "figure": fig_horizon_vs_needed(h, out / f"fig_horizon_vs_needed_{task}.png", task),
                         "source": f"results.json: horizon.{task}.per_query"})  # fmt: skip
        sections.append({"heading": f"Population horizon: {task}",
                         "figure": fig_population(h, out / f"fig_population_{task}.png", task),
                         "source": f"results.json: horizon.{task}.population"})  # fmt: skip
    if "cancellation" in r:
        c = r["cancellation"]
        v = r["verdicts"]["cancellation"]
        sections.append({"heading": "(ii) Cancellation: the per-step counterfactual", "text": [f"Verdict: {v['verdict']} ({v['why']})."],
                         "figure": fig_pairs(c, out / "fig_cancellation_pairs.png"),
                         "source": "results.json: cancellation.per_seed_pairs"})  # fmt: skip
        sections.append({"heading": "(ii) Cancellation: retraining", "figure": fig_removal(c, out / "fig_cancellation_removal.png"),
                         "source": "results.json: cancellation.summary.removal"})  # fmt: skip
    if "curation" in r:
        d = r["curation"]
        v = r["verdicts"]["curation"]
        sections.append({"heading": "(iii) Depth curation over seeds", "text": [f"Verdict: {v['verdict']} ({v['why']})."],
                         "figure": fig_seeds(d["seeds"], out / "fig_curation_seeds.png"),
                         "source": "results.json: curation.seeds"})  # fmt: skip
        sections.append({"heading": "(iii) Adding the examples back", "figure": fig_add_back(d["add_back"], out / "fig_add_back.png"),
                         "source": "results.json: curation.add_back"})  # fmt: skip
    return write_html(
        out, "looptrace: the paper's applications, checked", sections, {"config": r["config"], "task": r["task"]}
    )

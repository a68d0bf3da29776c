"""Figures and the HTML report of ``looptrace eval`` (the case studies' report style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from looptrace.apps.report import figures
from looptrace.apps.report.html import write_report as write_html


def _setup(r: dict[str, Any]) -> str:
    t, d = r["task"], r["data"]
    return (
        f"Task {t['name']}: {t['description']}; {t['n_train']} training examples ({d['distinct_train']} distinct inputs "
        f"of {d['input_space']}), {t['n_query']} distinct queries and {t['n_test']} held-out test inputs, none of them "
        f"in the training set; tau={t['loops']}, truncated BPTT k={t['bptt_k']}, full-batch AdamW lr {t['lr']} for "
        f"{t['steps']} steps (one training: {r['train_seconds']:.2f} s); TracIn checkpoints every {t['ckpt_every']} "
        "steps."
    )


def write_report(r: dict[str, Any], out: Path) -> Path:
    sections: list[dict[str, Any]] = [{"heading": "Setup", "text": [_setup(r)]}]
    cf = r.get("step_counterfactual")
    if cf:
        for side in ("test", "train"):
            etas = np.array(cf["etas"])
            tau = len(cf[side]["slope"])
            ys = {
                f"step {t + 1}": np.array([cf[side]["rel_error_by_eta"][str(e)][t] for e in etas]) for t in range(tau)
            }
            ys |= {
                "reversed steps (control)": np.array(
                    [np.nan] * (len(etas) - 1) + [min(cf[side]["negative_control"]["rel_error_smallest_eta"])]
                )
            }
            fig = figures.loglog(etas, ys, out / f"fig_counterfactual_{side}.png", "eta (learning rate applied)",
                                 "relative error of eta * SDI_t", f"Step counterfactual ({side} side)")  # fmt: skip
            sections.append({"heading": f"Step counterfactual, {side} side", "figure": fig,
                             "caption": f"Update: {cf[side]['update']}. Slopes {[round(s, 2) for s in cf[side]['slope']]}; "
                                        f"Spearman at the training lr {[round(s, 2) for s in cf[side]['spearman_at_training_lr']]}; "
                                        "the control point is the smallest error over steps when the features' steps "
                                        "are reversed.",
                             "source": f"results.json: step_counterfactual.{side}"})  # fmt: skip
    if "lds" in r:
        keys = list(r["lds"]["methods"])
        v = [r["lds"]["methods"][k] for k in keys]
        fig = figures.intervals([x["label"] for x in v], [x["mean"] for x in v], [x["lo"] for x in v],
                                [x["hi"] for x in v], out / "fig_lds.png",
                                f"LDS: mean over {r['lds']['queries']} distinct queries, 95% CI ({r['lds']['subsets']} "
                                "retrained subsets)", "Linear datamodeling score")  # fmt: skip
        sections.append({"heading": "Linear datamodeling score", "figure": fig, "source": "results.json: lds",
                         "caption": "Mean per-query LDS with a bootstrap 95% confidence interval over queries.",
                         "table": [{"first": p["a"], "second": p["b"], "paired difference": p["mean"],
                                    "95% CI": f"[{p['lo']:.3f}, {p['hi']:.3f}]"} for p in r["lds"]["paired"].values()]})  # fmt: skip
    if "removal" in r:
        rows = r["removal"]["rows"]
        methods = list(dict.fromkeys(row["method"] for row in rows))
        ks = sorted({row["k"] for row in rows})
        ys = {
            m: np.array(
                [next(x["loss_increase"]["mean"] for x in rows if x["method"] == m and x["k"] == k) for k in ks]
            )
            for m in methods
        }
        fig = figures.lines(np.array(ks), ys, out / "fig_removal.png", "examples removed (top-k proponents of the query)",
                            "query loss increase after retraining (nats)", "Removal test")  # fmt: skip
        sections.append({"heading": "Removal test", "figure": fig, "source": "results.json: removal",
                         "table": [{"k": x["k"], "method": x["label"], "loss increase": x["loss_increase"]["mean"],
                                    "95% CI": f"[{x['loss_increase']['lo']:.3f}, {x['loss_increase']['hi']:.3f}]",
                                    "flips": x["prediction_flips"]} for x in rows]})  # fmt: skip
    if "depth_curation" in r:
        dc = r["depth_curation"]
        budgets = np.array([int(b) for b in dc["budgets"]])
        ys = {k: np.array([v[b] for b in dc["budgets"]]) for k, v in dc["curves"].items()}
        fig = figures.lines(budgets, ys, out / "fig_depth_curation.png", "test-time loop budget r",
                            "held-out test accuracy (mean over seeds)",
                            f"Depth-targeted removal (k={dc['k']}, {len(dc['seeds'])} seeds)")  # fmt: skip
        sections.append({"heading": "Depth-targeted curation", "figure": fig, "source": "results.json: depth_curation",
                         "caption": "Loop-budget curves on held-out test inputs after removing the examples whose "
                                    "signed influence (summed over the ranking queries) is most late-step, most "
                                    "early-step, or random ones (same k), each retrained; mean over seeds.",
                         "table": [{"removed": lab, **{f"r={b}": f"{v[b]['mean']:+.3f} [{v[b]['min']:+.3f}, {v[b]['max']:+.3f}]"
                                                        for b in dc["budgets"]}}
                                   for lab, v in dc["versus_random"].items()]})  # fmt: skip
    return write_html(out, "looptrace: counterfactual evaluation", sections, {"config": r["config"], "task": r["task"]})

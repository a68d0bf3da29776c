"""Figures and the HTML report of ``looptrace eval`` (the case studies' report style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from looptrace.apps.report import figures
from looptrace.apps.report.html import write_report as write_html


def write_report(r: dict[str, Any], out: Path) -> Path:
    sections: list[dict[str, Any]] = [{"heading": "Setup", "text": [
        f"Task: majority of {r['task']['bits']} bits, {r['task']['n_train']} training examples ({r['task']['label_noise']:.0%} "
        f"labels flipped), {r['task']['n_query']} clean queries; looped transformer d={r['task']['d_model']}, "
        f"tau={r['task']['loops']}, truncated BPTT k={r['task']['bptt_k']}, full-batch AdamW lr {r['task']['lr']} for "
        f"{r['task']['steps']} steps (one training: {r['train_seconds']:.2f} s); TracIn checkpoints every "
        f"{r['task']['ckpt_every']} steps."]}]  # fmt: skip
    cf = r.get("step_counterfactual")
    if cf:
        for side in ("test", "train"):
            etas = np.array(cf[side]["etas"])
            tau = len(cf[side]["slope"])
            ys = {
                f"step {t + 1}": np.array([cf[side]["rel_error_by_eta"][str(e)][t] for e in etas]) for t in range(tau)
            }
            fig = figures.loglog(etas, ys, out / f"fig_counterfactual_{side}.png", "eta (learning rate applied)",
                                 "relative error of eta * SDI_t", f"Step counterfactual ({side} side)")  # fmt: skip
            sections.append({"heading": f"Step counterfactual, {side} side", "figure": fig,
                             "caption": f"Slopes {[round(s, 2) for s in cf[side]['slope']]}; Spearman at the training lr "
                                        f"{[round(s, 2) for s in cf[side]['spearman_at_training_lr']]}.",
                             "source": f"results.json: step_counterfactual.{side}"})  # fmt: skip
    if "lds" in r:
        names = list(r["lds"]["methods"])
        v = [r["lds"]["methods"][n] for n in names]
        fig = figures.intervals(names, [x["mean"] for x in v], [x["lo"] for x in v], [x["hi"] for x in v], out / "fig_lds.png",
                                f"LDS: mean over queries, 95% CI ({r['lds']['subsets']} retrained subsets)",
                                "Linear datamodeling score")  # fmt: skip
        sections.append({"heading": "Linear datamodeling score", "figure": fig, "source": "results.json: lds",
                         "caption": "Mean per-query LDS with a bootstrap 95% confidence interval."})  # fmt: skip
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
                         "table": [{"k": x["k"], "method": x["method"], "loss increase": x["loss_increase"]["mean"],
                                    "95% CI": f"[{x['loss_increase']['lo']:.3f}, {x['loss_increase']['hi']:.3f}]",
                                    "flips": x["prediction_flips"]} for x in rows]})  # fmt: skip
    if "depth_curation" in r:
        curves = r["depth_curation"]["curves"]
        budgets = np.array([int(b) for b in next(iter(curves.values()))])
        ys = {k: np.array(list(v.values())) for k, v in curves.items()}
        fig = figures.lines(budgets, ys, out / "fig_depth_curation.png", "test-time loop budget r", "query accuracy",
                            f"Depth-targeted removal (k={r['depth_curation']['k']})")  # fmt: skip
        sections.append({"heading": "Depth-targeted curation", "figure": fig, "source": "results.json: depth_curation",
                         "caption": "Loop-budget curves after removing the examples whose influence is most late-step, most "
                                    "early-step, or random ones (same k), each retrained."})  # fmt: skip
    return write_html(out, "looptrace: counterfactual evaluation", sections, {"config": r["config"], "task": r["task"]})

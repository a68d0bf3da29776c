"""The recursive-LM case study (paper section 4, Fig. 3): where step-resolved influence lands in the
recurrence of a nanochat-style looped LM, with full and truncated BPTT."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.analysis import recurrence as rec
from looptrace.apps.report import figures
from looptrace.apps.report.html import write_study
from looptrace.apps.runs import Run
from looptrace.apps.studies.common import batches
from looptrace.apps.studies.recursive_gpt.task import RecursiveGPTTask, masked_lm_loss
from looptrace.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class RecursiveStudyConfig:
    """What the recursive-LM study computes (saved as config.json beside its outputs).

    The per-step sums of this study cancel (their magnitudes add up to a few times TracIn), so a sketch's
    error, relative to the scores' size, is large on signed quantities: every number comes from the exact run
    (``exact=True``; the body is small), and the default sketch is measured against it at ``sketch_recurrences``
    (its relative error is reported; it is used for nothing else)."""

    recurrences: tuple[int, ...] = tuple(range(2, 17))
    n_train: int = 48
    n_test: int = 16
    exact: bool = True  # False: the sketch below for everything (bodies too large for exact mode)
    sketch_dim: int = 4096
    sketch_seed: int = 0
    batch_size: int = 16
    max_checkpoints: int = 3
    sketch_recurrences: tuple[int, ...] = (8, 16)  # where the sketch is compared with the exact run

    device: str = "cpu"  # where the model runs (cpu, cuda, cuda:N); outputs are on the CPU

    @classmethod
    def quick(cls) -> RecursiveStudyConfig:
        """A smoke run (seconds)."""
        return cls(
            recurrences=(2, 3, 4), n_train=6, n_test=4, sketch_dim=256, max_checkpoints=1, sketch_recurrences=(4,)
        )


def comparison(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the write-up sets beside the paper's, under fixed names: at the shortest and longest
    recurrence, the last-step fraction, the signed and absolute shares of the last steps, the step-to-step
    growth of the absolute per-step mass (first, last, smallest, largest factor: a geometric growth has them
    equal) beside the inverse of the state's contraction factor, how much the per-step sums cancel (TracIn vs
    the summed per-step magnitudes), the sketch's error against the exact run, and the answers' accuracy and
    loss over r (does more looping help this model at all?)."""
    rows = {r["r"]: r for r in results["full_bptt"]}
    lo, hi = min(rows), max(rows)
    cum, ab = results["cumulative_share"][str(hi)], results["absolute_share"][str(hi)]
    steps = np.diff(np.concatenate([[0.0], np.asarray(cum)]))  # signed per-step share at r = hi
    ab_arr = np.asarray(ab, dtype=np.float64)
    factors = ab_arr[1:] / np.maximum(ab_arr[:-1], 1e-300)  # growth of |per-step sum| from step t to t + 1
    ratio = results["state_contraction"]["median_ratio"]
    loss = results.get("answer_loss", {})
    out: dict[str, Any] = {
        "exact": bool(results.get("exact", False)),
        "r_min": lo, "r_max": hi,
        "last_step_fraction_r_min": rows[lo]["last_step_fraction"], "last_step_fraction_r_max": rows[hi]["last_step_fraction"],
        "last_step_fraction_min": min(r["last_step_fraction"] for r in rows.values()),
        "r_of_last_step_fraction_min": min(rows, key=lambda r: rows[r]["last_step_fraction"]),
        "growth_ratio_r_max": rows[hi]["growth_ratio"],
        "growth_factors_r_max": factors.tolist(),
        "growth_factor_first_r_max": float(factors[0]), "growth_factor_last_r_max": float(factors[-1]),
        "growth_factor_min_r_max": float(factors.min()), "growth_factor_max_r_max": float(factors.max()),
        "growth_factors_above_one_r_max": int((factors > 1).sum()), "growth_factors_r_max_count": len(factors),
        "inverse_contraction": 1.0 / ratio if ratio > 0 else float("inf"),
        "cumulative_share_r_max_last4": list(cum[-4:]), "signed_step_share_r_max_last4": steps[-4:].tolist(),
        "negative_steps_r_max": int((steps < 0).sum()),
        "cumulative_share_monotone_r_max": bool(np.all(np.diff(np.asarray(cum)) >= 0)),
        "absolute_share_r_max_last": ab[-1], "absolute_share_r_max_last4": float(np.sum(ab[-4:])),
        "tracin_sum_r_min": rows[lo]["tracin_sum"],
        "tracin_sum_r_max": rows[hi]["tracin_sum"], "abs_per_step_sum_r_max": rows[hi]["abs_per_step_sum"],
        "cancellation_r_max": rows[hi]["abs_per_step_sum"] / max(abs(rows[hi]["tracin_sum"]), 1e-300),
        "max_abs_cumulative_share_r_max": float(np.max(np.abs(cum))),
        "contraction_median_ratio": ratio,
        "state_change_last": results["state_contraction"]["relative_change"][-1],
        "state_change_first": results["state_contraction"]["relative_change"][0],
        "accuracy_max": max(results["answer_accuracy"].values()),
        "answer_loss_min": min(loss.values(), default=float("nan")),
        "answer_loss_max": max(loss.values(), default=float("nan")),
        "answer_loss_r_min": loss.get(str(lo), float("nan")), "answer_loss_r_max": loss.get(str(hi), float("nan")),
        "truncated_nonzero_steps_max": max((r["nonzero_steps"] for r in results["truncated_bptt"]), default=0),
    }  # fmt: skip
    last4 = {int(r): float(np.sum(a[-4:])) for r, a in results["absolute_share"].items() if int(r) >= 4}
    if last4:  # does influence land in the last four steps whatever r is (section 4)?
        out["absolute_share_last4_min"] = min(last4.values())
        out["r_of_absolute_share_last4_min"] = min(last4, key=lambda r: last4[r])
    errors = [row["sdi_rel_error_of_sketch"] for row in results["exact_vs_sketch"]]
    out["sketch_rel_error_max"] = max(errors, default=float("nan"))
    out["sketch_rel_error_min"] = min(errors, default=float("nan"))
    for row in results["exact_vs_sketch"]:
        r = row["r"]
        out[f"exact_r{r}_sketch_rel_error"] = row["sdi_rel_error_of_sketch"]
        out[f"exact_r{r}_last_cumulative"] = row["exact_cumulative_share"][-4:]
        out[f"sketched_r{r}_last_cumulative"] = row["sketched_cumulative_share"][-4:]
        out[f"exact_r{r}_tracin_sum"] = row["exact_tracin_sum"]
        if "sketched_tracin_sum" in row:
            out[f"sketched_r{r}_tracin_sum"] = row["sketched_tracin_sum"]
        out[f"exact_r{r}_absolute_last"] = row["exact_absolute_share"][-1]
        out[f"exact_r{r}_cancellation"] = row["exact_abs_step_mass"] / max(abs(row["exact_tracin_sum"]), 1e-300)
    return out


def run_recursive_study(run: Run, out: Path, cfg: RecursiveStudyConfig) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model = run.load_model(cfg.device)
    run_cfg = run.record.raw
    task: RecursiveGPTTask = run.task
    size = run.preset
    atomic_write_json({"study": dataclasses.asdict(cfg), "run": str(run.path), "preset": size}, out / "config.json")
    data = task.data()
    tr = [t[: cfg.n_train] for t in data.train]
    te = [t[: cfg.n_test].to(cfg.device) for t in data.test]
    paths = run.checkpoint_paths()[-cfg.max_checkpoints :]
    sketch = lt.SketchSpec(dim=cfg.sketch_dim, seed=cfg.sketch_seed)
    spec = lt.SketchSpec.exact() if cfg.exact else sketch

    rows, cum, trunc_rows, absolute, exact_rows = [], {}, [], {}, []
    core: Any = model.core
    with torch.no_grad():  # does the state settle to a fixed point? (contraction gives geometric growth)
        states = model(te[0], n_loops=max(cfg.recurrences), return_all=True)["states"]  # [tau, B, L, d]
    settling = rec.contraction(states.flatten(2).cpu().numpy())
    with torch.no_grad():
        acc, answer_loss = {}, {}
        for r in cfg.recurrences:
            logits = model(te[0], n_loops=r)
            acc[str(r)] = float((((logits.argmax(-1) == te[1]) | (te[2] == 0)).all(1)).float().mean())
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), te[1].flatten(), reduction="none")
            answer_loss[str(r)] = float((ce.view(te[1].shape) * te[2]).sum() / te[2].sum().clamp_min(1))
    for r in cfg.recurrences:
        for bptt in (None, run_cfg["model"].get("bptt_k")):

            def loss(m: torch.nn.Module, b: Any, r: int = r, bptt: int | None = bptt) -> torch.Tensor:
                return masked_lm_loss(m, b, r, bptt)

            def sdi_with(sketch: lt.SketchSpec, loss: Any = loss, r: int = r) -> tuple[np.ndarray, np.ndarray]:
                res = lt.attribute(model, [lt.Checkpoint(p) for p in paths], batches(tr, cfg.batch_size),
                                   batches(te, cfg.batch_size), loss, step_module=core, sketch=sketch, tau=r)  # fmt: skip
                return res.sdi.double().numpy(), res.tracin.double().numpy()

            s, tracin = sdi_with(spec)
            if bptt is None and cfg.exact and r in cfg.sketch_recurrences:  # how far off would the sketch be?
                sk, _ = sdi_with(sketch)
                exact_rows.append({"r": r, "sketched_cumulative_share": rec.cumulative_share(sk).tolist(),
                                   "exact_cumulative_share": rec.cumulative_share(s).tolist(),
                                   "exact_absolute_share": rec.absolute_share(s).tolist(),
                                   "sdi_rel_error_of_sketch": float(np.linalg.norm(sk - s)) / max(float(np.linalg.norm(s)), 1e-300),
                                   "tracin_rel_error_of_sketch": float(np.linalg.norm(sk.sum(-1) - s.sum(-1))) / max(float(np.linalg.norm(s.sum(-1))), 1e-300),
                                   "exact_tracin_sum": float(s.sum()), "sketched_tracin_sum": float(sk.sum()),
                                   "exact_abs_step_mass": float(np.abs(s.sum((0, 1))).sum())})  # fmt: skip
            row = {
                "r": r, "last_step_fraction": rec.last_step_fraction(s), "growth_ratio": rec.growth_ratio(s),
                "tracin_sum": float(s.sum()), "conservation_max_abs": float(np.abs(s.sum(-1) - tracin).max()),
                "abs_per_step_sum": float(np.abs(s.sum((0, 1))).sum()),
            }  # fmt: skip
            if bptt is None:
                rows.append(row)
                cum[str(r)] = rec.cumulative_share(s).tolist()
                absolute[str(r)] = rec.absolute_share(s).tolist()
            else:
                trunc_rows.append({**row, "bptt_k": bptt, "nonzero_steps": int((np.abs(s).sum((0, 1)) > 0).sum())})
    f_cum = figures.lines(
        np.arange(1, max(cfg.recurrences) + 1),
        {f"r={r}": np.pad(np.array(cum[str(r)]), (0, max(cfg.recurrences) - r), constant_values=np.nan) for r in cfg.recurrences[:: max(1, len(cfg.recurrences) // 5)]},
        out / "fig_cumulative_share.png", "loop step t", "signed cumulative SDI share", "Where influence lands in the recurrence (full BPTT)",
    )  # fmt: skip
    f_last = figures.lines(np.array(cfg.recurrences), {"last-step fraction": np.array([r["last_step_fraction"] for r in rows])},
                           out / "fig_last_step.png", "recurrence r", "fraction of |SDI| in the last step", "Influence in the final step")  # fmt: skip
    results: dict[str, Any] = {"run_record": run.record.raw, "preset": size, "checkpoints": [str(p) for p in paths], "sketch": spec.to_dict(),
               "exact": spec.is_exact, "compared_sketch": sketch.to_dict(), "answer_accuracy": acc, "answer_loss": answer_loss, "full_bptt": rows,
               "truncated_bptt": trunc_rows, "cumulative_share": cum, "absolute_share": absolute, "exact_vs_sketch": exact_rows,
               "state_contraction": settling}  # fmt: skip
    results["body_parameters"] = sum(p.numel() for p in core.parameters())
    results["model_parameters"] = sum(p.numel() for p in model.parameters())
    results["comparison"] = comparison(results)
    sections: list[dict[str, Any]] = [
        {"heading": "Setup", "text": [
            f"Model: recursive GPT ({run_cfg['model']['n_prelude']}/{run_cfg['model']['n_core']}/{run_cfg['model']['n_coda']} prelude/core/coda, "
            f"d={run_cfg['model']['d_model']}, concat adapter, RMSNorm, rotary, truncated BPTT k={run_cfg['model']['bptt_k']}), pretrained on stdlib "
            f"docstrings + arithmetic problems, fine-tuned on answers. SDI from {cfg.n_train} arithmetic train problems to {cfg.n_test} test problems "
            f"(disjoint templates) over the last {len(paths)} fine-tuning checkpoints, recomputed with full BPTT at r = {list(cfg.recurrences)}.",
        ]},
        {"heading": "Signed cumulative SDI share", "figure": f_cum, "caption": "Cumulative share of summed SDI up to step t (1 at t = r).", "source": "results.json: cumulative_share"},
        {"heading": "Final-step influence", "figure": f_last, "caption": "Fraction of absolute SDI mass in the last loop step.", "source": "results.json: full_bptt", "table": rows},
        {"heading": "With the training-time truncated BPTT", "table": trunc_rows, "text": ["Only the last k steps carry SDI, by construction."]},
    ]  # fmt: skip
    write_study(
        out,
        "looptrace: recursive LM case study",
        results,
        sections,
        {"run": str(run.path), "run_config": run_cfg, "study": dataclasses.asdict(cfg), "torch": torch.__version__},
    )
    return results

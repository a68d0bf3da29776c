"""The Sudoku and recursive-LM case studies (the parity study lives in :mod:`looptrace.demo`).

Each study reads a run directory from ``looptrace train``, computes SDI over its checkpoints, runs the
analyses of :mod:`looptrace.analysis`, and writes figures (PNG), numbers (JSON), its config and a
self-contained HTML report into an output directory.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.analysis import applications as app
from looptrace.analysis import difficulty as dif
from looptrace.analysis import recurrence as rec
from looptrace.io import atomic_write_json
from looptrace.report import figures
from looptrace.report.html import write_study
from looptrace.tasks import sudoku
from looptrace.train import checkpoint_paths, load_run
from looptrace.zoo import SIZES, preset


def _preset_task(task: str, model_cfg: dict[str, Any]) -> tuple[str, Any]:
    for size in SIZES:
        mc, _, tk = preset(task, size)
        if mc.to_dict() == model_cfg:
            return size, tk
    return "small", preset(task, "small")[2]


def batches(tensors: list[torch.Tensor], size: int) -> list[tuple[torch.Tensor, ...]]:
    """Loader-ordered batches of aligned tensors (rows i:i+size of each)."""
    return [tuple(t[i : i + size] for t in tensors) for i in range(0, len(tensors[0]), size)]


def _stratified(blanks: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices spread as evenly as possible over the blank-count strata (appendix D.4)."""
    rng = np.random.default_rng(seed)
    strata = {b: rng.permutation(np.nonzero(blanks == b)[0]).tolist() for b in np.unique(blanks)}
    out: list[int] = []
    while len(out) < min(n, len(blanks)):
        for b in list(strata):
            if strata[b] and len(out) < n:
                out.append(strata[b].pop())
    return np.array(sorted(out))


@dataclasses.dataclass(frozen=True)
class SudokuStudyConfig:
    n_train: int = 256
    n_test: int = 256
    horizon: int | None = None  # default: 2 x the model's training mean depth
    sketch_dim: int = 4096
    sketch_seed: int = 0
    batch_size: int = 32
    max_checkpoints: int = 8
    budgets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    seed: int = 0


def run_sudoku_study(run: Path, out: Path, cfg: SudokuStudyConfig) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model, run_cfg = load_run(run)
    size, task = _preset_task("sudoku", run_cfg["model"])
    depth_mean = run_cfg["train"].get("depth_mean") or run_cfg["model"]["n_loops"]
    horizon = cfg.horizon or int(2 * depth_mean)
    atomic_write_json(
        {"study": dataclasses.asdict(cfg), "run": str(run), "horizon": horizon, "preset": size}, out / "config.json"
    )
    split = task.split()
    (trx, try_), (tex, tey) = split["train"], split["test"]
    tr_blanks, te_blanks = (trx == 0).sum(1).numpy(), (tex == 0).sum(1).numpy()

    # accuracy vs test-time loop budget, by difficulty bin, on the full hard split
    bins_all = dif.bins_by_blanks(te_blanks)
    acc = {
        b: {str(r): sudoku.accuracy(model, tex[idx], tey[idx], loops=r)[0] for r in cfg.budgets}
        for b, idx in bins_all.items()
    }
    cell = {str(r): sudoku.accuracy(model, tex, tey, loops=r)[1] for r in cfg.budgets}
    # the same on fresh puzzles of the training difficulty (the hard split is harder than anything trained on)
    hx, hy = task.heldout()
    held = {str(r): sudoku.accuracy(model, hx, hy, loops=r) for r in cfg.budgets}
    held_board = {r: v[0] for r, v in held.items()}
    held_cell = {r: v[1] for r, v in held.items()}
    in_dist = {
        "board_accuracy": held_board,
        "cell_accuracy": held_cell,
        "blanks": [int((hx == 0).sum(1).min()), int((hx == 0).sum(1).max())],
    }

    # SDI on stratified subsets at a fixed horizon
    ti = _stratified(tr_blanks, cfg.n_train, cfg.seed)
    qi = _stratified(te_blanks, cfg.n_test, cfg.seed + 1)

    def loss(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return sudoku.loss(m, b[0], b[1], horizon)

    paths = checkpoint_paths(run)
    if len(paths) > cfg.max_checkpoints:  # evenly spaced, always including the last
        keep = np.unique(np.linspace(0, len(paths) - 1, cfg.max_checkpoints).round().astype(int))
        paths = [paths[i] for i in keep]
    spec = lt.SketchSpec(dim=cfg.sketch_dim, seed=cfg.sketch_seed)
    t0 = time.perf_counter()
    res = lt.attribute(model, [lt.Checkpoint(p) for p in paths], batches([trx[ti], try_[ti]], cfg.batch_size), batches([tex[qi], tey[qi]], cfg.batch_size), loss,
                       step_module=model.core, sketch=spec, progress=True)  # fmt: skip
    sdi_s = time.perf_counter() - t0
    sdi = res.sdi.double().numpy()
    tracin = res.tracin.double().numpy()
    self_inf = res.self_influence.double().numpy()
    conservation = float(np.abs(sdi.sum(-1) - tracin).max())

    trb, teb = tr_blanks[ti], te_blanks[qi]
    qbins = dif.bins_by_blanks(teb)
    lo, hi = np.quantile(trb, [1 / 3, 2 / 3])
    easy_cut, hard_cut = (42, 45) if (trb <= 42).sum() >= 10 and (trb >= 45).sum() >= 10 else (int(lo), int(hi))
    groups = {
        f"easy train (<= {easy_cut})": np.nonzero(trb <= easy_cut)[0],
        f"hard train (>= {hard_cut})": np.nonzero(trb >= hard_cut)[0],
    }
    energy = dif.energy_by_bin(sdi, qbins)
    corr = dif.influence_vs_difficulty(self_inf, tracin, trb)
    shares = dif.group_shares(tracin, groups, qbins)
    late_from = horizon // 2 + 1
    late = dif.late_mass(sdi, groups, qbins, late_from)
    names = list(qbins)
    t1 = dif.table1(shares, late, names[0], names[-1])
    e = np.abs(sdi).sum(0)
    horizon_step = app.influence_horizon(np.median(e, 0), 0.05)

    curves: dict[str, dict[str, float]] = {
        "board, held-out (train difficulty)": held_board,
        "cell, held-out (train difficulty)": held_cell,
        "cell, hard test split": cell,
        **{f"board, test {b} blanks": acc[b] for b in acc},
    }
    f_acc = figures.lines(np.array(cfg.budgets), {k: np.array([v[str(r)] for r in cfg.budgets]) for k, v in curves.items()},
                          out / "fig_accuracy_vs_loops.png", "test-time loop budget r", "accuracy",
                          f"Accuracy vs loops (trained with mean depth {depth_mean})")  # fmt: skip
    f_en = figures.energy_curves(
        e,
        out / "fig_energy.png",
        f"SDI energy by test difficulty (horizon {horizon})",
        groups={f"{b} blanks": idx for b, idx in qbins.items()},
    )
    f_sc = figures.lines(np.sort(np.unique(trb)), {"median self-influence": np.array([np.median(self_inf[trb == b]) for b in np.sort(np.unique(trb))])},
                         out / "fig_self_influence.png", "train puzzle blanks", "self-influence sum_k eta_k |g|^2", "Memorisation proxy vs difficulty", logy=True)  # fmt: skip
    results = {
        "preset": size, "horizon": horizon, "checkpoints": res.checkpoints, "etas": res.etas, "sketch": spec.to_dict(),
        "sdi_seconds": sdi_s, "board_accuracy_by_bin": acc, "cell_accuracy": cell, "in_distribution": in_dist,
        "energy_by_bin": energy,
        "correlations": {k: v for k, v in corr.items() if k != "cross_mass"}, "shares": shares, "late_mass": late,
        "late_from_step": late_from, "table1": t1, "conservation_max_abs": conservation, "influence_horizon": horizon_step,
        "train_blanks": trb.tolist(), "test_blanks": teb.tolist(), "self_influence": self_inf.tolist(),
    }  # fmt: skip
    sections: list[dict[str, Any]] = [
        {"heading": "Setup", "text": [
            f"Model: {run_cfg['model']['d_model']}-wide bidirectional looped block ({run_cfg['model']['n_heads']} heads, learned positions, "
            f"no injection), trained with Poisson log-normal depth (mean {depth_mean}). Data: generated unique-solution puzzles, easiest 80% "
            f"train / hardest 20% test by blanks. SDI on {len(ti)} train and {len(qi)} test puzzles (stratified by blanks), horizon "
            f"tau = {horizon}, {len(paths)} checkpoints weighted by their learning rates, sketch {spec}.",
            f"Conservation: max |sum_t SDI_t - TracIn| = {conservation:.2e}.",
        ]},
        {"heading": "Loop-compute scaling", "figure": f_acc, "caption": "Board and blank-cell accuracy vs test-time loops: on fresh puzzles of the training difficulty, and on the hard test split (board accuracy by blanks).", "source": "results.json: in_distribution, cell_accuracy, board_accuracy_by_bin"},
        {"heading": "SDI energy", "figure": f_en, "caption": f"Median and IQR of sum_i |SDI_t| per test bin; influence horizon (5% of peak): step {horizon_step}.", "source": "results.json: energy_by_bin"},
        {"heading": "Memorisation vs difficulty", "figure": f_sc, "caption": "Self-influence by train difficulty.", "source": "results.json: self_influence, train_blanks",
         "table": [{"relation": k, "Spearman rho": v["rho"], "p": v["p"]} for k, v in results["correlations"].items()]},
        {"heading": "Table 1: |TracIn| share and SDI late mass by train group", "table": t1,
         "text": [f"Late mass = share of a group's SDI energy at steps >= {late_from}."]},
    ]  # fmt: skip
    write_study(
        out,
        "looptrace: Sudoku case study",
        results,
        sections,
        {"run": str(run), "run_config": run_cfg, "study": dataclasses.asdict(cfg), "torch": torch.__version__},
    )
    return results


@dataclasses.dataclass(frozen=True)
class RecursiveStudyConfig:
    recurrences: tuple[int, ...] = tuple(range(2, 17))
    n_train: int = 48
    n_test: int = 16
    sketch_dim: int = 4096
    sketch_seed: int = 0
    batch_size: int = 16
    max_checkpoints: int = 3


def run_recursive_study(run: Path, out: Path, cfg: RecursiveStudyConfig) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    stage = run / "finetune" if (run / "finetune" / "config.json").exists() else run
    model, run_cfg = load_run(stage)
    size, task = _preset_task("recursive-gpt", run_cfg["model"])
    task = dataclasses.replace(task, stage="finetune")
    atomic_write_json({"study": dataclasses.asdict(cfg), "run": str(run), "preset": size}, out / "config.json")
    d = task.data()
    tr = [t[: cfg.n_train] for t in d.train]
    te = [t[: cfg.n_test] for t in d.test]
    paths = checkpoint_paths(stage)[-cfg.max_checkpoints :]
    spec = lt.SketchSpec(dim=cfg.sketch_dim, seed=cfg.sketch_seed)

    rows, cum, trunc_rows = [], {}, []
    with torch.no_grad():
        acc = {}
        for r in cfg.recurrences:
            logits = model(te[0], n_loops=r)
            acc[str(r)] = float((((logits.argmax(-1) == te[1]) | (te[2] == 0)).all(1)).float().mean())
    for r in cfg.recurrences:
        for bptt in (None, run_cfg["model"].get("bptt_k")):

            def loss(m: torch.nn.Module, b: Any, r: int = r, bptt: int | None = bptt) -> torch.Tensor:
                x, y, mk = b
                logits = m(x, n_loops=r, bptt_k=bptt)
                ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(
                    y.shape
                )
                return (ce * mk).sum(1) / mk.sum(1).clamp_min(1)

            res = lt.attribute(
                model,
                [lt.Checkpoint(p) for p in paths],
                batches(tr, cfg.batch_size),
                batches(te, cfg.batch_size),
                loss,
                step_module=model.core,
                sketch=spec,
                tau=r,
            )
            s = res.sdi.double().numpy()
            row = {
                "r": r, "last_step_fraction": rec.last_step_fraction(s), "growth_ratio": rec.growth_ratio(s),
                "tracin_sum": float(s.sum()), "conservation_max_abs": float(np.abs(s.sum(-1) - res.tracin.double().numpy()).max()),
            }  # fmt: skip
            if bptt is None:
                rows.append(row)
                cum[str(r)] = rec.cumulative_share(s).tolist()
            else:
                trunc_rows.append({**row, "bptt_k": bptt, "nonzero_steps": int((np.abs(s).sum((0, 1)) > 0).sum())})
    f_cum = figures.lines(
        np.arange(1, max(cfg.recurrences) + 1),
        {f"r={r}": np.pad(np.array(cum[str(r)]), (0, max(cfg.recurrences) - r), constant_values=np.nan) for r in cfg.recurrences[:: max(1, len(cfg.recurrences) // 5)]},
        out / "fig_cumulative_share.png", "loop step t", "signed cumulative SDI share", "Where influence lands in the recurrence (full BPTT)",
    )  # fmt: skip
    f_last = figures.lines(np.array(cfg.recurrences), {"last-step fraction": np.array([r["last_step_fraction"] for r in rows])},
                           out / "fig_last_step.png", "recurrence r", "fraction of |SDI| in the last step", "Influence in the final step")  # fmt: skip
    results = {"preset": size, "checkpoints": [str(p) for p in paths], "sketch": spec.to_dict(), "answer_accuracy": acc, "full_bptt": rows,
               "truncated_bptt": trunc_rows, "cumulative_share": cum}  # fmt: skip
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
        {"run": str(run), "run_config": run_cfg, "study": dataclasses.asdict(cfg), "torch": torch.__version__},
    )
    return results

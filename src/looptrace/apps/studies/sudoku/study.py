"""The Sudoku case study (paper section 4, Fig. 2 and Table 1): loop-compute scaling, SDI energy by
difficulty, memorisation vs difficulty and the late-step influence mass of easy and hard puzzles."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.analysis import applications as app
from looptrace.apps.report import figures
from looptrace.apps.report.html import write_study
from looptrace.apps.runs import Run
from looptrace.apps.studies.common import batches, stratified
from looptrace.apps.studies.sudoku import difficulty as dif
from looptrace.apps.studies.sudoku.task import SudokuTask
from looptrace.apps.tasks import sudoku
from looptrace.errors import ConfigError
from looptrace.io import atomic_write_bytes, atomic_write_json


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

    device: str = "cpu"  # where the model runs (cpu, cuda, cuda:N); outputs are on the CPU

    @classmethod
    def quick(cls) -> SudokuStudyConfig:
        """A smoke run (seconds)."""
        return cls(n_train=16, n_test=8, sketch_dim=256, budgets=(1, 2, 4), max_checkpoints=2)


def run_sudoku_study(run: Run, out: Path, cfg: SudokuStudyConfig) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model = run.load_model(cfg.device)
    run_cfg = run.record.raw
    task: SudokuTask = run.task
    size = run.preset
    depth_mean = run.train_config.depth_mean or run.model_config.n_loops
    horizon = cfg.horizon or int(2 * depth_mean)
    atomic_write_json(
        {"study": dataclasses.asdict(cfg), "run": str(run.path), "horizon": horizon, "preset": size},
        out / "config.json",
    )
    split = task.split()
    (train_x, train_y), (test_x, test_y) = split["train"], split["test"]
    split_train_blanks, split_test_blanks = (train_x == 0).sum(1).numpy(), (test_x == 0).sum(1).numpy()

    # accuracy vs test-time loop budget, by difficulty bin, on the full hard split
    bins_all = dif.bins_by_blanks(split_test_blanks)
    acc = {
        b: {str(r): sudoku.accuracy(model, test_x[idx], test_y[idx], loops=r)[0] for r in cfg.budgets}
        for b, idx in bins_all.items()
    }
    cell = {str(r): sudoku.accuracy(model, test_x, test_y, loops=r)[1] for r in cfg.budgets}
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
    # Fig. 2A: accuracy vs loop budget stratified by difficulty, on puzzles of the training difficulty
    held_bins = dif.bins_by_blanks((hx == 0).sum(1).numpy())
    stratified_acc = {
        kind: {b: {str(r): sudoku.accuracy(model, hx[idx], hy[idx], loops=r)[col] for r in cfg.budgets}
               for b, idx in held_bins.items()}
        for kind, col in (("board", 0), ("cell", 1))
    }  # fmt: skip
    fig2a = {
        "bins": {b: len(idx) for b, idx in held_bins.items()},
        "accuracy": stratified_acc,
        "compute_sensitivity": {kind: dif.compute_sensitivity(v) for kind, v in stratified_acc.items()},
    }

    # SDI on stratified subsets at a fixed horizon
    train_idx = stratified(split_train_blanks, cfg.n_train, cfg.seed)
    query_idx = stratified(split_test_blanks, cfg.n_test, cfg.seed + 1)

    def loss(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return sudoku.loss(m, b[0], b[1], horizon)

    paths = run.checkpoint_paths()
    if len(paths) > cfg.max_checkpoints:  # evenly spaced, always including the last
        keep = np.unique(np.linspace(0, len(paths) - 1, cfg.max_checkpoints).round().astype(int))
        paths = [paths[i] for i in keep]
    spec = lt.SketchSpec(dim=cfg.sketch_dim, seed=cfg.sketch_seed)
    t0 = time.perf_counter()
    res = lt.attribute(model, [lt.Checkpoint(p) for p in paths], batches([train_x[train_idx], train_y[train_idx]], cfg.batch_size), batches([test_x[query_idx], test_y[query_idx]], cfg.batch_size), loss,
                       step_module=model.core, sketch=spec, progress=True)  # fmt: skip
    sdi_s = time.perf_counter() - t0
    sdi = res.sdi.double().numpy()
    tracin = res.tracin.double().numpy()
    self_inf = res.self_influence.double().numpy()
    conservation = float(np.abs(sdi.sum(-1) - tracin).max())

    train_blanks, query_blanks = split_train_blanks[train_idx], split_test_blanks[query_idx]
    qbins = dif.bins_by_blanks(query_blanks)
    lo, hi = np.quantile(train_blanks, [1 / 3, 2 / 3])
    easy_cut, hard_cut = (
        (42, 45) if (train_blanks <= 42).sum() >= 10 and (train_blanks >= 45).sum() >= 10 else (int(lo), int(hi))
    )
    groups = {
        f"easy train (<= {easy_cut})": np.nonzero(train_blanks <= easy_cut)[0],
        f"hard train (>= {hard_cut})": np.nonzero(train_blanks >= hard_cut)[0],
    }
    energy = dif.energy_by_bin(sdi, qbins)
    corr = dif.influence_vs_difficulty(self_inf, tracin, train_blanks)
    shares = dif.group_shares(tracin, groups, qbins)
    late_from = horizon // 2 + 1
    late = dif.late_mass(sdi, groups, qbins, late_from)
    names = list(qbins)
    t1 = dif.table1(shares, late, names[0], names[-1])
    cross = np.abs(tracin).sum(1)
    table1_full = {
        "groups": {g: len(idx) for g, idx in groups.items()},
        "memorisation": dif.memorisation_table(self_inf, cross, groups),
        "shares": shares,
        "late_mass_between_groups": dif.late_mass_between_groups(sdi, groups, qbins, late_from),
        "quartiles": dif.quartile_overlap(self_inf, cross),
        "test_bins": {b: len(q) for b, q in qbins.items()},
    }
    e = np.abs(sdi).sum(0)
    horizon_step = app.influence_horizon(np.median(e, 0), 0.05)

    curves: dict[str, dict[str, float]] = {
        "board, held-out (train difficulty)": held_board,
        "cell, held-out (train difficulty)": held_cell,
        "cell, hard test split": cell,
        **{f"board, test {b} blanks": acc[b] for b in acc},
    }
    curves.update({f"cell, held-out {b} blanks": v for b, v in stratified_acc["cell"].items()})
    f_acc = figures.lines(np.array(cfg.budgets), {k: np.array([v[str(r)] for r in cfg.budgets]) for k, v in curves.items()},
                          out / "fig_accuracy_vs_loops.png", "test-time loop budget r", "accuracy",
                          f"Accuracy vs loops (trained with mean depth {depth_mean})")  # fmt: skip
    f_en = figures.energy_curves(
        e,
        out / "fig_energy.png",
        f"SDI energy by test difficulty (horizon {horizon})",
        groups={f"{b} blanks": idx for b, idx in qbins.items()},
    )
    f_sc = figures.lines(np.sort(np.unique(train_blanks)), {"median self-influence": np.array([np.median(self_inf[train_blanks == b]) for b in np.sort(np.unique(train_blanks))])},
                         out / "fig_self_influence.png", "train puzzle blanks", "self-influence sum_k eta_k |g|^2", "Memorisation proxy vs difficulty", logy=True)  # fmt: skip
    results = {
        "run_record": run.record.raw, "preset": size, "horizon": horizon, "checkpoints": res.checkpoints, "etas": res.etas, "sketch": spec.to_dict(),
        "sdi_seconds": sdi_s, "board_accuracy_by_bin": acc, "cell_accuracy": cell, "in_distribution": in_dist,
        "energy_by_bin": energy,
        "correlations": {k: v for k, v in corr.items() if k != "cross_mass"}, "shares": shares, "late_mass": late,
        "late_from_step": late_from, "table1": t1, "table1_full": table1_full, "fig2a": fig2a,
        "conservation_max_abs": conservation, "influence_horizon": horizon_step,
        "train_blanks": train_blanks.tolist(), "test_blanks": query_blanks.tolist(), "self_influence": self_inf.tolist(),
    }  # fmt: skip
    results["comparison"] = comparison(results)
    sections: list[dict[str, Any]] = [
        {"heading": "Setup", "text": [
            f"Model: {run_cfg['model']['d_model']}-wide bidirectional looped block ({run_cfg['model']['n_heads']} heads, learned positions, "
            f"no injection), trained with Poisson log-normal depth (mean {depth_mean}). Data: generated unique-solution puzzles, easiest 80% "
            f"train / hardest 20% test by blanks. SDI on {len(train_idx)} train and {len(query_idx)} test puzzles (stratified by blanks), horizon "
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
        {"run": str(run.path), "run_config": run_cfg, "study": dataclasses.asdict(cfg), "torch": torch.__version__},
    )
    return results


def comparison(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the write-up sets beside the paper's, under fixed names (the groups' and bins' labels depend
    on the run's difficulty range): Table 1, the correlations, the quartile statement and Fig. 2A's compute
    sensitivity of the easiest and hardest held-out bins. Works on a results dict read back from JSON, whose
    keys are sorted as strings: groups, bins and budgets are put in order by their numbers, not their keys."""
    t1 = results["table1_full"]
    easy, hard = sorted(t1["groups"], key=lambda g: not g.startswith("easy"))  # the easy group first
    bins = _by_number(t1["test_bins"])
    easy_bin, hard_bin = bins[0], bins[-1]
    mem, shares, late = t1["memorisation"], t1["shares"], t1["late_mass_between_groups"]
    sens = results["fig2a"]["compute_sensitivity"]["cell"]
    held = _by_number(sens)
    corr = results["correlations"]
    budgets = _by_number(results["in_distribution"]["board_accuracy"])
    decay = energy_decay(results["energy_by_bin"], results["late_from_step"])
    return {
        "easy_group": easy, "hard_group": hard, "easy_test_bin": easy_bin, "hard_test_bin": hard_bin,
        "n_easy": t1["groups"][easy], "n_hard": t1["groups"][hard],
        "self_vs_blanks_rho": corr["self_vs_blanks"]["rho"], "self_vs_blanks_p": corr["self_vs_blanks"]["p"],
        "cross_vs_blanks_rho": corr["cross_vs_blanks"]["rho"], "cross_vs_blanks_p": corr["cross_vs_blanks"]["p"],
        "self_vs_cross_rho": corr["self_vs_cross"]["rho"],
        "self_median_easy": mem["self"][easy]["median"], "self_median_hard": mem["self"][hard]["median"],
        "self_median_ratio_hard_over_easy": mem["self"]["median_ratio_hard_over_easy"], "self_welch_p": mem["self"]["welch_p"],
        "cross_median_easy": mem["cross"][easy]["median"], "cross_median_hard": mem["cross"][hard]["median"],
        "cross_median_ratio_hard_over_easy": mem["cross"]["median_ratio_hard_over_easy"], "cross_welch_p": mem["cross"]["welch_p"],
        "share_easy_test_easy_train": shares[easy_bin][easy], "share_easy_test_hard_train": shares[easy_bin][hard],
        "share_hard_test_easy_train": shares[hard_bin][easy], "share_hard_test_hard_train": shares[hard_bin][hard],
        "share_hard_test_p": shares[hard_bin].get("paired_p", float("nan")),
        "share_easy_test_p": shares[easy_bin].get("paired_p", float("nan")),
        "late_easy_test_easy_train": late[easy_bin][easy], "late_easy_test_hard_train": late[easy_bin][hard],
        "late_hard_test_easy_train": late[hard_bin][easy], "late_hard_test_hard_train": late[hard_bin][hard],
        "late_hard_test_p": late[hard_bin].get("paired_p", float("nan")),
        "late_easy_test_p": late[easy_bin].get("paired_p", float("nan")),
        "bottom_self_in_top_cross": t1["quartiles"]["bottom_self_in_top_cross"], "bottom_self": t1["quartiles"]["bottom_self"],
        "easiest_held_bin": held[0], "hardest_held_bin": held[-1],
        "sensitivity_cell_easiest": sens[held[0]], "sensitivity_cell_hardest": sens[held[-1]],
        "board_accuracy_at_1": results["in_distribution"]["board_accuracy"][budgets[0]],
        "board_accuracy_at_max": results["in_distribution"]["board_accuracy"][budgets[-1]],
        "cell_accuracy_hard_split_at_max": results["cell_accuracy"][budgets[-1]],
        **decay,
    }  # fmt: skip


def _by_number(keys: Any) -> list[str]:
    """Keys like "8", "16" or "34-35" in the order of their (first) number."""
    return sorted(keys, key=lambda k: int(str(k).split("-")[0]))


def energy_decay(energy: dict[str, dict[str, list[float]]], late_from: int) -> dict[str, Any]:
    """Fig. 2B in two numbers, from the median energy curve of the easiest and the hardest test bin: the late
    fraction of each (sum over steps t >= ``late_from`` of the median energy over its sum over all steps: a
    slower decay gives a larger one) and the hardest bin's late energy over the easiest's (above one: "higher
    SDI energy deeper into the recurrence"). Medians of the bins, not per-query values (those are not kept)."""
    names = _by_number(energy)
    easy, hard = np.asarray(energy[names[0]]["median"]), np.asarray(energy[names[-1]]["median"])
    k = late_from - 1  # 0-based first late step

    def late_fraction(e: np.ndarray) -> float:
        return float(e[k:].sum() / max(float(e.sum()), 1e-300))

    return {
        "energy_easiest_bin": names[0], "energy_hardest_bin": names[-1],
        "energy_late_fraction_easiest": late_fraction(easy), "energy_late_fraction_hardest": late_fraction(hard),
        "energy_late_fraction_hardest_minus_easiest": late_fraction(hard) - late_fraction(easy),
        "energy_late_ratio_hardest_over_easiest": float(hard[k:].sum() / max(float(easy[k:].sum()), 1e-300)),
        "energy_first_step_ratio_hardest_over_easiest": float(hard[0] / max(float(easy[0]), 1e-300)),
    }  # fmt: skip


def aggregate_seeds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The spread over training seeds of the figures the write-up compares with the paper."""

    def spread(values: list[float]) -> dict[str, Any]:
        """Mean, sd and the 95% interval of the mean over runs (Student t, n - 1 degrees of freedom: the run
        is the unit of replication), and in how many runs the value is positive."""
        from scipy import stats

        v = np.asarray(values, dtype=np.float64)
        n = len(v)
        sd = float(v.std(ddof=1)) if n > 1 else 0.0
        half = float(stats.t.ppf(0.975, n - 1)) * sd / np.sqrt(n) if n > 1 else float("nan")
        return {"mean": float(v.mean()), "sd": sd, "values": v.tolist(), "n": n,
                "ci95": [float(v.mean()) - half, float(v.mean()) + half], "positive_in": int((v > 0).sum())}  # fmt: skip

    out: dict[str, Any] = {"runs": len(results)}
    budgets = list(results[0]["in_distribution"]["board_accuracy"])
    for kind in ("board_accuracy", "cell_accuracy"):
        out[f"in_distribution_{kind}"] = {r: spread([x["in_distribution"][kind][r] for x in results]) for r in budgets}
    out["correlations"] = {
        k: spread([x["correlations"][k]["rho"] for x in results]) for k in results[0]["correlations"]
    }
    mem = [x["table1_full"]["memorisation"] for x in results]
    out["self_median_ratio_hard_over_easy"] = spread([m["self"]["median_ratio_hard_over_easy"] for m in mem])
    out["cross_median_ratio_hard_over_easy"] = spread([m["cross"]["median_ratio_hard_over_easy"] for m in mem])
    out["bottom_self_in_top_cross"] = [x["table1_full"]["quartiles"]["bottom_self_in_top_cross"] for x in results]

    def hard_minus_easy(table: str) -> dict[str, Any]:
        """Per test bin, the spread over runs of the hard train group's value minus the easy group's."""
        out_b: dict[str, Any] = {}
        for b in results[0]["table1_full"][table]:
            diffs = []
            for x in results:
                row = x["table1_full"][table].get(b, {})
                groups = [k for k in row if not k.startswith("paired")]
                if len(groups) == 2:
                    diffs.append(row[groups[1]] - row[groups[0]])
            if diffs:
                out_b[b] = {**spread(diffs), "positive_in": int(sum(d > 0 for d in diffs))}
        return out_b

    out["late_mass_hard_minus_easy_train"] = hard_minus_easy("late_mass_between_groups")
    out["share_hard_minus_easy_train"] = hard_minus_easy("shares")
    sens = [x["fig2a"]["compute_sensitivity"]["cell"] for x in results]
    out["compute_sensitivity_cell"] = {b: spread([s[b] for s in sens if b in s]) for b in sens[0]}
    comps = [comparison(x) for x in results]  # from each run's numbers, never a stored (possibly older) copy
    out["comparison"] = {k: spread([c[k] for c in comps]) for k, v in comps[0].items() if isinstance(v, (int, float))}
    out["comparison"]["sensitivity_hardest_minus_easiest"] = spread(
        [c["sensitivity_cell_hardest"] - c["sensitivity_cell_easiest"] for c in comps]
    )
    out["comparison"]["share_hard_minus_easy_on_hard_test"] = spread(
        [c["share_hard_test_hard_train"] - c["share_hard_test_easy_train"] for c in comps]
    )
    out["comparison"]["late_hard_minus_easy_on_hard_test"] = spread(
        [c["late_hard_test_hard_train"] - c["late_hard_test_easy_train"] for c in comps]
    )
    out["comparison"]["share_hard_minus_easy_on_easy_test"] = spread(
        [c["share_easy_test_hard_train"] - c["share_easy_test_easy_train"] for c in comps]
    )
    out["comparison"]["late_hard_minus_easy_on_easy_test"] = spread(
        [c["late_easy_test_hard_train"] - c["late_easy_test_easy_train"] for c in comps]
    )
    out["labels"] = {k: v for k, v in comps[0].items() if isinstance(v, str)}
    return out


def rederive(directory: Path) -> Path:
    """Recompute each run's ``comparison`` and the spread over runs (``seeds.json``) from the ``results.json``
    files already in ``directory`` (one sub-directory per run, in name order), without the models: what
    ``looptrace analyze sudoku --run A --run B ... --out DIR`` writes after its SDI, when only the derived
    figures changed."""
    runs = sorted(p.parent for p in directory.glob("*/results.json"))
    if not runs:
        raise ConfigError(
            f"{directory} holds no */results.json: run `looptrace analyze sudoku --run ... --out {directory}`"
        )
    results = []
    for run_dir in runs:
        res = json.loads((run_dir / "results.json").read_text())
        res["comparison"] = comparison(res)
        atomic_write_json(res, run_dir / "results.json")
        results.append(res)
    out = directory / "seeds.json"  # written the way the CLI writes it
    atomic_write_bytes(out, json.dumps(aggregate_seeds(results), indent=2, default=str).encode())
    return out

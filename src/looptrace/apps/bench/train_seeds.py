"""Training time of a preset over seeds, as a user runs it: ``looptrace train`` in a fresh process per seed,
one at a time, wall clock from process start to exit (imports, data, checkpoints and the final evaluation
included).

    python -m looptrace.apps.bench.train_seeds parity --preset small --seeds 0 1 2 3 4 --runs runs/timing

Writes ``OUT/train_time.json`` and ``OUT/train_time.md``: per seed the wall time, the steps taken, whether it
met the targets (>= 99 % in distribution, >= 95 % at the test length) and its final accuracies, then the
maximum and median over seeds and the machine. A run still going at ``--limit`` is stopped and reported as
such (with the step it reached), never dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from looptrace.apps.bench.common import machine
from looptrace.io import atomic_write_bytes, atomic_write_json

#: The small presets' accuracy targets: in distribution, and at the test length.
TARGETS = {"accuracy_in_distribution": 0.99, "accuracy_length": 0.95}


def run_seed(study: str, preset: str, seed: int, run_dir: Path, limit_s: float | None = None) -> tuple[float, bool]:
    """Train one seed in a fresh process: (wall-clock seconds, whether it was stopped at ``limit_s``)."""
    cmd = [sys.executable, "-m", "looptrace.cli", "train", study, "--preset", preset, "--seed", str(seed),
           "--out", str(run_dir), "--quiet"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, True
    return time.perf_counter() - t0, False


def _row(seed: int, path: Path, wall: float, timed_out: bool, note: str) -> dict[str, Any]:
    record = json.loads((path / "config.json").read_text())
    row: dict[str, Any] = {"seed": seed, "wall_s": wall, "timed_out": timed_out, "threads": record["train"].get("threads"),
                           "overrides": record.get("overrides", {}), "note": note}  # fmt: skip
    if timed_out or not (path / "metrics.json").exists():  # the last saved state says how far it got
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        last = [e for e in json.loads(state["history"]) if "loss" in e][-1]
        row.update(steps=int(state["step"]), stopped_early=False, met_targets=False,
                   task_state={k: v for k, v in last.items() if k not in ("step", "loss", "lr", "loops", "time_s")})  # fmt: skip
        return row
    metrics = json.loads((path / "metrics.json").read_text())
    acc = {k: v for k, v in metrics.items() if k.startswith("accuracy")}
    task = record["task"]
    met = acc.get("accuracy_in_distribution", 0.0) >= TARGETS["accuracy_in_distribution"] and all(
        v >= TARGETS["accuracy_length"] for k, v in acc.items() if k.startswith("accuracy_length")
    )
    row.update(steps=metrics["steps"], train_s=metrics.get("train_time_s"), stopped_early=bool(metrics.get("stopped_early")),
               met_targets=met, stop_accuracy=task.get("stop_accuracy"), **acc)  # fmt: skip
    return row


def collect(
    runs: dict[int, Path],
    wall: dict[int, float],
    limit_s: float,
    timed_out: dict[int, bool] | None = None,
    notes: dict[int, str] | None = None,
) -> dict[str, Any]:
    """The record of timed runs: ``runs`` seed -> run directory, ``wall`` seed -> measured wall seconds.
    A run counts as meeting its targets with >= 99 % in distribution and >= 95 % at the test length."""
    rows = [_row(seed, path, wall[seed], (timed_out or {}).get(seed, False), (notes or {}).get(seed, ""))
            for seed, path in sorted(runs.items())]  # fmt: skip
    walls = [r["wall_s"] for r in rows]
    first = json.loads((runs[min(runs)] / "config.json").read_text())
    return {
        "study": first["study"], "preset": first["preset"], "machine": machine(), "seeds": rows, "limit_s": limit_s,
        "targets": TARGETS,
        "max_wall_s": max(walls), "median_wall_s": statistics.median(walls),
        "within_limit_and_targets": sum(r["wall_s"] <= limit_s and r["met_targets"] for r in rows),
        "all_within_limit_and_targets": all(r["wall_s"] <= limit_s and r["met_targets"] for r in rows),
    }  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# `looptrace train {r['study']} --preset {r['preset']}`: wall-clock time by seed",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; one run at a time, each in a fresh process; "
        f"limit {r['limit_s']:.0f} s.",
        "",
        "| seed | wall (s) | stopped at the limit | steps | met the targets | overrides | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in r["seeds"]:
        lines.append(f"| {s['seed']} | {s['wall_s']:.0f} | {s['timed_out']} | {s['steps']} | {s['met_targets']} | "
                     f"{s['overrides']} | {s['note']} |")  # fmt: skip
    lines += ["", f"Within the limit and on target: {r['within_limit_and_targets']} of {len(r['seeds'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m looptrace.apps.bench.train_seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("study")
    p.add_argument("--preset", default="small")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--runs", default="runs/timing", help="where the timed runs are written (one directory per seed)")
    p.add_argument("--out", default=None, help="results directory (default: docs/results/STUDY)")
    p.add_argument("--limit", type=float, default=600.0, help="wall-clock budget per run: stopped there (seconds)")
    a = p.parse_args(argv)
    runs, wall, late = {}, {}, {}
    for seed in a.seeds:
        runs[seed] = Path(a.runs) / f"{a.study}-{a.preset}-s{seed}"
        if runs[seed].exists():
            raise SystemExit(f"{runs[seed]} exists: a timed run must start from scratch; remove it or pick --runs")
        wall[seed], late[seed] = run_seed(a.study, a.preset, seed, runs[seed], a.limit)
        print(f"seed {seed}: {wall[seed]:.0f} s{' (stopped at the limit)' if late[seed] else ''}", flush=True)
    r = collect(runs, wall, a.limit, late)
    out = Path(a.out or f"docs/results/{a.study}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(r, out / "train_time.json")
    atomic_write_bytes(out / "train_time.md", markdown(r).encode())
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

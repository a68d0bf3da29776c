"""Training time of a preset over seeds, as a user runs it: ``looptrace train`` in a fresh process per seed,
one at a time, wall clock from process start to exit (imports, data, checkpoints and the final evaluation
included).

    python -m looptrace.apps.bench.train_seeds parity --preset small --seeds 0 1 2 3 4 --runs runs/timing

Writes ``OUT/train_time.json`` and ``OUT/train_time.md``: per seed the wall time, the steps taken, whether the
run stopped early and its final accuracies, then the maximum and median over seeds and the machine. A seed
that misses the preset's targets is reported as such, never dropped.
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

from looptrace.apps.bench.common import machine
from looptrace.io import atomic_write_bytes, atomic_write_json


def run_seed(study: str, preset: str, seed: int, run_dir: Path, extra: list[str] | None = None) -> float:
    """Train one seed in a fresh process; its wall-clock seconds."""
    cmd = [sys.executable, "-m", "looptrace.cli", "train", study, "--preset", preset, "--seed", str(seed),
           "--out", str(run_dir), "--quiet", *(extra or [])]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def collect(
    runs: dict[int, Path], wall: dict[int, float], limit_s: float, notes: dict[int, str] | None = None
) -> dict[str, Any]:
    """The record of timed runs: ``runs`` seed -> run directory, ``wall`` seed -> measured wall seconds."""
    rows = []
    for seed, path in sorted(runs.items()):
        metrics = json.loads((path / "metrics.json").read_text())
        record = json.loads((path / "config.json").read_text())
        acc = {k: v for k, v in metrics.items() if k.startswith("accuracy")}
        rows.append({"seed": seed, "wall_s": wall[seed], "train_s": metrics.get("train_time_s"), "steps": metrics["steps"],
                     "stopped_early": bool(metrics.get("stopped_early", False)), **acc, "threads": record["train"].get("threads"),
                     "note": (notes or {}).get(seed, "")})  # fmt: skip
    walls = [r["wall_s"] for r in rows]
    first = json.loads((runs[min(runs)] / "config.json").read_text())
    targets = {k: first["task"][k] for k in ("stop_accuracy", "stop_length_accuracy") if k in first["task"]}
    return {
        "study": first["study"], "preset": first["preset"], "machine": machine(), "seeds": rows, "limit_s": limit_s,
        "max_wall_s": max(walls), "median_wall_s": statistics.median(walls), "min_wall_s": min(walls),
        "max_steps": max(r["steps"] for r in rows), "all_stopped_early": all(r["stopped_early"] for r in rows),
        "all_within_limit": all(w <= limit_s for w in walls), "targets": targets,
        "min_accuracy_in_distribution": min(r.get("accuracy_in_distribution", float("nan")) for r in rows),
        "min_accuracy_at_test_length": min(v for r in rows for k, v in r.items() if k.startswith("accuracy_length")),
    }  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    acc_keys = [k for k in r["seeds"][0] if k.startswith("accuracy")]
    lines = [
        f"# `looptrace train {r['study']} --preset {r['preset']}` over {len(r['seeds'])} seeds",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; one run at a time, each in a fresh process.",
        "",
        "| seed | wall (s) | steps | stopped early | " + " | ".join(acc_keys) + " | note |",
        "|---|---|---|---|" + "---|" * len(acc_keys) + "---|",
    ]
    for s in r["seeds"]:
        lines.append(f"| {s['seed']} | {s['wall_s']:.0f} | {s['steps']} | {s['stopped_early']} | "
                     + " | ".join(f"{s[k]:.3f}" for k in acc_keys) + f" | {s['note']} |")  # fmt: skip
    lines += ["", f"Maximum {r['max_wall_s']:.0f} s, median {r['median_wall_s']:.0f} s (limit {r['limit_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m looptrace.apps.bench.train_seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("study")
    p.add_argument("--preset", default="small")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--runs", default="runs/timing", help="where the timed runs are written (one directory per seed)")
    p.add_argument("--out", default=None, help="results directory (default: docs/results/STUDY)")
    p.add_argument("--limit", type=float, default=600.0, help="the wall-clock budget a run must meet (seconds)")
    a = p.parse_args(argv)
    runs, wall = {}, {}
    for seed in a.seeds:
        runs[seed] = Path(a.runs) / f"{a.study}-{a.preset}-s{seed}"
        if runs[seed].exists():
            raise SystemExit(f"{runs[seed]} exists: a timed run must start from scratch; remove it or pick --runs")
        wall[seed] = run_seed(a.study, a.preset, seed, runs[seed])
        print(f"seed {seed}: {wall[seed]:.0f} s", flush=True)
    r = collect(runs, wall, a.limit)
    out = Path(a.out or f"docs/results/{a.study}")
    atomic_write_json(r, out / "train_time.json")
    atomic_write_bytes(out / "train_time.md", markdown(r).encode())
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training time of a preset that is too long to run here: time optimizer steps at the lengths its
curriculum visits and add them up over its schedule.

    python -m looptrace.apps.bench.train_time parity --preset paper [--threads 2] [--reps 5]

Writes ``benchmarks/results/train-time-<task>-<preset>.json`` and ``.md``. Each step is a real
training step (AdamW, clipping) on a batch of the preset's size at the curriculum's maximum length,
so the estimate errs on the slow side (a batch's lengths are uniform up to that maximum, padded to it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from looptrace.apps.bench.common import RESULTS, machine
from looptrace.apps.catalog import study
from looptrace.apps.studies.parity.task import ParityTask
from looptrace.apps.tasks import parity
from looptrace.io import atomic_write_bytes, atomic_write_json
from looptrace.models.looped import LoopedTransformer


def parity_estimate(size: str, reps: int) -> dict[str, Any]:
    preset = study("parity").preset(size)
    model_cfg, train_cfg, task = preset.model, preset.train, preset.task
    assert isinstance(task, ParityTask)
    model = LoopedTransformer(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr)
    g = torch.Generator().manual_seed(0)
    lengths = sorted({task.start_max, *range(task.start_max, task.final_max + 1, 4), task.final_max})
    per_length: dict[int, float] = {}
    for n in lengths:
        batch = parity.sample(train_cfg.batch_size, task.min_digits, n, g, pad_to=n + 2)
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            loss = parity.loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip)
            opt.step()
            if i:  # the first step warms up the allocator
                times.append(time.perf_counter() - t0)
        per_length[n] = statistics.median(times)

    def step_time(n: int) -> float:  # linear interpolation between measured lengths
        lo = max(k for k in per_length if k <= n)
        hi = min(k for k in per_length if k >= n)
        if lo == hi:
            return per_length[lo]
        w = (n - lo) / (hi - lo)
        return (1 - w) * per_length[lo] + w * per_length[hi]

    total = sum(step_time(task.max_digits(s)) for s in range(train_cfg.steps)) if not task.adaptive else None
    return {
        "task": "parity",
        "preset": size,
        "model": dataclasses.asdict(model_cfg),
        "steps": train_cfg.steps,
        "batch_size": train_cfg.batch_size,
        "curriculum": f"{task.start_max} -> {task.final_max} digits, one more every {task.curriculum_every} steps",
        "seconds_per_step_by_max_length": {str(k): v for k, v in per_length.items()},
        "estimated_total_s": total,
        "estimated_total_h": None if total is None else total / 3600,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m looptrace.apps.bench.train_time")
    p.add_argument("task", choices=["parity"])
    p.add_argument("--preset", default="paper")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    r = {"machine": machine(), **parity_estimate(a.preset, a.reps)}
    stem = Path(a.out) / f"train-time-{a.task}-{a.preset}"
    atomic_write_json(r, stem.with_suffix(".json"))
    m = r["machine"]
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in r["seconds_per_step_by_max_length"].items())
    atomic_write_bytes(
        stem.with_suffix(".md"),
        (
            f"# Training time: {a.task} --preset {a.preset}\n\n"
            f"Measured {m['date']} on {m['cpu']}, {a.threads} torch threads, torch {m['torch']}: median of "
            f"{a.reps} optimizer steps (batch {r['batch_size']}) at each maximum length, added up over the "
            f"{r['steps']:,}-step schedule ({r['curriculum']}).\n\n"
            f"| max length | seconds / step |\n|---|---|\n{rows}\n\n"
            f"Estimated training time: **{r['estimated_total_h']:.1f} hours** on this machine.\n"
        ).encode(),
    )
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()

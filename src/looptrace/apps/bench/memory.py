"""Peak memory of plain training steps, sketched and exact featurisation, and the largest batch under a cap.

On the CPU each point runs in a fresh process (``python -m looptrace.apps.bench.memory_probe``) that
reports its peak RSS; on a GPU the allocator's peak and an out-of-memory search."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.apps.bench.common import RESULTS, BenchConfig, build, featurize, loss_fn, machine
from looptrace.io import atomic_write_json


def _peak_mib(cfg: BenchConfig, mode: str, batch: int) -> float:
    c = dataclasses.asdict(dataclasses.replace(cfg, batch=batch, n_batches=1))
    # glibc raises its mmap threshold after large frees, so big tensors then come from the heap and
    # RSS stays at its high-water mark: peaks stop being linear in the batch. A fixed threshold keeps
    # every tensor above 128 KiB in its own mapping, returned on free, so RSS follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": _src_path()}
    res = subprocess.run(
        [sys.executable, "-m", "looptrace.apps.bench.memory_probe", json.dumps(c), mode],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return (r["peak_kib"] - r["base_kib"]) / 1024


def _src_path() -> str:
    """The directory holding the ``looptrace`` package (for subprocesses, installed or not)."""
    return str(Path(__file__).resolve().parents[3])


MODES = ("plain", "sketched", "sketched-recompute", "exact")
#: The default sketch with each TensorSketch route forced (the widths benchmark's memory per route).
ROUTE_MODES = ("sketched-fft", "sketched-materialize")


def run_mode(model: Any, batch: Any, mode: str) -> None:
    """One plain training step's forward+backward, or one featurisation, of one batch."""
    if mode == "plain":
        loss_fn(model, batch).sum().backward()
    elif mode == "sketched":
        featurize(model, batch, lt.SketchSpec())
    elif mode == "sketched-recompute":
        featurize(model, batch, lt.SketchSpec(), recompute=True)
    elif mode == "exact":
        featurize(model, batch, lt.SketchSpec.exact())
    elif mode in ROUTE_MODES:
        featurize(model, batch, lt.SketchSpec(), outer_path=mode.removeprefix("sketched-"))
    else:
        raise ValueError(f"unknown mode {mode!r}: one of {MODES + ROUTE_MODES}")


def memory_cuda(
    cfg: BenchConfig, step: int = 4, max_batch: int = 256, modes: tuple[str, ...] = MODES
) -> dict[str, Any]:
    """On a GPU: the largest batch that runs (batch sizes step, 2 step, ... until out of memory, as in the
    paper) and the peak allocated memory at the configured batch, per mode."""
    out: dict[str, Any] = {"cap_mib": torch.cuda.get_device_properties(0).total_memory / 2**20, "modes": list(modes)}
    for mode in modes:
        best, peak = 0, None
        for b in range(step, max_batch + 1, step):
            model, batches = build(dataclasses.replace(cfg, batch=b, n_batches=1), cfg.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                run_mode(model, batches[0], mode)
                torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                break
            finally:
                del model, batches
            best = b
            if b == cfg.batch:
                peak = torch.cuda.max_memory_allocated() / 2**20
        out[mode] = {"max_batch_under_cap": best, f"peak_mib_b{cfg.batch}": peak}
        torch.cuda.empty_cache()
    _ratios(out)
    return out


def _ratios(out: dict[str, Any]) -> None:
    def cap(mode: str) -> int:
        return int(out[mode]["max_batch_under_cap"]) if mode in out else 0

    best = max(cap("sketched"), cap("sketched-recompute"))
    out["max_batch_ratio"] = best / max(cap("exact"), 1) if "exact" in out else None
    out["max_batch_over_plain"] = best / max(cap("plain"), 1) if "plain" in out else None
    # each mode on its own, so that nobody compares recomputation with a figure measured without it
    out["best_mode"] = "sketched-recompute" if cap("sketched-recompute") >= cap("sketched") else "sketched"
    if "exact" in out:
        for mode in ("sketched", "sketched-recompute"):
            if mode in out:
                out[f"max_batch_ratio_{mode.replace('-', '_')}"] = cap(mode) / max(cap("exact"), 1)


def memory(cfg: BenchConfig, batches: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Peak RSS above the loaded model (a fresh process per point); the largest batch under the cap
    comes from a least-squares line of peak memory in the batch size, per mode."""
    points = batches or {mode: (2, cfg.batch // 2, cfg.batch) for mode in MODES}
    out: dict[str, Any] = {"cap_mib": cfg.memory_cap_mib, "modes": list(points)}
    for mode, sizes in points.items():
        bs = sorted(set(sizes))
        peaks = [_peak_mib(cfg, mode, b) for b in bs]
        slope, fixed = (float(v) for v in np.polyfit(bs, peaks, 1))
        slope = max(slope, 1e-6)
        out[mode] = {
            **{f"peak_mib_b{b}": m for b, m in zip(bs, peaks, strict=True)},
            "mib_per_example": slope,
            "fixed_mib": fixed,
            "max_batch_under_cap": int((cfg.memory_cap_mib - fixed) / slope),
        }
    _ratios(out)
    return out


def measure_memory(cfg: BenchConfig) -> dict[str, Any]:
    """Allocator peaks and an out-of-memory search on a GPU; peak RSS and a linear fit on the CPU."""
    return memory_cuda(cfg) if cfg.device.startswith("cuda") else memory(cfg)


PAPER_MEMORY = "memory-paper-model"
A6000_MIB = 48 * 1024  # the paper's GPU (RTX A6000, 48 GB)


def memory_paper_model(out_dir: Path = RESULTS) -> dict[str, Any]:
    """The paper's configuration (135M parameters, tau = 32, sequence 128) on the CPU: peak RSS of each
    mode at small batches, extrapolated linearly to the paper's 48 GB card; then tau = 128 with full BPTT
    for a plain training step and recomputed sketched featurisation.

    RSS on the CPU is not CUDA allocator memory (no fragmentation, no cuBLAS workspaces), so this is the
    memory the computation needs, not a GPU measurement; ``looptrace bench gpu`` measures a GPU."""
    cfg = dataclasses.replace(BenchConfig.paper(), memory_cap_mib=A6000_MIB, device="cpu", n_batches=1)
    t0 = time.perf_counter()
    points = {"plain": (1, 2, 3), "sketched": (1, 2, 3), "sketched-recompute": (1, 2, 3), "exact": (1, 2)}
    res: dict[str, Any] = {"machine": machine(), "config": dataclasses.asdict(cfg), **memory(cfg, batches=points)}
    long = dataclasses.replace(cfg, loops=128)
    res["tau_128"] = {"config": {"loops": 128}, **memory(long, batches={"plain": (1, 2), "sketched-recompute": (1, 2)})}
    res["seconds"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, out_dir / f"{PAPER_MEMORY}.json")
    return res


def paper_memory(out_dir: Path) -> dict[str, Any] | None:
    """The last ``bench memory --paper`` result in ``out_dir``, if any."""
    path = out_dir / f"{PAPER_MEMORY}.json"
    return json.loads(path.read_text()) if path.exists() else None

"""The paper's configuration on one GPU, as one prepared run (``looptrace bench gpu``; ``benchmarks/gpu.sh``).

Looped GPT with 135M parameters, tau = 32, sequence 128, TensorSketch m = 2048 per tensor (the paper's
sketch) and our default sketch: plain forward+backward vs featurisation time (paired rounds), seconds per
checkpoint at batch 40, the largest batch of a plain step, sketched, sketched with recomputation and
exact featurisation (an out-of-memory search in steps of 4, as in the paper), and the peak memory of each at
batch 8. Writes ``gpu.json`` and ``gpu.md``. ``--dry-run`` runs the same code on a tiny model on any device
(it is tested on the CPU so the script cannot rot); its output is not a measurement.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

import looptrace as lt
from looptrace.apps.bench.common import BenchConfig, build, loss_fn, machine, paired_times
from looptrace.apps.bench.memory import MODES, run_mode
from looptrace.io import atomic_write_bytes, atomic_write_json

BUDGET_S = 8 * 60


def _config(dry_run: bool, device: str) -> BenchConfig:
    if dry_run:
        return BenchConfig(
            d_model=32, n_heads=2, loops=4, seq=16, vocab=64, batch=4, n_batches=2, reps=2, device=device
        )
    return dataclasses.replace(BenchConfig.paper(), n_batches=1, reps=3, device=device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def _reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def largest_batch(cfg: BenchConfig, mode: str, step: int, limit: int, deadline: float) -> dict[str, Any]:
    """Batch sizes step, 2 step, ... until out of memory (or ``limit``, or the time budget)."""
    best, stopped = 0, "limit"
    for b in range(step, limit + 1, step):
        if time.perf_counter() > deadline:
            stopped = "time budget"
            break
        model, batches = build(dataclasses.replace(cfg, batch=b, n_batches=1), cfg.device)
        _reset(cfg.device)
        try:
            run_mode(model, batches[0], mode)
            _sync(cfg.device)
        except torch.OutOfMemoryError:
            stopped = "out of memory"
            break
        finally:
            del model, batches
        best = b
    _reset(cfg.device)
    return {"max_batch": best, "stopped_by": stopped}


def run(device: str = "cuda", dry_run: bool = False, out_dir: Path = Path("benchmarks/results")) -> dict[str, Any]:
    cfg = _config(dry_run, device)
    deadline = time.perf_counter() + (60 if dry_run else BUDGET_S)
    t0 = time.perf_counter()
    model, batches = build(cfg, device)
    batch = batches[0]
    paper_spec = lt.SketchSpec(dim=2048, method="tensorsketch", budget="per_tensor")

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).sum().backward()

    res: dict[str, Any] = {"machine": machine(), "config": dataclasses.asdict(cfg), "dry_run": dry_run, "timing": {}}
    core: Any = model.core
    for name, spec in (("tensorsketch_m2048", paper_spec), ("default", lt.SketchSpec())):
        run_one = partial(lt.featurize, model, [batch], loss_fn, step_module=core, sketch=spec, verify=False)
        t_plain, t_feat, ratio, _ = paired_times(plain, run_one, cfg.reps)
        res["timing"][name] = {"plain_s": t_plain, "featurize_s": t_feat, "ratio": ratio, "batch": cfg.batch}
    big = 40 if not dry_run else 8
    big_model, big_batches = build(dataclasses.replace(cfg, batch=big, n_batches=1), device)
    start = time.perf_counter()
    big_core: Any = big_model.core
    lt.featurize(big_model, big_batches, loss_fn, step_module=big_core, sketch=paper_spec, verify=False)
    _sync(device)
    res["seconds_per_checkpoint"] = {"batch": big, "seconds": time.perf_counter() - start, "spec": str(paper_spec)}
    del big_model, big_batches
    res["peak_mib_at_batch"] = {"batch": cfg.batch}
    for mode in MODES:
        _reset(device)
        m, b = build(cfg, device)
        run_mode(m, b[0], mode)
        _sync(device)
        res["peak_mib_at_batch"][mode] = _peak(device)
        del m, b
    res["largest_batch"] = {
        mode: largest_batch(cfg, mode, step=4 if not dry_run else 2, limit=512 if not dry_run else 6, deadline=deadline)
        for mode in MODES
    }
    lb = {k: v["max_batch"] for k, v in res["largest_batch"].items()}
    best = max(lb["sketched"], lb["sketched-recompute"])
    res["max_batch_ratio"] = best / max(lb["exact"], 1)
    res["max_batch_over_plain"] = best / max(lb["plain"], 1)
    res["seconds"] = time.perf_counter() - t0
    stem = "gpu-dry-run" if dry_run else "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, out_dir / f"{stem}.json")
    atomic_write_bytes(out_dir / f"{stem}.md", markdown(res).encode())
    return res


def markdown(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    lines = [
        "# GPU benchmark" + (" (dry run: not a measurement)" if r["dry_run"] else ""),
        "",
        f"{m.get('gpu', 'no GPU')} ({m['date']}, torch {m['torch']}): looped GPT {c['n_prelude']}/{c['n_core']}/{c['n_coda']}, "
        f"d={c['d_model']}, tau={c['loops']}, sequence {c['seq']}.",
        "",
        "| measurement | value |",
        "|---|---|",
    ]
    for name, t in r["timing"].items():
        lines.append(f"| featurisation ({name}) / plain fwd+bwd at batch {t['batch']} | {t['ratio']:.2f}x |")
    s = r["seconds_per_checkpoint"]
    lines.append(f"| seconds per checkpoint at batch {s['batch']} ({s['spec']}) | {s['seconds']:.2f} |")
    for mode, v in r["largest_batch"].items():
        peak = r["peak_mib_at_batch"].get(mode)
        peak_text = f", peak {peak:.0f} MiB at batch {r['peak_mib_at_batch']['batch']}" if peak else ""
        lines.append(f"| largest batch, {mode} | {v['max_batch']} (stopped by {v['stopped_by']}{peak_text}) |")
    lines.append(f"| sketched / exact largest batch | {r['max_batch_ratio']:.1f}x |")
    lines.append(f"| sketched / plain largest batch | {r['max_batch_over_plain']:.1f}x |")
    return "\n".join(lines) + "\n"

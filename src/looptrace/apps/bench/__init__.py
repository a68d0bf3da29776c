"""Benchmarks: fidelity, conservation, memory and speed against the exact baseline and the peers.

``looptrace bench all [--quick]`` writes ``benchmarks/results/latest.json`` and regenerates the
Markdown table ``benchmarks/results/README.md``. Ratios are measured within one run (the machines
are noisy); every timing is the median of repetitions; the machine, threads, torch version and date
are recorded with the figures.

Peers, on the same model, batch and run:
* the PyPI reference implementation of the paper (``step-decomposed-influence``), installed into a
  throwaway virtual environment and run in a subprocess;
* project-after-the-fact TracIn (per-example gradients by ``torch.func``, then a dense Gaussian or a
  sparse JL projection, as TRAK and Captum do).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import looptrace as lt
from looptrace.apps.bench.common import RESULTS, BenchConfig, build, featurize, machine
from looptrace.apps.bench.fidelity import conservation, fidelity
from looptrace.apps.bench.memory import measure_memory, memory_paper_model, paper_memory
from looptrace.apps.bench.reference import reference
from looptrace.apps.bench.report import markdown
from looptrace.apps.bench.speed import project_after, speed
from looptrace.io import atomic_write_bytes, atomic_write_json


# ---------------------------------------------------------------------------------------- all
def run_all(cfg: BenchConfig, out_dir: Path = RESULTS, venv: Path = Path(".bench-venv")) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    model, batch = build(cfg, cfg.device)
    t0 = time.perf_counter()
    exact = featurize(model, batch, lt.SketchSpec.exact())
    results: dict[str, Any] = {
        "machine": machine(),
        "config": dataclasses.asdict(cfg),
        "body_parameters": exact.dim,
        "body_tensors": len(exact.layout),
    }
    print("speed ...", flush=True)
    results["speed"] = speed(model, batch, cfg)
    print("fidelity ...", flush=True)
    results["fidelity"] = fidelity(model, batch, cfg, exact)
    print("conservation ...", flush=True)
    results["conservation"] = conservation(model, batch, exact)
    print("project-after-the-fact ...", flush=True)
    results["project_after"] = project_after(model, batch, cfg, exact)
    print("memory ...", flush=True)
    results["memory"] = measure_memory(cfg)
    if cfg.peer:
        print("reference implementation ...", flush=True)
        results["reference"] = reference(cfg, exact, results["speed"]["overhead_tensorsketch_m2048_materialize"], venv)
    results["seconds"] = time.perf_counter() - t0
    sp, fi, ref = results["speed"], results["fidelity"], results.get("reference")
    at2048 = [r for r in fi["per_tensor_tensorsketch"] if r["m"] == 2048] or fi["per_tensor_tensorsketch"]
    results["overhead_ratio"] = sp["overhead_default"]
    results["speedup_vs_reference"] = ref["speedup_of_ours_at_same_settings"] if ref else None
    results["sdi_rel_error"] = at2048[len(at2048) // 2]["sdi_rel_error"]
    results["slope"] = fi["slope"]
    results["conservation_rel"] = results["conservation"]["relative"]
    results["max_batch_ratio"] = results["memory"]["max_batch_ratio"]
    paper_mem = paper_memory(out_dir)
    if paper_mem is not None:  # measured separately (bench memory --paper, ~3 minutes)
        results["max_batch_ratio_paper_model"] = paper_mem["max_batch_ratio"]
        results["paper_model_memory_measured"] = paper_mem["machine"]["date"]
    stem = "latest" if cfg.device == "cpu" else "gpu"
    atomic_write_json(results, out_dir / f"{stem}.json")
    atomic_write_bytes(
        out_dir / ("README.md" if cfg.device == "cpu" else "gpu.md"), markdown(results, out_dir).encode()
    )
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options: one definition for ``looptrace bench`` and :func:`main`."""
    p.add_argument(
        "what",
        choices=["all", "scale", "memory"],
        help="all: fidelity/speed/memory/peers; scale: the feature store at N examples; memory: peak memory of "
        "plain / sketched / exact (with --paper: the paper's configuration, on the CPU)",
    )
    p.add_argument("--quick", action="store_true", help="fewer dimensions and seeds (<= 10 minutes on 2 cores)")
    p.add_argument("--n", type=int, default=100_000, help="examples for the scale benchmark")
    p.add_argument("--no-peer", action="store_true", help="skip the reference implementation")
    p.add_argument("--paper", action="store_true", help="the paper's configuration (135M parameters, tau=32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=str(RESULTS), help="results directory")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="looptrace bench")
    add_arguments(p)
    return run_args(p.parse_args(argv))


def run_args(a: argparse.Namespace) -> int:
    """Run the benchmark chosen by parsed :func:`add_arguments` options."""
    if a.what == "scale":
        from looptrace.apps.bench import scale

        print(json.dumps(scale.run(a.n, Path(a.out)), indent=2, default=str))
        return 0
    if a.what == "memory":
        if a.paper:
            r = memory_paper_model(Path(a.out))
        else:
            r = measure_memory(dataclasses.replace(BenchConfig(), device=a.device))
        print(json.dumps(r, indent=2, default=str))
        return 0
    cfg = BenchConfig.paper() if a.paper else BenchConfig.quick() if a.quick else BenchConfig()
    cfg = dataclasses.replace(cfg, device=a.device)
    if a.no_peer:
        cfg = dataclasses.replace(cfg, peer=False)
    r = run_all(cfg, Path(a.out))
    keys = (
        "overhead_ratio",
        "speedup_vs_reference",
        "sdi_rel_error",
        "slope",
        "conservation_rel",
        "max_batch_ratio",
        "seconds",
    )
    print(json.dumps({k: r[k] for k in keys}, indent=2))
    return 0

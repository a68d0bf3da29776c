"""Benchmarks: fidelity, conservation, memory and speed against the exact baseline and the peers.

``looptrace bench all [--quick]`` writes ``benchmarks/results/latest.json`` and regenerates the
Markdown table ``benchmarks/results/README.md``, whose every label comes from the data. The models
have every loop step active (checked; a model with an inactive step is refused). Ratios are
measured within one run (the machines are noisy), as medians of per-round ratios; the machine,
threads, torch version and date are recorded with the figures.

Peers, on the same model, batches and run: the PyPI reference implementation of the paper
(``step-decomposed-influence``, in a throwaway virtual environment, run in a subprocess), and
project-after-the-fact TracIn (per-example gradients by ``torch.func``, then a dense Gaussian or a
sparse JL projection, as TRAK and Captum do).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import looptrace as lt
from looptrace.apps.bench.common import (
    RESULTS,
    BenchConfig,
    InactiveSteps,
    machine,
    parity_workload,
    synthetic_workload,
)
from looptrace.apps.bench.extras import positions_cost, precision, recorder_overhead, routes
from looptrace.apps.bench.fidelity import conservation, fidelity
from looptrace.apps.bench.memory import measure_memory, memory_paper_model, paper_memory
from looptrace.apps.bench.reference import reference
from looptrace.apps.bench.report import markdown
from looptrace.apps.bench.speed import overhead, peer_rows, peer_specs, project_after, where_time_goes
from looptrace.io import atomic_write_bytes, atomic_write_json

__all__ = ["add_arguments", "main", "run_all", "run_args"]


def _trained_run(path: str | None) -> Path | None:
    """The trained run the benchmark also measures: ``--trained``, else the shipped parity run ("" for none)."""
    if path == "":
        return None
    if path:
        return Path(path)
    from looptrace.apps.demo import shipped_run

    return shipped_run("parity", "small")


def run_all(
    cfg: BenchConfig, out_dir: Path = RESULTS, venv: Path = Path(".bench-venv"), trained: str | None = None
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    work = synthetic_workload(cfg)
    results: dict[str, Any] = {"machine": machine(), "config": dataclasses.asdict(cfg)}
    clock = _Sections()
    results["section_seconds"] = clock.seconds  # where the run's time went, section by section
    section = clock.start
    section("fidelity")
    exact = work.featurize(lt.SketchSpec.exact())
    results["fidelity"] = {work.name: fidelity(work, cfg, exact)}
    run_dir = _trained_run(trained)
    if run_dir is not None:
        section("fidelity (trained run)")
        trained_work = parity_workload(run_dir)
        results["fidelity"][trained_work.name] = fidelity(
            trained_work, dataclasses.replace(cfg, total_dims=()), trained_work.featurize(lt.SketchSpec.exact())
        )
    section("conservation")
    results["conservation"] = conservation(work, exact)
    section("speed")
    results["overhead"] = overhead(work, cfg)
    ref = None
    if cfg.peer:
        section("reference implementation")
        # our rows of the peer table, each timed against the reference round by round
        ours = {label: [spec.to_dict(), kw] for label, spec, kw in peer_specs(exact)}
        ref = reference(cfg, exact, venv, dims=sorted({256, 1024, 2048}), ours=ours)
    results["reference"] = ref
    section("peer table, profile, project-after")
    results["peer_table"] = peer_rows(work, cfg, exact, ref)
    results["where_time_goes"] = where_time_goes(work)
    results["project_after"] = project_after(work, cfg, exact)
    section("memory")
    points: dict[str, tuple[int, ...]] = {
        "plain": (2, 8),
        "sketched": (2, 8),
        "sketched-recompute": (2, 8),
        "exact": (2, 8),
    }
    results["memory"] = measure_memory(cfg) if cfg.device != "cpu" else _cpu_memory(cfg, points)
    section("precision")
    results["precision"] = precision(work, cfg, exact)
    section("routes")
    results["routes"] = routes(cfg)
    section("positions")
    results["positions"] = positions_cost(work, cfg)
    section("recorder")
    results["recorder"] = recorder_overhead(cfg)
    section("")
    results["seconds"] = time.perf_counter() - t0
    results.update(headline(results, out_dir))
    stem = "latest" if cfg.device == "cpu" else "gpu-all"
    atomic_write_json(results, out_dir / f"{stem}.json")
    # the page is rendered from the JSON as written (its key order), so that it is the rendering of the file
    written = json.loads((out_dir / f"{stem}.json").read_text())
    atomic_write_bytes(
        out_dir / ("README.md" if cfg.device == "cpu" else "gpu-all.md"), markdown(written, out_dir).encode()
    )
    return results


class _Sections:
    """Wall seconds per named section of a run (``start(name)`` ends the previous one; ``start("")`` the last)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name = ""
        self._t = time.perf_counter()

    def start(self, name: str) -> None:
        now = time.perf_counter()
        if self._name:
            self.seconds[self._name] = now - self._t
        self._name, self._t = name, now
        if name:
            print(f"{name} ...", flush=True)


def _cpu_memory(cfg: BenchConfig, points: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    from looptrace.apps.bench.memory import memory

    return memory(cfg, batches=points)


def _speedup(ref: dict[str, Any] | None, ours: dict[str, Any]) -> float | None:
    """The reference's time over ours, head to head (round by round in its process); None without it."""
    return None if ref is None else float(ours["speedup"])


def headline(r: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The figures the README quotes, each taken from the detailed results."""
    fid = r["fidelity"]["looped-gpt"]
    at = next(row for row in fid["per_tensor_tensorsketch"] if row["m"] == 2048)
    table = {row["label"]: row for row in r["peer_table"]}
    ours_fft = next(v for k, v in table.items() if "FFT" in k and k.startswith("looptrace"))
    ours_mat = next(v for k, v in table.items() if "materialised" in k and k.startswith("looptrace"))
    ours_default = next(v for k, v in table.items() if "default" in k)
    ref = next((v for k, v in table.items() if k.startswith("reference")), None)
    out: dict[str, Any] = {
        "sdi_rel_error_m2048": at["sdi_rel_error"]["mean"],
        "tracin_rel_error_m2048": at["tracin_rel_error"]["mean"],
        "slope": fid["slope"],
        "per_step_error": at["per_step_sdi_rel_error"],
        "step_shares": fid["step_shares"],
        "overhead_ratio": r["overhead"]["default_verify_first"]["ratio"],
        "overhead_ratio_no_verify": r["overhead"]["default_no_verify"]["ratio"],
        "speedup_vs_reference_same_method": _speedup(ref, ours_fft),
        "speedup_vs_reference_default": _speedup(ref, ours_default),
        # the same sketch as the reference, by the route looptrace picks for these shapes (outer_path="auto")
        "speedup_vs_reference_same_sketch_materialised": _speedup(ref, ours_mat),
        "conservation_rel": r["conservation"]["relative"],
        "max_batch_ratio": r["memory"]["max_batch_ratio"],
    }
    out["sdi_rel_error_m2048_sd"] = at["sdi_rel_error"]["sd"]
    out["fidelity_seeds"] = r["config"]["seeds"]
    out["max_batch_ratio_mode"] = _best_mode(r["memory"])
    out["max_batch_ratio_no_recompute"] = _ratio(r["memory"], "sketched")
    for name, f in r["fidelity"].items():  # every workload's slope and its worst step, not only the synthetic one's
        row = next(x for x in f["per_tensor_tensorsketch"] if x["m"] == 2048)
        worst = max(range(len(row["per_step_sdi_rel_error"])), key=lambda t: row["per_step_sdi_rel_error"][t])
        out.setdefault("fidelity_by_workload", {})[name] = {
            "slope": f["slope"], "sdi_rel_error_m2048": row["sdi_rel_error"]["mean"],
            "sdi_rel_error_m2048_sd": row["sdi_rel_error"]["sd"], "worst_step": worst + 1,
            "worst_step_sdi_rel_error": row["per_step_sdi_rel_error"][worst],
        }  # fmt: skip
    for key in ("FFT", "materialised", "default"):
        rounds = next((v.get("speedup_rounds") for k, v in table.items() if key in k and "speedup" in v), None)
        out[f"speedup_rounds_{'fft' if key == 'FFT' else key}"] = len(rounds) if rounds else 0
    paper = paper_memory(out_dir)
    if paper is not None:  # measured separately (bench memory --paper, several minutes)
        out["max_batch_ratio_paper_model"] = paper["max_batch_ratio"]
        out["max_batch_over_plain_paper_model"] = paper["max_batch_over_plain"]
        out["max_batch_ratio_paper_model_mode"] = _best_mode(paper)
        out["max_batch_ratio_paper_model_no_recompute"] = _ratio(paper, "sketched")
        out["paper_model_memory_measured"] = paper["machine"]["date"]
    return out


def _ratio(mem: dict[str, Any], mode: str) -> float | None:
    """The largest batch of ``mode`` over the exact mode's (each under the same cap)."""
    if mode not in mem or "exact" not in mem:
        return None
    return int(mem[mode]["max_batch_under_cap"]) / max(int(mem["exact"]["max_batch_under_cap"]), 1)


def _best_mode(mem: dict[str, Any]) -> str:
    caps = {m: int(mem[m]["max_batch_under_cap"]) for m in ("sketched", "sketched-recompute") if m in mem}
    return max(caps, key=lambda m: (caps[m], m))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options: one definition for ``looptrace bench`` and :func:`main`."""
    p.add_argument(
        "what",
        choices=["all", "widths", "scale", "memory", "gpu", "routes", "recorder", "train-time", "curvature"],
        help="all: fidelity/speed/memory/peers; widths: speed, fidelity and memory of the default sketch at widths "
        "128-768 on a body-dominated looped block, head to head with the reference; scale: the feature store at N examples; memory: peak memory of each "
        "mode (with --paper: the paper's configuration, on the CPU); gpu: the paper's configuration on one GPU "
        "(--dry-run: a tiny model, any device); routes: the cost of each capture route; recorder: the checkpoint "
        "recorder's training overhead; train-time: the parity paper preset's training time from timed steps; "
        "curvature: what fitting K-FAC / EK-FAC costs next to one featurisation pass (issue #24)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer dimensions and seeds (m = 2048 kept; about 5 minutes); curvature: 3 rounds, not 5",
    )
    p.add_argument("--n", type=int, default=100_000, help="examples for the scale benchmark")
    p.add_argument("--no-peer", action="store_true", help="skip the reference implementation")
    p.add_argument("--paper", action="store_true", help="the paper's configuration (135M parameters, tau=32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dry-run", action="store_true", help="(gpu) a tiny model: checks the script, measures nothing")
    p.add_argument("--trained", default=None, help="a trained run directory to measure fidelity on as well")
    p.add_argument("--out", default=str(RESULTS), help="results directory")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="looptrace bench")
    add_arguments(p)
    return run_args(p.parse_args(argv))


def run_args(a: argparse.Namespace) -> int:
    """Run the benchmark chosen by parsed :func:`add_arguments` options."""
    out = Path(a.out)
    base = BenchConfig.quick() if a.quick else BenchConfig()
    cfg = dataclasses.replace(base, device=a.device, peer=not a.no_peer)
    if a.what == "widths":
        from looptrace.apps.bench import widths

        wcfg = widths.WidthsConfig.quick() if a.quick else widths.WidthsConfig()
        wres = widths.run(dataclasses.replace(wcfg, peer=not a.no_peer), out)
        print(json.dumps(wres["headline"], indent=2, default=str))
        return 0
    if a.what == "scale":
        from looptrace.apps.bench import scale

        print(json.dumps(scale.run(a.n, out), indent=2, default=str))
        return 0
    if a.what == "gpu":
        from looptrace.apps.bench import gpu

        print(json.dumps(gpu.run(a.device, a.dry_run, out), indent=2, default=str))
        return 0
    if a.what == "curvature":
        from looptrace.apps.bench import curvature_cost

        res = curvature_cost.run(out, repeats=3 if a.quick else 5)
        print(curvature_cost.markdown(res))
        return 0
    if a.what == "train-time":
        from looptrace.apps.bench.train_time import main as train_time

        train_time(["parity", "--preset", "paper", "--out", str(out)])
        return 0
    if a.what == "memory":
        r = memory_paper_model(out) if a.paper else measure_memory(cfg)
        print(json.dumps(r, indent=2, default=str))
        return 0
    if a.what == "routes":
        r = routes(cfg)
        atomic_write_json(r, out / "routes.json")
        print(json.dumps(r, indent=2, default=str))
        return 0
    if a.what == "recorder":
        r = recorder_overhead(cfg)
        atomic_write_json(r, out / "recorder.json")
        print(json.dumps(r, indent=2, default=str))
        return 0
    if a.paper:
        cfg = dataclasses.replace(BenchConfig.paper(), device=a.device, peer=not a.no_peer)
    try:
        r = run_all(cfg, out, trained=a.trained)
    except InactiveSteps as exc:
        print(f"looptrace bench: refused: {exc}", file=sys.stderr)
        return 2
    keys = ("sdi_rel_error_m2048", "tracin_rel_error_m2048", "slope", "overhead_ratio", "speedup_vs_reference_same_method",
            "speedup_vs_reference_default", "conservation_rel", "max_batch_ratio", "seconds")  # fmt: skip
    print(json.dumps({k: r.get(k) for k in keys}, indent=2))
    return 0

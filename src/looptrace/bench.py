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
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.io import atomic_write_json
from looptrace.models.looped import LoopedConfig, LoopedTransformer
from looptrace.sketch.plan import SketchPlan

RESULTS = Path("benchmarks/results")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The CPU benchmark model (prelude-core-coda looped GPT) and the sweep sizes."""

    d_model: int = 128
    n_heads: int = 4
    n_prelude: int = 1
    n_core: int = 2
    n_coda: int = 1
    loops: int = 8
    seq: int = 128
    vocab: int = 512
    batch: int = 8
    dims: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    total_dims: tuple[int, ...] = (4096, 16384, 65536)
    seeds: int = 10
    reps: int = 5
    memory_cap_mib: int = 2048
    peer: bool = True
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(dims=(256, 1024, 4096), total_dims=(4096, 16384), seeds=5, reps=7)

    @classmethod
    def paper(cls) -> BenchConfig:
        """The paper's configuration (135M parameters, tau = 32): a GPU option."""
        return cls(
            d_model=768, n_heads=12, n_prelude=2, n_core=4, n_coda=2, loops=32, vocab=50304, batch=8, seeds=3, reps=3
        )


def model_config(cfg: BenchConfig) -> LoopedConfig:
    return LoopedConfig(
        vocab_size=cfg.vocab, d_model=cfg.d_model, n_heads=cfg.n_heads, n_prelude=cfg.n_prelude, n_core=cfg.n_core,
        n_coda=cfg.n_coda, n_loops=cfg.loops, max_len=cfg.seq, injection="concat", positions="rotary", bptt_k=None,
    )  # fmt: skip


def build(cfg: BenchConfig, device: str = "cpu") -> tuple[LoopedTransformer, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(cfg.seed)
    model = LoopedTransformer(model_config(cfg)).to(device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
    y = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
    return model, (x, y)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-example mean token cross-entropy (no reduction over examples)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], reps: int, warm: bool = True) -> float:
    if warm:
        fn()
    ts = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def paired_times(base: Callable[[], Any], fn: Callable[[], Any], reps: int) -> tuple[float, float, float]:
    """Median times of ``base`` and ``fn`` run alternately, and the median of the per-round ratios
    fn / base: drift in the machine's speed (other tenants, frequency) cancels within a round."""
    base()
    fn()  # warm-up
    tb, tf, ratio = [], [], []
    for _ in range(reps):
        a = median_time(base, 1, warm=False)
        b = median_time(fn, 1, warm=False)
        tb.append(a)
        tf.append(b)
        ratio.append(b / a)
    return statistics.median(tb), statistics.median(tf), statistics.median(ratio)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def featurize(model: LoopedTransformer, batch: Any, spec: lt.SketchSpec, **kw: Any) -> lt.Features:
    return lt.featurize(model, [batch], loss_fn, step_module=model.core, sketch=spec, verify=False, **kw)


# ---------------------------------------------------------------------------------------- fidelity
def fidelity(model: LoopedTransformer, batch: Any, cfg: BenchConfig, exact: lt.Features) -> dict[str, Any]:
    s_ex, t_ex = lt.sdi(exact, exact), lt.tracin(exact, exact)
    n_tensors = len(exact.layout)
    out: dict[str, Any] = {"per_tensor_tensorsketch": [], "equal_total_dim": []}
    for m in cfg.dims:
        es, et = [], []
        for seed in range(cfg.seeds):
            f = featurize(model, batch, lt.SketchSpec(dim=m, seed=seed, method="tensorsketch", budget="per_tensor"))
            es.append(rel(lt.sdi(f, f), s_ex))
            et.append(rel(lt.tracin(f, f), t_ex))
        out["per_tensor_tensorsketch"].append(
            {
                "m": m,
                "D": m * n_tensors,
                "sdi_rel_error": statistics.mean(es),
                "sdi_sd": statistics.pstdev(es),
                "tracin_rel_error": statistics.mean(et),
                "tracin_sd": statistics.pstdev(et),
            }
        )
    xs = np.log([r["m"] for r in out["per_tensor_tensorsketch"]])
    ys = np.log([r["sdi_rel_error"] for r in out["per_tensor_tensorsketch"]])
    out["slope"] = float(np.polyfit(xs, ys, 1)[0])
    for total in cfg.total_dims:
        for method in ("tensorsketch", "countsketch"):
            for budget in ("per_tensor", "proportional", "shared"):
                dim = total // n_tensors if budget == "per_tensor" else total
                dim -= dim % 2
                es, ts = [], []
                for seed in range(cfg.seeds):
                    t0 = time.perf_counter()
                    f = featurize(model, batch, lt.SketchSpec(dim=dim, seed=seed, method=method, budget=budget))  # type: ignore[arg-type]
                    ts.append(time.perf_counter() - t0)
                    es.append(rel(lt.sdi(f, f), s_ex))
                out["equal_total_dim"].append(
                    {
                        "D": total,
                        "method": method,
                        "budget": budget,
                        "sdi_rel_error": statistics.mean(es),
                        "sdi_sd": statistics.pstdev(es),
                        "seconds": statistics.median(ts),
                    }
                )
    return out


# ---------------------------------------------------------------------------------------- conservation
def conservation(model: LoopedTransformer, batch: Any, exact: lt.Features, m: int = 2048) -> dict[str, float]:
    """Sketch of the summed gradient (autograd, per example) vs the sum of per-step sketches (float32)."""
    spec = lt.SketchSpec(dim=m, method="tensorsketch", budget="per_tensor")
    f = featurize(model, batch, spec)
    names = [d["name"] for d in exact.layout]
    plan = SketchPlan.build(spec, [(d["name"], tuple(d["shape"])) for d in exact.layout])
    params = dict(model.named_parameters())
    losses = loss_fn(model, batch)
    direct = torch.zeros_like(f.total)
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], [params[n] for n in names], retain_graph=True)
        for n, g in zip(names, grads, strict=True):
            slot = plan.slot(n)
            slot.add_dense(direct[i : i + 1, slot.offset : slot.offset + slot.m], g.reshape(1, -1))
    diff = f.total - direct
    return {"max_abs": float(diff.abs().max()), "relative": float(diff.norm() / direct.norm())}


# ---------------------------------------------------------------------------------------- speed
def speed(model: LoopedTransformer, batch: Any, cfg: BenchConfig) -> dict[str, Any]:
    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).sum().backward()

    def forward() -> None:
        with torch.no_grad():
            loss_fn(model, batch)

    t_plain = median_time(plain, cfg.reps)
    t_fwd = median_time(forward, cfg.reps)
    out: dict[str, Any] = {"plain_fwd_bwd_s": t_plain, "inference_forward_s": t_fwd}
    specs = {
        "default": lt.SketchSpec(),
        "tensorsketch_m2048_materialize": lt.SketchSpec(dim=2048, method="tensorsketch", budget="per_tensor"),
        "countsketch_m2048": lt.SketchSpec(dim=2048, method="countsketch", budget="per_tensor"),
    }
    for name, spec in specs.items():  # each paired with a plain step, ratios per round
        _, t, ratio = paired_times(plain, partial(featurize, model, batch, spec), cfg.reps)
        out[f"featurize_{name}_s"] = t
        out[f"overhead_{name}"] = ratio
    _, t_fft, ratio = paired_times(
        plain,
        lambda: featurize(model, batch, specs["tensorsketch_m2048_materialize"], outer_path="fft"),
        max(1, cfg.reps // 2),
    )
    out["featurize_tensorsketch_m2048_fft_s"] = t_fft
    out["overhead_tensorsketch_m2048_fft"] = ratio

    def per_checkpoint() -> None:
        f = featurize(model, batch, specs["default"])
        lt.sdi(f, f)
        lt.tracin(f, f)

    t_ck = median_time(per_checkpoint, cfg.reps)
    out["sdi_per_checkpoint_s"] = t_ck
    out["sdi_per_checkpoint_over_forward"] = t_ck / t_fwd
    return out


# ---------------------------------------------------------------------------------------- project after the fact
def project_after(
    model: LoopedTransformer, batch: Any, cfg: BenchConfig, exact: lt.Features, k: int = 2048
) -> dict[str, Any]:
    """TRAK/Captum-style TracIn: per-example gradients by torch.func, then a JL projection."""
    body = dict(model.core.named_parameters(prefix="core"))
    names = sorted(body)
    others = {n: p.detach() for n, p in model.named_parameters() if n not in body}

    def one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**others, **params}, (x[None],))
        return F.cross_entropy(out[0], y)

    grad_fn = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    detached = {n: body[n].detach() for n in names}

    def per_example() -> torch.Tensor:
        g = grad_fn(detached, *batch)
        return torch.cat([g[n].reshape(cfg.batch, -1) for n in names], 1)

    t_grad = median_time(per_example, max(1, cfg.reps // 2))
    g = per_example()
    p = g.shape[1]
    t_ex = lt.tracin(exact, exact)

    def dense() -> torch.Tensor:  # Gaussian JL, generated in seeded blocks (never a P x k matrix)
        gen = torch.Generator().manual_seed(0)
        out = torch.zeros(cfg.batch, k, device=g.device)
        for i in range(0, p, 16384):
            r = torch.randn(min(16384, p - i), k, generator=gen).to(g.device) / math.sqrt(k)
            out += g[:, i : i + 16384] @ r
        return out

    slot = SketchPlan.build(lt.SketchSpec(dim=k, method="countsketch", budget="shared"), [("all", (p,))]).slots[0]

    def sparse() -> torch.Tensor:
        out = torch.zeros(cfg.batch, k, device=g.device)
        slot.add_dense(out, g)
        return out

    t_dense = median_time(dense, max(1, cfg.reps // 2))
    t_sparse = median_time(sparse, cfg.reps)
    pd, ps = dense(), sparse()
    return {
        "k": k,
        "per_example_grad_s": t_grad,
        "dense_projection_s": t_dense,
        "sparse_projection_s": t_sparse,
        "tracin_rel_error_dense": rel(pd @ pd.T, t_ex),
        "tracin_rel_error_sparse": rel(ps @ ps.T, t_ex),
        "per_example_grad_bytes": int(g.numel() * g.element_size()),
        "note": "gives TracIn only: per-step SDI would need one gradient per example per step",
    }


# ---------------------------------------------------------------------------------------- memory
_MEM_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {src!r})
from looptrace import bench
import looptrace as lt
def hwm():  # this process's peak RSS in KiB (VmHWM: per address space, unlike ru_maxrss which survives exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
cfg = bench.BenchConfig(**json.loads(sys.argv[1]))
model, batch = bench.build(cfg)
mode = sys.argv[2]
base = hwm()
if mode == "plain":
    bench.loss_fn(model, batch).sum().backward()
elif mode == "exact":
    bench.featurize(model, batch, lt.SketchSpec.exact())
else:
    bench.featurize(model, batch, lt.SketchSpec())
print(json.dumps({{"base_kib": base, "peak_kib": hwm()}}))
"""


def _peak_mib(cfg: BenchConfig, mode: str, batch: int) -> float:
    src = str(Path(__file__).resolve().parents[1])
    c = dataclasses.asdict(dataclasses.replace(cfg, batch=batch))
    # glibc raises its mmap threshold after large frees, so big tensors then come from the heap and
    # RSS stays at its high-water mark: peaks stop being linear in the batch. A fixed threshold keeps
    # every tensor above 128 KiB in its own mapping, returned on free, so RSS follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT.format(src=src), json.dumps(c), mode],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return (r["peak_kib"] - r["base_kib"]) / 1024


def memory_cuda(cfg: BenchConfig, step: int = 4, max_batch: int = 256) -> dict[str, Any]:
    """On a GPU: the largest batch that runs (batch sizes 4, 8, 12, ... until out of memory, as in the
    paper) and the peak allocated memory at the configured batch, for plain, sketched and exact."""
    out: dict[str, Any] = {"cap_mib": torch.cuda.get_device_properties(0).total_memory / 2**20}
    for mode in ("plain", "sketched", "exact"):
        best, peak = 0, None
        for b in range(step, max_batch + 1, step):
            model, batch = build(dataclasses.replace(cfg, batch=b), cfg.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                if mode == "plain":
                    loss_fn(model, batch).sum().backward()
                else:
                    featurize(model, batch, lt.SketchSpec() if mode == "sketched" else lt.SketchSpec.exact())
                torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                break
            finally:
                del model, batch
            best = b
            if b == cfg.batch:
                peak = torch.cuda.max_memory_allocated() / 2**20
        out[mode] = {"max_batch_under_cap": best, f"peak_mib_b{cfg.batch}": peak, "mib_per_example": float("nan")}
        torch.cuda.empty_cache()
    out["sketched_over_plain_peak"] = (out["sketched"][f"peak_mib_b{cfg.batch}"] or 0) / max(
        out["plain"][f"peak_mib_b{cfg.batch}"] or 1, 1e-6
    )
    out["max_batch_ratio"] = out["sketched"]["max_batch_under_cap"] / max(out["exact"]["max_batch_under_cap"], 1)
    return out


def memory(cfg: BenchConfig, batches: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Peak RSS above the loaded model (a fresh process per point); the largest batch under the cap
    comes from a least-squares line of peak memory in the batch size, per mode."""
    out: dict[str, Any] = {"cap_mib": cfg.memory_cap_mib}
    points = batches or {mode: (2, cfg.batch // 2, cfg.batch) for mode in ("plain", "sketched", "exact")}
    for mode in ("plain", "sketched", "exact"):
        bs = sorted(set(points[mode]))
        peaks = [_peak_mib(cfg, mode, b) for b in bs]
        slope, fixed = (float(v) for v in np.polyfit(bs, peaks, 1))
        slope = max(slope, 1e-6)
        out[mode] = {
            **{f"peak_mib_b{b}": m for b, m in zip(bs, peaks, strict=True)},
            "mib_per_example": slope,
            "fixed_mib": fixed,
            "max_batch_under_cap": int((cfg.memory_cap_mib - fixed) / slope),
        }
    b = max(set(points["plain"]) & set(points["sketched"]))
    out["sketched_over_plain_peak"] = out["sketched"][f"peak_mib_b{b}"] / max(out["plain"][f"peak_mib_b{b}"], 1e-6)
    out["max_batch_ratio"] = out["sketched"]["max_batch_under_cap"] / max(out["exact"]["max_batch_under_cap"], 1)
    return out


def _memory(cfg: BenchConfig) -> dict[str, Any]:
    """Allocator peaks and an out-of-memory search on a GPU; peak RSS and a linear fit on the CPU."""
    return memory_cuda(cfg) if cfg.device.startswith("cuda") else memory(cfg)


PAPER_MEMORY = "memory-paper-model"
A6000_MIB = 48 * 1024  # the paper's GPU (RTX A6000, 48 GB)


def memory_paper_model(out_dir: Path = RESULTS) -> dict[str, Any]:
    """The paper's configuration (135M parameters, tau = 32, sequence 128) on the CPU: peak RSS of
    plain / sketched / exact at batches 1-3, extrapolated linearly to the paper's 48 GB card.

    RSS on the CPU is not CUDA allocator memory (no fragmentation, no cuBLAS workspaces), so this is the
    memory the computation needs, not a GPU measurement; ``benchmarks/gpu.sh`` measures the GPU."""
    cfg = dataclasses.replace(BenchConfig.paper(), memory_cap_mib=A6000_MIB, device="cpu")
    t0 = time.perf_counter()
    points = {"plain": (1, 2, 3), "sketched": (1, 2, 3), "exact": (1, 2)}  # exact: ~4.6 GiB per example
    res = {"machine": machine(), "config": dataclasses.asdict(cfg), **memory(cfg, batches=points)}
    res["seconds"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, out_dir / f"{PAPER_MEMORY}.json")
    return res


def _paper_memory(out_dir: Path) -> dict[str, Any] | None:
    """The last ``bench memory --paper`` result in ``out_dir``, if any."""
    path = out_dir / f"{PAPER_MEMORY}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _paper_memory_lines(out_dir: Path) -> list[str]:
    r = _paper_memory(out_dir)
    if r is None:
        return []
    m, c = r["machine"], r["config"]
    lines = [
        "",
        "## Memory at the paper's configuration (CPU, peak RSS)",
        "",
        f"From `looptrace bench memory --paper` on {m['date']} ({m['cpu']}, torch {m['torch']}): looped GPT "
        f"{c['n_prelude']}/{c['n_core']}/{c['n_coda']}, d={c['d_model']}, tau={c['loops']}, sequence {c['seq']}, "
        f"vocabulary {c['vocab']}, float32; peak RSS at batches 1-3 in fresh processes, extrapolated to the "
        f"paper's {r['cap_mib'] // 1024} GB card (the paper: 4 -> 40). CPU memory, not a GPU measurement.",
        "",
        "| mode | MiB per example | largest batch under cap |",
        "|---|---|---|",
    ]
    for mode in ("plain", "sketched", "exact"):
        lines.append(f"| {mode} | {r[mode]['mib_per_example']:.0f} | {r[mode]['max_batch_under_cap']} |")
    lines.append(f"| **sketched / exact** | | **{r['max_batch_ratio']:.1f}x** |")
    return lines


# ---------------------------------------------------------------------------------------- the reference implementation
_PEER_SCRIPT = r"""
import json, statistics, sys, time, torch
sys.path.insert(0, {src!r})
from looptrace import bench
from sdi import ProjectedTracInSDI
cfg = bench.BenchConfig(**json.loads(sys.argv[1]))
dims = json.loads(sys.argv[2]); seeds = int(sys.argv[3]); out_path = sys.argv[4]
model, batch = bench.build(cfg)
def plain():
    model.zero_grad(set_to_none=True); bench.loss_fn(model, batch).sum().backward()
t_plain = bench.median_time(plain, cfg.reps)
res = {{"plain_fwd_bwd_s": t_plain, "runs": []}}
feats = {{}}
for m in dims:
    for seed in range(seeds):
        est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=m, seed=seed, loss_reduction="sum")
        t0 = time.perf_counter(); fs = est.featurize_loader(loader=[batch], loss_fn=bench.loss_fn); t = time.perf_counter() - t0
        est.close()
        phi = torch.cat([fs.phi[k] for k in sorted(fs.phi)], dim=-1)  # [N, steps, alpha * m]
        feats[f"{{m}}_{{seed}}"] = phi
        res["runs"].append({{"m": m, "seed": seed, "seconds": t, "D": phi.shape[-1], "steps": fs.steps}})
def timed():
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=2048, seed=0, loss_reduction="sum")
    est.featurize_loader(loader=[batch], loss_fn=bench.loss_fn); est.close()
_, res["featurize_m2048_s"], res["overhead_m2048"] = bench.paired_times(plain, timed, cfg.reps)
torch.save(feats, out_path)
print(json.dumps(res))
"""


def peer_venv(root: Path) -> Path | None:
    """A throwaway venv with the reference implementation (created once, reused)."""
    py = root / "bin" / "python"
    if py.exists():
        return py
    try:
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True, capture_output=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "step-decomposed-influence", "numpy", "tqdm"],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"reference implementation unavailable: {exc}", file=sys.stderr)
        return None
    return py


def reference(cfg: BenchConfig, exact: lt.Features, ours_overhead_s: float, venv: Path) -> dict[str, Any] | None:
    py = peer_venv(venv)
    if py is None:
        return None
    n_tensors = len(exact.layout)
    dims = sorted({2048, *[max(2, d // n_tensors) // 2 * 2 for d in cfg.total_dims]})
    src = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.pt"
        r = subprocess.run(
            [str(py), "-c", _PEER_SCRIPT.format(src=src), json.dumps(dataclasses.asdict(cfg)), json.dumps(dims), str(cfg.seeds), str(out)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
        )  # fmt: skip
        if r.returncode != 0:
            print("reference implementation failed:\n" + r.stderr[-3000:], file=sys.stderr)
            return None
        res = json.loads(r.stdout.strip().splitlines()[-1])
        feats = torch.load(out, weights_only=True)
    s_ex = lt.sdi(exact, exact)
    errs: dict[int, list[float]] = {}
    for key, phi in feats.items():
        m = int(key.split("_")[0])
        s = torch.einsum("nd,mtd->nmt", phi.sum(1), phi)
        errs.setdefault(m, []).append(rel(s, s_ex))
    res["equal_total_dim"] = [
        {"m": m, "D": m * n_tensors, "sdi_rel_error": statistics.mean(v), "sdi_sd": statistics.pstdev(v)}
        for m, v in sorted(errs.items())
    ]
    res["speedup_of_ours_at_same_settings"] = res["overhead_m2048"] / ours_overhead_s
    return res


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
    results["memory"] = _memory(cfg)
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
    paper_mem = _paper_memory(out_dir)
    if paper_mem is not None:  # measured separately (bench memory --paper, ~3 minutes)
        results["max_batch_ratio_paper_model"] = paper_mem["max_batch_ratio"]
        results["paper_model_memory_measured"] = paper_mem["machine"]["date"]
    stem = "latest" if cfg.device == "cpu" else "gpu"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / ("README.md" if cfg.device == "cpu" else "gpu.md")).write_text(markdown(results, out_dir))
    return results


def markdown(r: dict[str, Any], out_dir: Path = RESULTS) -> str:
    m, sp, fi, mem, pa, ref = (
        r["machine"],
        r["speed"],
        r["fidelity"],
        r["memory"],
        r["project_after"],
        r.get("reference"),
    )
    c = r["config"]
    lines = [
        "# Benchmark results",
        "",
        f"Regenerated by `looptrace bench all{' --quick' if c['seeds'] < 10 else ''}` on {m['date']}: {m['cpu']}, "
        f"{m['threads']} torch threads of {m['cores']} cores, torch {m['torch']}. Model: looped GPT "
        f"{c['n_prelude']}/{c['n_core']}/{c['n_coda']} prelude/core/coda, d={c['d_model']}, tau={c['loops']}, sequence "
        f"{c['seq']}, batch {c['batch']}, float32, full BPTT; body = core + concat adapter, {r['body_parameters']:,} "
        f"parameters in {r['body_tensors']} tensors. Timings: medians of {c['reps']} repetitions; ratios are medians over rounds of alternating plain and featurisation calls, within this run.",
        "",
        "## Headline",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| featurisation / plain fwd+bwd (default sketch) | {r['overhead_ratio']:.2f}x | <= 1.5x |",
        f"| featurisation / plain fwd+bwd (TensorSketch m=2048/tensor, materialised) | {sp['overhead_tensorsketch_m2048_materialize']:.2f}x | |",
        f"| featurisation / plain fwd+bwd (TensorSketch m=2048/tensor, FFT) | {sp['overhead_tensorsketch_m2048_fft']:.2f}x | |",
        f"| speed-up vs the reference implementation, same settings | {_f(r['speedup_vs_reference'])}x | >= 2.5x |",
        f"| SDI relative error, TensorSketch m=2048/tensor | {r['sdi_rel_error']:.4f} | |",
        f"| log-log slope of SDI error vs m | {r['slope']:.3f} | -0.5 +- 0.05 |",
        f"| conservation (relative, float32) | {r['conservation_rel']:.2e} | <= 1e-5 |",
        f"| largest batch under {mem['cap_mib']} MiB, sketched / exact | {r['max_batch_ratio']:.1f}x | >= 10x |",
        *(
            [
                f"| largest batch at the paper's configuration (CPU RSS, 48 GB cap; measured {r['paper_model_memory_measured']}), "
                f"sketched / exact | {r['max_batch_ratio_paper_model']:.1f}x | >= 10x (the paper: 10x) |"
            ]
            if "max_batch_ratio_paper_model" in r
            else []
        ),
        f"| SDI per checkpoint / inference forward | {sp['sdi_per_checkpoint_over_forward']:.2f}x | |",
        "",
        "## Fidelity vs m (TensorSketch, m per tensor)",
        "",
        "| m | D | SDI rel. error | TracIn rel. error |",
        "|---|---|---|---|",
    ]
    for row in fi["per_tensor_tensorsketch"]:
        lines.append(
            f"| {row['m']} | {row['D']} | {row['sdi_rel_error']:.4f} +- {row['sdi_sd']:.4f} | {row['tracin_rel_error']:.4f} +- {row['tracin_sd']:.4f} |"
        )
    lines += [
        "",
        "## Equal total feature dimension D",
        "",
        "| D | estimator | budget | SDI rel. error | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in fi["equal_total_dim"]:
        lines.append(
            f"| {row['D']} | looptrace {row['method']} | {row['budget']} | {row['sdi_rel_error']:.4f} +- {row['sdi_sd']:.4f} | {row['seconds']:.2f} |"
        )
    if ref:
        for row in ref["equal_total_dim"]:
            lines.append(
                f"| {row['D']} | reference (TensorSketch) | per_tensor m={row['m']} | {row['sdi_rel_error']:.4f} +- {row['sdi_sd']:.4f} | |"
            )
    lines += [
        "",
        "## Memory (peak RSS above the loaded model)",
        "",
        "| mode | MiB per example | largest batch under cap |",
        "|---|---|---|",
    ]
    for mode in ("plain", "sketched", "exact"):
        lines.append(f"| {mode} | {mem[mode]['mib_per_example']:.1f} | {mem[mode]['max_batch_under_cap']} |")
    lines += [
        "",
        "## Project-after-the-fact TracIn (TRAK/Captum style)",
        "",
        f"Per-example gradients by torch.func: {pa['per_example_grad_s']:.2f} s ({pa['per_example_grad_bytes'] / 2**20:.0f} MiB held); "
        f"dense Gaussian projection to k={pa['k']}: {pa['dense_projection_s']:.2f} s (TracIn rel. error {pa['tracin_rel_error_dense']:.4f}); "
        f"sparse JL: {pa['sparse_projection_s']:.3f} s (error {pa['tracin_rel_error_sparse']:.4f}). {pa['note']}.",
    ]
    lines += _paper_memory_lines(out_dir)
    if ref:
        lines += [
            "",
            f"Reference implementation: featurisation {ref['overhead_m2048']:.2f}x a plain fwd+bwd at m=2048 per tensor (same model, batch, run).",
        ]
    return "\n".join(lines) + "\n"


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"


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
        from looptrace import bench_scale

        print(json.dumps(bench_scale.run(a.n, Path(a.out)), indent=2, default=str))
        return 0
    if a.what == "memory":
        if a.paper:
            r = memory_paper_model(Path(a.out))
        else:
            r = _memory(dataclasses.replace(BenchConfig(), device=a.device))
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

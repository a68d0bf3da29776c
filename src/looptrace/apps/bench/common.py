"""What every benchmark shares: the benchmark model and batch, the loss, timing and the machine."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.models.looped import LoopedConfig, LoopedTransformer

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

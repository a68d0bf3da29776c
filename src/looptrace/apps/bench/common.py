"""What every benchmark shares: the benchmark models and batches, the loss, the every-step-active check,
timing and the machine.

The benchmark model is a looped GPT (prelude / recurrent core / coda, concat injection adapter, rotary
positions, full BPTT). At initialisation the adapter is [I | 0], so the core ignores its state and
only the last loop step carries gradient: a benchmark on it would measure one step. ``build`` therefore
perturbs the weights (adapter [0.6 I | 0.6 I] plus noise, noise on every core matrix), and every
fidelity measurement first checks, with the exact per-step gradients, that each loop step carries at
least ``share_floor / tau`` of the body-gradient norm; otherwise it refuses to report
(:class:`InactiveSteps`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.errors import LooptraceError
from looptrace.models.looped import LoopedConfig, LoopedTransformer

RESULTS = Path("benchmarks/results")


class InactiveSteps(LooptraceError):
    """A benchmark model has loop steps that carry (almost) no gradient: its figures would not measure them."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The CPU benchmark model (a looped GPT with every step active) and the sweep sizes."""

    d_model: int = 128
    n_heads: int = 4
    n_prelude: int = 1
    n_core: int = 2
    n_coda: int = 1
    loops: int = 8
    seq: int = 64
    vocab: int = 512
    batch: int = 8
    n_batches: int = 6  # the "realistic loader" of the speed measurement
    dims: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)  # m per tensor, TensorSketch
    total_dims: tuple[int, ...] = (16384, 51200)  # D, for the choice of the default sketch
    seeds: int = 10
    reps: int = 7
    memory_cap_mib: int = 2048
    recorder_steps: int = 100  # training steps per timing of the checkpoint recorder's overhead
    peer: bool = True
    active: bool = True  # perturb the weights so that every loop step carries gradient
    share_floor: float = 0.1  # every step must carry >= share_floor / tau of the gradient norm
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def quick(cls) -> BenchConfig:
        """Fewer dimensions, seeds, timing rounds and recorder steps (m = 2048 always included): about five
        minutes on a 2-core CPU (``section_seconds`` in the results says where they go)."""
        return cls(dims=(256, 1024, 2048), total_dims=(51200,), seeds=3, reps=3, recorder_steps=20)

    @classmethod
    def paper(cls) -> BenchConfig:
        """The paper's configuration (135M parameters, tau = 32, sequence 128)."""
        return cls(
            d_model=768, n_heads=12, n_prelude=2, n_core=4, n_coda=2, loops=32, seq=128, vocab=50304, batch=8,
            seeds=3, reps=3,
        )  # fmt: skip


def model_config(cfg: BenchConfig) -> LoopedConfig:
    return LoopedConfig(
        vocab_size=cfg.vocab, d_model=cfg.d_model, n_heads=cfg.n_heads, n_prelude=cfg.n_prelude, n_core=cfg.n_core,
        n_coda=cfg.n_coda, n_loops=cfg.loops, max_len=cfg.seq, injection="concat", positions="rotary", bptt_k=None,
    )  # fmt: skip


def activate(model: LoopedTransformer, seed: int = 0, noise: float = 0.02) -> None:
    """Make every loop step matter: the adapter mixes the embedding and the state ([0.6 I | 0.6 I] plus
    noise) and every core matrix moves off its initialisation."""
    g = torch.Generator().manual_seed(seed + 5)
    d = model.cfg.d_model
    with torch.no_grad():
        for name, p in model.core.named_parameters():
            shape_noise = noise * torch.randn(p.shape, generator=g)
            if name == "adapter.weight":
                p.copy_(torch.cat([0.6 * torch.eye(d), 0.6 * torch.eye(d)], 1) + shape_noise)
            elif p.dim() >= 2:
                p.add_(shape_noise.to(p.dtype))


def build(cfg: BenchConfig, device: str = "cpu") -> tuple[LoopedTransformer, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The benchmark model and ``cfg.n_batches`` batches of ``cfg.batch`` random token sequences."""
    torch.manual_seed(cfg.seed)
    model = LoopedTransformer(model_config(cfg))
    if cfg.active and model.core.adapter is not None:
        activate(model, cfg.seed)
    model.to(device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    batches = []
    for _ in range(cfg.n_batches):
        x = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
        y = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
        batches.append((x, y))
    return model, batches


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-example mean token cross-entropy (no reduction over examples)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


@dataclasses.dataclass
class Workload:
    """A model, its batches, its loss and its loop body: what one benchmark measures."""

    name: str
    description: str
    model: nn.Module
    batches: list[Any]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    step_module: nn.Module

    def featurize(self, spec: lt.SketchSpec, batches: list[Any] | None = None, **kw: Any) -> lt.Features:
        kw.setdefault("verify", False)
        return lt.featurize(self.model, batches or self.batches[:1], self.loss_fn, step_module=self.step_module,
                            sketch=spec, **kw)  # fmt: skip

    def plain_step(self, batches: list[Any] | None = None) -> None:
        """A plain training step's forward and backward on each batch (no optimizer)."""
        for b in batches or self.batches[:1]:
            self.model.zero_grad(set_to_none=True)
            self.loss_fn(self.model, b).sum().backward()


def synthetic_workload(cfg: BenchConfig) -> Workload:
    model, batches = build(cfg, cfg.device)
    d = cfg
    return Workload(
        "looped-gpt",
        f"looped GPT {d.n_prelude}/{d.n_core}/{d.n_coda} prelude/core/coda, d={d.d_model}, {d.n_heads} heads, tau={d.loops}, "
        f"sequence {d.seq}, concat adapter, rotary, full BPTT, weights perturbed so every step is active"
        + ("" if d.active else " (NOT perturbed: adapter at [I | 0])"),
        model,
        batches,
        loss_fn,
        model.core,
    )


def step_shares(exact: lt.Features) -> list[float]:
    """Each loop step's share of the body-gradient norm, averaged over examples: mean_i |phi_t(z_i)| / sum_t |phi_t(z_i)|."""
    norms = exact.require_steps("step shares").double().norm(dim=-1)  # [N, tau]
    shares = norms / norms.sum(1, keepdim=True).clamp_min(1e-300)
    return [float(v) for v in shares.mean(0)]


def require_active(shares: list[float], floor: float, what: str) -> None:
    """Refuse to report on a model with a loop step below ``floor / tau`` of the gradient."""
    tau = len(shares)
    low = [t + 1 for t, s in enumerate(shares) if s < floor / tau]
    if low:
        raise InactiveSteps(
            f"{what}: loop step(s) {low} carry less than {floor / tau:.3g} of the body-gradient norm (shares "
            f"{[round(s, 4) for s in shares]}); a benchmark on this model would not measure those steps. Perturb "
            "or train the weights (an untrained concat adapter at [I | 0] makes only the last step active)"
        )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """One call's seconds (synchronised on a GPU) and its result: for calls too long to repeat."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


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


def paired_times(
    base: Callable[[], Any], fn: Callable[[], Any], reps: int, warm: bool = True
) -> tuple[float, float, float, list[float]]:
    """Median times of ``base`` and ``fn`` run alternately, the median of the per-round ratios fn / base
    (drift in the machine's speed cancels within a round), and the ratios themselves. ``warm=False`` when
    the caller has run both already."""
    if warm:
        base()
        fn()
    tb, tf, ratio = [], [], []
    for _ in range(reps):
        a = median_time(base, 1, warm=False)
        b = median_time(fn, 1, warm=False)
        tb.append(a)
        tf.append(b)
        ratio.append(b / a)
    return statistics.median(tb), statistics.median(tf), statistics.median(ratio), ratio


@dataclasses.dataclass
class Bracketed:
    """Timing rounds in which every group of calls runs between two plain runs (see :func:`bracketed_rounds`)."""

    times: dict[str, list[float]]  # each call's seconds, round by round
    base: dict[str, list[float]]  # per call, the mean of the two plain runs around its group, round by round
    plain: list[list[float]]  # each round's plain runs, in order (one more than there are groups)

    def ratios(self, key: str) -> list[float]:
        """``key``'s time over its plain baseline, round by round."""
        return [t / b for t, b in zip(self.times[key], self.base[key], strict=True)]


def bracketed_rounds(
    plain: Callable[[], Any], groups: Sequence[Mapping[str, Callable[[], Any]]], reps: int, alternate: bool = False
) -> Bracketed:
    """``reps`` rounds of: plain, then each group's calls followed by plain again. A call is compared with the
    mean of the plain runs just before and after its group, so a slow spell of the machine that spans it shows
    on both sides of the ratio. ``alternate``: every other round runs each group's calls in reverse order, so
    that no call always runs first. Warm every call up before."""
    times: dict[str, list[float]] = {k: [] for g in groups for k in g}
    base: dict[str, list[float]] = {k: [] for k in times}
    plains: list[list[float]] = []
    for r in range(reps):
        runs = [median_time(plain, 1, warm=False)]
        for group in groups:
            order = list(group)
            for key in reversed(order) if alternate and r % 2 else order:
                times[key].append(median_time(group[key], 1, warm=False))
            runs.append(median_time(plain, 1, warm=False))
            for key in order:
                base[key].append((runs[-2] + runs[-1]) / 2)
        plains.append(runs)
    return Bracketed(times, base, plains)


def _shown(path: Any) -> str:
    """A path inside the package or the checkout, without this machine's prefix (for result descriptions)."""
    p = Path(path).resolve()
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        if p.is_relative_to(base):
            return str(p.relative_to(base.parent if base.name == "looptrace" else base))
    return str(path)


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
    """||a - b|| / ||b|| (the paper's relative error)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def featurize(model: nn.Module, batch: Any, spec: lt.SketchSpec, **kw: Any) -> lt.Features:
    """One batch of the looped-GPT benchmark model (the memory probe and the reference's comparisons)."""
    kw.setdefault("verify", False)
    core: Any = model.core
    return lt.featurize(model, [batch], loss_fn, step_module=core, sketch=spec, **kw)


def parity_workload(run_dir: Path, n: int = 8, length: int = 20) -> Workload:
    """A trained checkpoint: the final weights of a parity run, on held-out inputs of ``length`` bits read
    out at their last loop step (so that every step of the loop carries gradient)."""
    from looptrace.apps.catalog import open_run
    from looptrace.apps.tasks import parity

    run = open_run(run_dir)
    model = run.load_model()
    data = parity.fixed_length(n, length, torch.Generator().manual_seed(123))

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        b = parity.ParityBatch(*batch)
        logits = parity.logits_at_answer(m, b, loops=int(b.n.max()))
        return F.cross_entropy(logits, b.y, reduction="none")

    return Workload(
        "parity-trained",
        f"the trained parity model ({run.preset} preset, final checkpoint of {_shown(run_dir)}), {n} held-out "
        f"{length}-bit inputs, "
        f"tau={length} (read out at the last step)",
        model,
        [(data.x, data.y, data.n)],
        loss,
        model.core,
    )

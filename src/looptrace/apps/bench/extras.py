"""Smaller measurements: the cost of each capture route on one body written three ways (issue #16), the
error of bf16 autocast against float32, and the training-time overhead of the checkpoint recorder."""

from __future__ import annotations

import tempfile
import time
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.apps.bench.common import BenchConfig, Workload, paired_times, rel


class _MLPBody(nn.Module):
    """h + fc2(tanh(fc(h + e))) written three ways with the same weights: batch first (the rule route),
    tokens folded into the batch axis (the rows route), rows concatenated example by example (the step route)."""

    def __init__(self, d: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.fc = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = h + e
        if self.layout == "batch-first":
            return h + self.fc2(torch.tanh(self.fc(x)))
        flat = x.reshape(b * t, d) if self.layout == "folded" else torch.cat(list(x.unbind(0)), 0)
        return h + self.fc2(torch.tanh(self.fc(flat))).reshape(b, t, d)


class _Looped(nn.Module):
    def __init__(self, layout: str, d: int, vocab: int, loops: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.core = _MLPBody(d, layout)
        self.head = nn.Linear(d, vocab)
        self.loops = loops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = e
        for _ in range(self.loops):
            h = self.core(h, e) * 0.5
        return self.head(h)


def _lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def routes(cfg: BenchConfig) -> dict[str, Any]:
    """Featurisation time over plain forward+backward for the same body through each route."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g),) * 2 for _ in range(3)]
    batches = [(x, torch.roll(x, -1, 1)) for x, _ in batches]
    out: dict[str, Any] = {
        "body": f"MLP d={cfg.d_model} (4x), tau={cfg.loops}, 3 batches of {cfg.batch} x {cfg.seq} tokens",
        "routes": [],
    }
    reference = None
    for layout in ("batch-first", "folded", "concatenated"):
        model = _Looped(layout, cfg.d_model, cfg.vocab, cfg.loops)
        work = Workload(layout, layout, model, batches, _lm_loss, model.core)
        f = work.featurize(lt.SketchSpec(), batches)
        reference = f if reference is None else reference
        _, t, ratio, _ = paired_times(
            partial(work.plain_step, batches), partial(work.featurize, lt.SketchSpec(), batches), cfg.reps
        )
        out["routes"].append({"layout": layout, "route": sorted(set(f.routes.values())), "overhead": ratio,
                              "featurize_s": t, "features_vs_batch_first": rel(f.require_steps("routes"),
                                                                                reference.require_steps("routes"))})  # fmt: skip
    return out


def precision(work: Workload, cfg: BenchConfig, exact: lt.Features) -> dict[str, Any]:
    """bf16 autocast featurisation against float32: feature, SDI and TracIn errors, and its time ratio."""
    spec = lt.SketchSpec()
    f32 = work.featurize(spec)
    bf16 = work.featurize(spec, autocast=torch.bfloat16)
    s32, t32 = lt.sdi(f32, f32), lt.tracin(f32, f32)
    _, _, ratio, _ = paired_times(  # both ran just above
        lambda: work.featurize(spec), lambda: work.featurize(spec, autocast=torch.bfloat16), cfg.reps, warm=False
    )
    return {
        "dtype": "bfloat16",
        "feature_rel_error_vs_float32": rel(bf16.require_steps("precision"), f32.require_steps("precision")),
        "sdi_rel_error_vs_float32": rel(lt.sdi(bf16, bf16), s32),
        "tracin_rel_error_vs_float32": rel(lt.tracin(bf16, bf16), t32),
        "time_over_float32": ratio,
        "note": "CPU autocast; on a GPU bf16 matmuls are faster, the errors are the same kind",
    }


def recorder_overhead(cfg: BenchConfig, every: tuple[int, ...] = (10, 50)) -> dict[str, Any]:
    """Training time of the benchmark model (AdamW) with and without lt.CheckpointRecorder, over
    ``cfg.recorder_steps`` steps (a checkpoint interval longer than that is left out)."""
    from looptrace.apps.bench.common import build

    steps = cfg.recorder_steps
    every = tuple(n for n in every if n <= steps) or (steps,)
    rows = []
    model, batches = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train(recorder: lt.CheckpointRecorder | None) -> float:
        t0 = time.perf_counter()
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            _lm = batches[step % len(batches)]
            F.cross_entropy(model(_lm[0]).flatten(0, 1), _lm[1].flatten()).backward()
            opt.step()
            if recorder is not None:
                recorder.step(model, opt)
        return time.perf_counter() - t0

    base = min(train(None) for _ in range(2))  # the first of the two warms up
    for n in every:
        with tempfile.TemporaryDirectory() as tmp:
            t = min(train(lt.CheckpointRecorder(f"{tmp}/{i}", every=n, body=model.core)) for i in range(2))
        rows.append({"every": n, "seconds": t, "overhead": t / base - 1, "per_checkpoint_s": (t - base) / (steps // n)})
    params = sum(p.numel() for p in model.parameters())
    return {"steps": steps, "model_parameters": params, "baseline_seconds": base, "rows": rows}


def positions_cost(work: Workload, cfg: BenchConfig, dims: tuple[int, ...] = (256, 4096)) -> dict[str, Any]:
    """Token x step attribution's cost on the benchmark model (one batch): time of ``featurize(positions=True)``
    over the ordinary featurisation (``per_step=False``, the train side it replaces), in alternating rounds; the
    features' memory per example ([L, D] against [D]); and the disk per example in a store (ragged: real positions
    only), at every position and in spans of 8."""
    from looptrace.store.fill import ragged_positions

    out: dict[str, Any] = {"rows": []}
    batch = work.batches[:1]
    n = int(batch[0][0].shape[0]) if isinstance(batch[0], tuple | list) else cfg.batch
    for d in dims:
        spec = lt.SketchSpec(dim=d)

        def plain(spec: lt.SketchSpec = spec) -> Any:
            return work.featurize(spec, batch, per_step=False)

        def pos(spec: lt.SketchSpec = spec) -> Any:
            return work.featurize(spec, batch, positions=True)

        _, _, ratio, rounds = paired_times(plain, pos, max(cfg.reps, 3))
        f = pos()
        p = f.require_positions("the benchmark")
        item = p.element_size()
        row: dict[str, Any] = {
            "dim": d, "time_over_per_example": ratio, "rounds": rounds, "positions": int(p.shape[1]),
            "memory_bytes_per_example": int(p.shape[1] * p.shape[2] * item),
            "memory_bytes_per_example_without": int(p.shape[2] * item),
        }  # fmt: skip
        for span in (1, 8):
            rows, offsets = ragged_positions(p, span)
            row[f"disk_bytes_per_example_span{span}"] = (rows.numel() * item + offsets.numel() * 8) / n
        out["rows"].append(row)
    out["examples"] = n
    return out

"""Fidelity of the sketches against the exact per-step gradients, and conservation."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.apps.bench.common import BenchConfig, featurize, loss_fn, rel
from looptrace.models.looped import LoopedTransformer
from looptrace.sketch.plan import SketchPlan


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

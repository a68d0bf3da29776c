"""Fidelity of the sketches against the exact per-step gradients, as the paper measures it, and conservation.

On one batch of a workload: the exact features, every step's share of the gradient (refusing a model
with an inactive step), then TensorSketch with m per tensor over ``cfg.dims`` and ``cfg.seeds`` seeds:
relative errors of the test-side SDI tensor ``[N, M, tau]`` and of TracIn ``[N, M]`` (reported
separately), per-step SDI errors, and the log-log slope of the SDI error in m. At equal total
dimension D every method x budget is measured to choose the default sketch.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.apps.bench.common import BenchConfig, Workload, rel, require_active, step_shares
from looptrace.sketch.plan import SketchPlan


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.pstdev(values)}


def per_step_errors(est: torch.Tensor, exact: torch.Tensor) -> list[float]:
    """Relative error of SDI_t for every step t (``[N, M, tau]`` tensors)."""
    return [rel(est[..., t], exact[..., t]) if float(exact[..., t].norm()) > 0 else 0.0 for t in range(exact.shape[-1])]


def fidelity(work: Workload, cfg: BenchConfig, exact: lt.Features) -> dict[str, Any]:
    """The paper's fidelity measurements on one batch of ``work`` (see the module docstring)."""
    shares = step_shares(exact)
    require_active(shares, cfg.share_floor, work.name)
    s_ex, t_ex = lt.sdi(exact, exact), lt.tracin(exact, exact)
    n_tensors = len(exact.layout)
    rows: list[dict[str, Any]] = []
    for m in cfg.dims:
        sdi_err, tracin_err, steps = [], [], []
        for seed in range(cfg.seeds):
            f = work.featurize(lt.SketchSpec(dim=m, seed=seed, method="tensorsketch", budget="per_tensor"))
            est = lt.sdi(f, f)
            sdi_err.append(rel(est, s_ex))
            tracin_err.append(rel(lt.tracin(f, f), t_ex))
            steps.append(per_step_errors(est, s_ex))
        rows.append(
            {
                "m": m,
                "D": m * n_tensors,
                "sdi_rel_error": _mean_sd(sdi_err),
                "tracin_rel_error": _mean_sd(tracin_err),
                "per_step_sdi_rel_error": [statistics.mean(v) for v in zip(*steps, strict=True)],
            }
        )
    xs = np.log([r["m"] for r in rows])
    ys = np.log([r["sdi_rel_error"]["mean"] for r in rows])
    slope = float(np.polyfit(xs, ys, 1)[0]) if len(rows) > 1 else float("nan")
    return {
        "workload": work.name,
        "description": work.description,
        "body_parameters": exact.dim,
        "body_tensors": n_tensors,
        "tau": exact.tau,
        "examples": exact.n,
        "step_shares": shares,
        "share_floor": cfg.share_floor / len(shares),
        "per_tensor_tensorsketch": rows,
        "slope": slope,
        "equal_total_dim": equal_total_dim(work, cfg, exact),
    }


def equal_total_dim(work: Workload, cfg: BenchConfig, exact: lt.Features) -> list[dict[str, Any]]:
    """SDI error and time of every method x budget at the same total feature dimension D (the measurement
    that chooses the default sketch)."""
    s_ex = lt.sdi(exact, exact)
    n_tensors = len(exact.layout)
    out = []
    for total in cfg.total_dims:
        for method in ("tensorsketch", "countsketch"):
            for budget in ("per_tensor", "proportional", "shared"):
                dim = total // n_tensors if budget == "per_tensor" else total
                dim -= dim % 2
                errs, times = [], []
                for seed in range(cfg.seeds):
                    t0 = time.perf_counter()
                    f = work.featurize(lt.SketchSpec(dim=dim, seed=seed, method=method, budget=budget))  # type: ignore[arg-type]
                    times.append(time.perf_counter() - t0)
                    errs.append(rel(lt.sdi(f, f), s_ex))
                out.append(
                    {"D": total, "method": method, "budget": budget, "sdi_rel_error": _mean_sd(errs),
                     "seconds": statistics.median(times)}
                )  # fmt: skip
    return out


def conservation(work: Workload, exact: lt.Features, m: int = 2048) -> dict[str, float]:
    """The sum of per-step sketches against the sketch of autograd's per-example gradient (float32)."""
    spec = lt.SketchSpec(dim=m, method="tensorsketch", budget="per_tensor")
    f = work.featurize(spec)
    names = [d["name"] for d in exact.layout]
    plan = SketchPlan.build(spec, [(d["name"], tuple(d["shape"])) for d in exact.layout])
    params = dict(work.model.named_parameters())
    batch = work.batches[0]
    losses = work.loss_fn(work.model, batch)
    direct = torch.zeros_like(f.total)
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], [params[n] for n in names], retain_graph=True)
        for n, g in zip(names, grads, strict=True):
            slot = plan.slot(n)
            slot.add_dense(direct[i : i + 1, slot.offset : slot.offset + slot.m], g.reshape(1, -1))
    diff = f.total - direct
    return {"max_abs": float(diff.abs().max()), "relative": float(diff.norm() / direct.norm())}

"""Speed of featurisation against a plain forward+backward, and project-after-the-fact TracIn."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

import looptrace as lt
from looptrace.apps.bench.common import BenchConfig, featurize, loss_fn, median_time, paired_times, rel
from looptrace.models.looped import LoopedTransformer
from looptrace.sketch.plan import SketchPlan


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

"""Speed: featurisation against a plain forward+backward on a realistic loader, the peer table at equal
total dimension, where the time goes, and project-after-the-fact TracIn.

Every ratio is the median over rounds of alternating calls (plain, then featurisation) within this
process, so drift in the machine's speed cancels within a round.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.apps.bench.common import (
    BenchConfig,
    Workload,
    bracketed_rounds,
    median_time,
    paired_times,
    rel,
    timed,
)
from looptrace.errors import ConfigError
from looptrace.sketch.plan import SketchPlan, Slot


def _ratio(work: Workload, cfg: BenchConfig, **kw: Any) -> dict[str, Any]:
    spec = kw.pop("spec")
    work.featurize(spec, work.batches[:1], **kw)  # warm-up on one batch (plain is warm already)
    t_plain, t_feat, ratio, rounds = paired_times(
        lambda: work.plain_step(work.batches), lambda: work.featurize(spec, work.batches, **kw), cfg.reps, warm=False
    )
    return {"plain_s": t_plain, "featurize_s": t_feat, "ratio": ratio, "rounds": rounds}


#: Timing rounds of the overhead measurement at least (its ratios drive a target; fewer rounds are too noisy).
OVERHEAD_ROUNDS = 5


def overhead(work: Workload, cfg: BenchConfig) -> dict[str, Any]:
    """The default featurisation over the whole loader (verification on its first batch, as users run it)
    and without verification, with the floor and the Linear replays (where the time goes), all timed in the
    same rounds as a plain forward+backward over the same batches; the check's own cost from one-batch
    rounds (:func:`check_cost`); then with recomputation."""
    default = lt.SketchSpec()
    n = len(work.batches)
    replay = linear_products(work, default)
    calls = {
        "verify": lambda: work.featurize(default, work.batches, verify="first"),
        "no_verify": lambda: work.featurize(default, work.batches, verify=False),
        "floor": floor_step(work),
        "products": replay.products,
        "weight_grads": replay.weight_grads,
    }
    # warm-up, on one batch (the first call sets up hooks, plans and hash tables); the replays are short
    work.plain_step(work.batches[:1])
    work.featurize(default, work.batches[:1], verify="first")
    for key in ("floor", "products", "weight_grads"):
        calls[key]()
    # each featurisation between two plain runs (the floor and the two short replays share one such window)
    groups = (("verify",), ("no_verify",), ("floor", "products", "weight_grads"))
    timed_rounds = bracketed_rounds(
        lambda: work.plain_step(work.batches),
        [{k: calls[k] for k in g} for g in groups],
        max(cfg.reps, OVERHEAD_ROUNDS),
    )

    def ratios(key: str) -> dict[str, Any]:
        rounds = timed_rounds.ratios(key)
        return {"plain_s": statistics.median(timed_rounds.base[key]), "featurize_s": statistics.median(timed_rounds.times[key]),
                "ratio": statistics.median(rounds), "rounds": rounds}  # fmt: skip

    verify, no_verify = ratios("verify"), ratios("no_verify")
    check = check_cost(work, default)
    return {
        "loader": f"{n} batches of {work.batches[0][0].shape[0]} examples",
        "n_batches": n,
        "default_spec": str(default),
        "default_verify_first": verify,
        "default_no_verify": no_verify,
        "check_cost_plain_batches": statistics.median(check),
        "check_cost_rounds": check,
        # where the capture's time goes, in the same rounds (each a ratio to a plain fwd+bwd of the loader)
        "floor": ratios("floor"),
        "linear_products": ratios("products"),
        "linear_weight_grads": ratios("weight_grads"),
        "default_recompute": _ratio(work, cfg, spec=default, verify=False, recompute=True),
    }


#: Rounds of the check's own cost (one batch each: short, so several).
CHECK_ROUNDS = 7


def check_cost(work: Workload, spec: lt.SketchSpec) -> list[float]:
    """The first-batch check's own cost in plain batches, per round: featurisation of the first batch with
    and without it, next to a plain forward+backward of that batch. (The whole-loader rounds above differ by
    it too, but a whole loader's noise is larger than one batch's check.)"""
    one = work.batches[:1]
    calls = [
        lambda: work.plain_step(one),
        lambda: work.featurize(spec, one, verify="first"),
        lambda: work.featurize(spec, one, verify=False),
    ]
    rounds = []  # (warmed up by the whole-loader rounds before)
    for _ in range(CHECK_ROUNDS):
        plain, with_check, without = (median_time(fn, 1, warm=False) for fn in calls)
        rounds.append((with_check - without) / plain)
    return rounds


def floor_step(work: Workload) -> Callable[[], None]:
    """A forward and backward over the loader that asks autograd only for the gradient at the input of the
    first loop step: every delta inside the loop is computed, no weight gradient anywhere and nothing behind
    the loop. No capture can cost less (it needs those deltas); the gap between this and featurisation is
    the capture's own work."""

    anchor: list[torch.Tensor] = []  # the batch's anchor, added to the first step call's input

    def pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if anchor or not args or not isinstance(args[0], torch.Tensor):
            return None
        zero = torch.zeros((), dtype=args[0].dtype, device=args[0].device, requires_grad=True)
        anchor.append(zero)
        return (args[0] + zero, *args[1:])

    def run() -> None:
        for batch in work.batches:
            anchor.clear()
            handle = work.step_module.register_forward_pre_hook(pre)
            try:
                losses = work.loss_fn(work.model, batch)
            finally:
                handle.remove()
            if not anchor:
                raise ConfigError(
                    "the floor anchors the step module's first tensor argument, and the step module was never called "
                    "with one: pass the module called once per loop step as the workload's step_module"
                )
            torch.autograd.grad(losses.sum(), anchor)

    return run


@dataclasses.dataclass
class LinearReplay:
    """The body's ``nn.Linear`` calls of one batch (recorded from one forward), replayed on random factors of
    their shapes (the cost depends on the shapes only), once per batch of the loader."""

    factors: list[tuple[Slot, torch.Tensor, torch.Tensor]]  # (slot, delta-like [B, L, out], input-like [B, L, in])
    out: torch.Tensor  # [B, D]
    batches: int

    def products(self) -> None:
        """The per-example products and their sketch as the capture computes them (``Slot.add_outer``)."""
        for _ in range(self.batches):
            for slot, left, right in self.factors:
                slot.add_outer(self.out[:, slot.offset : slot.offset + slot.m], left, right)

    def weight_grads(self) -> None:
        """The summed weight gradients a plain backward computes there instead (one matmul per call)."""
        for _ in range(self.batches):
            for _slot, left, right in self.factors:
                torch.mm(left.flatten(0, 1).T, right.flatten(0, 1))


def linear_products(work: Workload, spec: lt.SketchSpec) -> LinearReplay:
    """Record the shapes of the body's ``nn.Linear`` calls in one forward and lay out their sketch."""
    calls: list[tuple[str, int, int, int, int]] = []  # (weight name, batch, tokens, out, in)

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            x = args[0]
            calls.append(
                (
                    f"{name}.weight" if name else "weight",
                    x.shape[0],
                    x[0].numel() // x.shape[-1],
                    output.shape[-1],
                    x.shape[-1],
                )
            )

        return hook

    linears = [(n, m) for n, m in work.step_module.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(record(n)) for n, m in linears]
    try:
        with torch.no_grad():
            work.loss_fn(work.model, work.batches[0])
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ConfigError(
            "the overhead split replays the body's nn.Linear calls and this body made none: benchmark a workload "
            "whose loop body has Linear layers (the benchmark model does)"
        )
    plan = SketchPlan.build(spec, [(n, tuple(p.shape)) for n, p in work.step_module.named_parameters()])
    p0 = next(work.step_module.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    factors = [
        (plan.slot(name), torch.randn(b, t, o, generator=g).to(p0), torch.randn(b, t, i, generator=g).to(p0))
        for name, b, t, o, i in calls
    ]
    out = torch.zeros(calls[0][1], plan.dim, dtype=p0.dtype, device=p0.device)
    return LinearReplay(factors, out, len(work.batches))


#: The reference's m per body tensor in the peer table (the paper's).
PEER_M = 2048


def peer_dim(exact: lt.Features) -> int:
    """The reference's total feature dimension D: m for each body tensor."""
    return PEER_M * len(exact.layout)


def peer_specs(exact: lt.Features) -> list[tuple[str, lt.SketchSpec, dict[str, Any]]]:
    """Our rows of the peer table, at the reference's total dimension (m = 2048 for each body tensor):
    (label, spec, featurize keywords)."""
    total = peer_dim(exact)
    same = lt.SketchSpec(dim=PEER_M, method="tensorsketch", budget="per_tensor")
    return [
        (f"looptrace: same method (per-tensor TensorSketch m={PEER_M}, FFT)", same, {"outer_path": "fft"}),
        (
            f"looptrace: same method (per-tensor TensorSketch m={PEER_M}, materialised)",
            same,
            {"outer_path": "materialize"},
        ),
        (f"looptrace: default sketch at the same D ({lt.SketchSpec(dim=total)})", lt.SketchSpec(dim=total), {}),
    ]


def peer_rows(work: Workload, cfg: BenchConfig, exact: lt.Features, ref: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The reference implementation and ours at the same total dimension D (TensorSketch, m = 2048 per
    tensor): the same method by FFT, the same method materialised, and our default sketch."""
    total = peer_dim(exact)
    s_ex, t_ex = lt.sdi(exact, exact), lt.tracin(exact, exact)
    head = (ref or {}).get("head_to_head", {})
    rows = []
    for label, spec, kw in peer_specs(exact):
        errs_sdi, errs_tracin = [], []
        for seed in range(cfg.seeds):
            f = work.featurize(lt.SketchSpec(**{**spec.to_dict(), "seed": seed}), None, **kw)
            errs_sdi.append(rel(lt.sdi(f, f), s_ex))
            errs_tracin.append(rel(lt.tracin(f, f), t_ex))
        h = head.get(label)
        if h is not None:  # timed with the reference, round by round in its process: the same rounds as its row
            timing = {"ratio": h["overhead"], "featurize_s": h["featurize_s"], "rounds": h["overhead_rounds"]}
        else:
            timing = _ratio(work, cfg, spec=spec, verify=False, **kw)
        rows.append({"label": label, "D": total, "overhead": timing["ratio"], "featurize_s": timing["featurize_s"],
                     "overhead_rounds": timing["rounds"], "timed": "with the reference" if h else "this process",
                     "sdi_rel_error": statistics.mean(errs_sdi), "tracin_rel_error": statistics.mean(errs_tracin)})  # fmt: skip
        if h is not None:  # the reference's time over ours, round by round
            rows[-1].update(speedup=h["speedup"], speedup_rounds=h["speedup_rounds"])
    if ref is not None:
        at = next((e for e in ref["errors"] if e["m"] == PEER_M), None)
        rows.append(
            {"label": "reference implementation (step-decomposed-influence, TensorSketch m=2048, FFT)", "D": at["D"] if at else None,
             "overhead": ref["overhead_m2048"], "featurize_s": ref["featurize_m2048_s"],
             "overhead_rounds": ref.get("overhead_m2048_rounds"),
             "sdi_rel_error": at["sdi_rel_error"] if at else None, "tracin_rel_error": at["tracin_rel_error"] if at else None}
        )  # fmt: skip
    return rows


def where_time_goes(work: Workload, top: int = 12) -> dict[str, Any]:
    """torch.profiler self-CPU time of one default featurisation of one batch, by operator, against a
    plain forward+backward of the same batch."""
    from torch.profiler import ProfilerActivity, profile

    def table(fn: Any) -> tuple[float, list[dict[str, Any]]]:
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        return total / 1e6, [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total}
                             for e in events[:top]]  # fmt: skip

    feat_total, feat_ops = table(lambda: work.featurize(lt.SketchSpec(), work.batches[:1]))
    plain_total, plain_ops = table(lambda: work.plain_step(work.batches[:1]))
    return {
        "featurize_self_s": feat_total,
        "plain_self_s": plain_total,
        "featurize_ops": feat_ops,
        "plain_ops": plain_ops,
    }


def project_after(work: Workload, cfg: BenchConfig, exact: lt.Features, k: int = 2048) -> dict[str, Any]:
    """TRAK/Captum-style TracIn: per-example gradients by torch.func, then a JL projection (TracIn only)."""
    model = work.model
    prefix = next(n for n, m in model.named_modules() if m is work.step_module)
    body = dict(work.step_module.named_parameters(prefix=prefix))
    names = sorted(body)
    others = {n: p.detach() for n, p in model.named_parameters() if n not in body}
    x, y = work.batches[0]
    batch_size = x.shape[0]

    def one(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**others, **params}, (xi[None],))
        return F.cross_entropy(out[0], yi)

    grad_fn = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    detached = {n: body[n].detach() for n in names}

    def per_example() -> torch.Tensor:
        g = grad_fn(detached, x, y)
        return torch.cat([g[n].reshape(batch_size, -1) for n in names], 1)

    per_example()  # warm-up (vmap's first call)
    t_grad, g = timed(per_example)
    p = g.shape[1]
    t_ex = lt.tracin(exact, exact)

    def dense() -> torch.Tensor:  # Gaussian JL, generated in seeded blocks (never a P x k matrix)
        gen = torch.Generator().manual_seed(0)
        out = torch.zeros(batch_size, k, device=g.device)
        for i in range(0, p, 16384):
            r = torch.randn(min(16384, p - i), k, generator=gen).to(g.device) / math.sqrt(k)
            out += g[:, i : i + 16384] @ r
        return out

    slot = SketchPlan.build(lt.SketchSpec(dim=k, method="countsketch", budget="shared"), [("all", (p,))]).slots[0]

    def sparse() -> torch.Tensor:
        out = torch.zeros(batch_size, k, device=g.device)
        slot.add_dense(out, g)
        return out

    # the dense projection draws P x k Gaussians (tens of seconds on a CPU): one timed call, its output kept
    t_dense, pd = timed(dense)
    t_sparse = median_time(sparse, cfg.reps)
    ps = sparse()
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

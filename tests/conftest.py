"""Shared fixtures: a tiny float64 looped model and the untied per-step oracle.

The oracle gives every call of the step module its own copy of the body parameters
(``torch.func.functional_call``); the gradient w.r.t. copy t is exactly phi_t.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import looptrace as lt
from looptrace import batching
from looptrace.models.looped import LoopedConfig, LoopedTransformer

# The suite never writes route decisions into the user's ~/.cache (tests of the disk cache point it elsewhere).
os.environ.setdefault("LOOPTRACE_ROUTE_CACHE", "0")


def pytest_configure(config: pytest.Config) -> None:
    """RUN_SLOW=1 runs the slow tests too (pyproject.toml deselects them with ``-m 'not slow'``); an explicit
    ``-m`` on the command line still wins."""
    if os.environ.get("RUN_SLOW", "") not in ("", "0") and config.option.markexpr == "not slow":
        config.option.markexpr = ""


# One tolerance for every exact-vs-oracle comparison in float64.
ATOL = 1e-10
RTOL = 1e-8


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Compare and, on failure, print the norms of the difference (what is probably wrong)."""
    diff = (got - want).abs()
    ok = bool((diff <= atol + rtol * want.abs()).all())
    assert ok, (
        f"{what}: max|diff|={float(diff.max()):.3e}, |diff|={float(diff.norm()):.3e}, "
        f"|want|={float(want.norm()):.3e}, |got|={float(got.norm()):.3e}, "
        f"first bad index={tuple(int(i) for i in (diff > atol + rtol * want.abs()).nonzero()[0])}"
    )


def oracle_per_step(
    model: nn.Module,
    step_module: nn.Module,
    batches: list[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> torch.Tensor:
    """Exact ``[N, T, P]`` per-example per-step gradients, parameters in sorted-name order."""
    prefix = next(n for n, m in model.named_modules() if m is step_module)
    ref = copy.deepcopy(step_module)
    local = dict(step_module.named_parameters())
    order = sorted(local, key=lambda n: f"{prefix}.{n}" if prefix else n)
    copies: list[dict[str, torch.Tensor]] = []

    def patched(*args: Any, **kwargs: Any) -> Any:
        p = {n: t.detach().clone().requires_grad_(True) for n, t in local.items()}
        copies.append(p)
        return torch.func.functional_call(ref, p, args, kwargs)

    rows: list[list[torch.Tensor]] = []
    step_module.forward = patched  # type: ignore[method-assign]
    try:
        for batch in batches:
            for i in range(batching.leading_size(batch) or 0):
                copies.clear()
                loss = loss_fn(model, batching.slice_rows(batch, i, i + 1))[0]
                flat = [x for c in copies for x in (c[n] for n in order)]
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
                per_step = []
                for t in range(len(copies)):
                    gs = grads[t * len(order) : (t + 1) * len(order)]
                    per_step.append(
                        torch.cat(
                            [
                                (g if g is not None else torch.zeros_like(c)).reshape(-1)
                                for g, c in zip(gs, flat[t * len(order) : (t + 1) * len(order)], strict=True)
                            ]
                        )
                    )
                rows.append(per_step)
    finally:
        del step_module.forward
    t_max = max(len(r) for r in rows)
    out = torch.zeros(len(rows), t_max, rows[0][0].numel(), dtype=rows[0][0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.stack(r)
    return out


def per_example_grads(
    model: nn.Module,
    params: list[tuple[str, nn.Parameter]],
    batches: list[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> torch.Tensor:
    """Autograd per-example total gradients ``[N, P]`` of ``params`` (sorted by name)."""
    params = sorted(params)
    out = []
    for batch in batches:
        losses = loss_fn(model, batch)
        for i in range(losses.shape[0]):
            g = torch.autograd.grad(losses[i], [p for _, p in params], retain_graph=True, allow_unused=True)
            out.append(
                torch.cat(
                    [
                        (x if x is not None else torch.zeros_like(p)).reshape(-1)
                        for x, (_, p) in zip(g, params, strict=True)
                    ]
                )
            )
    return torch.stack(out)


def lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-example mean next-token cross-entropy; batch = (x [B, L], y [B, L], optional readout [B])."""
    x, y = batch[0], batch[1]
    kwargs = {"readout_steps": batch[2]} if len(batch) > 2 else {}
    logits = model(x, **kwargs)
    ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return ce.view(y.shape).mean(1)


def tiny_model(**overrides: Any) -> LoopedTransformer:
    cfg = dict(vocab_size=7, d_model=8, n_heads=2, d_mlp=12, n_core=2, n_loops=4, max_len=8, injection="concat")
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig(**cfg)).double()
    with torch.no_grad():  # move weights off their init so no gradient is accidentally tiny
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def tiny_batches(
    n_batches: int = 2, b: int = 3, length: int = 5, vocab: int = 7, readout: bool = False, loops: int = 4
) -> list[Any]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        x = torch.randint(0, vocab, (b, length), generator=g)
        y = torch.randint(0, vocab, (b, length), generator=g)
        if readout:
            out.append((x, y, torch.randint(1, loops + 1, (b,), generator=g)))
        else:
            out.append((x, y))
    return out


@pytest.fixture
def model() -> LoopedTransformer:
    return tiny_model()


@pytest.fixture
def batches() -> list[Any]:
    return tiny_batches()


def assert_exact_matches_oracle(
    model: nn.Module,
    step_module: nn.Module,
    batches: list[Any],
    loss_fn: Callable[..., torch.Tensor],
    what: str,
    **kw: Any,
) -> lt.Features:
    """Exact per-step features equal the untied oracle (float64). Only the first batch is verified: verification
    asks autograd for the weights' gradients too, which computes every delta, so the later batches test the
    capture alone."""
    feats = lt.featurize(
        model, batches, loss_fn, step_module=step_module, sketch=lt.SketchSpec.exact(), verify="first", **kw
    )
    want = oracle_per_step(model, step_module, batches, loss_fn)
    assert float(want.norm()) > 0, f"{what}: the oracle has no gradient, the comparison would prove nothing"
    assert feats.per_step is not None and feats.per_step.dtype == torch.float64
    assert_close(feats.per_step, want, what)
    return feats

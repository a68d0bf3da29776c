"""Loop bodies whose examples do not interact, whatever they do inside: tokens folded into the batch
axis, routed (mixture-of-experts) rows, RNN cells, layers without a rule, bare parameters. Exact
per-step features equal the untied oracle in float64 (truncated BPTT included); sketched features are
the sketch of the oracle's; bodies whose examples interact are refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.sketch.plan import SketchPlan
from tests.conftest import assert_close, assert_exact_matches_oracle, oracle_per_step

D, T, B = 6, 4, 3


class FlatMLP(nn.Module):
    """h + fc2(tanh(fc((h + e).reshape(B*T, D)))).reshape(B, T, D): two Linears on folded rows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        u = self.fc2(torch.tanh(self.fc((h + e).reshape(b * t, d))))
        return h + u.reshape(b, t, d)


class GRUBody(nn.Module):
    """An nn.GRUCell (no layer rule: the exact fallback) on [B*T, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(D, D)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        return self.cell(e.reshape(b * t, d), h.reshape(b * t, d)).reshape(b, t, d)


class MoE(nn.Module):
    """A router over flattened tokens, top-k dispatch by index, small MLP experts, index_add back."""

    def __init__(self, top: int = 1, experts: int = 3, unbind: bool = False) -> None:
        super().__init__()
        self.top, self.unbind = top, unbind
        self.router = nn.Linear(D, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, 2 * D), nn.Tanh(), nn.Linear(2 * D, D)) for _ in range(experts)
        )

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = h + e
        # an example-by-example concatenation hides the rows' examples from the data flow: the step route
        flat = torch.cat(list(x.unbind(0)), 0) if self.unbind else x.reshape(b * t, d)
        weights, chosen = self.router(flat).softmax(-1).topk(self.top, dim=-1)  # [N, top]
        out = torch.zeros_like(flat)
        for j, expert in enumerate(self.experts):
            tok, slot = (chosen == j).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(flat[tok]) * weights[tok, slot, None])
        return h + out.reshape(b, t, d)


class ConvMixer(nn.Module):
    """A depthwise Conv1d over tokens and a GroupNorm (both through the exact fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(D, D, kernel_size=3, padding=1, groups=D)
        self.norm = nn.GroupNorm(2, D)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        u = self.norm(self.conv((h + e).transpose(1, 2)))  # [B, D, T]
        return h + torch.tanh(u.transpose(1, 2))


class BareParam(nn.Module):
    """Parameters owned by the step module itself, used directly (no submodule), next to a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(D))
        self.fc = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(h * self.scale + e))


class ConstantBranch(nn.Module):
    """A Linear on a fixed code (not downstream of the step's inputs: its output needs its own anchor) next to
    one on the state."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.code_net = nn.Linear(3, D)
        self.register_buffer("code", torch.randn(3, generator=torch.Generator().manual_seed(1)))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        return h + torch.tanh(self.fc(h + e) * self.code_net(self.code.expand(b, t, 3)))


class Looped(nn.Module):
    def __init__(self, core: nn.Module, loops: int = 4, bptt_k: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, D)
        self.core = core
        self.head = nn.Linear(D, 5)
        self.loops, self.bptt_k = loops, bptt_k
        with torch.no_grad():
            for p in core.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = e
        for t in range(self.loops):
            h = self.core(h, e)
            if self.bptt_k is not None and t < self.loops - self.bptt_k:
                h = h.detach()
        return self.head(h).mean(1)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def batches(n: int = 2) -> list[Any]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 7, (B, T), generator=g), torch.randint(0, 5, (B,), generator=g)) for _ in range(n)]


BODIES = {
    "flat-linear": (FlatMLP, "rows"),
    "grucell": (GRUBody, "rows"),
    "moe-top1": (lambda: MoE(top=1), "rows"),
    "moe-top2": (lambda: MoE(top=2), "rows"),
    "moe-top2-step": (lambda: MoE(top=2, unbind=True), "step"),
    "conv-groupnorm": (ConvMixer, "exact fallback"),
    "bare-parameter": (BareParam, "exact fallback"),
    "constant-branch": (ConstantBranch, "Linear"),
}


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
@pytest.mark.parametrize("bptt_k", [None, 2])
@pytest.mark.parametrize("body", list(BODIES))
def test_exact_per_step_features_equal_the_oracle(body: str, bptt_k: int | None, recompute: bool) -> None:
    make, route = BODIES[body]
    model = Looped(make(), bptt_k=bptt_k)
    data = batches()
    what = f"exact per-step features vs the untied oracle ({body}, bptt_k={bptt_k})"
    feats = assert_exact_matches_oracle(model, model.core, data, loss_fn, what, recompute=recompute)
    if bptt_k is not None:
        assert torch.count_nonzero(feats.per_step[:, : model.loops - bptt_k]) == 0, "truncated steps must be exactly 0"
    assert any(route in r for r in feats.routes.values()), f"{body}: expected a {route!r} route, got {feats.routes}"


@pytest.mark.parametrize("body", ["flat-linear", "grucell", "moe-top2", "moe-top2-step"])
@pytest.mark.parametrize("method", ["countsketch", "tensorsketch"])
def test_sketched_features_are_the_sketch_of_the_exact_ones(body: str, method: str) -> None:
    """Every sketch is a fixed linear map, so the sketched per-step features must equal the map applied
    to the oracle's exact per-step gradients: the same unbiasedness and variance as for any body."""
    model = Looped(BODIES[body][0]())
    data = batches()
    spec = lt.SketchSpec(dim=64, seed=4, method=method)  # type: ignore[arg-type]
    feats = lt.featurize(model, data, loss_fn, step_module=model.core, sketch=spec)
    exact = oracle_per_step(model, model.core, data, loss_fn)  # [N, tau, P], parameters in name order
    named = sorted(model.core.named_parameters(prefix="core"))
    plan = SketchPlan.build(spec, [(n, tuple(p.shape)) for n, p in named])
    n, tau, _ = exact.shape
    want = torch.zeros(n * tau, plan.dim, dtype=torch.float64)
    flat = exact.reshape(n * tau, -1)
    offset = 0
    for name, p in named:
        slot = plan.slot(name)
        slot.add_dense(want[:, slot.offset : slot.offset + slot.m], flat[:, offset : offset + p.numel()])
        offset += p.numel()
    assert_close(feats.per_step, want.view(n, tau, -1), f"sketched vs sketch of exact ({body}, {method})")


@pytest.mark.parametrize("unbind", [True, False], ids=["step route", "rows route"])
def test_step_route_is_unbiased_in_sketched_sdi(unbind: bool) -> None:
    """Monte Carlo over sketch seeds on the routed-token body, through the per-example step route (rows concatenated
    example by example, which the data flow cannot trace; the routes are asserted) and through the rows route:
    the mean sketched SDI is within 4 standard errors of the exact SDI, with the error bounded by the CountSketch
    variance (2/m |g|^2 |p|^2). Catches a biased or mis-sketched step route (this test used to run the rows
    route only)."""
    model = Looped(MoE(top=2, unbind=unbind))
    data = batches(1)
    exact = lt.featurize(model, data, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact())
    route = "step (exact per-example VJP of the loop step)" if unbind else "Linear (rows from the data flow)"
    assert set(exact.routes.values()) == {route}, exact.routes
    assert_close(exact.per_step, oracle_per_step(model, model.core, data, loss_fn), f"exact features ({route})")
    want = lt.sdi(exact, exact)
    m, seeds = 256, 16 if unbind else 40  # the step route costs a per-example VJP per step: fewer draws
    est = torch.stack(
        [
            lt.sdi(f, f)
            for f in (
                lt.featurize(model, data, loss_fn, step_module=model.core, sketch=lt.SketchSpec(dim=m, seed=s))
                for s in range(seeds)
            )
        ]
    )
    g2 = exact.total.pow(2).sum(-1)  # |g|^2 per train row
    p2 = exact.per_step.pow(2).sum(-1)  # |phi_t|^2 per query row and step
    bound = (2 / m) * g2[:, None, None] * p2[None, :, :]
    se = (bound / seeds).sqrt()
    z = (est.mean(0) - want).abs() / se.clamp_min(1e-30)
    assert float(z.max()) < 4.5, f"sketched SDI biased on a routed body ({route}): max z={float(z.max()):.2f}"
    var = est.var(0)
    assert bool((var <= 2 * bound + 1e-20).all()), "sketched SDI variance above the CountSketch bound"


class Interacting(nn.Module):
    """Each example's update reads the batch mean: examples interact inside the body."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        flat = (h + e).reshape(-1, D)
        return h + torch.tanh(self.fc(flat - flat.mean(0, keepdim=True))).reshape(h.shape)


class BatchNormBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(D)
        self.fc = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        flat = (h + e).reshape(-1, D)
        return h + torch.tanh(self.fc(self.bn(flat))).reshape(h.shape)


class AttendAcrossBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=False)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        u = h + e  # [B, T, D] read as [sequence=B, batch=T, D]: attention runs across examples
        return h + self.mha(u, u, u, need_weights=False)[0]


@pytest.mark.parametrize(
    ("make", "kw"),
    [(Interacting, {}), (BatchNormBody, {"train_mode": True}), (AttendAcrossBatch, {})],
    ids=["batch-mean", "batchnorm-train", "attention-across-batch"],
)
def test_bodies_whose_examples_interact_are_refused(make: Any, kw: dict[str, Any]) -> None:
    model = Looped(make())
    with pytest.raises(lt.VerificationError, match="examples interact"):
        lt.featurize(model, batches(), loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(), **kw)


def test_examples_that_interact_in_a_batch_of_two_are_refused() -> None:
    """A batch of two run as a pair is the batch itself: each example must then be run alone."""
    model = Looped(Interacting())
    pairs = [(x[:2], y[:2]) for x, y in batches()]
    with pytest.raises(lt.VerificationError, match="example 0's features"):
        lt.featurize(model, pairs, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact())


def test_batchnorm_in_eval_mode_does_not_interact() -> None:
    model = Looped(BatchNormBody())
    data = batches()
    feats = lt.featurize(model, data, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact())
    assert_close(feats.per_step, oracle_per_step(model.eval(), model.core, data, loss_fn), "batch norm (eval)")


def test_routes_are_reported(capsys) -> None:
    model = Looped(MoE(top=1))
    lt.featurize(model, batches(1), loss_fn, step_module=model.core, sketch=lt.SketchSpec(dim=32), progress=True)
    err = capsys.readouterr().err
    assert "core.experts.0.0" in err and "rows from the data flow" in err, err


def test_only_layers_off_the_step_inputs_get_their_own_anchor(monkeypatch) -> None:
    """The capture anchors the step module's inputs; a layer downstream of them is hooked as it is, one that is not
    (the fixed-code branch) gets the anchor itself. Both kinds occur here, and the features are the oracle's."""
    from looptrace.capture.tracer import Tracer

    seen: list[bool] = []
    walk = Tracer._downstream_of_anchor

    def spy(self: Tracer, t: torch.Tensor) -> bool:
        seen.append(walk(self, t))
        return seen[-1]

    monkeypatch.setattr(Tracer, "_downstream_of_anchor", spy)
    model = Looped(ConstantBranch())
    data = batches(1)
    # without verification: it asks autograd for the weights' gradients, which computes every delta anyway
    feats = lt.featurize(model, data, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(), verify=False)
    assert seen.count(True) == model.loops and seen.count(False) == model.loops, (
        f"expected fc downstream of the anchored inputs and code_net not, at each of {model.loops} steps: {seen}"
    )
    assert_close(feats.per_step, oracle_per_step(model, model.core, data, loss_fn), "constant-branch features")

"""Capture edge cases: layer types, shared weights, multiple calls per step, checkpointing, markers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import looptrace as lt
from tests.conftest import assert_close, assert_exact_matches_oracle, per_example_grads


class Scale(nn.Module):
    """A custom layer with no rule: exercised through the exact torch.func fallback."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.gamma)


class Conv1D(nn.Module):
    """The Hugging Face GPT-2 layer, re-declared: y = x @ W + b with W [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class Body(nn.Module):
    def __init__(self, d: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d, bias=False)
        if kind == "tied":
            self.fc2.weight = self.fc.weight  # weight tying inside the body
        if kind == "mha":
            self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        if kind == "mha-seqfirst":
            self.mha = nn.MultiheadAttention(d, 2, batch_first=False)
        if kind == "embedding":
            self.emb = nn.Embedding(5, d, padding_idx=0)
        if kind == "fallback":
            self.scale = Scale(d)
        if kind == "conv1d":
            self.conv = Conv1D(d, d)
        if kind == "rmsnorm":
            self.rms = nn.RMSNorm(d)
        self.ln = nn.LayerNorm(d)

    def inner(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        u = self.ln(h)
        if self.kind == "twice":
            u = torch.tanh(self.fc(u))
            u = self.fc(u)  # the same layer twice within one step: both add into this step
        else:
            u = self.fc2(torch.tanh(self.fc(u)))
        if self.kind == "mha":
            u = u + self.mha(u, u, u, need_weights=False)[0]
        if self.kind == "mha-seqfirst":
            ut = u.transpose(0, 1)
            u = u + self.mha(ut, ut, ut, need_weights=False)[0].transpose(0, 1)
        if self.kind == "embedding":
            u = u + self.emb(x % 5)
        if self.kind == "fallback":
            u = self.scale(u)
        if self.kind == "conv1d":
            u = u + self.conv(torch.tanh(u))
        if self.kind == "rmsnorm":
            u = self.rms(u)
        return h + u

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "ckpt":
            return checkpoint(self.inner, h, x, use_reentrant=False)
        if self.kind == "ckpt-reentrant":
            return checkpoint(self.inner, h, x, use_reentrant=True)
        return self.inner(h, x)


class Net(nn.Module):
    def __init__(self, kind: str = "plain", d: int = 6, loops: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, d)
        self.core = Body(d, kind)
        self.head = nn.Linear(d, 3)
        self.loops = loops
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = e
        for _ in range(self.loops):
            h = self.core(h, x)
        return self.head(h).mean(1)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def make_batches(n: int = 2, b: int = 3) -> list[Any]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 5, (b, 4), generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


KINDS = ["plain", "tied", "twice", "mha", "mha-seqfirst", "embedding", "fallback", "ckpt", "conv1d", "rmsnorm"]


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_kinds_match_oracle(kind: str, recompute: bool) -> None:
    model = Net(kind)
    batches = make_batches()
    assert_exact_matches_oracle(
        model, model.core, batches, loss_fn, f"exact features vs oracle ({kind})", recompute=recompute
    )


@pytest.mark.parametrize("kind", ["plain", "tied", "mha", "embedding", "fallback", "conv1d"])
@pytest.mark.parametrize("method", ["tensorsketch", "countsketch"])
def test_sketched_conservation(kind: str, method: str) -> None:
    """sum_t sketch(phi_t) equals the sketch of the per-example autograd gradient."""
    model = Net(kind)
    batches = make_batches()
    spec = lt.SketchSpec(dim=32, seed=5, method=method)  # type: ignore[arg-type]
    feats = lt.featurize(model, batches, loss_fn, step_module=model.core, sketch=spec)
    exact = per_example_grads(model, list(model.core.named_parameters(prefix="core")), batches, loss_fn)
    from looptrace.sketch.plan import SketchPlan

    plan = SketchPlan.build(spec, [(n, tuple(p.shape)) for n, p in model.core.named_parameters(prefix="core")])
    want = torch.zeros(exact.shape[0], plan.dim, dtype=torch.float64)
    off = 0
    for slot in sorted(plan.slots, key=lambda s: s.name):
        slot.add_dense(want[:, slot.offset : slot.offset + slot.m], exact[:, off : off + slot.numel])
        off += slot.numel
    assert_close(feats.total, want, f"sketched conservation ({kind}, {method})")


def test_reentrant_checkpointing_raises() -> None:
    model = Net("ckpt-reentrant")
    with pytest.raises(lt.StepError, match="use_reentrant=False"):
        lt.featurize(model, make_batches(), loss_fn, step_module=model.core, sketch=lt.SketchSpec(dim=16))


class MarkedNet(nn.Module):
    """An iteration spanning an adapter and a stack of blocks, marked with lt.loop_step()."""

    def __init__(self, d: int = 6, loops: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, d)
        self.adapter = nn.Linear(2 * d, d, bias=False)
        self.blocks = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d)])
        self.head = nn.Linear(d, 3)
        self.loops = loops
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = torch.zeros_like(e)
        for _ in range(self.loops):
            with lt.loop_step():
                u = self.adapter(torch.cat([e, h], -1))
                for blk in self.blocks:
                    u = torch.tanh(blk(u))
                h = u
        return self.head(h).mean(1)


def test_loop_step_marker_matches_step_module_featurisation() -> None:
    model = MarkedNet()
    batches = make_batches()
    feats = lt.featurize(
        model, batches, loss_fn, body=[model.adapter, model.blocks], sketch=lt.SketchSpec.exact(), verify="first"
    )
    assert feats.per_step is not None and feats.per_step.shape[1] == 3
    exact = per_example_grads(
        model,
        list(model.adapter.named_parameters(prefix="adapter")) + list(model.blocks.named_parameters(prefix="blocks")),
        batches,
        loss_fn,
    )
    assert_close(feats.total, exact, "marked loop: sum over steps vs autograd")
    assert bool((feats.per_step.norm(dim=-1) > 0).all())


def test_rows_follow_loader_order_and_batching_does_not_matter() -> None:
    model = Net("plain")
    batches = make_batches(n=2, b=3)
    spec = lt.SketchSpec(dim=32)
    whole = lt.featurize(model, batches, loss_fn, step_module=model.core, sketch=spec)
    singles = [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(x.shape[0])]
    one = lt.featurize(model, singles, loss_fn, step_module=model.core, sketch=spec)
    assert_close(whole.per_step, one.per_step, "features batched vs one example at a time")


def test_dataloader_rows_in_dataset_order() -> None:
    model = Net("plain")
    x = torch.randint(0, 5, (7, 4), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(1))
    ds = torch.utils.data.TensorDataset(x, y)
    spec = lt.SketchSpec(dim=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    feats = lt.featurize(model, loader, loss_fn, step_module=model.core, sketch=spec)
    rev = lt.featurize(
        model, [(x[i : i + 1], y[i : i + 1]) for i in range(7)], loss_fn, step_module=model.core, sketch=spec
    )
    assert_close(feats.total, rev.total, "DataLoader rows vs dataset order")
    with pytest.raises(lt.LoaderError, match="shuffle=False"):
        lt.featurize(
            model,
            torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True),
            loss_fn,
            step_module=model.core,
            sketch=spec,
        )


def test_bitwise_deterministic_on_cpu() -> None:
    spec = lt.SketchSpec(dim=64, seed=3)
    m1, m2 = Net("mha"), Net("mha")
    f1 = lt.featurize(m1, make_batches(), loss_fn, step_module=m1.core, sketch=spec)
    f2 = lt.featurize(m2, make_batches(), loss_fn, step_module=m2.core, sketch=spec)
    assert torch.equal(f1.per_step, f2.per_step), "two runs with the same seed must be bitwise identical"

"""Capture edge cases: layer types, shared weights, multiple calls per step, checkpointing, markers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import looptrace as lt
from tests.conftest import assert_close, assert_exact_matches_oracle, lm_loss, oracle_per_step, per_example_grads


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


def _marked_oracle(model: nn.Module, modules: dict[str, nn.Module], batches: list[Any]) -> torch.Tensor:
    """Exact ``[N, tau, P]`` per-step gradients of a loop marked with lt.loop_step() whose iteration calls each of
    ``modules`` once: the t-th call of every module runs on its own copy of the weights (step t's), parameters in
    sorted full-name order."""
    import copy

    from looptrace import batching

    order = sorted((f"{prefix}.{n}", prefix, n) for prefix, m in modules.items() for n, _ in m.named_parameters())
    copies: dict[str, list[dict[str, torch.Tensor]]] = {prefix: [] for prefix in modules}
    refs = {prefix: copy.deepcopy(m) for prefix, m in modules.items()}

    def patch(prefix: str, m: nn.Module) -> None:
        def forward(*args: Any, **kwargs: Any) -> Any:
            p = {n: t.detach().clone().requires_grad_(True) for n, t in m.named_parameters()}
            copies[prefix].append(p)
            return torch.func.functional_call(refs[prefix], p, args, kwargs)

        m.forward = forward  # type: ignore[method-assign]

    for prefix, m in modules.items():
        patch(prefix, m)
    rows = []
    try:
        for batch in batches:
            for i in range(batching.leading_size(batch) or 0):
                for c in copies.values():
                    c.clear()
                loss = loss_fn(model, batching.slice_rows(batch, i, i + 1))[0]
                tau = len(copies[next(iter(modules))])
                leaves = [copies[prefix][t][n] for t in range(tau) for _, prefix, n in order]
                grads = torch.autograd.grad(loss, leaves)
                rows.append(torch.stack([torch.cat([g.reshape(-1) for g in grads[t * len(order) : (t + 1) * len(order)]])
                                         for t in range(tau)]))  # fmt: skip
    finally:
        for m in modules.values():
            del m.forward
    return torch.stack(rows)


def test_loop_step_marker_splits_the_gradient_by_step_like_the_oracle() -> None:
    """With lt.loop_step() around an iteration that spans an adapter and a stack of blocks, each step's features are
    the gradient with respect to that step's copy of every body module (not only their sum). Catches calls
    assigned to the wrong step (a shifted or merged split keeps the total)."""
    model = MarkedNet()
    batches = make_batches()
    feats = lt.featurize(model, batches, loss_fn, body=[model.adapter, model.blocks], sketch=lt.SketchSpec.exact())
    modules = {"adapter": model.adapter, "blocks.0": model.blocks[0], "blocks.1": model.blocks[1]}
    want = _marked_oracle(model, modules, batches)
    assert feats.per_step is not None and feats.per_step.shape == want.shape
    assert_close(feats.per_step, want, "loop_step() per-step features vs per-step copies of the marked modules")


def test_sketched_features_with_recomputation_equal_those_without() -> None:
    """recompute=True (each step re-run inside backward, the setup behind the memory figures) gives the same
    sketched features as keeping every step's activations, in float64 to rounding. Catches a recomputed step
    captured twice, or with the other steps' inputs."""
    for kind in ("plain", "mha", "tied"):
        model = Net(kind)
        spec = lt.SketchSpec(dim=64, seed=3)
        kept = lt.featurize(model, make_batches(), loss_fn, step_module=model.core, sketch=spec)
        recomputed = lt.featurize(model, make_batches(), loss_fn, step_module=model.core, sketch=spec, recompute=True)
        assert_close(recomputed.per_step, kept.per_step, f"sketched, recompute=True vs False ({kind})", rtol=1e-12)
    from looptrace.models.looped import LoopedConfig, LoopedTransformer

    torch.manual_seed(0)
    gpt = LoopedTransformer(LoopedConfig(vocab_size=11, d_model=16, n_heads=2, d_mlp=24, n_prelude=1, n_core=2,
                                         n_coda=1, n_loops=3, max_len=8, injection="concat")).double()  # fmt: skip
    data = [(torch.randint(0, 11, (3, 6)), torch.randint(0, 11, (3, 6)))]
    spec = lt.SketchSpec(dim=128)
    a = lt.featurize(gpt, data, lm_loss, step_module=gpt.core, sketch=spec)
    b = lt.featurize(gpt, data, lm_loss, step_module=gpt.core, sketch=spec, recompute=True)
    assert_close(b.per_step, a.per_step, "looped GPT, sketched, recompute=True vs False", rtol=1e-12)


#: bfloat16 autocast against float32, relative error of the SDI tensor and of the features (docs/reliability.md):
#: bfloat16 keeps 8 bits of mantissa (2^-8 = 0.4 % per rounding); the benchmark model measures about 1 %.
BF16_SDI_BOUND, BF16_FEATURE_BOUND = 0.05, 0.05


def test_bfloat16_autocast_stays_within_its_documented_bound() -> None:
    """featurize(autocast=torch.bfloat16) on a float32 model: the features and SDI are within the documented relative
    error of float32, are really computed in bfloat16 (not equal to float32), and the option is recorded. Catches
    autocast silently off, or on and far off (a delta kept in bfloat16 through the whole loop)."""
    from looptrace.models.looped import LoopedConfig, LoopedTransformer

    torch.manual_seed(0)
    model = LoopedTransformer(LoopedConfig(vocab_size=11, d_model=32, n_heads=2, d_mlp=48, n_loops=4, max_len=8,
                                           injection="concat"))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 11, (4, 8), generator=g), torch.randint(0, 11, (4, 8), generator=g))]
    spec = lt.SketchSpec(dim=256)
    ref = lt.featurize(model, data, lm_loss, step_module=model.core, sketch=spec)
    low = lt.featurize(model, data, lm_loss, step_module=model.core, sketch=spec, autocast=torch.bfloat16)
    assert low.per_step.dtype == torch.float32 and low.settings["autocast"] == "bfloat16"

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    feature_err, sdi_err = rel(low.per_step, ref.per_step), rel(lt.sdi(low, low), lt.sdi(ref, ref))
    assert 1e-5 < feature_err < BF16_FEATURE_BOUND, f"bf16 features vs float32: relative error {feature_err:.2e}"
    assert sdi_err < BF16_SDI_BOUND, f"bf16 SDI vs float32: relative error {sdi_err:.2e}"


class DropoutBody(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(0.3)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return h + self.drop(torch.tanh(self.fc(h)))


def _dropout_oracle(model: nn.Module, batch: Any, seed: int) -> torch.Tensor:
    """``[B, tau, P]`` per-step gradients of one batch run in train mode with the RNG at ``seed``: the same dropout
    masks as a featurisation of that batch that starts from the same RNG state."""
    import copy

    core = model.core
    ref = copy.deepcopy(core)
    names = sorted(n for n, _ in core.named_parameters())
    copies: list[dict[str, torch.Tensor]] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        p = {n: t.detach().clone().requires_grad_(True) for n, t in core.named_parameters()}
        copies.append(p)
        return torch.func.functional_call(ref, p, args, kwargs)

    core.forward = forward  # type: ignore[method-assign]
    model.train()
    ref.train()
    torch.manual_seed(seed)
    try:
        losses = loss_fn(model, batch)
    finally:
        del core.forward
        model.eval()
    leaves = [c[n] for c in copies for n in names]
    out = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], leaves, retain_graph=True)
        out.append(torch.stack([torch.cat([g.reshape(-1) for g in grads[t * len(names) : (t + 1) * len(names)]])
                                for t in range(len(copies))]))  # fmt: skip
    return torch.stack(out)


def test_train_mode_featurises_with_dropout_on() -> None:
    """train_mode=True runs the body with dropout on: the exact features equal the per-step gradients of the same
    batch under the same dropout masks (one batch forward from the same RNG state), differ from eval mode, and the
    model's mode is restored. Catches train_mode ignored (eval masks) and a mode left switched."""
    model = Net()
    model.core = DropoutBody().double()
    model.eval()
    batch = make_batches(1, b=4)[0]
    torch.manual_seed(7)
    got = lt.featurize(model, [batch], loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(), verify=False,
                       train_mode=True)  # fmt: skip
    assert not model.training, "featurize must restore eval mode"
    want = _dropout_oracle(model, batch, seed=7)
    assert_close(got.per_step, want, "train_mode=True features vs per-step gradients under the same dropout masks")
    off = lt.featurize(model, [batch], loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(), verify=False)
    assert not torch.allclose(off.per_step, got.per_step), "dropout must change the features in train mode"
    assert_close(off.per_step, oracle_per_step(model, model.core, [batch], loss_fn), "eval mode: no dropout")

"""Curvature-aware step-resolved influence (K-FAC, EK-FAC, Gauss-Newton) against dense references.

The references are built here, independently of :mod:`looptrace.curvature`: the Kronecker factors from
this file's own hooks on the body's Linear layers, the EK-FAC eigenvalues and the diagonal blocks from the
untied oracle's per-step gradients (summed over steps: the tied gradient), the Fisher assembled as an
explicit ``[P, P]`` matrix over the whole body and inverted; Gauss-Newton as an explicit Gram solve.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import looptrace as lt
from looptrace.curvature import Curvature, fit_curvature, sketch_flat
from looptrace.sketch.plan import SketchPlan
from tests.conftest import assert_close, lm_loss, oracle_per_step, tiny_batches, tiny_model

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "full-bptt": (dict(), dict()),
    "truncated-bptt": (dict(bptt_k=2), dict()),
    "readout-step": (dict(injection="additive"), dict(readout=True)),
}


def content_sampled_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A true-Fisher loss whose targets are drawn from the model with a generator seeded by each example's
    content, so that the reference (one example at a time) and the fit (batches) see the same draws."""
    x = batch[0]
    kwargs = {"readout_steps": batch[2]} if len(batch) > 2 else {}
    logits = model(x, **kwargs)  # [B, L, V]
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        y = torch.stack([
            torch.multinomial(probs[i], 1, generator=torch.Generator().manual_seed(int((x[i] * (x[i] + 3)).sum())))[:, 0]
            for i in range(len(x))
        ])  # fmt: skip
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(x.shape).mean(1)


def _param_index(model: nn.Module) -> dict[str, tuple[int, int]]:
    out, off = {}, 0
    for name, p in sorted(model.core.named_parameters()):
        out[f"core.{name}"] = (off, p.numel())
        off += p.numel()
    return out


def _factors(model: nn.Module, batches: list[Any], loss_fn: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{linear name: (A, S)}: A = mean of [x, 1][x, 1]^T over rows with a nonzero output gradient, S = sum of
    g g^T over all rows / N; every call of the Linear (every loop step) is pooled."""
    linears = {f"core.{n}": m for n, m in model.core.named_modules() if isinstance(m, nn.Linear)}
    sums = {n: [0.0, 0.0, 0] for n in linears}
    n_ex = 0
    for batch in batches:
        calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        hooks = [
            m.register_forward_hook(lambda mod, a, o, n=n, calls=calls: calls.append((n, a[0], o)))
            for n, m in linears.items()
        ]
        try:
            losses = loss_fn(model, batch)
        finally:
            for h in hooks:
                h.remove()
        live = [c for c in calls if c[2].requires_grad]
        grads = torch.autograd.grad(losses.sum(), [c[2] for c in live], allow_unused=True)
        for (name, x, _), g in zip(live, grads, strict=True):
            if g is None:
                continue
            x2, g2 = x.detach().reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
            keep = g2.abs().sum(1) > 0
            x2, g2 = x2[keep], g2[keep]
            if linears[name].bias is not None:
                x2 = torch.cat([x2, torch.ones(len(x2), 1, dtype=x2.dtype)], 1)
            sums[name][0] = sums[name][0] + x2.T @ x2
            sums[name][1] = sums[name][1] + g2.T @ g2
            sums[name][2] += len(x2)
        n_ex += len(losses)
    return {n: (s[0] / s[2], s[1] / n_ex) for n, s in sums.items()}  # type: ignore[operator]


def dense_fisher_inverse(model: nn.Module, batches: list[Any], fisher_loss: Any, kind: str) -> torch.Tensor:
    """The explicit ``[P, P]`` (F + lambda I)^-1 over the body, lambda = 0.1 x each block's mean eigenvalue."""
    index = _param_index(model)
    p_total = sum(n for _, n in index.values())
    tied = oracle_per_step(model, model.core, batches, fisher_loss).sum(1)  # [N, P] tied per-example gradients
    fisher = torch.zeros(p_total, p_total, dtype=torch.float64)
    covered: set[str] = set()
    for name, (a, s) in _factors(model, batches, fisher_loss).items():
        lin = model.get_submodule(name)
        d_out, d_in = lin.weight.shape
        w0 = index[f"{name}.weight"][0]
        cols = [[w0 + i * d_in + j for j in range(d_in)] for i in range(d_out)]
        if lin.bias is not None:
            b0 = index[f"{name}.bias"][0]
            cols = [[*row, b0 + i] for i, row in enumerate(cols)]
            covered.add(f"{name}.bias")
        covered.add(f"{name}.weight")
        idx = torch.tensor(cols).reshape(-1)  # row-major vec of G = [W | b]: vec(g a^T) = g (x) a
        if kind == "kfac":
            block = torch.kron(s, a)
        else:
            ea, qa = torch.linalg.eigh(a)
            es, qs = torch.linalg.eigh(s)
            q = torch.kron(qs, qa)
            lam = ((tied[:, idx] @ q) ** 2).mean(0)  # E_n[(Q^T vec G_n)^2]
            block = q @ torch.diag(lam) @ q.T
            del ea, es
        damp = 0.1 * float(torch.linalg.eigvalsh(block).mean())
        fisher[idx[:, None], idx[None, :]] = block + damp * torch.eye(len(idx), dtype=torch.float64)
    for name, (off, n) in index.items():
        if name in covered:
            continue
        d = (tied[:, off : off + n] ** 2).mean(0)
        fisher[range(off, off + n), range(off, off + n)] = d + 0.1 * float(d.mean())
    return torch.linalg.inv(fisher)


def gauss_newton_inverse(phi: torch.Tensor) -> torch.Tensor:
    n, d = phi.shape
    gram = phi.T @ phi / n
    lam = 0.1 * float(torch.trace(gram)) / min(n, d)
    return torch.linalg.inv(gram + lam * torch.eye(d, dtype=torch.float64))


def _checkpoints(model: nn.Module) -> list[lt.Checkpoint]:
    states = []
    for k in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * (k + 1) * torch.sin(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + k))
        states.append({n: t.clone() for n, t in model.state_dict().items()})
    return [lt.Checkpoint(states[0], lr=0.5, name="a"), lt.Checkpoint(states[1], lr=0.25, name="b")]


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "gauss-newton"])
@pytest.mark.parametrize("case", list(CASES))
def test_preconditioned_scores_equal_dense_reference(case: str, kind: str, fisher: str) -> None:
    """Test-side SDI, train-side SDI, the step matrix and TracIn (summed over two checkpoints with eta) equal
    g^T (F + lambda I)^-1 phi with F the explicit dense K-FAC / EK-FAC / Gauss-Newton matrix. Breaks caught
    (each tried by hand): S averaged over rows instead of summed per example, the bias not folded into A,
    rows without gradient kept in A, EK-FAC eigenvalues from per-step instead of tied gradients, a
    transposed rotation, damping from the max instead of the mean eigenvalue, the preconditioner applied
    to the train side."""
    if kind == "gauss-newton" and fisher == "true":
        pytest.skip("Gauss-Newton is built from the training features; it has no Fisher choice")
    model_kw, batch_kw = CASES[case]
    model = tiny_model(**model_kw)
    train, query = tiny_batches(2, **batch_kw), tiny_batches(1, b=2, **batch_kw)
    cks = _checkpoints(model)
    extra: dict[str, Any] = {} if kind == "gauss-newton" else {"fisher": fisher}
    if fisher == "true" and kind != "gauss-newton":
        extra["fisher_loss"] = content_sampled_loss
    kw = dict(step_module=model.core, sketch=lt.SketchSpec.exact(), precondition=kind, **extra)
    mat = lt.attribute(model, cks, train, query, lm_loss, decomposition="matrix", **kw)
    side = lt.attribute(model, cks, train, query, lm_loss, decomposition="train", **kw)
    want = torch.zeros_like(mat.step_matrix)
    for ck in cks:
        model.load_state_dict(ck.load_full().state)
        pt, pq = oracle_per_step(model, model.core, train, lm_loss), oracle_per_step(model, model.core, query, lm_loss)
        if kind == "gauss-newton":
            inv = gauss_newton_inverse(pt.sum(1))
        else:
            inv = dense_fisher_inverse(model, train, content_sampled_loss if fisher == "true" else lm_loss, kind)
        want += ck.lr * torch.einsum("nsp,pq,mtq->nmst", pt, inv, pq)
    what = f"{kind} ({fisher} Fisher, {case})"
    assert float(want.abs().max()) > 0
    assert_close(mat.step_matrix, want, f"{what}: step matrix vs dense reference")
    assert_close(mat.sdi, want.sum(2), f"{what}: test-side SDI vs dense reference")
    assert_close(side.sdi, want.sum(3), f"{what}: train-side SDI vs dense reference")
    assert_close(mat.tracin, want.sum((2, 3)), f"{what}: TracIn vs dense reference")
    assert_close(mat.sdi.sum(-1), mat.tracin, f"{what}: conservation sum_t SDI_t = TracIn", rtol=0, atol=1e-10)
    assert_close(side.sdi.sum(-1), side.tracin, f"{what}: conservation, train side", rtol=0, atol=1e-10)


def test_truncated_steps_get_no_preconditioned_influence() -> None:
    """Under truncated BPTT the cut steps have no gradient: preconditioning the query side must not give
    them any (a preconditioner mixing steps would)."""
    model = tiny_model(bptt_k=2)
    ck = [lt.Checkpoint(model.state_dict(), lr=1.0, name="c")]
    res = lt.attribute(model, ck, tiny_batches(1), tiny_batches(1, b=2), lm_loss, step_module=model.core,
                       sketch=lt.SketchSpec.exact(), precondition="ekfac")  # fmt: skip
    assert float(res.sdi[..., :2].abs().max()) == 0 and float(res.sdi[..., 2:].abs().max()) > 0


@pytest.mark.parametrize(
    "spec",
    [
        lt.SketchSpec(dim=64, seed=3),
        lt.SketchSpec(dim=64, seed=1, method="tensorsketch", budget="per_tensor"),
        lt.SketchSpec(dim=900, seed=2, budget="proportional"),
    ],
    ids=["countsketch-shared", "tensorsketch-per-tensor", "proportional"],
)
def test_sketch_flat_equals_featurized_sketch(spec: lt.SketchSpec) -> None:
    """The sketch of exact per-step gradients (flat, in the exact layout) equals what featurisation
    computes from the factors: the query side is sketched with the training features' map. Catches a slot
    read at the wrong offset, a sign or bucket table of another slot, a transposed flattening."""
    model = tiny_model()
    batches = tiny_batches(1)
    exact = lt.featurize(model, batches, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact())
    sk = lt.featurize(model, batches, lm_loss, step_module=model.core, sketch=spec)
    plan = SketchPlan.build(spec, [(n, tuple(p.shape)) for n, p in model.named_parameters() if n.startswith("core.")])
    assert exact.per_step is not None and sk.per_step is not None
    b, t, p = exact.per_step.shape
    got = sketch_flat(plan, exact.per_step.reshape(b * t, p)).reshape(b, t, -1)
    assert_close(got, sk.per_step, f"sketch of exact per-step gradients vs featurised sketch ({spec})")


def _fitted() -> tuple[nn.Module, list[Any], Curvature]:
    model = tiny_model()
    train = tiny_batches(2)
    return model, train, fit_curvature(model, train, lm_loss, step_module=model.core)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_preconditioning_runs_in_the_gradients_precision(kind: str) -> None:
    """``Curvature.precondition`` of float64 gradients is float64 (the exact path the dense twins check); of
    float32 or bfloat16 gradients it runs in float32 (half the memory and about twice the speed of float64 at
    width) and agrees with the float64 result to float32 precision. Catches a block cast to the wrong precision or
    orientation on the float32 path, or a float64 copy handed back for float32 input."""
    _, _, curv = _fitted()
    g = torch.randn(5, curv.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = curv.precondition(g, kind)
    assert want.dtype == torch.float64
    for dtype in (torch.float32, torch.bfloat16):
        got = curv.precondition(g.to(dtype), kind)
        assert got.dtype == torch.float32, f"{dtype} gradients preconditioned in {got.dtype}"
        ref = curv.precondition(g.to(dtype).double(), kind)
        scale = float(ref.abs().max())
        assert_close(got.double(), ref, f"{kind} in float32 from {dtype}", rtol=1e-4, atol=1e-5 * scale)
    assert float((want - curv.precondition(g.float(), kind).double()).abs().max()) < 1e-4 * float(want.abs().max())


def test_sketched_query_is_the_sketch_of_the_exact_preconditioned_query() -> None:
    """attribute's sketched EK-FAC scores are <S g_train, S P^-1 phi_t> with the exact P^-1 phi_t: the
    preconditioner acts before the sketch (after it, it would be a different, biased estimator)."""
    model, train, curv = _fitted()
    query = tiny_batches(1, b=2)
    spec = lt.SketchSpec(dim=48, seed=5)
    res = lt.attribute(model, [lt.Checkpoint(model.state_dict(), lr=1.0, name="c")], train, query, lm_loss,
                       step_module=model.core, sketch=spec, precondition="ekfac")  # fmt: skip
    plan = SketchPlan.build(spec, [(n, tuple(p.shape)) for n, p in model.named_parameters() if n.startswith("core.")])
    g = oracle_per_step(model, model.core, train, lm_loss).sum(1)
    phi = oracle_per_step(model, model.core, query, lm_loss)
    pre = curv.precondition(phi, "ekfac")
    m, t, p = pre.shape
    want = torch.einsum("nd,mtd->nmt", sketch_flat(plan, g), sketch_flat(plan, pre.reshape(m * t, p)).reshape(m, t, -1))
    assert_close(res.sdi, want, "sketched EK-FAC SDI vs sketch of the exact preconditioned gradients")


def test_sketched_preconditioned_scores_are_unbiased() -> None:
    """Monte Carlo over sketch seeds: the mean of <S g, S P^-1 phi_t> is g . P^-1 phi_t. With R seeds the
    mean's sd is at most sqrt(bound / R) per entry, bound = (2/m + 2/m^2) |g|^2 |P^-1 phi_t|^2 (CountSketch,
    shared budget); every entry must lie within 5 sd. A sketch applied before the preconditioner, or hashes
    that do not change with the seed, fail this. (Three body tensors, so that drawing 300 plans is quick.)"""
    model, train, curv = _fitted()
    query = tiny_batches(1, b=2)
    off = curv.offsets
    keep = ["core.blocks.0.attn.qkv.bias", "core.blocks.0.attn.qkv.weight", "core.blocks.0.ln1.weight"]
    cols = torch.cat([torch.arange(off[n][0], off[n][0] + off[n][1]) for n in keep])
    names = [(n, s) for n, s in curv.params if n in keep]
    g = oracle_per_step(model, model.core, train, lm_loss).sum(1)[:3][:, cols]
    y = curv.precondition(oracle_per_step(model, model.core, query, lm_loss), "ekfac")[..., cols]  # [2, 4, p]
    y = y.reshape(-1, y.shape[-1])
    exact = g @ y.T
    m, seeds = 32, 300
    est = torch.stack(
        [
            sketch_flat(plan, g) @ sketch_flat(plan, y).T
            for plan in (SketchPlan.build(lt.SketchSpec(dim=m, seed=s), names) for s in range(seeds))
        ]
    )
    bound = (2 / m + 2 / m**2) * g.norm(dim=1)[:, None] ** 2 * y.norm(dim=1)[None, :] ** 2
    z = (est.mean(0) - exact).abs() / (bound / seeds).sqrt()
    assert float(z.max()) < 5, f"sketched preconditioned scores are biased: max z = {float(z.max()):.2f}"
    ratio = est.var(0) / bound
    assert float(ratio.max()) < 1.5, f"variance exceeds the bound (max ratio {float(ratio.max()):.2f})"
    assert float(ratio.min()) > 0.01, "variance implausibly small: is the seed used?"


def test_factors_round_trip_and_refuse_damage(tmp_path) -> None:
    """Saved factors load to the same preconditioner; a corrupted file is refused by its checksum."""
    _, _, curv = _fitted()
    path = curv.save(tmp_path / "ck000.safetensors", extra={"model_fingerprint": "x"})
    back, side = Curvature.load(path)
    x = torch.randn(3, curv.dim, dtype=torch.float64)
    assert_close(back.precondition(x, "ekfac"), curv.precondition(x, "ekfac"), "loaded vs fitted EK-FAC")
    assert side["model_fingerprint"] == "x"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(lt.CorruptFileError, match="checksum"):
        Curvature.load(path)


def test_true_fisher_fit_is_reproducible_and_keeps_the_callers_rng() -> None:
    """Sampling targets draws from torch's generator, seeded per batch by the fit (forked): two fits under
    different caller seeds agree exactly, another ``seed=`` differs, and the caller's random state is what it
    was. Catches unseeded sampling (the draws would follow the caller's state)."""
    from looptrace.curvature import sampled_cross_entropy

    def sampled(model: nn.Module, batch: Any) -> torch.Tensor:
        return sampled_cross_entropy(model(batch[0])).mean(1)

    model, train = tiny_model(), tiny_batches(2)
    fits = []
    for caller_seed in (123, 456):
        torch.manual_seed(caller_seed)
        state = torch.get_rng_state()
        fits.append(fit_curvature(model, train, lm_loss, step_module=model.core, fisher_loss=sampled))
        assert torch.equal(torch.get_rng_state(), state), "the fit changed the caller's random state"
    assert fits[0].fisher == "true"
    x = torch.randn(2, fits[0].dim, dtype=torch.float64)
    assert torch.equal(fits[0].precondition(x, "ekfac"), fits[1].precondition(x, "ekfac")), (
        "the fit's target draws depend on the caller's random state: is the generator seeded per batch?"
    )
    other = fit_curvature(model, train, lm_loss, step_module=model.core, fisher_loss=sampled, seed=1)
    assert not torch.equal(other.precondition(x, "ekfac"), fits[0].precondition(x, "ekfac")), "seed= is unused"
    emp = fit_curvature(model, train, lm_loss, step_module=model.core)
    assert emp.fisher == "empirical"
    assert not torch.allclose(emp.precondition(x, "kfac"), fits[0].precondition(x, "kfac")), (
        "true and empirical Fisher gave the same factors: are the sampled targets used?"
    )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(precondition="kfca"), "precondition must be one of"),
        (dict(precondition="adam", damping=0.1), "damping applies to"),
        (dict(precondition=None, fisher="true"), "fisher= and fisher_loss="),
        (dict(precondition="kfac", fisher="true"), "pass fisher_loss="),
        (dict(precondition="ekfac", damping=-1.0), "positive finite"),
    ],
)
def test_bad_options_raise(kwargs: dict[str, Any], words: str) -> None:
    model = tiny_model()
    with pytest.raises(lt.ConfigError, match=words):
        lt.attribute(model, [lt.Checkpoint(model.state_dict(), lr=1.0, name="c")], tiny_batches(1),
                     tiny_batches(1, b=2), lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact(), **kwargs)  # fmt: skip


def test_damping_float_is_lambda_for_every_block() -> None:
    """A float damping is lambda itself: with a huge lambda, (F + lambda I)^-1 ~ I / lambda."""
    _, _, curv = _fitted()
    x = torch.randn(2, curv.dim, dtype=torch.float64)
    lam = 1e12
    assert_close(curv.precondition(x, "ekfac", damping=lam) * lam, x, "huge damping", rtol=1e-6, atol=1e-9)
    assert math.isclose(float(curv.dense("kfac", damping=lam).trace()) * lam, curv.dim, rel_tol=1e-6)


class _TransposedCore(nn.Module):
    """A loop step whose Linear sees rows [L, B, d] (sequence first): not batch-first."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(self.norm(h + e).transpose(0, 1))).transpose(0, 1)


class _SeqFirstLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 6)
        self.core = _TransposedCore(6)
        self.head = nn.Linear(6, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = torch.zeros_like(e)
        for _ in range(3):
            h = self.core(h, e)
        return self.head(h)


@pytest.mark.parametrize("length", [5, 3], ids=["L-differs-from-B", "L-equals-B"])
def test_ekfac_rows_that_are_not_batch_first_take_the_exact_route(length: int) -> None:
    """EK-FAC groups a Linear's rows by example assuming the batch is their first axis; rows [L, B, d] must
    be caught: by shape when L != B (then fitted from exact per-example gradients), and when L == B by the
    first-batch check of the exact route against autograd, which refuses the body as featurize does. The
    batch-first tiny model keeps the fast route."""
    model = _SeqFirstLoop().double()
    batches = [(torch.randint(0, 7, (3, length)), torch.randint(0, 7, (3, length))) for _ in range(2)]

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return (
            nn.functional.cross_entropy(m(batch[0]).flatten(0, 1), batch[1].flatten(), reduction="none")
            .view(batch[1].shape)
            .mean(1)
        )

    if length == 3:
        with pytest.raises(lt.VerificationError, match="batch not on the first axis"):
            fit_curvature(model, batches, loss, step_module=model.core, kinds=("ekfac",))
        return
    curv = fit_curvature(model, batches, loss, step_module=model.core, kinds=("ekfac",))
    assert curv.ekfac_route == "exact"
    tied = oracle_per_step(model, model.core, batches, loss).sum(1)
    blk = curv.kronecker[0]
    off = curv.offsets
    w0, wn = off[blk.weight]
    b0, bn = off[blk.bias]  # type: ignore[index]
    g = torch.cat([tied[:, w0 : w0 + wn].reshape(-1, 6, 6), tied[:, b0 : b0 + bn].reshape(-1, 6, 1)], 2)
    assert_close(blk.ekfac, blk.rotate(g).square().mean(0), "EK-FAC eigenvalues of sequence-first rows")
    model2, train = tiny_model(), tiny_batches(2)
    fast = fit_curvature(model2, train, lm_loss, step_module=model2.core, kinds=("ekfac",))
    assert fast.ekfac_route == "rows"


class _SeqFirstNormCore(nn.Module):
    """A loop step whose LayerNorm and Linear both see rows [L, B, d] (sequence first)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(self.norm((h + e).transpose(0, 1)))).transpose(0, 1)


@pytest.mark.parametrize(
    "length, d", [(5, 6), (5, 4), (3, 6)], ids=["L-differs-from-B", "rows-do-not-divide-by-B", "L-equals-B"]
)
def test_kfac_diagonal_of_rows_that_are_not_batch_first(length: int, d: int) -> None:
    """K-FAC's diagonal blocks square per-example gradients that a layer rule groups by the rows' first axis; a
    LayerNorm that sees [L, B, d] rows (B = 3) is grouped wrongly whether its rows divide into B groups (L d = 30)
    or not (L d = 20), and even where every shape fits (L == B). It must take the exact route: equal to
    per-example autograd when L != B, and when L == B refused by that route's own check, as featurize refuses it.
    Catches a grouping check that passes whatever the rule grouped (the diagonal then silently wrong), and a
    first pass that lets the rule reshape rows it cannot group (a crash before any check)."""
    model = _SeqFirstLoop()
    model.emb, model.head = nn.Embedding(7, d), nn.Linear(d, 7)
    model.core = _SeqFirstNormCore(d)
    model.double()
    g = torch.Generator().manual_seed(length)
    batches = [(torch.randint(0, 7, (3, length), generator=g), torch.randint(0, 7, (3, length), generator=g))
               for _ in range(2)]  # fmt: skip

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        logits = m(batch[0]).flatten(0, 1)
        return nn.functional.cross_entropy(logits, batch[1].flatten(), reduction="none").view(batch[1].shape).mean(1)

    if length == 3:
        with pytest.raises(lt.VerificationError):
            fit_curvature(model, batches, loss, step_module=model.core, kinds=("kfac",))
        return
    curv = fit_curvature(model, batches, loss, step_module=model.core, kinds=("kfac",))
    tied = oracle_per_step(model, model.core, batches, loss).sum(1)
    off = curv.offsets
    assert {dia.name for dia in curv.diagonal} == {"core.norm.weight", "core.norm.bias"}
    for dia in curv.diagonal:
        s0, sn = off[dia.name]
        assert_close(dia.diag.reshape(-1), tied[:, s0 : s0 + sn].square().mean(0), f"K-FAC diagonal of {dia.name}")


def test_batch_first_diagonal_blocks_are_fitted_in_the_first_pass(monkeypatch) -> None:
    """On a batch-first body the LayerNorm diagonal blocks come from pass 1's layer rules (the grouping check
    passes): no exact featurisation runs, for K-FAC or EK-FAC, and the diagonal equals per-example autograd.
    Catches a grouping check that always fails (every diagonal then takes the slower exact route unnoticed)."""
    import looptrace.curvature.fit as fitmod

    calls: list[int] = []
    exact = fitmod.featurize
    monkeypatch.setattr(fitmod, "featurize", lambda *a, **k: calls.append(1) or exact(*a, **k))
    model, train = tiny_model(), tiny_batches(2)
    tied = oracle_per_step(model, model.core, train, lm_loss).sum(1)
    for kinds in (("kfac",), ("kfac", "ekfac")):
        curv = fit_curvature(model, train, lm_loss, step_module=model.core, kinds=kinds)
        assert not calls, f"{kinds}: the diagonal blocks of a batch-first body took the exact featurisation route"
        assert curv.diagonal, "the tiny model's body has LayerNorm parameters: diagonal blocks expected"
        for dia in curv.diagonal:
            s0, sn = curv.offsets[dia.name]
            assert_close(dia.diag.reshape(-1), tied[:, s0 : s0 + sn].square().mean(0), f"diagonal of {dia.name}")


class _NormOnlyCore(nn.Module):
    """A loop step with no Linear layer: one LayerNorm called, another whose weights the step reads itself."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.sub = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        x = self.norm(h + e)
        return h + torch.tanh(nn.functional.layer_norm(x, x.shape[-1:], self.sub.weight, self.sub.bias))


def test_fit_a_body_without_linear_layers_and_a_float64_loss_of_a_float32_model() -> None:
    """Two bodies the grouping check must not trip on: one with no Linear layer whose LayerNorm parameters take
    the exact route (nothing hooked, nothing to check: EK-FAC fits its diagonal blocks), and a float32 model whose
    loss is float64 (the check's weights take the rows' precision, its tolerance the parameters'), which keeps the
    rows route. Catches a check that assumes a hooked call, or weights in the loss's dtype (a dtype error)."""
    model = _SeqFirstLoop()
    model.core = _NormOnlyCore(6)
    model.double()
    batches = [(torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))) for _ in range(2)]

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        logits = m(batch[0]).flatten(0, 1)
        return nn.functional.cross_entropy(logits, batch[1].flatten(), reduction="none").view(batch[1].shape).mean(1)

    curv = fit_curvature(model, batches, loss, step_module=model.core)
    tied = oracle_per_step(model, model.core, batches, loss).sum(1)
    assert not curv.kronecker and len(curv.diagonal) == 4
    for dia in curv.diagonal:
        s0, sn = curv.offsets[dia.name]
        assert_close(dia.diag.reshape(-1), tied[:, s0 : s0 + sn].square().mean(0), f"diagonal of {dia.name}")
    m32, train = tiny_model().float(), tiny_batches(2)
    fit = fit_curvature(m32, train, lambda m, b: lm_loss(m, b).double(), step_module=m32.core, kinds=("ekfac",))
    assert fit.ekfac_route == "rows"


@pytest.mark.parametrize("n, d", [(10, 4), (3, 20)], ids=["N>=D-cholesky", "N<D-woodbury"])
def test_gauss_newton_solve_equals_the_explicit_inverse(n: int, d: int) -> None:
    """Both routes of the Gauss-Newton solve equal (Phi^T Phi / N + lambda I)^-1 x, with the default lambda
    0.1 x the mean nonzero eigenvalue. Catches a Woodbury term with the wrong N, or the default damping
    averaged over all D eigenvalues."""
    from looptrace.curvature import gauss_newton

    g = torch.Generator().manual_seed(0)
    phi = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, d, generator=g, dtype=torch.float64)
    gram = phi.T @ phi / n
    lam = 0.1 * float(torch.linalg.eigvalsh(gram).clamp_min(0).sum()) / min(n, d)
    want = torch.linalg.solve(gram + lam * torch.eye(d, dtype=torch.float64), x.reshape(-1, d).T).T.reshape(x.shape)
    assert_close(gauss_newton(phi, x), want, f"Gauss-Newton solve (N={n}, D={d})")
    assert_close(
        gauss_newton(phi, x, damping=0.5),
        torch.linalg.solve(gram + 0.5 * torch.eye(d, dtype=torch.float64), x.reshape(-1, d).T).T.reshape(x.shape),
        "explicit damping",
    )


def _outside_gradients(model: nn.Module, batches: list[Any], loss_fn: Any) -> torch.Tensor:
    """``[N, P]``: each example's gradient w.r.t. the parameters outside ``model.core``, one example at a time."""
    params = [p for n, p in model.named_parameters() if not n.startswith("core.")]
    rows = []
    for batch in batches:
        for i in range(len(batch[0])):
            loss = loss_fn(model, tuple(t[i : i + 1] for t in batch)).sum()
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _outside_fisher_inverse(model: nn.Module, batches: list[Any], kind: str) -> torch.Tensor:
    """The dense K-FAC / EK-FAC inverse over the parameters outside ``model.core``, built here: the read-out Linear
    (no bias) a Kronecker block from this function's own hook (A over the rows with gradient, S summed per example
    and averaged), EK-FAC's eigenvalues from the per-example gradients in its eigenbasis; the read-in embedding and
    the final norm diagonal blocks; each damped by 0.1 x its mean eigenvalue."""
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("core.")]
    g = _outside_gradients(model, batches, lm_loss)
    offs, off = {}, 0
    for n, p in named:
        offs[n] = (off, p.numel())
        off += p.numel()
    fisher = torch.zeros(off, off, dtype=torch.float64)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.head.register_forward_hook(lambda mod, a, out: calls.append((a[0], out)))
    a_sum, s_sum, rows = 0.0, 0.0, 0
    try:
        for batch in batches:
            calls.clear()
            losses = lm_loss(model, batch)
            x, out = calls[0]
            (gr,) = torch.autograd.grad(losses.sum(), out)
            x2, g2 = x.detach().reshape(-1, x.shape[-1]), gr.reshape(-1, gr.shape[-1])
            keep = g2.abs().sum(1) > 0
            a_sum, s_sum, rows = a_sum + x2[keep].T @ x2[keep], s_sum + g2[keep].T @ g2[keep], rows + int(keep.sum())
    finally:
        hook.remove()
    a_mat, s_mat = a_sum / rows, s_sum / g.shape[0]
    start, n = offs["head.weight"]
    idx = torch.arange(start, start + n)
    if kind == "kfac":
        block = torch.kron(s_mat, a_mat)
    else:
        q = torch.kron(torch.linalg.eigh(s_mat)[1], torch.linalg.eigh(a_mat)[1])
        block = q @ torch.diag(((g[:, idx] @ q) ** 2).mean(0)) @ q.T
    fisher[idx[:, None], idx[None, :]] = block + 0.1 * float(torch.linalg.eigvalsh(block).mean()) * torch.eye(n)
    for name, (o, k) in offs.items():
        if name != "head.weight":
            d = (g[:, o : o + k] ** 2).mean(0)
            fisher[range(o, o + k), range(o, o + k)] = d + 0.1 * float(d.mean())
    return torch.linalg.inv(fisher)


@pytest.mark.parametrize("kind", [None, "gauss-newton", "kfac", "ekfac"])
def test_outside_scores_the_rest_of_the_model(kind: str | None) -> None:
    """``outside=True``: ``Attribution.outside`` is sum_k eta_k g_out(z)^T P_out^-1 g_out(z') over the parameters
    outside the body (read-in, final norm, read-out), with the query side preconditioned on their own block (a
    dense reference built here); ``total = tracin + outside``; the body's scores and conservation are unchanged.
    Breaks caught: the outside run scoring the body again (body parameters in it), eta dropped, the preconditioner
    left off the outside block or of another kind, its damping changed."""
    model = tiny_model(bptt_k=2)
    train, query = tiny_batches(2), tiny_batches(1, b=2)
    cks = _checkpoints(model)
    kw: dict[str, Any] = dict(step_module=model.core, sketch=lt.SketchSpec.exact(), precondition=kind)
    plain = lt.attribute(model, cks, train, query, lm_loss, **kw)
    res = lt.attribute(model, cks, train, query, lm_loss, outside=True, **kw)
    assert plain.outside is None and res.outside is not None
    assert_close(res.tracin, plain.tracin, "the body's TracIn with outside=True")
    assert_close(res.sdi.sum(-1), res.tracin, "conservation with outside=True", rtol=0, atol=1e-10)
    assert_close(res.total, res.tracin + res.outside, "total = tracin + outside")
    want = torch.zeros_like(res.outside)
    for ck in cks:
        model.load_state_dict(ck.load_full().state)
        gt, gq = _outside_gradients(model, train, lm_loss), _outside_gradients(model, query, lm_loss)
        if kind == "gauss-newton":
            gq = gq @ gauss_newton_inverse(gt)
        elif kind in ("kfac", "ekfac"):
            gq = gq @ _outside_fisher_inverse(model, train, kind)
        want += ck.lr * gt @ gq.T
    assert float(want.abs().max()) > 0
    assert_close(
        res.outside, want, f"outside scores ({kind}) vs a dense reference over the parameters outside the body"
    )


def test_outside_modules_and_a_parameter_on_the_body_s_parent() -> None:
    """The modules outside the body are found in order; a bare parameter on the module that holds the body cannot
    be scored apart from it and is refused with what to do."""
    model = tiny_model()
    assert [type(m).__name__ for m in lt.outside_modules(model, model.core)] == ["Embedding", "LayerNorm", "Linear"]
    model.scale = nn.Parameter(torch.ones(1, dtype=torch.float64))
    with pytest.raises(lt.ConfigError, match="sits directly on a module that also contains the loop body"):
        lt.outside_modules(model, model.core)


def test_outside_refuses_what_it_cannot_score(tmp_path) -> None:
    """``outside=True`` with Adam needs every parameter's second moments (a recorder with ``body=`` keeps the
    body's only: the outside block would be left unscaled, silently mixing two geometries); a model that marks its
    loop steps with ``lt.loop_step()`` cannot be run as one pass per forward; a model with nothing outside its body
    has nothing to score (refused, as the store refuses it, not returned as a zero ``outside``). Each is refused
    with what to do."""
    from tests.test_capture import MarkedNet, loss_fn, make_batches

    model = tiny_model()
    train, query = tiny_batches(2), tiny_batches(1, b=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = lt.CheckpointRecorder(tmp_path, every=2, body=model.core)
    for _ in range(2):
        for b in train:
            opt.zero_grad()
            lm_loss(model, b).mean().backward()
            opt.step()
            rec.step(model, opt)
    cks = lt.load_checkpoints(tmp_path)
    kw: dict[str, Any] = dict(step_module=model.core, sketch=lt.SketchSpec.exact(), precondition="adam")
    lt.attribute(model, cks, train, query, lm_loss, **kw)  # the body alone has its moments
    with pytest.raises(lt.CheckpointError, match="no optimizer second moments for"):
        lt.attribute(model, cks, train, query, lm_loss, outside=True, **kw)
    marked = MarkedNet()
    batches = make_batches()
    ck = [lt.Checkpoint({k: v.clone() for k, v in marked.state_dict().items()}, lr=0.5, name="a")]
    with pytest.raises(lt.ConfigError, match="loop_step"):
        lt.attribute(marked, ck, batches, batches[:1], loss_fn, body=[marked.adapter, marked.blocks],
                     sketch=lt.SketchSpec.exact(), outside=True)  # fmt: skip
    whole = [lt.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, lr=0.5, name="w")]
    with pytest.raises(lt.ConfigError, match="no trainable parameter outside the loop body"):
        lt.attribute(model, whole, train, query, lm_loss, step_module=model, body=[model], outside=True,
                     sketch=lt.SketchSpec.exact())  # fmt: skip


def test_outside_scores_learned_positions_and_old_checkpoints_load() -> None:
    """A looped transformer with learned positions (the Sudoku preset's): the table is a module of its own, so
    ``outside=True`` scores it with the rest of the read-in (against per-example autograd gradients), and a
    checkpoint written when it was a bare parameter (key ``pos``) still loads, by ``load_state_dict`` and by
    ``lt.attribute``'s checked loader. Catches: the table left out of the outside run, old checkpoints refused."""
    model = tiny_model(positions="learned")
    with torch.no_grad():
        model.pos.weight.add_(0.3 * torch.randn_like(model.pos.weight))
    assert any(isinstance(m, type(model.pos)) for m in lt.outside_modules(model, model.core))
    old = {("pos" if k == "pos.weight" else k): v.clone() for k, v in model.state_dict().items()}
    twin = tiny_model(positions="learned")
    twin.load_state_dict(old)
    assert_close(twin.pos.weight, model.pos.weight, "the old key pos read as pos.weight")
    train, query = tiny_batches(2), tiny_batches(1, b=2)
    res = lt.attribute(model, [lt.Checkpoint(old, lr=0.5, name="old")], train, query, lm_loss,
                       step_module=model.core, sketch=lt.SketchSpec.exact(), outside=True)  # fmt: skip
    assert res.outside is not None
    want = 0.5 * _outside_gradients(model, train, lm_loss) @ _outside_gradients(model, query, lm_loss).T
    assert_close(res.outside, want, "outside scores with learned positions vs per-example autograd")


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rows", [2, 40])
@pytest.mark.parametrize("form", ["rows", "gradient", None])
def test_rotated_sums_both_forms_equal_the_definition(rows: int, form: str | None, bias: bool) -> None:
    """EK-FAC's second pass rotates each example's rows into the Kronecker eigenbasis either row by row or after
    forming the example's gradient (whichever costs fewer flops), over every call (loop step) without
    concatenating them and with a bias column of ones it never materialises: both forms equal
    sum_r (Q_S^T g_r)(Q_A^T [x_r, 1])^T over all calls' rows in float64. Catches a transposed eigenbasis, a sum over
    the wrong axis, a call left out or the bias column's rotation dropped, in either form."""
    from looptrace.curvature.fit import rotated_sums

    gen = torch.Generator().manual_seed(rows)
    gs = [torch.randn(3, r, 7, generator=gen, dtype=torch.float64) for r in (rows, rows + 1)]
    xs = [torch.randn(3, r, 5, generator=gen, dtype=torch.float64) for r in (rows, rows + 1)]
    d_in = 5 + bias
    q_s = torch.linalg.qr(torch.randn(7, 7, generator=gen, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))[0]
    g, x = torch.cat(gs, 1), torch.cat(xs, 1)
    if bias:
        x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], 2)
    want = torch.einsum("brs,bra->bsa", g @ q_s, x @ q_a)
    got = rotated_sums(gs, xs, q_s, q_a, bias=bias, form=form)
    assert_close(got, want, f"rotated sums ({form}, {rows} rows, bias {bias})", rtol=1e-12, atol=1e-12)


def test_fit_refuses_an_empty_loader() -> None:
    model = tiny_model()
    with pytest.raises(lt.ConfigError, match="no examples"):
        fit_curvature(model, [], lm_loss, step_module=model.core)


class _EncoderLoop(nn.Module):
    """A loop of one ``nn.TransformerEncoderLayer`` (its attention an ``nn.MultiheadAttention``, whose forward
    returns a tuple and reads ``out_proj.weight`` itself), float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 8)
        self.core = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = e
        for _ in range(3):
            h = self.core(h + e)
        return self.head(h.mean(1))


def test_kfac_diagonal_of_an_attention_body_is_its_fisher() -> None:
    """K-FAC on a loop of ``nn.TransformerEncoderLayer``: the diagonal blocks of its attention (in-projection,
    out-projection) are the mean squared per-example tied gradients. Before the fit followed the modules that read
    each parameter, they were all zero (the out-projection's weight is read in the attention's own forward, its
    ``forward`` never called; checked against the previous fit)."""
    model = _EncoderLoop()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 7, (3, 5), generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

    curv = fit_curvature(model, batches, loss, step_module=model.core, kinds=("kfac",))
    attn = [d for d in curv.diagonal if "self_attn" in d.name]
    assert attn, f"no attention parameter in the diagonal blocks: {[d.name for d in curv.diagonal]}"
    params = dict(model.named_parameters())
    rows = []
    for x, y in batches:
        for i in range(len(x)):
            gr = torch.autograd.grad(loss(model, (x[i : i + 1], y[i : i + 1])).sum(), [params[d.name] for d in attn])
            rows.append(torch.cat([t.reshape(-1) for t in gr]))
    grads = torch.stack(rows)
    off = 0
    for d in attn:
        n = d.diag.numel()
        want = grads[:, off : off + n].square().mean(0)
        off += n
        assert float(want.max()) > 0
        assert_close(d.diag.reshape(-1), want, f"K-FAC diagonal of {d.name}", rtol=1e-8, atol=1e-12)


def test_ekfac_from_kept_rows_equals_running_the_model_again(monkeypatch) -> None:
    """EK-FAC's second pass rotates pass 1's kept rows instead of running the model again when they fit the
    budget: the hook route, the model not run again (no call of the recomputing rotation), the same eigenvalues as
    recomputing (``keep_rows_bytes=0``) in float64, on a true Fisher too (its sampled targets must be the same
    draws); a budget too small for every batch recomputes, with the same result. Catches rows of another batch
    rotated (an index off by one: batch 0 passes the first-batch check, the others would not), kept rows that
    differ from a second forward, or kept rows left unused."""
    import looptrace.curvature.fit as fitmod
    from looptrace.curvature import sampled_cross_entropy

    calls: list[int] = []
    recompute = fitmod._rotated_by_hooks
    monkeypatch.setattr(fitmod, "_rotated_by_hooks", lambda *a, **k: calls.append(1) or recompute(*a, **k))

    def sampled(m: nn.Module, batch: Any) -> torch.Tensor:
        return sampled_cross_entropy(m(batch[0])).mean(1)

    model, train = tiny_model(), tiny_batches(3)
    for kw in ({}, {"fisher_loss": sampled}):
        again = fit_curvature(model, train, lm_loss, step_module=model.core, kinds=("ekfac",), keep_rows_bytes=0, **kw)
        assert len(calls) == 3, "keep_rows_bytes=0 should run the model again for every batch"
        calls.clear()
        kept = fit_curvature(model, train, lm_loss, step_module=model.core, kinds=("ekfac",), **kw)
        assert kept.ekfac_route == "rows", "the kept rows failed the first-batch check"
        assert not calls, "the model ran again although the rows were kept"
        small = fit_curvature(model, train, lm_loss, step_module=model.core, kinds=("ekfac",), keep_rows_bytes=64, **kw)
        assert len(calls) == 3
        calls.clear()
        for a, b, c in zip(again.kronecker, kept.kronecker, small.kronecker, strict=True):
            assert a.ekfac is not None and b.ekfac is not None and c.ekfac is not None
            assert_close(b.ekfac, a.ekfac, f"EK-FAC of {a.module} from kept rows", rtol=1e-12, atol=1e-14)
            assert_close(c.ekfac, a.ekfac, f"EK-FAC of {a.module} over the budget", rtol=1e-12, atol=1e-14)


class _Shrinking:
    """Yields three batches until one iteration has run to its end, two afterwards (a loader that changes under
    the fit between its passes)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.done = batches, False

    def __iter__(self) -> Any:
        yield from self.batches if not self.done else self.batches[:2]
        self.done = True


def test_ekfac_refuses_a_loader_it_cannot_read_twice() -> None:
    """EK-FAC reads the fitting loader more than once: a one-shot iterator is refused before any work (its second
    pass would see nothing: all-zero eigenvalues, no error), and a loader that yields another number of batches
    the second time is refused with what to do."""
    model, train = tiny_model(), tiny_batches(3)
    with pytest.raises(lt.LoaderError, match="one-shot iterator"):
        fit_curvature(model, iter(train), lm_loss, step_module=model.core, kinds=("ekfac",))
    with pytest.raises(lt.LoaderError, match="3 batches in the first pass and 2 in the second"):
        fit_curvature(model, _Shrinking(train), lm_loss, step_module=model.core, kinds=("ekfac",))


def test_fit_on_the_first_examples_equals_a_fit_on_them_alone() -> None:
    """``max_examples=k`` fits on the loader's first k examples, the batch that crosses k cut: the same factors,
    EK-FAC eigenvalues and diagonal blocks as a fit on a loader of just those examples (float64), the same through
    ``lt.attribute(max_fit_examples=...)``, whose scores still cover every training example. Catches a limit that
    is ignored, off by a batch, or applied to one pass only; bad values are refused."""
    from looptrace import batching

    model, train, query = tiny_model(), tiny_batches(3), tiny_batches(1, b=2)
    first = [train[0], batching.slice_rows(train[1], 0, 2)]  # 3 + 2 examples
    cut = fit_curvature(model, train, lm_loss, step_module=model.core, max_examples=5)
    alone = fit_curvature(model, first, lm_loss, step_module=model.core)
    assert cut.n == alone.n == 5
    for a, b in zip(cut.kronecker, alone.kronecker, strict=True):
        assert a.ekfac is not None and b.ekfac is not None
        for x, y, what in ((a.a_cov, b.a_cov, "A"), (a.s_cov, b.s_cov, "S"), (a.ekfac, b.ekfac, "EK-FAC")):
            assert_close(x, y, f"{what} of {a.module} on the first 5 examples", rtol=1e-12, atol=1e-15)
    for a, b in zip(cut.diagonal, alone.diagonal, strict=True):
        assert_close(a.diag, b.diag, f"diagonal of {a.name} on the first 5 examples", rtol=1e-12, atol=1e-15)
    ck = [lt.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, lr=0.5, name="a")]
    kw: dict[str, Any] = dict(step_module=model.core, sketch=lt.SketchSpec.exact(), precondition="ekfac")
    every = lt.attribute(model, ck, train, query, lm_loss, **kw)
    limited = lt.attribute(model, ck, train, query, lm_loss, max_fit_examples=5, **kw)
    assert limited.tracin.shape == every.tracin.shape == (9, 2)
    want = 0.5 * oracle_per_step(model, model.core, train, lm_loss).sum(1) @ alone.precondition(
        oracle_per_step(model, model.core, query, lm_loss).sum(1), "ekfac").T  # fmt: skip
    assert_close(limited.tracin, want, "attribute(max_fit_examples=5) vs the factors of the first 5 examples")
    assert float((limited.tracin - every.tracin).abs().max()) > 1e-6 * float(every.tracin.abs().max())
    for bad in (0, -1, True, 2.5):
        with pytest.raises(lt.ConfigError, match="max_examples"):
            fit_curvature(model, train, lm_loss, step_module=model.core, max_examples=bad)  # type: ignore[arg-type]
    with pytest.raises(lt.ConfigError, match="max_fit_examples"):
        lt.attribute(model, ck, train, query, lm_loss, step_module=model.core, max_fit_examples=5)


class _Counted:
    """A list of batches that records how many of them each iteration fetched."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.fetched = batches, [0]

    def __iter__(self) -> Any:
        for i, b in enumerate(self.batches):
            self.fetched[0] = max(self.fetched[0], i + 1)
            yield b


def test_first_examples_on_a_true_fisher_with_the_parts_outside_and_what_it_refuses() -> None:
    """``max_examples`` with a true Fisher (targets drawn per batch index; the cut batch draws for its kept rows as a
    loader of them alone does) on the recomputing route equals the fit on those examples alone; no batch past the
    limit is fetched; ``lt.attribute(outside=True, max_fit_examples=...)`` limits the fit of the parts outside the
    loop too; a batch with a per-example list that a cut of its tensors would leave whole is refused with what to
    do. Catches a limit dropped from the outside run, a loader read one batch too far, or a list left uncut."""
    from looptrace import batching
    from looptrace.curvature import sampled_cross_entropy

    def sampled(m: nn.Module, batch: Any) -> torch.Tensor:
        return sampled_cross_entropy(m(batch[0])).mean(1)

    model, train, query = tiny_model(), tiny_batches(3), tiny_batches(1, b=2)
    first = [train[0], batching.slice_rows(train[1], 0, 2)]
    kw: dict[str, Any] = dict(step_module=model.core, fisher_loss=sampled, keep_rows_bytes=0)
    cut = fit_curvature(model, train, lm_loss, max_examples=5, **kw)
    alone = fit_curvature(model, first, lm_loss, **kw)
    for a, b in zip(cut.kronecker, alone.kronecker, strict=True):
        assert a.ekfac is not None and b.ekfac is not None
        assert_close(a.ekfac, b.ekfac, f"true-Fisher EK-FAC of {a.module} on 5 examples", rtol=1e-12, atol=1e-15)
    counted = _Counted(train)
    fit_curvature(model, counted, lm_loss, step_module=model.core, max_examples=6)
    assert counted.fetched[0] == 2, f"the fit fetched {counted.fetched[0]} batches of 3 for 6 examples"
    ck = [lt.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, lr=0.5, name="a")]
    whole = dict(step_module=model.core, sketch=lt.SketchSpec.exact(), precondition="ekfac", outside=True)
    every = lt.attribute(model, ck, train, query, lm_loss, **whole)
    limited = lt.attribute(model, ck, train, query, lm_loss, max_fit_examples=5, **whole)
    assert every.outside is not None and limited.outside is not None
    assert float((limited.outside - every.outside).abs().max()) > 1e-6 * float(every.outside.abs().max()), (
        "max_fit_examples did not reach the fit of the parts outside the loop"
    )
    named = [(x, y, [f"ex{i}" for i in range(len(x))]) for x, y in train]
    with pytest.raises(lt.LoaderError, match="collate them into tensors"):
        fit_curvature(model, named, lambda m, b: lm_loss(m, b[:2]), step_module=model.core, max_examples=4)
    with pytest.raises(lt.ConfigError, match="max_fit_examples"):
        lt.attribute(model, ck, train, query, lm_loss, step_module=model.core, precondition="kfac", max_fit_examples=0)

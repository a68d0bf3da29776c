"""Sketch operators: TensorSketch identities, unbiasedness and the variance bound, hashing."""

from __future__ import annotations

import math

import pytest
import torch

import looptrace as lt
import looptrace.sketch.plan as plan_mod
from looptrace.sketch.hashing import bucket_hash, sign_hash
from looptrace.sketch.plan import SketchPlan, Slot
from tests.conftest import assert_close


def _ts_slot(rows: int, cols: int, m: int, seed: int = 0, kind: str = "ts") -> Slot:
    return Slot("w", (rows, cols), kind, m, 0, seed)  # type: ignore[arg-type]


def _induced(rows: int, cols: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    h1 = bucket_hash(rows, m, seed=seed, name="w", role="h1")
    h2 = bucket_hash(cols, m, seed=seed, name="w", role="h2")
    s1 = sign_hash(rows, seed=seed, name="w", role="s1").double()
    s2 = sign_hash(cols, seed=seed, name="w", role="s2").double()
    return (h1[:, None] + h2[None, :]) % m, s1[:, None] * s2[None, :]


@pytest.mark.parametrize(
    ("path", "chunk_tokens", "b"),
    [("fft", None, 3), ("fft", 10, 3), ("fft", 5, 3), ("fft", 3, 3), ("fft", 4, 2), ("fft", 4, 1),
     ("materialize", None, 3)],
)  # fmt: skip
def test_tensorsketch_of_outer_sums_equals_countsketch_of_matrix_under_induced_hash(
    path: str, chunk_tokens: int | None, b: int, monkeypatch
) -> None:
    """Lemma 3, entry by entry, over ``b`` examples of 5 tokens. ``chunk_tokens``: the FFT route's chunks hold at
    most this many tokens (10: two whole examples, the last chunk one; 5: one example; 3 or 4: less than an
    example, so each chunk is a slice of every example's tokens: one token each at b = 3, two at b = 2 with a
    last slice of one, four at b = 1). Catches: a wrong sign or hash, a chunk's tokens summed into the wrong
    example (a transposed reshape), a chunk or a last partial slice left out."""
    if chunk_tokens is not None:
        per_token = (2 * 16 + 4 * 9) * 8  # the route's buffers per token at m = 16, float64
        monkeypatch.setattr(plan_mod, "FFT_CHUNK_BYTES", per_token * chunk_tokens)
    torch.manual_seed(0)
    n_tok, rows, cols, m = 5, 6, 7, 16
    left, right = torch.randn(b, n_tok, rows, dtype=torch.float64), torch.randn(b, n_tok, cols, dtype=torch.float64)
    slot = _ts_slot(rows, cols, m)
    out = torch.zeros(b, m, dtype=torch.float64)
    slot.add_outer(out, left, right, path=path)  # type: ignore[arg-type]
    idx, sign = _induced(rows, cols, m, 0)
    mats = torch.einsum("bli,blj->bij", left, right)
    want = torch.zeros(b, m, dtype=torch.float64)
    for i in range(rows):  # the definition, entry by entry (Lemma 3)
        for j in range(cols):
            want[:, idx[i, j]] += sign[i, j] * mats[:, i, j]
    assert_close(out, want, f"TensorSketch via {path} vs CountSketch of the materialised matrix")


def test_identity_slot_is_the_gradient() -> None:
    left, right = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    out = torch.zeros(2, 20, dtype=torch.float64)
    Slot("w", (4, 5), "identity", 20, 0, 0).add_outer(out, left, right)
    assert_close(out, torch.einsum("bli,blj->bij", left, right).reshape(2, -1), "identity slot")


def _inner_products(kind: str, x: torch.Tensor, y: torch.Tensor, m: int, n_seeds: int) -> torch.Tensor:
    vals = []
    for seed in range(n_seeds):
        slot = Slot("w", tuple(x.shape), kind, m, 0, seed)  # type: ignore[arg-type]
        sx, sy = torch.zeros(1, m, dtype=x.dtype), torch.zeros(1, m, dtype=x.dtype)
        slot.add_dense(sx, x.reshape(1, -1))
        slot.add_dense(sy, y.reshape(1, -1))
        vals.append(float((sx * sy).sum()))
    return torch.tensor(vals, dtype=torch.float64)


@pytest.mark.parametrize(("kind", "factor"), [("ts", lambda m: 4 / m**2 + 6 / m), ("cs", lambda m: 2 / m + 2 / m**2)])
def test_unbiased_with_variance_within_bound(kind: str, factor) -> None:
    """Monte Carlo over hash seeds. Tolerances come from the bound: with R seeds the mean's sd is at
    most sqrt(bound / R), so |mean - <X, Y>| <= 5 sd; the sample variance may exceed the true one by
    sampling error, allowed 50 % at R = 600 (the estimator's kurtosis is moderate here)."""
    torch.manual_seed(0)
    m, n_seeds = 32, 600
    u = torch.randn(3, 24, dtype=torch.float64)
    v = torch.randn(3, 20, dtype=torch.float64)
    x = u.T @ torch.randn(3, 20, dtype=torch.float64)  # a sum of 3 outer products
    y = x + 0.5 * (torch.randn(24, 3, dtype=torch.float64) @ v)
    exact = float((x * y).sum())
    bound = factor(m) * float(x.norm() ** 2 * y.norm() ** 2)
    est = _inner_products(kind, x, y, m, n_seeds)
    sd_mean = math.sqrt(bound / n_seeds)
    assert abs(float(est.mean()) - exact) <= 5 * sd_mean, (
        f"{kind}: mean {float(est.mean()):.4g} vs exact {exact:.4g} (5 sd = {5 * sd_mean:.3g}); the estimator "
        "is biased: check the sign hash (must be independent of the bucket hash) and the induced hash"
    )
    var = float(est.var())
    assert var <= 1.5 * bound, (
        f"{kind}: sample variance {var:.4g} exceeds the bound {bound:.4g}; the hash family is probably not "
        "independent enough (check the polynomial degrees: TensorSketch 2-wise buckets and 4-wise signs, CountSketch "
        "4-wise buckets and 4-wise row and column signs)"
    )
    assert var > 0.01 * bound, (
        f"{kind}: variance {var:.3g} is implausibly small vs bound {bound:.3g}: is the seed used?"
    )


def test_hashes_are_uniform_and_seeded() -> None:
    h = bucket_hash(100_000, 64, seed=3, name="core.fc.weight", role="h")
    counts = torch.bincount(h, minlength=64).double()
    expected = 100_000 / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 63 + 6 * math.sqrt(2 * 63), f"bucket hash is not uniform: chi2={chi2:.1f} on 63 dof"
    s = sign_hash(100_000, seed=3, name="core.fc.weight", role="s")
    assert abs(float(s.double().mean())) < 5 / math.sqrt(100_000), "sign hash is biased"
    assert torch.equal(h, bucket_hash(100_000, 64, seed=3, name="core.fc.weight", role="h"))
    assert not torch.equal(h, bucket_hash(100_000, 64, seed=4, name="core.fc.weight", role="h"))
    assert not torch.equal(h, bucket_hash(100_000, 64, seed=3, name="core.fc.bias", role="h"))


def test_plan_depends_on_names_not_order() -> None:
    params = [("b.weight", (4, 3)), ("a.bias", (4,)), ("a.weight", (4, 4))]
    spec = lt.SketchSpec(dim=16)
    p1, p2 = SketchPlan.build(spec, params), SketchPlan.build(spec, list(reversed(params)))
    assert p1.describe() == p2.describe()
    x = torch.randn(1, 12, dtype=torch.float64)
    o1, o2 = torch.zeros(1, 16, dtype=torch.float64), torch.zeros(1, 16, dtype=torch.float64)
    p1.slot("b.weight").add_dense(o1, x)
    p2.slot("b.weight").add_dense(o2, x)
    assert torch.equal(o1, o2)


@pytest.mark.parametrize("budget", ["per_tensor", "proportional", "shared"])
def test_budget_layouts(budget: str) -> None:
    params = [("big", (64, 32)), ("mid", (32, 8)), ("small", (8,))]
    plan = SketchPlan.build(lt.SketchSpec(dim=256, budget=budget), params)  # type: ignore[arg-type]
    if budget == "per_tensor":
        assert plan.dim == 3 * 256
    else:
        assert plan.dim == 256, plan.describe()
    if budget == "proportional":
        kinds = {s.name: s.kind for s in plan.slots}
        assert kinds["small"] == "identity", "a tensor smaller than its share is kept exactly"
        assert sum(s.m for s in plan.slots) == 256


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(dim=0), "positive"),
        (dict(dim=-4), "positive"),
        (dict(dim=1001, method="tensorsketch"), "odd"),
        (dict(dim=1 << 30), "absurdly large"),
        (dict(method="bogus"), "method"),
        (dict(budget="bogus"), "budget"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_specs_raise(kwargs, words: str) -> None:
    with pytest.raises(lt.ConfigError, match=words):
        lt.SketchSpec(**kwargs)


def test_the_table_cache_returns_what_a_fresh_draw_gives_and_stays_bounded() -> None:
    from looptrace.sketch.plan import TABLE_CACHE, TableCache

    params = [("a.weight", (12, 5)), ("b.bias", (7,))]
    spec = lt.SketchSpec(dim=64, seed=3)
    cpu, f32 = torch.device("cpu"), torch.float32
    TABLE_CACHE.clear()
    first = SketchPlan.build(spec, params)
    drawn = {s.name: s.tables(cpu, f32) for s in first.slots}
    again = SketchPlan.build(spec, params)
    for s in again.slots:
        assert s.tables(cpu, f32) is drawn[s.name], "a second plan of the same body and spec should reuse the tables"
    limit, TABLE_CACHE.max_bytes = TABLE_CACHE.max_bytes, 0
    try:
        fresh = SketchPlan.build(spec, params)
        for s in fresh.slots:
            t = s.tables(cpu, f32)
            assert t is not drawn[s.name]
            for k, v in t.items():
                assert torch.equal(v, drawn[s.name][k]), f"cached table {k} of {s.name} differs from a fresh draw"
    finally:
        TABLE_CACHE.max_bytes = limit
    other = SketchPlan.build(lt.SketchSpec(dim=64, seed=4), params)  # another seed: other tables, not a hit
    assert not torch.equal(other.slot("a.weight").tables(cpu, f32)["idx"], drawn["a.weight"]["idx"])

    small = TableCache(max_bytes=3000)
    for i in range(10):
        small.put(("k", i), {"idx": torch.zeros(100, dtype=torch.int64)})  # 800 bytes each
    assert small.nbytes <= 3000 and small.get(("k", 9)) is not None and small.get(("k", 0)) is None, (
        "the cache should drop the least recently used tables to stay under its bound"
    )

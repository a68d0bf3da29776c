"""Token x step attribution: the training side decomposed by sequence position, against an independent oracle.

The oracle gives every *position* of the body its own copy of each body parameter (a hand-written twin of the
model whose weights carry a position axis); the gradient w.r.t. position p's copy, summed over the loop steps
that all use it, is the part of the body gradient that comes through position p. Nothing of looptrace's capture
is used to compute it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.sketch.plan import SketchPlan
from tests.conftest import assert_close

D, V, T, TAU = 6, 9, 5, 3


class Block(nn.Module):
    """h + down(tanh(up(LN(h + e)))): Linear, LayerNorm and biases, tokenwise."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.tanh(self.up(self.norm(h + e))))


class Mixer(nn.Module):
    """A body that mixes positions (causal average of the state): a position's term then carries the rest of the
    sequence, and every term is still a per-token Linear / LayerNorm term."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.mix = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        n = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.block(h, e) + 0.3 * self.mix(h.cumsum(1) / n)


class Net(nn.Module):
    def __init__(self, mixer: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.core: nn.Module = Mixer() if mixer else Block()
        self.head = nn.Linear(D, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = torch.zeros_like(e)
        for _ in range(TAU):
            h = self.core(h, e)
        return self.head(h)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y, mask = batch
    per_tok = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none") * mask
    return per_tok.sum(1) / mask.sum(1)


def _batch(n: int, seed: int, lengths: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T), generator=g)
    lengths = lengths or [T] * n
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()
    return x, x.roll(1, 1), mask


def _model(mixer: bool = False) -> Net:
    torch.manual_seed(0)
    net = Net(mixer).double()
    with torch.no_grad():  # move off the initialisation so every step and position carries gradient
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def oracle_positions(model: Net, batch) -> torch.Tensor:
    """``[N, T, P]``: per example, per position, the gradient w.r.t. that position's copy of the body parameters
    (sorted by name, flattened), summed over the loop steps; written out by hand from the model's definition."""
    core = model.core
    names = sorted(n for n, _ in core.named_parameters())
    base = dict(core.named_parameters())
    x, y, mask = batch

    def block(p: dict[str, torch.Tensor], h: torch.Tensor, e: torch.Tensor, pre: str) -> torch.Tensor:
        u = h + e
        mu, var = u.mean(-1, keepdim=True), u.var(-1, unbiased=False, keepdim=True)
        z = (u - mu) / torch.sqrt(var + core_norm(model).eps) * p[pre + "norm.weight"] + p[pre + "norm.bias"]
        a = torch.tanh(torch.einsum("btd,tod->bto", z, p[pre + "up.weight"]) + p[pre + "up.bias"])
        return h + torch.einsum("bto,tdo->btd", a, p[pre + "down.weight"]) + p[pre + "down.bias"]

    def body(p: dict[str, torch.Tensor], h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if isinstance(core, Block):
            return block(p, h, e, "")
        n = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        mixed = torch.einsum("btd,ted->bte", h.cumsum(1) / n, p["mix.weight"]) + p["mix.bias"]
        return block(p, h, e, "block.") + 0.3 * mixed

    out = torch.zeros(x.shape[0], T, sum(base[n].numel() for n in names), dtype=torch.float64)
    for i in range(x.shape[0]):
        copies = {n: base[n].detach()[None].repeat(T, *[1] * base[n].dim()).requires_grad_(True) for n in names}
        e = model.emb(x[i : i + 1]).detach()
        h = torch.zeros_like(e)
        for _ in range(TAU):
            h = body(copies, h, e)
        logits = model.head(h)
        loss = (F.cross_entropy(logits.transpose(1, 2), y[i : i + 1], reduction="none") * mask[i]).sum() / mask[i].sum()
        grads = torch.autograd.grad(loss, [copies[n] for n in names])
        out[i] = torch.cat([g.reshape(T, -1) for g in grads], dim=1)
    return out


def core_norm(model: Net) -> nn.LayerNorm:
    return model.core.norm if isinstance(model.core, Block) else model.core.block.norm  # type: ignore[return-value]


@pytest.mark.parametrize("mixer", [False, True])
def test_positions_equal_the_per_position_oracle(mixer: bool) -> None:
    """Exact per-position features equal the oracle in float64, and sum over positions to the totals of an ordinary
    featurisation. Catches: a term sent to the wrong position (a transposed or shifted token axis), a bias or norm
    term summed over tokens before it reaches the positions, steps not summed, padding that gets a term."""
    model = _model(mixer)
    batches = [_batch(3, 1, [5, 3, 4]), _batch(2, 2)]
    got = lt.featurize(model, batches, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(), positions=True)
    assert got.per_step is None and got.positions is not None and got.positions.shape[:2] == (5, T)
    want = torch.cat([oracle_positions(model, b) for b in batches])
    assert_close(got.positions, want, "per-position features vs the per-position oracle")
    assert float(got.positions[1, 3:].abs().max()) == 0.0, "positions past an example's length must be zero"
    plain = lt.featurize(model, batches, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact())
    assert_close(got.positions.sum(1), plain.total, "positions summed vs the ordinary totals")


def test_sketched_positions_are_the_sketch_of_the_exact_ones() -> None:
    """Catches: a sketch that is not applied row by row (position by position), e.g. one sum over tokens left in."""
    model = _model(True)
    batches = [_batch(3, 3, [5, 4, 2])]
    spec = lt.SketchSpec(dim=64)
    got = lt.featurize(model, batches, loss_fn, step_module=model.core, sketch=spec, positions=True)
    exact = lt.featurize(model, batches, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(), positions=True)
    plan = SketchPlan.build(spec, [(s["name"], tuple(s["shape"])) for s in exact.layout])
    n = exact.positions.shape[0] * T
    flat = exact.positions.reshape(n, -1)
    want = torch.zeros(n, plan.dim, dtype=torch.float64)
    for s, e in zip(plan.slots, exact.layout, strict=True):
        assert s.name == e["name"]
        s.add_dense(want[:, s.offset : s.offset + s.m], flat[:, e["offset"] : e["offset"] + e["m"]])
    assert_close(got.positions.reshape(n, -1), want, "sketched positions vs sketch of exact positions")


def test_attribute_train_positions_sums_to_sdi() -> None:
    """``res.sdi_positions`` [N, M, tau, L]: sums over positions to ``res.sdi`` (exactly) and over steps to
    ``res.tracin_positions``; the sketched run sums the same way and agrees with the exact one within the sketch
    error. Catches: positions paired with the wrong query step, eta applied twice, a sum that is not sdi."""
    model = _model(True)
    train, query = [_batch(4, 4, [5, 5, 3, 4])], [_batch(3, 5)]
    cks = [lt.Checkpoint(model.state_dict(), lr=0.5), lt.Checkpoint(model.state_dict(), lr=0.25)]
    res = lt.attribute(model, cks, train, query, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(),
                       train_positions=True)  # fmt: skip
    assert res.sdi_positions is not None and res.sdi_positions.shape == (4, 3, TAU, T)
    assert torch.equal(res.sdi_positions.sum(-1), res.sdi)
    assert_close(res.sdi.sum(-1), res.tracin, "conservation with positions")
    plain = lt.attribute(model, cks, train, query, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact())
    assert_close(res.sdi, plain.sdi, "sdi from positions vs plain sdi")
    assert res.tracin_positions is not None
    assert_close(res.tracin_positions, res.sdi_positions.sum(2), "tracin_positions")
    want = torch.einsum("npd,mtd->nmtp", oracle_positions(model, train[0]),
                        lt.featurize(model, query, loss_fn, step_module=model.core,
                                     sketch=lt.SketchSpec.exact()).per_step) * 0.75  # fmt: skip
    assert_close(res.sdi_positions, want, "sdi_positions vs the oracle's positions and the query's steps")
    with pytest.raises(lt.ConfigError, match="decomposition='test'"):
        lt.attribute(model, cks, train, query, loss_fn, step_module=model.core, decomposition="train",
                     train_positions=True)  # fmt: skip


def test_layers_without_a_per_position_form_are_refused() -> None:
    """Catches: a layer whose per-example gradient comes whole (the exact fallback) silently dropped or smeared
    over positions."""

    class Odd(nn.Module):  # no rule: the exact per-example fallback
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(D, dtype=torch.float64))

        def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            return torch.tanh(h * self.w + e)

    model = _model()
    model.core = Odd()
    with pytest.raises(lt.UnsupportedLayerError, match="per-position"):
        lt.featurize(model, [_batch(2, 6)], loss_fn, step_module=model.core, positions=True)


def test_a_body_that_folds_tokens_into_the_batch_axis() -> None:
    """A body that runs its Linear layers on ``[B * T, d]`` rows (rows from the data flow): an example's rows, in
    order, are its positions. Catches: regrouped rows mapped to the wrong position; a routed (reordered) body
    accepted without positions it can name."""

    class Folded(Block):
        def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            b = h.shape[0]
            z = self.norm(h + e).reshape(b * T, D)
            return h + self.down(torch.tanh(self.up(z))).reshape(b, T, D)

    class Routed(Block):
        def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            b = h.shape[0]
            z = self.norm(h + e).reshape(b * T, D)
            order = torch.arange(b * T - 1, -1, -1)  # a fixed reordering of the rows, undone after
            out = torch.zeros_like(z).index_copy_(0, order, self.down(torch.tanh(self.up(z[order]))))
            return h + out.reshape(b, T, D)

    model = _model()
    folded = Folded().double()
    folded.load_state_dict(model.core.state_dict())
    batches = [_batch(3, 7, [5, 2, 4])]
    want = oracle_positions(model, batches[0])
    model.core = folded
    got = lt.featurize(model, batches, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(), positions=True)
    assert_close(got.positions, want, "positions of a folded body vs the oracle")
    routed = Routed().double()
    routed.load_state_dict(folded.state_dict())
    model.core = routed
    with pytest.raises(lt.UnsupportedLayerError, match="reordered"):
        lt.featurize(model, batches, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(), positions=True)


def test_a_store_keeps_positions_ragged_and_scores_them(tmp_path) -> None:
    """``featurize --positions``: per-position rows stored ragged (real positions only, optional spans), checksummed
    with the shard, read back per example; their scores equal ``lt.attribute(train_positions=True)``'s and sum to
    the example's SDI. Catches: padding stored, offsets off by one, spans that do not sum their positions, a store
    reopened with another span, per-position scores not weighted by eta."""
    from looptrace.cli import main
    from looptrace.store import FeatureStore, featurize_to_store, position_matrix, position_scores, topk

    model = _model(True)
    lengths = [5, 3, 4, 2]
    xs = _batch(4, 8, lengths)
    train = torch.utils.data.TensorDataset(*xs)
    query = torch.utils.data.TensorDataset(*_batch(2, 9))
    cks = [lt.Checkpoint(model.state_dict(), lr=0.5), lt.Checkpoint(model.state_dict(), lr=0.25)]
    spec = lt.SketchSpec.exact()
    store = featurize_to_store(model, cks, {"train": train, "query": query}, loss_fn, tmp_path / "s",
                               step_module=model.core, sketch=spec, batch_size=2, shard_size=3, positions=1)  # fmt: skip
    res = lt.attribute(model, cks, [xs], [_batch(2, 9)], loss_fn, step_module=model.core, sketch=spec,
                       train_positions=True)  # fmt: skip
    for i, n in enumerate(lengths):
        rows = store.read_positions(0, "train", i)
        assert rows.shape[0] == n, f"example {i}: {rows.shape[0]} stored positions, its length is {n}"
        mat = position_matrix(store, i, 1)
        torch.testing.assert_close(torch.from_numpy(mat), res.sdi_positions[i, 1, :, :n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.from_numpy(position_scores(store, i, 1, step=2)),
                                   res.sdi_positions[i, 1, 1, :n], rtol=1e-5, atol=1e-7)  # fmt: skip
    spans = featurize_to_store(model, cks, {"train": train, "query": query}, loss_fn, tmp_path / "k2",
                               step_module=model.core, sketch=spec, batch_size=2, shard_size=3, positions=2)  # fmt: skip
    full = store.read_positions(0, "train", 0)
    two = spans.read_positions(0, "train", 0)
    assert two.shape[0] == 3 and np.allclose(two[0], full[0] + full[1]) and np.allclose(two[2], full[4])
    with pytest.raises(lt.SpecMismatchError, match="options"):
        featurize_to_store(model, cks, {"train": train}, loss_fn, tmp_path / "s", step_module=model.core,
                           sketch=spec, batch_size=2, shard_size=3, positions=2)  # fmt: skip
    top = topk(FeatureStore.open(tmp_path / "s"), k=2, positions=True)
    assert top.proponent_positions is not None
    best = int(top.proponents[0, 0])
    assert np.isclose(sum(top.proponent_positions[0][0]), top.proponent_scores[0, 0])
    assert len(top.proponent_positions[0][0]) == lengths[best]
    assert main(["topk", "--store", str(tmp_path / "s"), "--k", "1", "--positions", "--out",
                 str(tmp_path / "t.json")]) == 0  # fmt: skip


def test_the_explorer_reads_positions_from_a_store(tmp_path) -> None:
    """A store filled with ``positions=1`` gives the explorer token heatmaps whose values are ``lt.attribute``'s
    ``sdi_positions``. Catches: the store hook returning nothing, positions paired with the wrong query or step,
    eta missing."""
    from looptrace.explore.stores import explorer_from_store
    from looptrace.store import featurize_to_store

    model = _model(True)
    xs = _batch(4, 10, [5, 3, 4, 2])
    train = torch.utils.data.TensorDataset(*xs)
    query = torch.utils.data.TensorDataset(*_batch(2, 11))
    cks = [lt.Checkpoint(model.state_dict(), lr=0.5)]
    spec = lt.SketchSpec.exact()
    store = featurize_to_store(model, cks, {"train": train, "query": query}, loss_fn, tmp_path / "s",
                               step_module=model.core, sketch=spec, batch_size=2, positions=1)  # fmt: skip
    data = explorer_from_store(store, datasets={"train": train, "query": query}, k=2)
    assert data["positions"] is True, data.get("positions_note")
    res = lt.attribute(model, cks, [xs], [_batch(2, 11)], loss_fn, step_module=model.core, sketch=spec,
                       train_positions=True)  # fmt: skip
    entry = data["queries"][0] if isinstance(data["queries"], list) else data["queries"]["0"]
    row = entry["overall"]["proponents"][0]
    i = row["train"]
    want = res.sdi_positions[i, 0].sum(0)[: len(row["positions"])]
    np.testing.assert_allclose(row["positions"], want.numpy(), rtol=1e-4, atol=1e-7)

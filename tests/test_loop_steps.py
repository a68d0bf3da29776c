"""A loop step that spans several modules, parameters read outside their module's forward, and the row
tracker on the operations real models use; all in float64 against the untied per-pass oracle
(``tests/loop_oracle.py``) on a model in Inkling-2-Loop's shape (``tests/loop_fixtures.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.capture.discover import modules_at
from looptrace.cli import main
from looptrace.sketch.plan import SketchPlan
from tests.conftest import assert_close, assert_exact_matches_oracle
from tests.loop_fixtures import D, RangeLoop, range_batches, range_loss
from tests.loop_oracle import body_names, oracle_per_pass, tied_gradients
from tests.test_bodies import Looped, batches, loss_fn


def _loop(model: RangeLoop) -> tuple[list[nn.Module], list[nn.Module]]:
    blocks = list(model.blocks)
    return blocks, [*blocks, model.messenger]


def _oracle(model: RangeLoop, data: list[Any]) -> torch.Tensor:
    """The per-pass oracle, checked against autograd first (its passes add up to the tied gradient)."""
    blocks, body = _loop(model)
    want = oracle_per_pass(model, blocks, [model.messenger], data, range_loss)
    assert_close(want.sum(1), tied_gradients(model, body_names(model, body), data, range_loss), "oracle vs autograd")
    return want


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
def test_a_pass_over_a_range_of_modules_equals_the_untied_oracle(recompute: bool) -> None:
    """step_module=[block 0, block 1], body= those plus the messenger: exact per-pass features, with and without
    recomputation. Catches: messages tagged with the previous pass (tag calls outside the step modules with
    `completed`), the convolution's weight missing (no covers), the parent's second read of fc.weight
    missing or counted twice (no suppression in Tracer._out), the router's logits counted with the weights'
    path (hook a multi-output layer's outputs directly)."""
    model = RangeLoop()
    data = range_batches()
    blocks, body = _loop(model)
    feats = lt.featurize(
        model, data, range_loss, step_module=blocks, body=body, sketch=lt.SketchSpec.exact(), recompute=recompute
    )
    want = _oracle(model, data)
    assert feats.per_step is not None and feats.per_step.shape == want.shape and want.shape[1] == 3
    assert bool((want.norm(dim=-1) > 0).all()), "every pass must carry gradient"
    assert_close(feats.per_step, want, f"range loop, exact per pass (recompute={recompute})")
    assert "read in this module's forward" in feats.routes["blocks.0.conv [conv1d.weight]"]
    assert "blocks.0.conv.conv1d" not in feats.routes, "a Conv1d never called reports nothing of its own"
    assert "see 'blocks.1 [fc.weight]'" in feats.routes["blocks.1.fc"]


def test_a_module_list_is_the_sequence_of_its_modules() -> None:
    """An nn.ModuleList (never called itself) as step_module= means its children in order; body= may hold
    the ModuleList too."""
    model = RangeLoop(passes=2)
    data = range_batches(1)
    feats = lt.featurize(
        model, data, range_loss, step_module=model.blocks, body=[model.blocks, model.messenger],
        sketch=lt.SketchSpec.exact(),
    )  # fmt: skip
    assert_close(feats.per_step, _oracle(model, data), "ModuleList step module")


def test_sketched_range_loop_is_the_sketch_of_the_exact_one() -> None:
    """The default sketch (method and budget auto) of every pass is the sketch of the oracle's exact pass."""
    model = RangeLoop()
    data = range_batches()
    blocks, body = _loop(model)
    spec = lt.SketchSpec(dim=96, seed=2)
    feats = lt.featurize(model, data, range_loss, step_module=blocks, body=body, sketch=spec)
    exact = _oracle(model, data)
    names = body_names(model, body)
    params = dict(model.named_parameters())
    plan = SketchPlan.build(spec, [(n, tuple(params[n].shape)) for n in names])
    n, tau, _ = exact.shape
    want = torch.zeros(n * tau, plan.dim, dtype=torch.float64)
    flat, offset = exact.reshape(n * tau, -1), 0
    for name in names:
        slot = plan.slot(name)
        slot.add_dense(want[:, slot.offset : slot.offset + slot.m], flat[:, offset : offset + params[name].numel()])
        offset += params[name].numel()
    assert_close(feats.per_step, want.view(n, tau, -1), "range loop: sketched vs sketch of exact")


def test_find_step_module_returns_the_range_and_names_the_tied_module() -> None:
    model = RangeLoop()
    x = range_batches(1)[0][0]
    with pytest.warns(
        RuntimeWarning, match=r"\['messenger'\] run inside the loop passes.*body=\[blocks.0, blocks.1, messenger\]"
    ):
        step = lt.find_step_module(model, x)
    assert step == list(model.blocks)
    loop = lt.find_loop(model, x)
    assert loop.passes == 3 and loop.tied == [model.messenger] and loop.body == [*model.blocks, model.messenger]
    # two passes over two blocks: the messenger runs as often as the blocks, but not in step with them
    two = RangeLoop(passes=2)
    with pytest.warns(RuntimeWarning, match="messenger"):
        assert lt.find_step_module(two, x) == list(two.blocks)


def test_two_equally_plausible_loops_are_ambiguous() -> None:
    class Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(2):
                x = self.a(x)
            for _ in range(2):
                x = self.b(x)
            return x

    with pytest.raises(lt.StepError, match=r"ambiguous.*\['a'\].*\['b'\]"):
        lt.find_step_module(Twins(), torch.randn(2, 3))


def test_step_sequences_are_checked() -> None:
    """Each mistake gets its own message: wrong order, a module after the last pass, a repeated or nested
    module, a body module read by code that owns no copy of it."""
    model = RangeLoop(passes=2)
    data = range_batches(1)
    b0, b1 = model.blocks
    exact = lt.SketchSpec.exact()

    def run(**kw: Any) -> Any:
        return lt.featurize(model, data, range_loss, sketch=exact, **kw)

    with pytest.raises(lt.StepError, match=r"'blocks.0' was called where 'blocks.1' was expected"):
        run(step_module=[b1, b0])
    with pytest.raises(lt.StepError, match=r"'head' ran after the last loop pass"):
        run(step_module=[b0, b1], body=[b0, b1, model.head])
    with pytest.raises(lt.ConfigError, match="twice"):
        run(step_module=[b0, b0])
    with pytest.raises(lt.ConfigError, match="submodules"):
        run(step_module=[b0, b0.fc])
    with pytest.raises(lt.ConfigError, match="string"):
        run(step_module="blocks.0")
    with pytest.raises(lt.StepError, match=r"'blocks.0' ran again before the pass was complete"):
        run(step_module=[b0, model.head])

    class EarlyExit(nn.Module):  # the last pass stops after its first block
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(2):
                x = self.b(self.a(x))
            return self.a(x).sum(-1)

    short = EarlyExit()
    with pytest.raises(lt.StepError, match=r"middle of loop pass 3: it called \['a'\] but not \['b'\]"):
        lt.featurize(short, [torch.randn(2, 3, dtype=torch.float64)], lambda m, x: m(x), step_module=[short.a, short.b])

    class Peeking(nn.Module):  # reads block 0's weight through a reference it does not own
        def __init__(self, target: nn.Linear) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(D, dtype=torch.float64))
            self.peek = [target]

        def forward(self, states: torch.Tensor, last: torch.Tensor, i: int) -> torch.Tensor:
            return F.linear(last * self.scale, self.peek[0].weight)

    model.messenger = Peeking(b0.fc)
    with pytest.raises(lt.UnsupportedLayerError, match=r"'blocks.0.fc.weight' is read in the forward of 'messenger'"):
        run(step_module=[b0, b1], body=[b0, b1, model.messenger])


def test_modules_at_reads_paths_ranges_and_lists() -> None:
    model = RangeLoop()
    assert modules_at(model, "blocks.1") is model.blocks[1]
    assert modules_at(model, "blocks.0:2") == list(model.blocks)
    assert modules_at(model, "blocks.1:") == [model.blocks[1]]
    assert modules_at(model, "blocks.0:2,messenger") == [*model.blocks, model.messenger]
    for bad, msg in [("blocks.7", "no submodule"), ("pre.0:1", "not a ModuleList"), ("blocks.a:b", "START:END"),
                     ("blocks.5:9", "selects no module")]:  # fmt: skip
        with pytest.raises(lt.ConfigError, match=msg):
            modules_at(model, bad)


def test_cli_featurizes_a_range_with_a_body(tmp_path) -> None:
    """`--step-module blocks.0:2 --body blocks.0:2,messenger` into a store gives lt.attribute's TracIn."""
    from tests.loop_fixtures import make_range_dataset

    model = RangeLoop()
    ck = tmp_path / "w.pt"
    torch.save(model.state_dict(), ck)
    store, out = tmp_path / "store", tmp_path / "tracin.npy"
    args = ["featurize", "--store", str(store), "--model", "tests.loop_fixtures:make_range_loop", "--loss",
            "tests.loop_fixtures:range_loss", "--dataset", "tests.loop_fixtures:make_range_dataset",
            "--step-module", "blocks.0:2", "--body", "blocks.0:2,messenger", "--checkpoint", f"{ck}@0.5",
            "--dim", "64", "--batch-size", "4", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert main(["score", "--store", str(store), "--out", str(out), "--kind", "tracin"]) == 0
    loader = {r: torch.utils.data.DataLoader(make_range_dataset(r), batch_size=4) for r in ("train", "query")}
    res = lt.attribute(
        model, [lt.Checkpoint(str(ck), lr=0.5)], loader["train"], loader["query"], range_loss,
        step_module=list(model.blocks), body=[*model.blocks, model.messenger], sketch=lt.SketchSpec(dim=64),
    )  # fmt: skip
    assert_close(torch.from_numpy(np.load(out)).double(), res.tracin.double(), "CLI store vs lt.attribute", 1e-4, 1e-7)


class TrackedOps(nn.Module):
    """Tokens folded into rows, then the operations HF models use on them: a learned query expanded over the
    rows, new_zeros, cat / unsqueeze / unbind along an inner axis, sum(-1), topk(k, -1), x[..., :n]."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(2, D))
        self.fc = nn.Linear(D, D)
        self.out = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = (h + e).reshape(b * t, d)  # [N, D]: the row tracker decides
        q = self.query.expand(b * t, 2, d)  # free: a parameter over the rows
        states = torch.cat([x.new_zeros(b * t, 0, d), x.unsqueeze(-2), torch.tanh(x).unsqueeze(-2)], dim=-2)
        score = (states * q).sum(-1)  # [N, 2]
        top = torch.topk(score, 1, -1).values  # [N, 1]
        first, second = states.softmax(-1)[..., :d].unbind(-2)
        y = self.fc(first * top + second)
        return h + self.out(torch.tanh(y)).reshape(b, t, d)


def test_row_tracker_follows_the_operations_of_hf_models() -> None:
    """Both Linears keep the rows route (the old tracker lost the rows at unsqueeze(-2), new_zeros, unbind(-2),
    x[..., :n] and topk(k, -1), and sent them the step route) and equal the oracle."""
    model = Looped(TrackedOps())
    feats = assert_exact_matches_oracle(model, model.core, batches(), loss_fn, "tracked operations")
    for name in ("core.fc", "core.out"):
        assert feats.routes[name] == "Linear (rows from the data flow)", feats.routes


class RelBias(nn.Module):
    """A learned bias over a [T, T] table of relative distances, which does not depend on the batch."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.t = t
        self.proj = nn.Parameter(torch.randn(2 * t - 1))

    def forward(self, h: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        bias = self.proj[dist + self.t - 1]  # [T, T]
        return h + torch.tanh(bias @ h)  # [B, T, D]


class RelBody(nn.Module):
    """The table is made in the forward (``arange``), or read from a buffer registered on the model."""

    def __init__(self, t: int, source: str) -> None:
        super().__init__()
        self.rel = RelBias(t)
        self.fc = nn.Linear(D, D)
        self.source = source
        pos = torch.arange(t)
        self.register_buffer("table", pos[:, None] - pos[None, :])

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        pos = torch.arange(t)
        dist = pos[:, None] - pos[None, :] if self.source == "arange" else self.table[:t, :t]
        return torch.tanh(self.fc(self.rel(h + e, dist)))


@pytest.mark.parametrize("source", ["arange", "buffer"])
def test_an_argument_that_does_not_depend_on_the_batch_is_not_split_when_its_size_is_the_batch_s(source: str) -> None:
    """Batch size = sequence length: the [T, T] distance table passed to a layer on the exact fallback has the
    batch size as its leading size, but is made from constants (or a buffer) alone, so each example's re-run gets
    it whole. Catches splitting it by example (drop the unbatch in Tracer._capture, or the buffers' mark_free in
    Tracer.forward_pass): a crash or wrong features."""
    t = 4
    model = Looped(RelBody(t, source))
    g = torch.Generator().manual_seed(5)
    data = [(torch.randint(0, 7, (t, t), generator=g), torch.randint(0, 5, (t,), generator=g)) for _ in range(2)]
    assert data[0][0].shape[0] == data[0][0].shape[1] == t, "the coincidence this test is about"
    feats = assert_exact_matches_oracle(model, model.core, data, loss_fn, "distance table with B == T")
    assert feats.routes["core.rel"] == "exact fallback", feats.routes

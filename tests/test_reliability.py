"""Bad input gives one of looptrace's own exceptions with a message that says what to do."""

from __future__ import annotations

import contextlib
import math
import pickle
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from tests.conftest import lm_loss, tiny_batches, tiny_model
from tests.test_capture import Net, loss_fn, make_batches


def feat(model: nn.Module, batches: Any = None, fn: Any = loss_fn, **kw: Any) -> lt.Features:
    kw.setdefault("sketch", lt.SketchSpec(dim=16))
    kw.setdefault("step_module", model.core)
    return lt.featurize(model, batches if batches is not None else make_batches(), fn, **kw)


def test_step_module_that_never_runs() -> None:
    model = Net()
    model.spare = nn.Linear(6, 6).double()  # registered but never called
    with pytest.raises(lt.StepError, match="never ran"):
        feat(model, step_module=model.spare)


def test_step_count_differs_from_declared() -> None:
    model = Net(loops=3)
    with pytest.raises(lt.StepError, match=r"ran 3 loop steps but tau=4"):
        feat(model, tau=4)


class Leaky(Net):
    """Uses the body's weight outside the loop through a functional call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = e
        for _ in range(self.loops):
            h = self.core(h, x)
        h = F.linear(h, self.core.fc.weight)  # body weight used in the read-out
        return self.head(h).mean(1)


class CalledOutside(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.core.fc(self.emb(x))  # a body layer run before the loop
        for _ in range(self.loops):
            h = self.core(h, x)
        return self.head(h).mean(1)


def test_body_weights_used_outside_the_step_module() -> None:
    with pytest.raises(lt.VerificationError, match="used outside the step module"):
        feat(Leaky())
    with pytest.raises(lt.StepError, match="outside a loop step"):
        feat(CalledOutside())


def test_parameter_without_rule_when_fallback_disabled() -> None:
    model = Net("fallback")
    with pytest.raises(lt.UnsupportedLayerError, match=r"core\.scale\.gamma"):
        feat(model, fallback=False)


def test_parameter_tied_between_body_and_readout() -> None:
    model = Net()
    model.head.weight = nn.Parameter(torch.randn(6, 6, dtype=torch.float64))
    model.core.fc.weight = model.head.weight
    model.head = nn.Linear(6, 6).double()
    model.head.weight = model.core.fc.weight
    with pytest.raises(lt.TiedParameterError, match="also used outside the loop body"):
        feat(model)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (lambda m, b: loss_fn(m, b).sum(), r"shape \[B\]"),
        (lambda m, b: loss_fn(m, b)[:2], "losses for a batch of 3"),
        (lambda m, b: loss_fn(m, b).long(), "floating point"),
        (lambda m, b: loss_fn(m, b) * torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64), r"example\(s\) \[1\]"),
        (lambda m, b: loss_fn(m, b) / torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), r"example\(s\) \[2\]"),
        (lambda m, b: loss_fn(m, b).detach(), "do not require grad"),
        (lambda m, b: [1.0, 2.0, 3.0], "Tensor"),
    ],
)
def test_bad_losses(bad: Any, words: str) -> None:
    with pytest.raises(lt.LossError, match=words):
        feat(Net(), fn=bad)


def test_loader_inconsistent_batches() -> None:
    b = make_batches()
    mixed = [b[0], {"x": b[1][0], "y": b[1][1]}]
    with pytest.raises(lt.LoaderError, match="different structure"):
        feat(
            Net(),
            mixed,
            fn=lambda m, batch: loss_fn(m, batch if isinstance(batch, tuple) else (batch["x"], batch["y"])),
        )
    with pytest.raises(lt.LoaderError, match="no batches"):
        feat(Net(), [])


def test_checkpoint_problems(tmp_path) -> None:
    model = tiny_model()
    sd = model.state_dict()
    bad = dict(sd)
    bad.pop("head.weight")
    bad["core.blocks.0.mlp.fc.weight"] = torch.zeros(3, 3)
    bad["extra"] = torch.zeros(1)
    data = (tiny_batches(1), tiny_batches(1), lm_loss)
    with pytest.raises(
        lt.CheckpointError, match=r"missing \['head.weight'\].*unexpected \['extra'\].*shape mismatches"
    ):
        lt.attribute(model, [lt.Checkpoint(bad, lr=1.0)], *data, step_module=model.core)
    for eta, words in [(-1.0, ">= 0"), (math.nan, "finite"), (None, "no learning rate")]:
        with pytest.raises(lt.CheckpointError, match=words):
            lt.attribute(model, [lt.Checkpoint(sd, lr=eta)], *data, step_module=model.core)
    with pytest.raises(lt.ConfigError, match="Checkpoint"):
        lt.attribute(model, [sd], *data, step_module=model.core)  # type: ignore[list-item]
    with pytest.raises(lt.CheckpointError, match="does not exist"):
        lt.Checkpoint(tmp_path / "nope.pt", lr=1.0).load()


class Evil:
    def __reduce__(self) -> Any:
        return (print, ("this must never run",))


def test_pickle_bearing_checkpoint_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(lt.CheckpointError, match="weights_only=True"):
        lt.Checkpoint(path, lr=1.0).load()
    assert "must never run" not in capsys.readouterr().out
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2, 3])[:5])
    with pytest.raises(lt.CheckpointError):
        lt.Checkpoint(junk, lr=1.0).load()


def test_memory_estimate_refuses_up_front() -> None:
    model = Net()
    x = torch.randint(0, 5, (10, 4))
    ds = torch.utils.data.TensorDataset(x, torch.zeros(10, dtype=torch.long))
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    with pytest.raises(lt.MemoryBudgetError, match=r"would take .* \(limit"):
        lt.featurize(model, loader, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(), max_memory=1000)


def test_stream_sdi_never_leaves_partial_output(tmp_path, monkeypatch) -> None:
    model = tiny_model()
    f = lt.featurize(model, tiny_batches(), lm_loss, step_module=model.core, sketch=lt.SketchSpec(dim=16))
    calls = {"n": 0}
    real = torch.einsum

    def flaky(*a: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("disk on fire")
        return real(*a)

    monkeypatch.setattr(torch, "einsum", flaky)
    with pytest.raises(RuntimeError):
        lt.stream_sdi(f, f, tmp_path / "sdi.npy", block_rows=1, block_cols=1)
    assert not (tmp_path / "sdi.npy").exists(), "a failed write must not leave a result file"
    assert not list(tmp_path.glob("*.partial")), "a failed write must clean up its temporary file"


def test_truncated_checkpoint_is_refused(tmp_path) -> None:
    model = tiny_model()
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "lr": 0.1}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(lt.CheckpointError, match="cannot be loaded safely"):
        lt.Checkpoint(path).load()


class SeqFirst(Net):
    """Runs the body on [L, B, d] (sequence first): per-example rows would mix examples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).transpose(0, 1)  # [L, B, d]
        for _ in range(self.loops):
            h = self.core(h, x.T)
        return self.head(h.transpose(0, 1)).mean(1)


def test_batch_not_on_the_first_axis_is_refused() -> None:
    with pytest.raises(lt.StepError, match="batch axis"):
        feat(SeqFirst(), make_batches(b=3))  # sequence length 4 != batch 3
    square = [(x[:, :3], y) for x, y in make_batches(b=3)]  # sequence length 3 == batch 3
    with pytest.raises(lt.VerificationError, match="example"):
        feat(SeqFirst(), square)


def test_features_swapped_between_the_first_and_last_example_are_caught() -> None:
    """The batch sum cannot see a swap; the first and last examples' check weights them 1:2, so it must."""
    from looptrace.sketch.plan import SketchPlan
    from looptrace.verify import check_batch

    g = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)  # 4 examples' gradients of a [3, 5] weight
    plan = SketchPlan.build(lt.SketchSpec.exact(), [("w", (3, 5))])
    feats = grads.reshape(4, 1, 15)  # one loop step, exact features

    def rows_grad(rows: list[int], weights: list[float]) -> tuple[torch.Tensor, ...]:
        return (sum(w * grads[r] for r, w in zip(rows, weights, strict=True)),)

    params = {"w": torch.zeros(3, 5, dtype=torch.float64)}
    check_batch(plan, feats, params, (grads.sum(0),), rows_grad, 0)  # the right features pass
    swapped = feats[[3, 1, 2, 0]]
    with pytest.raises(lt.VerificationError, match="examples 0 and 3"):
        check_batch(plan, swapped, params, (grads.sum(0),), rows_grad, 0)


class _Unbound(nn.Module):
    """A body layer on rows concatenated example by example: the data flow does not say whose row is whose."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = torch.cat(list(h.unbind(0)), 0)  # [B * L, d]
        return h + torch.tanh(self.fc(flat)).reshape(h.shape)


class _MarkedUnbound(nn.Module):
    def __init__(self, marked: bool = True) -> None:
        super().__init__()
        self.marked = marked
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 6)
        self.core = _Unbound()
        self.head = nn.Linear(6, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for _ in range(3):
            with lt.loop_step() if self.marked else contextlib.nullcontext():
                h = self.core(h)
        return self.head(h).mean(1)


def test_rows_that_cannot_be_traced_without_a_step_module_to_fall_back_on() -> None:
    """body= with loop_step() markers and no step_module=: a layer whose rows the data flow does not trace has no
    per-example step route, so StepError says to pass step_module= (and with it the same model is exact).
    Catches the step route silently taken (or wrong rows used) without a step module."""
    model = _MarkedUnbound()
    with pytest.raises(lt.StepError, match="no per-example step route to fall back on; pass the module"):
        feat(model, body=model.core, step_module=None, sketch=lt.SketchSpec.exact())
    unmarked = _MarkedUnbound(marked=False)
    f = feat(unmarked, step_module=unmarked.core, sketch=lt.SketchSpec.exact())
    assert f.routes["core.fc"].startswith("step"), f.routes


def test_accumulating_into_an_existing_file_leaves_it_intact_on_failure(tmp_path, monkeypatch) -> None:
    """stream_sdi(accumulate=True) works on a copy: a failure halfway leaves the existing scores byte for byte and
    no temporary file. Catches accumulation in place (a half-added file)."""
    model = tiny_model()
    f = lt.featurize(model, tiny_batches(), lm_loss, step_module=model.core, sketch=lt.SketchSpec(dim=16))
    path = lt.stream_sdi(f, f, tmp_path / "sdi.npy", block_rows=1, block_cols=1)
    before = path.read_bytes()
    calls = {"n": 0}
    real = torch.einsum

    def flaky(*a: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return real(*a)

    monkeypatch.setattr(torch, "einsum", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        lt.stream_sdi(f, f, path, accumulate=True, block_rows=1, block_cols=1)
    assert calls["n"] > 3, "the failure must come after some blocks were added"
    assert path.read_bytes() == before, "a failed accumulation must leave the existing file as it was"
    assert not list(tmp_path.glob("*.partial"))


def test_features_of_different_model_bodies_are_not_combined() -> None:
    """Catches scores of features from two different bodies (same spec, same checkpoint name)."""
    small, other = tiny_model(), tiny_model(d_mlp=16)
    a = lt.featurize(small, tiny_batches(1), lm_loss, step_module=small.core, sketch=lt.SketchSpec(dim=16))
    b = lt.featurize(other, tiny_batches(1), lm_loss, step_module=other.core, sketch=lt.SketchSpec(dim=16))
    with pytest.raises(lt.SpecMismatchError, match="different model bodies"):
        lt.sdi(a, b)


def test_every_cited_test_exists() -> None:
    """Each test docs/reliability.md cites (as ``file::name``) exists, and the autocast row states the bound its test
    enforces. Catches a row left citing a renamed or deleted test, or a test cited without its file."""
    import re
    from pathlib import Path

    from tests.test_capture import BF16_SDI_BOUND

    root = Path(__file__).resolve().parent
    text = (root.parent / "docs" / "reliability.md").read_text()
    checked = 0
    for line in text.splitlines():
        if not line.startswith("|") or line.count("|") < 4:
            continue
        for ref in re.findall(r"`([^`]*)`", line.rsplit("|", 2)[-2]):
            if ref.endswith(".py") or "test" not in ref:
                continue
            file, sep, name = ref.partition("::")
            assert sep, f"docs/reliability.md cites {ref!r} without its file"
            assert re.search(rf"^def {re.escape(name)}\(", (root / file).read_text(), re.M), f"no test {ref}"
            checked += 1
    assert checked > 40, f"only {checked} cited tests found: did the table's format change?"
    row = next(line for line in text.splitlines() if "autocast=torch.bfloat16" in line)
    assert f"within {round(BF16_SDI_BOUND * 100)} %" in row, row

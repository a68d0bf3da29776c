"""Exact mode against the untied per-step oracle, in float64."""

from __future__ import annotations

import pytest
import torch

import looptrace as lt
from tests.conftest import (
    assert_close,
    assert_exact_matches_oracle,
    lm_loss,
    oracle_per_step,
    per_example_grads,
    tiny_batches,
    tiny_model,
)

CASES = {
    "concat-layernorm": dict(injection="concat"),
    "additive-rmsnorm-corenorm": dict(injection="additive", norm="rmsnorm", core_norm=True),
    "prelude-coda-rotary": dict(n_prelude=1, n_coda=1, positions="rotary", qk_norm=True, mlp="relu2"),
    "bidirectional-learnedpos-nobias": dict(
        causal=False, positions="learned", bias=False, injection="none", state_init="embedding"
    ),
    "truncated-bptt": dict(bptt_k=2),
}


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_equals_untied_oracle(case: str, recompute: bool) -> None:
    """With recompute=True each step is re-run inside backward (its activations are not kept): the
    features must be the same, exactly."""
    model = tiny_model(**CASES[case])
    batches = tiny_batches()
    what = f"exact per-step features vs untied oracle ({case}, recompute={recompute})"
    assert_exact_matches_oracle(model, model.core, batches, lm_loss, what, recompute=recompute)


def test_truncated_bptt_gives_zero_rows_at_true_index() -> None:
    model = tiny_model(bptt_k=2)
    batches = tiny_batches()
    feats = lt.featurize(model, batches, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact())
    ps = feats.per_step
    assert ps is not None and ps.shape[1] == 4
    assert torch.count_nonzero(ps[:, :2]) == 0, "steps 1..r-k must have no gradient under truncated BPTT"
    assert bool((ps[:, 2:].norm(dim=-1) > 0).all()), "the last k steps must carry gradient"


def test_per_example_readout_step() -> None:
    model = tiny_model(injection="additive")
    batches = tiny_batches(readout=True)
    feats = lt.featurize(model, batches, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact(), verify="first")
    want = oracle_per_step(model, model.core, batches, lm_loss)
    assert_close(feats.per_step, want, "exact features with per-example read-out")
    readout = torch.cat([b[2] for b in batches])
    for i, n in enumerate(readout.tolist()):
        assert torch.count_nonzero(feats.per_step[i, n:]) == 0, f"example {i} read out at {n} has gradient after it"
        assert feats.per_step[i, n - 1].norm() > 0


def test_conservation_sum_of_steps_is_autograd_gradient(model, batches) -> None:
    feats = lt.featurize(model, batches, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact())
    want = per_example_grads(model, list(model.core.named_parameters(prefix="core")), batches, lm_loss)
    assert_close(feats.total, want, "sum_t phi_t vs autograd per-example gradient")


def test_featurize_leaves_grad_and_mode_untouched(model, batches) -> None:
    model.train()
    lt.featurize(model, batches, lm_loss, step_module=model.core, sketch=lt.SketchSpec(dim=64))
    assert model.training
    assert all(p.grad is None for p in model.parameters()), "featurize must not fill .grad"


def test_batches_with_different_step_counts_are_zero_padded() -> None:
    """A loader whose batches run different numbers of loop steps (tau sampled per batch): features have the
    most steps any batch ran, each batch's rows equal featurising it alone, and the steps it did not run are
    exactly zero (the assembly writes them; it must not leave them uninitialised)."""
    model = tiny_model()
    batches = [(x, y, n) for (x, y), n in zip(tiny_batches(n_batches=3), (2, 4, 3), strict=True)]

    def loss(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        x, y, loops = batch
        logits = m(x, n_loops=loops)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return ce.view(y.shape).mean(1)

    for spec in (lt.SketchSpec.exact(), lt.SketchSpec(dim=64)):
        got = lt.featurize(model, batches, loss, step_module=model.core, sketch=spec).per_step
        assert got is not None and got.shape[1] == 4, "features must have as many steps as the longest batch ran"
        for i, batch in enumerate(batches):
            alone = lt.featurize(model, [batch], loss, step_module=model.core, sketch=spec).per_step
            assert alone is not None
            rows, ran = got[3 * i : 3 * i + 3], batch[2]
            assert_close(rows[:, :ran], alone, f"batch {i} ({ran} steps) among others vs alone, {spec}")
            assert torch.count_nonzero(rows[:, ran:]) == 0, f"batch {i} ran {ran} steps: later steps must be 0"

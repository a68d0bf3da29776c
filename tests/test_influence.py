"""TracIn / SDI from features: exactness with the identity sketch, conservation against autograd's gradient of the
tied body (and, labelled so, rounding checks that hold by construction), eta weighting, the decompositions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import looptrace as lt
from tests.conftest import assert_close, lm_loss, oracle_per_step, per_example_grads, tiny_batches, tiny_model


def _tied_grads(model: torch.nn.Module, batches: list) -> torch.Tensor:
    """Autograd's per-example gradients of the tied body (not a sum of our per-step rows)."""
    return per_example_grads(model, list(model.core.named_parameters(prefix="core")), batches, lm_loss)


def test_identity_sketch_reproduces_exact_tracin_and_sdi() -> None:
    """Exact SDI (both sides), the step matrix and TracIn against the untied oracle, and conservation against
    autograd's gradient of the tied body: sum_t SDI_t = g(z) . g(z'). Catches a step missing from the features
    (each decomposition would still sum to our own TracIn) or a wrong einsum."""
    model = tiny_model()
    train, query = tiny_batches(2), tiny_batches(1, b=2)
    ft = lt.featurize(model, train, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact())
    fq = lt.featurize(model, query, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact())
    pt, pq = oracle_per_step(model, model.core, train, lm_loss), oracle_per_step(model, model.core, query, lm_loss)
    assert_close(lt.sdi(ft, fq), torch.einsum("nsd,mtd->nmt", pt, pq), "test-side SDI vs oracle")
    assert_close(lt.sdi(ft, fq, side="train"), torch.einsum("nsd,mtd->nms", pt, pq), "train-side SDI vs oracle")
    assert_close(lt.step_matrix(ft, fq), torch.einsum("nsd,mtd->nmst", pt, pq), "step matrix vs oracle")
    tied = _tied_grads(model, train) @ _tied_grads(model, query).T  # autograd, the tied body
    assert_close(lt.tracin(ft, fq), tied, "TracIn vs autograd's tied gradients")
    for what, decomposition in (("sum_t SDI_t", lt.sdi(ft, fq).sum(-1)),
                                ("sum_t train-side SDI_t", lt.sdi(ft, fq, side="train").sum(-1)),
                                ("sum_st I_st", lt.step_matrix(ft, fq).sum((-1, -2)))):  # fmt: skip
        assert_close(decomposition, tied, f"conservation: {what} vs g(z) . g(z') from autograd's tied gradients")


def test_sketched_sdi_sums_to_sketched_tracin_rounding_check() -> None:
    """A rounding check, true by construction (TracIn is computed from the same totals): the sketched SDI summed
    over steps equals the sketched TracIn to float64 rounding. The check against autograd is the next test and
    test_capture.py::test_sketched_conservation."""
    model = tiny_model()
    spec = lt.SketchSpec(dim=32, seed=1)
    ft = lt.featurize(model, tiny_batches(), lm_loss, step_module=model.core, sketch=spec)
    assert_close(lt.sdi(ft, ft).sum(-1), lt.tracin(ft, ft), "sketched sum_t SDI_t vs sketched TracIn (rounding)")


def test_sketched_sdi_sums_to_the_sketch_of_autograd_s_gradients() -> None:
    """Sketched conservation against autograd: sum_t SDI~_t(z, z') = <S g(z), S g(z')> with g from autograd on
    the tied body and S the plan's sketch. Catches a step's contribution sketched with another hash, or dropped."""
    from looptrace.sketch.plan import SketchPlan

    model = tiny_model()
    spec = lt.SketchSpec(dim=32, seed=1)
    batches = tiny_batches()
    ft = lt.featurize(model, batches, lm_loss, step_module=model.core, sketch=spec)
    g = _tied_grads(model, batches)
    named = sorted(model.core.named_parameters(prefix="core"))
    plan = SketchPlan.build(spec, [(n, tuple(p.shape)) for n, p in named])
    sg = torch.zeros(g.shape[0], plan.dim, dtype=torch.float64)
    offset = 0
    for name, p in named:
        slot = plan.slot(name)
        slot.add_dense(sg[:, slot.offset : slot.offset + slot.m], g[:, offset : offset + p.numel()])
        offset += p.numel()
    assert_close(lt.sdi(ft, ft).sum(-1), sg @ sg.T, "sketched sum_t SDI_t vs <S g, S g'> from autograd")


@pytest.mark.parametrize("decomposition", ["train", "matrix"])
def test_attribute_decompositions_equal_the_oracle_and_restore_the_weights(decomposition: str) -> None:
    """attribute(decomposition="train") is sum_k eta_k phi_s(z) . g(z') per train step s, "matrix" the full
    tau x tau sum_k eta_k phi_s(z) . phi_t(z'), each against the untied oracle at every checkpoint; the model ends
    with its own weights, bitwise. Catches the wrong side summed, a checkpoint's eta dropped, and weights left
    from the last checkpoint."""
    model = tiny_model()
    train, query = tiny_batches(1, b=3), tiny_batches(1, b=2)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    states = []
    for k in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * (k + 1) * torch.randn_like(p))
        states.append({n: t.clone() for n, t in model.state_dict().items()})
    model.load_state_dict(own)
    etas = [0.5, 0.125]
    res = lt.attribute(model, [lt.Checkpoint(sd, lr=eta, name=f"c{k}") for k, (sd, eta) in enumerate(zip(states, etas, strict=True))],
                       train, query, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact(),
                       decomposition=decomposition)  # type: ignore[arg-type]  # fmt: skip
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items()), "attribute must restore the weights"
    want_matrix = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    probe = tiny_model()
    for sd, eta in zip(states, etas, strict=True):
        probe.load_state_dict(sd)
        pt = oracle_per_step(probe, probe.core, train, lm_loss)
        pq = oracle_per_step(probe, probe.core, query, lm_loss)
        want_matrix += eta * torch.einsum("nsd,mtd->nmst", pt, pq)
    want_train = want_matrix.sum(-1)  # [N, M, s]: which train step
    assert res.decomposition == decomposition
    if decomposition == "matrix":
        assert res.step_matrix is not None
        assert_close(res.step_matrix, want_matrix, "attribute step matrix vs oracle")
        assert_close(res.sdi, want_matrix.sum(2), "attribute(matrix).sdi is the test-side SDI")
    else:
        assert res.step_matrix is None
        assert_close(res.sdi, want_train, "attribute(train) vs oracle")
    assert_close(res.tracin, want_matrix.sum((-1, -2)), "attribute TracIn vs oracle")
    assert not torch.allclose(want_train, want_matrix.sum(2)), "the two sides must differ on this model"


def test_attribute_weights_checkpoints_by_eta(tmp_path) -> None:
    model = tiny_model()
    train, query = tiny_batches(1, b=3), tiny_batches(1, b=2)
    spec = lt.SketchSpec(dim=32)
    states = []
    for k in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * (k + 1))
        states.append({n: t.clone() for n, t in model.state_dict().items()})
    torch.save({"model": states[1], "lr": 0.25}, tmp_path / "ck1.pt")
    res = lt.attribute(
        model,
        [lt.Checkpoint(states[0], lr=0.5, name="a"), lt.Checkpoint(tmp_path / "ck1.pt")],
        train,
        query,
        lm_loss,
        step_module=model.core,
        sketch=spec,
    )
    assert res.etas == [0.5, 0.25]
    want_sdi = torch.zeros_like(res.sdi)
    want_self = torch.zeros_like(res.self_influence)
    for sd, eta, name in [(states[0], 0.5, "a"), (states[1], 0.25, str(tmp_path / "ck1.pt"))]:
        model.load_state_dict(sd)
        ft = lt.featurize(model, train, lm_loss, step_module=model.core, sketch=spec, checkpoint=name)
        fq = lt.featurize(model, query, lm_loss, step_module=model.core, sketch=spec, checkpoint=name)
        want_sdi += eta * lt.sdi(ft, fq)
        want_self += eta * lt.self_influence(ft)
    assert_close(res.sdi, want_sdi, "attribute SDI vs manual sum_k eta_k SDI_k")
    assert_close(res.tracin, res.sdi.sum(-1), "attribute TracIn vs sum_t SDI (rounding: by construction)")
    assert_close(res.self_influence, want_self, "self-influence")
    assert float(res.sdi.abs().sum()) > 0


def test_mixing_specs_or_checkpoints_raises() -> None:
    model = tiny_model()
    b = tiny_batches(1)
    f1 = lt.featurize(model, b, lm_loss, step_module=model.core, sketch=lt.SketchSpec(dim=16, seed=0))
    f2 = lt.featurize(model, b, lm_loss, step_module=model.core, sketch=lt.SketchSpec(dim=16, seed=1))
    with pytest.raises(lt.SpecMismatchError, match="different sketch specs"):
        lt.sdi(f1, f2)
    f3 = lt.featurize(model, b, lm_loss, step_module=model.core, sketch=lt.SketchSpec(dim=16), checkpoint="other")
    with pytest.raises(lt.SpecMismatchError, match="different checkpoints"):
        lt.tracin(f1, f3)
    totals = lt.featurize(model, b, lm_loss, step_module=model.core, sketch=lt.SketchSpec(dim=16), per_step=False)
    with pytest.raises(lt.SpecMismatchError, match="per_step=True"):
        lt.sdi(f1, totals)
    assert_close(totals.total, f1.total, "per_step=False totals")


def test_stream_sdi_to_disk_matches_in_memory(tmp_path) -> None:
    model = tiny_model()
    f = lt.featurize(model, tiny_batches(), lm_loss, step_module=model.core, sketch=lt.SketchSpec(dim=16))
    path = lt.stream_sdi(f, f, tmp_path / "sdi.npy", eta=0.5, block_rows=2, block_cols=4, dtype=np.dtype(np.float64))
    lt.stream_sdi(f, f, path, eta=0.5, accumulate=True, block_rows=4, block_cols=1)
    got = torch.from_numpy(np.load(path))
    assert_close(got, lt.sdi(f, f), "streamed SDI (two halves of eta) vs in memory")
    assert not list(tmp_path.glob("*.partial"))

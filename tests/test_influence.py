"""TracIn / SDI from features: exactness with the identity sketch, conservation, eta weighting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import looptrace as lt
from tests.conftest import assert_close, lm_loss, oracle_per_step, tiny_batches, tiny_model


def test_identity_sketch_reproduces_exact_tracin_and_sdi() -> None:
    model = tiny_model()
    train, query = tiny_batches(seed_batches := 2), tiny_batches(1, b=2)
    del seed_batches
    ft = lt.featurize(model, train, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact())
    fq = lt.featurize(model, query, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact())
    pt, pq = oracle_per_step(model, model.core, train, lm_loss), oracle_per_step(model, model.core, query, lm_loss)
    assert_close(lt.sdi(ft, fq), torch.einsum("nsd,mtd->nmt", pt, pq), "test-side SDI vs oracle")
    assert_close(lt.sdi(ft, fq, side="train"), torch.einsum("nsd,mtd->nms", pt, pq), "train-side SDI vs oracle")
    assert_close(lt.step_matrix(ft, fq), torch.einsum("nsd,mtd->nmst", pt, pq), "step matrix vs oracle")
    assert_close(lt.tracin(ft, fq), pt.sum(1) @ pq.sum(1).T, "TracIn vs oracle")
    # conservation: every decomposition sums to TracIn
    assert_close(lt.sdi(ft, fq).sum(-1), lt.tracin(ft, fq), "sum_t SDI_t vs TracIn")
    assert_close(lt.step_matrix(ft, fq).sum((-1, -2)), lt.tracin(ft, fq), "sum_st I_st vs TracIn")


def test_sketched_sdi_conserves_tracin_exactly() -> None:
    model = tiny_model()
    spec = lt.SketchSpec(dim=32, seed=1)
    ft = lt.featurize(model, tiny_batches(), lm_loss, step_module=model.core, sketch=spec)
    assert_close(lt.sdi(ft, ft).sum(-1), lt.tracin(ft, ft), "sketched sum_t SDI_t vs sketched TracIn")


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
    assert_close(res.tracin, res.sdi.sum(-1), "attribute TracIn vs sum_t SDI")
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

"""The curvature comparison on the evaluation task: its scores are lt.attribute's, its verdicts follow its
numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import looptrace as lt
from looptrace.apps.evaluation.curvature import CurvatureEvalConfig, aggregate, compare, estimator_scores
from looptrace.apps.evaluation.task import MajorityTask, full_bptt_loss, loss_fn
from tests.conftest import assert_close

TINY = MajorityTask(bits=7, n_train=24, n_query=6, n_test=20, d_model=8, steps=12, ckpt_every=6)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cv") / "checkpoints"
    TINY.train(record=path)
    return path


@pytest.mark.parametrize("kind", ["TracIn", "kfac", "ekfac", "gauss-newton"])
def test_comparison_scores_are_attributes(ckpt_dir: Path, kind: str) -> None:
    """The comparison fits each checkpoint's curvature once and sweeps the damping on it; at the default
    damping its scores must be lt.attribute's (all checkpoints and the final one, as trained and full BPTT).
    Catches a checkpoint weighted by the wrong eta, the final checkpoint mislabelled, the losses swapped."""
    cfg = CurvatureEvalConfig(damping_scales=(0.1,), fishers=("empirical",), batch_size=10)
    scores = estimator_scores(TINY, ckpt_dir, cfg)
    model = TINY.model()
    data = TINY.data()
    tr = [(data["train"][0][i : i + 10], data["train"][1][i : i + 10]) for i in range(0, TINY.n_train, 10)]
    qu = [data["query"]]
    cks = lt.load_checkpoints(ckpt_dir)
    suffix = {"TracIn": "", "gauss-newton": " | damping 0.1x"}.get(kind, " | empirical Fisher | damping 0.1x")
    for which, subset in (("all checkpoints", cks), ("final checkpoint", cks[-1:])):
        for variant, lfn in (("as trained", loss_fn), ("full BPTT", full_bptt_loss)):
            res = lt.attribute(model, subset, tr, qu, lfn, step_module=model.core, sketch=lt.SketchSpec.exact(),
                               precondition=None if kind == "TracIn" else kind)  # fmt: skip
            got = torch.from_numpy(scores[f"{kind} | {which} | {variant}{suffix}"])
            want = res.tracin.double()
            assert float(want.abs().max()) > 0
            assert_close(got, want, f"{kind}, {which}, {variant}", rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_compare_and_aggregate_verdicts_follow_the_numbers() -> None:
    """A smoke run of the whole comparison; the verdict fields are recomputed here from the table."""
    cfg = dataclasses.replace(CurvatureEvalConfig.smoke(), subsets=6)
    res = compare(TINY, cfg)
    table, summary = res["lds"], res["summary"]
    tracin = table["TracIn | all checkpoints | as trained"]["mean"]
    best = summary["best_curvature"]["name"]
    assert table[best]["mean"] == max(v["mean"] for k, v in table.items() if not k.startswith("TracIn"))
    assert summary["beats_tracin"] == (table[best]["mean"] >= tracin)
    agg = aggregate([res, res])
    assert agg["best_beats_tracin_every_run"] == summary["beats_tracin"]
    assert agg["lds"][best]["runs"] == [table[best]["mean"]] * 2
    assert np.isfinite(agg["best_curvature"]["mean"])

"""The curvature comparison of ``looptrace eval``: its methods are lt.attribute with their settings, its
verdict fields follow its numbers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import looptrace as lt
from looptrace.apps.evaluation.curvature import compare, summarize
from looptrace.apps.evaluation.methods import METHODS, ScoreContext
from looptrace.apps.evaluation.task import MajorityTask
from looptrace.apps.evaluation.verdicts import verdicts
from tests.conftest import assert_close

TINY = MajorityTask(bits=7, n_train=24, n_query=6, n_test=20, d_model=8, steps=12, ckpt_every=6)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cv") / "checkpoints"
    TINY.train(record=path)
    return path


@pytest.mark.parametrize(
    ("key", "kwargs", "last", "full"),
    [
        ("kfac_d1", {"precondition": "kfac", "damping_scale": 1.0}, False, False),
        ("ekfac_last_full", {"precondition": "ekfac"}, True, True),
        ("gauss_newton_full_d0.01", {"precondition": "gauss-newton", "damping_scale": 0.01}, False, True),
    ],
)
def test_curvature_method_is_attribute_with_its_settings(
    ckpt_dir: Path, key: str, kwargs: dict[str, Any], last: bool, full: bool
) -> None:
    """A registered curvature method's scores are ``lt.attribute(precondition=..., damping_scale=...)`` on its
    checkpoints and loss. Catches a damping scale, loss or checkpoint choice dropped between the registry and
    lt.attribute (break: ignore ``damping_scale`` in ScoreContext.attribution, or swap ``last_only``)."""
    ctx = ScoreContext(TINY, ckpt_dir)
    got = torch.from_numpy(METHODS[key].scores(ctx))
    cks = lt.load_checkpoints(ckpt_dir)
    model = TINY.model()
    lfn = TINY.full_bptt_loss if full else TINY.loss_fn
    res = lt.attribute(model, cks[-1:] if last else cks, ctx.train, ctx.query, lfn, step_module=model.core,
                       sketch=lt.SketchSpec.exact(), verify=False, **kwargs)  # fmt: skip
    want = res.tracin.double()
    assert float(want.abs().max()) > 0
    assert_close(got, want, key, rtol=1e-6, atol=1e-9 * float(want.abs().max()))
    plain = torch.from_numpy(METHODS["tracin"].scores(ctx))
    assert float((got - plain).abs().max()) > 1e-3 * float(plain.abs().max()), f"{key} is plain TracIn"


def test_true_fisher_differs_from_empirical(ckpt_dir: Path) -> None:
    """``ekfac_true`` fits on labels sampled from the model, so its scores differ from the empirical Fisher's.
    Catches ``fisher="true"`` not reaching lt.attribute (break: drop the fisher_loss in ScoreContext)."""
    ctx = ScoreContext(TINY, ckpt_dir)
    emp, true = METHODS["ekfac"].scores(ctx), METHODS["ekfac_true"].scores(ctx)
    assert np.abs(emp - true).max() > 1e-4 * np.abs(emp).max()


def _lds_table(means: dict[str, float], m: int = 40, seed: int = 0) -> dict[str, Any]:
    """An LDS section like run_lds writes: per-query LDS around each mean (noise 0.02), halves from the same."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for key, mu in means.items():
        pq = mu + 0.02 * rng.standard_normal(m)
        sh = mu + 0.02 * rng.standard_normal(m)
        out[key] = {"label": key, "group": METHODS[key].group, "mean": float(pq.mean()), "lo": float(pq.mean() - 0.01),
                    "hi": float(pq.mean() + 0.01), "per_query": pq.tolist(), "first_half": float(pq.mean()),
                    "second_half": float(sh.mean()), "second_half_per_query": sh.tolist()}  # fmt: skip
    return {"methods": out, "paired": {}, "subsets": 100, "queries": m}


def test_compare_picks_the_best_and_the_verdicts_follow() -> None:
    """The best candidate is the highest mean over the curvature groups (never TracIn or a peer), the "Done
    when" flags are its comparisons with TracIn and the better kronfluence EK-FAC, and moving the peer above
    it flips the verdict. Catches a peer counted as a candidate, the worse EK-FAC loss used as the reference,
    or a flag computed on the wrong field (break: ``>=`` -> ``<=`` in ``reaches``)."""
    means = {"tracin": 0.30, "kfac": 0.33, "ekfac_full": 0.36, "gauss_newton_d1": 0.31, "ekfac": 0.32, "ekfac_true": 0.2,
             "kronfluence_ekfac": 0.34, "kronfluence_ekfac_full": 0.35, "kronfluence_identity": 0.5}  # fmt: skip
    c = compare(_lds_table(means), n_boot=200)
    assert c is not None
    assert c["best"]["key"] == "ekfac_full"
    assert c["references"]["kronfluence_ekfac"]["key"] == "kronfluence_ekfac_full"
    assert c["done_when"]["holds"] is True
    assert c["paired"]["tracin"]["lo"] > 0
    assert c["defaults"]["kfac"]["ge_tracin"] is True and c["defaults"]["kfac"]["ge_kronfluence_ekfac"] is False
    assert c["sweep"]["gauss_newton"]["best_scale"] == "1"
    assert set(c["fisher"]) == {"ekfac"}
    v = verdicts({"curvature": c})["curvature"]
    assert v["done_when"] == "holds" and v["paired"]["tracin"].startswith("higher")
    worse = dict(means, kronfluence_ekfac=0.40)
    c2 = compare(_lds_table(worse), n_boot=200)
    assert c2 is not None and c2["done_when"]["holds"] is False and c2["done_when"]["ge_tracin"] is True
    assert verdicts({"curvature": c2})["curvature"]["done_when"] == "does not hold"
    no_peer = compare(_lds_table({"tracin": 0.3, "kfac": 0.2}), n_boot=200)
    assert no_peer is not None and no_peer["done_when"]["holds"] is None
    assert compare(_lds_table({"tracin": 0.3})) is None


def test_summarize_every_task() -> None:
    """``done_when_on_every_task`` is the conjunction over the tasks, and the replication checks the primary
    run's choice on another seed's numbers. Catches ``any`` for ``all`` (break it in ``summarize.every``) and
    a replicate judged by its own best instead of the primary's choice (break: ``key = other[...]["best"]``)."""
    good = {"tracin": 0.3, "ekfac": 0.4, "kronfluence_ekfac": 0.35}
    bad = {"tracin": 0.3, "ekfac": 0.32, "kronfluence_ekfac": 0.35}
    runs = {}
    for name, means in (("a", good), ("b", bad)):
        lds = _lds_table(means)
        res: dict[str, Any] = {
            "task": {"description": name, "seed": 0},
            "lds": lds,
            "train_seconds": 1.0,
            "seconds": 9.0,
            "curvature": compare(lds, n_boot=200),
        }
        res["verdicts"] = verdicts(res)
        runs[name] = res
    s = summarize(runs)
    assert s["tasks"]["a"]["done_when"]["holds"] is True and s["tasks"]["b"]["done_when"]["holds"] is False
    assert s["done_when_on_every_task"] is False
    both_good = summarize({"a": runs["a"], "c": copy.deepcopy(runs["a"])})
    assert both_good["done_when_on_every_task"] is True
    # replication: a's choice (ekfac) checked on another seed where it falls below the peer
    lds = _lds_table({"tracin": 0.3, "ekfac": 0.32, "kfac": 0.5, "kronfluence_ekfac": 0.35}, seed=1)
    other = {"task": {"description": "a", "seed": 1}, "lds": lds, "curvature": compare(lds, n_boot=200)}
    rep = summarize({"a": runs["a"]}, {"a": [other]})["tasks"]["a"]["replication"]
    assert rep["seeds"] == [1] and rep["per_seed"][0]["key"] == "ekfac"
    assert rep["per_seed"][0]["ge_tracin"] is True and rep["per_seed"][0]["ge_kronfluence_ekfac"] is False
    assert rep["holds_every_seed"] is False and rep["holds_seeds"] == 0

"""The curvature comparison of ``looptrace eval``: its methods are lt.attribute with their settings, its
verdict fields follow its numbers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import looptrace as lt
from looptrace.apps.evaluation.curvature import compare, pooled, summarize
from looptrace.apps.evaluation.methods import METHODS, ScoreContext
from looptrace.apps.evaluation.parity_profile import peak_word
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


def test_every_preconditioner_runs_whole_model_on_the_task_checkpoints(ckpt_dir: Path) -> None:
    """Every ``lt.attribute`` preconditioner, with ``outside=True``, on an evaluation task's own checkpoints at its
    defaults: the whole model's score is the body's plus the outside part's, and differs from the body's. Catches a
    task recorder that keeps the body's optimizer moments only (``precondition="adam"`` with ``outside=True`` was
    refused on every evaluation task's checkpoints)."""
    ctx = ScoreContext(TINY, ckpt_dir)
    for kind in (None, "kfac", "ekfac", "gauss-newton", "adam"):
        res = ctx.attribution(precondition=kind, outside=True)
        assert res.outside is not None
        assert_close(res.total, res.tracin + res.outside, f"total of {kind}")
        assert float(res.outside.abs().max()) > 0, f"{kind}: nothing outside the loop was scored"


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


def test_the_issue_candidate_set_is_judged_on_its_own() -> None:
    """``default_damping`` judges only the default-damping, empirical-Fisher configurations: a damping-sweep
    entry that beats the peer does not make it hold. Catches the sweep leaking into the issue's candidate set
    (break: drop the group filter in ``compare``)."""
    c = compare(_lds_table({"tracin": 0.3, "kfac": 0.32, "kfac_d1": 0.5, "kronfluence_ekfac": 0.35}), n_boot=200)
    assert c is not None and c["best"]["key"] == "kfac_d1" and c["done_when"]["holds"] is True
    dd = c["default_damping"]
    assert dd["n_candidates"] == 1 and dd["best"]["key"] == "kfac" and dd["holds"] is False
    assert verdicts({"curvature": c})["curvature"]["default_damping"] == "does not hold"


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


# --- the committed numbers: docs/results/eval/curvature-summary.json and the runs it is computed from

EVAL = Path(__file__).resolve().parents[1] / "docs" / "results" / "eval"
SUMMARY = EVAL / "curvature-summary.json"


#: the runs on configurations that chose nothing, in the summary's order
UNSEEN_ORDER = ["maj-c", "maj-d", "maj-e", "maj-f", "att-a", "att-b", "att-c", "att-d"]


def _committed_runs() -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The primary run (task seed 0) of each task and its replicates (other seeds), as the summary reads them."""
    primary: dict[str, Any] = {}
    replicas: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((EVAL / "curvature").glob("*/seed*/results.json"), key=lambda p: (p.parent.parent.name,
                                                                                          int(p.parent.name[4:]))):  # fmt: skip
        r = json.loads(path.read_text())
        name = r["task"]["name"]
        if r["task"]["seed"] == 0:
            primary[name] = r
        else:
            replicas.setdefault(name, []).append(r)
    return primary, replicas


@pytest.mark.skipif(not SUMMARY.exists(), reason="no committed curvature summary")
def test_committed_curvature_verdicts_follow_from_their_numbers() -> None:
    """Every verdict of the committed curvature comparison is re-derived from the committed numbers: each run's
    comparison from its LDS table, its verdict words from the comparison, and the summary (the README's and the
    guide's source) from the runs. Catches a verdict or a summary that no longer matches its numbers (a rule
    changed, a run replaced without re-summarising, a number edited by hand)."""
    primary, replicas = _committed_runs()
    assert set(primary) == {"majority", "count-attention"}, f"primary runs found: {sorted(primary)}"
    for r in [*primary.values(), *(x for xs in replicas.values() for x in xs)]:
        name = f"{r['task']['name']} seed {r['task']['seed']}"
        assert r["lds"]["subsets"] >= 100, f"{name}: only {r['lds']['subsets']} subsets"
        again = compare(r["lds"], r["config"]["n_boot"], r["config"]["seed"])
        assert again is not None
        for key, value in again.items():
            assert r["curvature"][key] == value, f"{name}: curvature.{key} does not follow from lds (rerun the summary)"
        assert r["verdicts"] == verdicts(r), f"{name}: the verdicts do not follow from the numbers"
        best = r["curvature"]["best"]["key"]
        m = r["lds"]["methods"]
        assert all(m[best]["mean"] >= m[k]["mean"] for k in m if m[k]["group"] in ("curvature", "damping sweep",
                                                                                   "fisher"))  # fmt: skip
    committed = json.loads(SUMMARY.read_text())
    others = [json.loads(p.read_text()) for p in sorted((EVAL / "curvature" / "unseen").glob("*/results.json"),
                                                        key=lambda p: UNSEEN_ORDER.index(p.parent.name))]  # fmt: skip
    for r in others:
        again = compare(r["lds"], r["config"]["n_boot"], r["config"]["seed"])
        assert again is not None and r["curvature"] == again, f"unseen {r['task']}: curvature does not follow from lds"
    assert json.loads(json.dumps(summarize(primary, replicas, others))) == committed, (
        "docs/results/eval/curvature-summary.json is not the summary of the committed runs: rerun "
        "`python -m looptrace.apps.evaluation.curvature --summary ...`"
    )
    for task, t in committed["tasks"].items():
        ref = t["references"]
        assert t["done_when"]["holds"] == (t["best"]["mean"] >= ref["tracin"]["mean"] and
                                           t["best"]["mean"] >= ref["kronfluence_ekfac"]["mean"]), task  # fmt: skip


@pytest.mark.skipif(not SUMMARY.exists(), reason="no committed curvature summary")
def test_a_planted_peer_flips_the_committed_verdict() -> None:
    """Raising kronfluence EK-FAC's per-query LDS above the best estimator's in a committed run flips its "Done
    when" to "does not hold": the re-derivation above can fail."""
    primary, _ = _committed_runs()
    r = copy.deepcopy(primary["majority"])
    m = r["lds"]["methods"]
    best = r["curvature"]["best"]["key"]
    for key in ("kronfluence_ekfac", "kronfluence_ekfac_full"):
        m[key]["per_query"] = [x + 1.0 for x in m[best]["per_query"]]
        m[key]["mean"] = m[best]["mean"] + 1.0
    c = compare(r["lds"], 200, 0)
    assert c is not None and c["done_when"]["holds"] is False
    assert verdicts({"curvature": c})["curvature"]["done_when"] == "does not hold"


def test_count_attention_task_is_registered_and_sound(tmp_path: Path) -> None:
    """The attention task: offered by ``looptrace eval --task``, its queries and test inputs distinct and unseen,
    its query labels clean, its training labels flipped at about the set rate, and its curvature methods ``lt.attribute``'s. Catches a query leaking into the training set, a
    label rule that ignores the counts (break: ``>`` -> ``>=`` in clean_labels makes ties label 1), the read-out
    at the first position (which attends to nothing but itself), and a task that cannot be scored."""
    import looptrace.apps.evaluation  # noqa: F401  (registers the task)
    from looptrace.apps.evaluation.task import TASKS

    cls = TASKS["count-attention"]
    task = cls(n_train=64, n_query=8, n_test=40, steps=12, ckpt_every=6, d_model=8)
    d = task.overlap()
    assert d["query_in_train"] == d["test_in_train"] == d["test_in_query"] == 0
    assert d["distinct_query"] == 8 and d["distinct_test"] == 40
    x, y = task.data()["query"]
    assert torch.equal(y, ((x == 0).sum(1) > (x == 1).sum(1)).long())
    ties = task.clean_labels(torch.tensor([[0, 1, 2, 2], [0, 0, 1, 2], [1, 1, 0, 2]]))
    assert ties.tolist() == [0, 1, 0]
    flipped = cls(n_train=2000, n_query=8, n_test=8).noisy_labels().mean()
    assert abs(flipped - 0.1) < 4 * (0.1 * 0.9 / 2000) ** 0.5, f"label noise {flipped:.3f}, set 0.1"
    model = task.train(record=tmp_path / "ck")
    xq = task.data()["query"][0]
    moved = xq.clone()
    moved[:, -1] = (moved[:, -1] + 1) % task.vocab  # only the last position's read-out sees the last token
    assert not torch.allclose(task.logits(model, xq), task.logits(model, moved))
    ctx = ScoreContext(task, tmp_path / "ck")
    got = torch.from_numpy(METHODS["ekfac_last"].scores(ctx))
    m = task.model()
    want = lt.attribute(m, lt.load_checkpoints(tmp_path / "ck")[-1:], ctx.train, ctx.query, task.loss_fn,
                        step_module=task.step_module(m), sketch=lt.SketchSpec.exact(), verify=False,
                        precondition="ekfac").tracin.double()  # fmt: skip
    assert_close(got, want, "ekfac_last on count-attention", rtol=1e-6, atol=1e-9 * float(want.abs().max()))


PARITY = EVAL / "curvature" / "parity-profile.json"


@pytest.mark.skipif(not PARITY.exists(), reason="no committed parity profile")
def test_committed_parity_profile_shapes_follow_from_the_profiles() -> None:
    """The parity profile's comparison fields (correlation with the plain profile, step of largest magnitude,
    sign agreement, up to the read-out) are re-derived from the committed profiles. Catches a field computed
    over every step instead of those up to the read-out, or a summary not updated after a rerun."""
    r = json.loads(PARITY.read_text())
    readout = r["readout"]
    plain = np.asarray(r["profiles"]["plain"]["profile"])[:readout]
    for name, p in r["profiles"].items():
        q = np.asarray(p["profile"])[:readout]
        assert len(p["profile"]) == r["tau"] > readout
        assert p["correlation_with_plain"] == pytest.approx(float(np.corrcoef(q, plain)[0, 1]), abs=1e-12), name
        assert p["peak_step"] == int(np.argmax(np.abs(q)) + 1), name
        assert p["sign_agreement_with_plain"] == pytest.approx(float(np.mean(np.sign(q) == np.sign(plain)))), name
    curv = [k for k in r["profiles"] if k != "plain"]
    assert r["min_correlation_with_plain"] == min(r["profiles"][k]["correlation_with_plain"] for k in curv)
    assert r["same_peak_as_plain"] == {k: r["profiles"][k]["peak_step"] == r["profiles"]["plain"]["peak_step"]
                                       for k in curv}  # fmt: skip
    assert r["peak_word"] == peak_word(r["same_peak_as_plain"])
    if r["plain_vs_parity_study"] is not None:  # the full sample: the plain profile is the parity study's
        assert r["plain_vs_parity_study"]["relative_difference"] < 1e-4


def test_whole_model_comparison_reads_its_numbers() -> None:
    """The whole-model section: the best of the ``outside=True`` estimators and each default, against plain TracIn,
    TracIn of the whole model and kronfluence EK-FAC. Catches: a flag computed against the wrong reference, the body's
    estimators let into the whole-model candidates, a tie not counted as reaching."""
    from looptrace.apps.evaluation.curvature import whole_model

    def m(mean: float) -> dict[str, Any]:
        return {"label": "x", "mean": mean, "lo": mean, "hi": mean, "first_half": mean, "second_half": mean,
                "per_query": [mean, mean]}  # fmt: skip

    methods = {"tracin": m(0.10), "tracin_whole": m(0.16), "kronfluence_ekfac": m(0.20), "gauss_newton": m(0.5),
               "gauss_newton_whole": m(0.20), "kfac_whole": m(0.15), "ekfac_whole": m(0.19)}  # fmt: skip
    out = whole_model(methods, "kronfluence_ekfac", n_boot=10)
    assert out is not None and out["best"]["key"] == "gauss_newton_whole", "a body-only estimator was a candidate"
    assert out["best"]["holds"] is True and out["best"]["ge_tracin_whole"] is True  # a tie with the peer reaches it
    kfac = out["defaults"]["kfac"]  # 0.15: above plain TracIn (0.10), below TracIn of the whole model (0.16)
    assert kfac["ge_tracin"] is True and kfac["ge_tracin_whole"] is False and kfac["holds"] is False
    assert out["defaults"]["ekfac"]["ge_kronfluence_ekfac"] is False
    assert whole_model({"tracin": m(0.1)}, None) is None


def test_whole_model_replication_counts_every_seed() -> None:
    """The whole-model estimator chosen on the primary run, scored on the other seeds: ``holds`` there is its own
    LDS against that seed's TracIn and kronfluence EK-FAC (not that seed's own best), and a replicate that lacks the
    whole-model estimators makes the every-seed verdict unknown instead of dropping the seed. Catches: ``holds`` read
    off the replicate's own best, a missing replicate shrinking the count to the seeds that agree."""
    from looptrace.apps.evaluation.curvature import compare, replicate_whole, summarize

    def run(seed: int, means: dict[str, float]) -> dict[str, Any]:
        methods = {k: {"label": k, "group": "", "mean": v, "lo": v, "hi": v, "first_half": v, "second_half": v,
                       "per_query": [v, v], "second_half_per_query": [v, v]} for k, v in means.items()}  # fmt: skip
        lds = {"methods": methods, "subsets": 4, "queries": 2}
        return {"task": {"seed": seed, "name": "t", "description": "d"}, "lds": lds, "curvature": compare(lds, 10),
                "train_seconds": 0.0, "seconds": 0.0, "verdicts": {}}  # fmt: skip

    base = {"tracin": 0.1, "kronfluence_ekfac": 0.2, "gauss_newton": 0.15}
    primary = run(0, {**base, "gauss_newton_whole": 0.3, "kfac_whole": 0.25})
    other = run(1, {**base, "gauss_newton_whole": 0.18, "kfac_whole": 0.25})
    row = replicate_whole(primary, other)
    assert row is not None and row["key"] == "gauss_newton_whole" and row["own_best"] == "kfac_whole"
    assert row["holds"] is False, "holds must be the primary's choice on this seed (0.18 < the peer's 0.2)"
    s = summarize({"t": primary}, {"t": [other]})["tasks"]["t"]["whole_model_replication"]
    assert s["holds_seeds"] == 1 and s["n_seeds"] == 2 and s["holds_every_seed"] is False
    bare = run(2, base)  # a replicate run before the whole-model estimators existed
    s = summarize({"t": primary}, {"t": [bare]})["tasks"]["t"]["whole_model_replication"]
    assert s["n_seeds"] == 2 and s["holds_every_seed"] is None


@pytest.mark.skipif(not SUMMARY.exists(), reason="no committed curvature summary")
def test_pooled_comparison_reads_every_seed() -> None:
    """The pooled comparison over task seeds concatenates every run's per-query LDS: its queries are the runs'
    together, its means are those of the concatenation, and raising kronfluence EK-FAC's per-query LDS in one
    replicate alone lowers every estimator's pooled paired difference by that amount over the pooled queries.
    Catches a pool that reads the primary run only, or mixes the peer's two losses across runs."""
    primary, replicas = _committed_runs()
    runs = [primary["count-attention"], *replicas["count-attention"]]
    p = pooled(runs)
    assert p is not None and p["queries"] == sum(r["lds"]["queries"] for r in runs)
    tr = np.concatenate([r["lds"]["methods"]["tracin"]["per_query"] for r in runs])
    assert p["tracin"]["mean"] == pytest.approx(float(tr.mean()), abs=1e-12)
    keys = [r["curvature"]["references"]["kronfluence_ekfac"]["key"] for r in runs]
    assert p["kronfluence_ekfac"]["keys"] == keys
    # plant in a run whose peer key differs from the first run's: a pool that took one key for every run misses it
    j = next((i for i, k in enumerate(keys) if k != keys[0]), len(keys) - 1)
    planted = copy.deepcopy(runs)
    m = planted[j]["lds"]["methods"][keys[j]]
    m["per_query"] = [x + 1.0 for x in m["per_query"]]
    q = pooled(planted)
    assert q is not None
    shift = planted[j]["lds"]["queries"] / p["queries"]
    for name, row in p["estimators"].items():
        got = q["estimators"][name]["paired"]["kronfluence_ekfac"]["mean"]
        assert got == pytest.approx(row["paired"]["kronfluence_ekfac"]["mean"] - shift, abs=1e-9), name


def test_unseen_configurations_compare_mean_of_means() -> None:
    """The unseen-configuration section: each default's mean over the runs of its per-run mean LDS against the same
    mean of kronfluence EK-FAC's (the better of its two losses per run); a peer raised above every estimator in
    every run flips every verdict. Catches a comparison against the peer of one run only, or a mean over queries
    that weights runs unequally."""
    from looptrace.apps.evaluation.curvature import unseen

    runs = [json.loads((EVAL / "curvature" / "unseen" / n / "results.json").read_text()) for n in UNSEEN_ORDER
            if (EVAL / "curvature" / "unseen" / n / "results.json").exists()]  # fmt: skip
    if not runs:
        pytest.skip("no committed unseen-configuration runs")
    u = unseen(runs)
    assert u is not None and u["n_runs"] == len(runs)
    want = np.mean([r["lds"]["methods"]["gauss_newton"]["mean"] for r in runs])
    assert u["mean"]["gauss-newton"] == pytest.approx(want, abs=1e-12)
    # runs of unequal size still count once each: the mean of the runs' means, not of their pooled queries
    uneven = copy.deepcopy(runs)
    row = uneven[0]["lds"]["methods"]["gauss_newton"]
    row["per_query"], row["mean"] = row["per_query"][:10], float(np.mean(row["per_query"][:10]))
    uneven[0]["lds"]["queries"] = 10
    w = unseen(uneven)
    assert w is not None
    assert w["mean"]["gauss-newton"] == pytest.approx(np.mean([r["lds"]["methods"]["gauss_newton"]["mean"]
                                                               for r in uneven]), abs=1e-12)  # fmt: skip
    peer = np.mean([r["curvature"]["references"]["kronfluence_ekfac"]["mean"] for r in runs])
    assert u["kronfluence_ekfac_mean"] == pytest.approx(peer, abs=1e-12)
    planted = copy.deepcopy(runs)
    for r in planted:
        r["curvature"]["references"]["kronfluence_ekfac"]["mean"] += 1.0
    v = unseen(planted)
    assert v is not None and not any(v["ge_kronfluence_ekfac"].values())
    assert not any(v["runs_ge_kronfluence_ekfac"].values())

"""The applications' analyses (``looptrace.analysis.applications``) on planted answers and against
brute-force twins, the sampled-depth task, and the statistics behind docs/results/applications."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import looptrace as lt
from looptrace.analysis import applications as app
from looptrace.evaluation import spearman


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is ~100x faster than two threads fighting over a loaded 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _brute_stable(pred: np.ndarray, k: int) -> np.ndarray:
    """The definition, one query and one step at a time."""
    t_max, m = pred.shape[:2]
    out = np.full(m, t_max)
    for j in range(m):
        for t in range(k + 1, t_max + 1):  # 1-based step t and the k steps before it
            window = pred[t - k - 1 : t, j].reshape(k + 1, -1)
            if (window == window[0]).all():
                out[j] = t
                break
    return out


def _brute_needed(score: np.ndarray, budgets: list[int]) -> np.ndarray:
    out = []
    for j in range(score.shape[1]):
        final = score[-1, j]
        if final <= 0:
            out.append(0)
            continue
        out.append(next(b for i, b in enumerate(budgets) if (score[i:, j] >= final).all()))
    return np.array(out)


def test_per_query_horizons_equal_the_one_curve_function_row_by_row() -> None:
    """The vectorised horizon is :func:`influence_horizon` applied to each row (random curves, several fractions),
    and a planted decay gives the known step. Catches an off-by-one in the reversed argmax (a horizon one step
    early or late) or a peak taken over the whole array instead of each row."""
    rng = np.random.default_rng(0)
    e = rng.gamma(1.0, size=(50, 12)) * rng.uniform(0.01, 100, size=(50, 1))
    e[3] = 0.0
    for frac in (0.9, 0.3, 0.05):
        want = np.array([app.influence_horizon(row, frac) for row in e])
        np.testing.assert_array_equal(app.influence_horizons(e, frac), want, err_msg=f"frac={frac}")
    planted = np.array([[1, 5, 10, 8, 4, 2, 0.2, 0.1, 0.05, 0.01]])
    assert app.influence_horizons(planted, 0.05)[0] == 6 and app.influence_horizons(planted, 0.5)[0] == 4


def test_cumulative_horizon_is_where_the_running_sum_reaches_the_share() -> None:
    """Planted: equal energy at four steps reaches half at step 2 and all of it at step 4; energy only at the first
    step reaches any share at step 1; no energy gives 0. Catches a cumulative sum read one step late."""
    e = np.array([[1.0, 1, 1, 1], [3.0, 0, 0, 0], [0.0, 0, 0, 0]])
    np.testing.assert_array_equal(app.cumulative_horizons(e, 0.5), [2, 1, 0])
    np.testing.assert_array_equal(app.cumulative_horizons(e, 1.0), [4, 1, 0])
    np.testing.assert_array_equal(app.cumulative_horizons(e, 0.51), [3, 1, 0])
    with pytest.raises(lt.ConfigError, match="share"):
        app.cumulative_horizons(e, 0.0)


def test_needed_budget_is_where_the_answer_becomes_right_and_stays_right() -> None:
    """Bool and fractional outcomes against the definition checked budget by budget, and planted cases: right from
    the second budget on, right early but wrong later (needs the last), never right. Catches "first right"
    instead of "right from here on" (the early-right, later-wrong query)."""
    budgets = [1, 2, 4, 8]
    right = np.array([[0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], bool).T  # [B, M]
    np.testing.assert_array_equal(app.needed_budgets(right, budgets), [2, 8, 0, 0])
    rng = np.random.default_rng(1)
    for score in (rng.random((9, 40)) < 0.6, rng.integers(0, 5, size=(9, 40)) / 4):
        b = list(range(1, 10))
        np.testing.assert_array_equal(app.needed_budgets(score, b), _brute_needed(score.astype(float), b))
    with pytest.raises(lt.ConfigError, match="increase"):
        app.needed_budgets(right, [1, 4, 2, 8])


def test_stable_prediction_rule_equals_its_definition() -> None:
    """Against the brute-force definition on random predictions with several cells per query, for k = 1..3.
    Catches a run counter that is not reset when a prediction changes, or a stop one step early."""
    rng = np.random.default_rng(2)
    pred = rng.integers(0, 2, size=(10, 30, 3))
    pred[4:, :10] = pred[4, :10]  # some queries settle
    for k in (1, 2, 3):
        np.testing.assert_array_equal(app.stop_when_stable(pred, k), _brute_stable(pred, k), err_msg=f"k={k}")
    np.testing.assert_array_equal(app.stop_when_stable(np.array([[0, 1], [1, 1], [1, 0]]), 1), [3, 2])


def test_confidence_rule_outcomes_and_saturation_on_planted_values() -> None:
    """Planted: the first step at or above the threshold (the last step when never); the outcome read at the stop;
    the smallest budget within tol of the best. Catches a 0-based stop and a saturation at the maximum instead of
    the first budget close to it."""
    conf = np.array([[0.5, 0.95], [0.8, 0.99], [0.85, 0.2]])
    np.testing.assert_array_equal(app.stop_when_confident(conf, 0.8), [2, 1])
    np.testing.assert_array_equal(app.stop_when_confident(conf, 0.999), [3, 3])
    score = np.array([[0, 1], [1, 1], [1, 0]])
    np.testing.assert_array_equal(app.outcome_at_stop(score, np.array([2, 3])), [1, 0])
    assert app.saturation_budget([1, 2, 4, 8], [0.5, 0.898, 0.9, 0.899], tol=0.005) == 2
    assert app.saturation_budget([1, 2, 4, 8], [0.5, 0.8, 0.9, 0.899], tol=0.005) == 4


def test_cancellation_measures_on_planted_pairs() -> None:
    """Opposite large steps with a tiny sum cancel; one sign does not; noise around zero beside one large step is
    not "opposite" (the floor). Catches a cancelled mass with the wrong sign, or opposite signs counted in noise."""
    v = np.array([[5.0, -5.0, 3.0, -2.9], [1.0, 2.0, 0.5, 0.1], [4.0, -1e-4, 1e-4, 0.0]])
    c = app.step_cancellation(v, ratio=0.1, floor=0.1)
    assert c["cancels"].tolist() == [True, False, False]
    assert c["opposite"].tolist() == [True, False, False]
    np.testing.assert_allclose(app.cancelled_mass(v[None]), [[15.8, 0.0, 2e-4]], atol=1e-9)
    assert c["score"][0] > 0.99 and c["score"][1] == 0.0


def test_cancelling_examples_and_their_control() -> None:
    """Planted: examples 0-2 cancel at every query (large opposite steps, small sum); the control has as much
    |TracIn| as each of them, picked among examples that cancel no more than the median, none of them reused.
    Catches a control drawn from the cancelling set, or matched on the wrong quantity."""
    rng = np.random.default_rng(3)
    n, m, tau = 30, 5, 6
    sdi = np.abs(rng.normal(size=(n, m, tau))) * rng.uniform(0.1, 2, size=(n, 1, 1))  # one sign: no cancellation
    for i in range(3):
        sdi[i, :, :3] = 10.0
        sdi[i, :, 3:] = -10.0 + 0.01 * (i + 1)
    sets = app.cancelling_examples(sdi, 3)
    assert sorted(sets["cancelling"].tolist()) == [0, 1, 2]
    ctrl = sets["control"]
    assert len(set(ctrl.tolist())) == 3 and not set(ctrl.tolist()) & {0, 1, 2}
    assert (sets["ratio"][ctrl] <= np.median(sets["ratio"])).all()
    others = np.setdiff1d(np.arange(n), [0, 1, 2])
    best = others[
        np.argmin(np.abs(np.log(sets["abs_tracin"][others]) - np.log(sets["abs_tracin"][sets["cancelling"][0]])))
    ]
    assert ctrl[0] == best, "the first control is the closest in |TracIn| to the strongest canceller"
    with pytest.raises(lt.ConfigError, match="k must"):
        app.cancelling_examples(sdi, 20)


def test_integer_spearman_equals_the_general_one() -> None:
    """The vectorised rank correlation of the bootstrap equals :func:`looptrace.evaluation.spearman` on small
    integers with many ties, row by row; constant rows give 0. Catches ties ranked by position instead of
    averaged."""
    from looptrace.apps.evaluation.applications.horizon import int_spearman

    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 5, size=(20, 60)), rng.integers(0, 13, size=(20, 60))
    y[3] = 7
    want = np.array([float(spearman(a, b)) for a, b in zip(x, y, strict=True)])
    np.testing.assert_allclose(int_spearman(x, y), want, atol=1e-12)
    assert int_spearman(x[3], y[3]) == 0.0


def test_two_level_bootstrap_covers_a_known_mean_and_pairs_its_draws() -> None:
    """Seeds whose query means differ: the interval of the mean over seeds covers the population mean at about its
    level (400 repetitions, tolerance from the binomial sd), and two statistics drawn through one instance share
    their replicates (a constant shift has a zero-width paired interval). Catches draws that ignore the seed level
    (too narrow: coverage collapses) or unpaired draws."""
    from looptrace.apps.evaluation.applications.stats import TwoLevel, interval

    rng = np.random.default_rng(5)
    hits, reps_n = 0, 400
    for _ in range(reps_n):
        seed_means = rng.normal(0.0, 1.0, size=6)  # between-seed spread dominates
        values = [rng.normal(mu, 0.5, size=30) for mu in seed_means]
        boot = TwoLevel([30] * 6, n_boot=300, seed=int(rng.integers(1 << 30)))
        ci = interval(float(np.mean([v.mean() for v in values])), boot.mean_replicates(values))
        hits += ci["lo"] <= 0.0 <= ci["hi"]
    sd = np.sqrt(0.95 * 0.05 / reps_n)
    assert 0.95 - 5 * sd - 0.05 <= hits / reps_n <= 0.95 + 5 * sd, f"coverage {hits / reps_n:.3f} of a 95% interval"
    boot = TwoLevel([10, 12], n_boot=100, seed=0)
    a = [rng.random(10), rng.random(12)]
    diff = boot.mean_replicates([x + 1.0 for x in a]) - boot.mean_replicates(a)
    np.testing.assert_allclose(diff, 1.0, atol=1e-12)


def _planted_runs(tracks: bool, seeds: int = 3, m: int = 80, steps: int = 8):
    """Runs whose queries need 1..steps loops; the energy dies at the needed budget when ``tracks``, at a random
    step otherwise."""
    from looptrace.apps.evaluation.applications.horizon import QueryRun

    rng = np.random.default_rng(6)
    runs = []
    for _ in range(seeds):
        need = rng.integers(1, steps + 1, size=m)
        t = np.arange(1, steps + 1)[:, None]
        right = (t >= need).astype(float)  # [T, M]
        pred = right.astype(int)
        die = need if tracks else rng.integers(1, steps + 1, size=m)
        energy = np.where(np.arange(1, steps + 1)[None] <= die[:, None], 1.0, 1e-3)
        conf = np.full((steps, m), 0.5)
        acc = {str(b): float(right[b - 1].mean()) for b in range(1, steps + 1)}
        runs.append(QueryRun(right, pred, conf, {"label": energy, "pseudo": energy}, acc))
    return runs


def test_the_horizon_analysis_finds_a_planted_rule_and_rejects_a_random_one() -> None:
    """When each query's energy dies exactly where it becomes right, the horizon's rank correlation with the needed
    budget is 1, the rule reaches the best accuracy with the oracle's loops (far fewer than a fixed budget), and
    the verdict is "works"; with energy dying at random steps the correlation is near zero and the verdict is "does
    not work". Catches a rule evaluated at the wrong step, or a verdict that ignores the numbers."""
    from looptrace.apps.evaluation.applications.horizon import HorizonConfig, analyze
    from looptrace.apps.evaluation.applications.verdicts import verdicts

    cfg = HorizonConfig(fracs=(0.5,), shares=(0.99,), stable_ks=(1,), confidences=(0.9,), default_frac=0.5,
                        default_share=0.99, default_k=1, n_boot=200)  # fmt: skip
    good = analyze(_planted_runs(True), cfg)
    assert good["rank_correlation"]["peak_pseudo"]["mean"] == pytest.approx(1.0)
    peak = good["families"]["horizon_peak"]["points"][0]
    oracle = good["families"]["oracle"]["points"][0]
    assert peak["accuracy"]["mean"] == pytest.approx(1.0) and peak["loops"]["mean"] == pytest.approx(
        oracle["loops"]["mean"]
    )
    assert good["loops_saved"]["fixed-horizon_peak"]["lo"] > 1.0
    v = verdicts({"horizon": {"planted": good}})["horizon"]
    assert v["tasks"]["planted"]["verdict"] == "works" and v["tasks"]["planted"]["rank_pseudo"] == "tracks"
    bad = analyze(_planted_runs(False), cfg)
    assert abs(bad["rank_correlation"]["peak_pseudo"]["mean"]) < 0.2
    assert bad["families"]["horizon_peak"]["points"][0]["accuracy"]["mean"] < 0.8
    assert verdicts({"horizon": {"planted": bad}})["horizon"]["verdict"] == "does not work"


def _tiny_depth_task(**kw):
    from looptrace.apps.evaluation.sampled_depth import SampledDepthMajorityTask

    base = dict(bits=9, n_train=40, n_query=6, n_test=50, loops=4, steps=8, ckpt_every=4, depth_mean=2.0,
                budgets=(1, 2, 3, 4), d_model=8)  # fmt: skip
    return SampledDepthMajorityTask(**{**base, **kw})


def test_the_sampled_depth_task_replays_its_depths_and_is_registered() -> None:
    """The depth of every training step is a pure function of (seed, step) inside [1, loops] and varies; two trainings
    give the same weights; continuing a run from step s draws the depths of steps s, s+1, ...; the task is offered by
    `looptrace eval`'s registry; bad settings are refused. Catches a depth drawn from a global RNG (runs that do not
    replay) or a continuation that restarts the depth sequence."""
    import torch

    from looptrace.apps.evaluation.task import TASKS

    task = _tiny_depth_task()
    assert TASKS["majority-depth"] is type(task)
    depths = task.sampler().samples(range(50))
    assert depths.min() >= 1 and depths.max() <= task.loops and len(set(depths.tolist())) > 1
    np.testing.assert_array_equal(depths, _tiny_depth_task().sampler().samples(range(50)))
    a, b = task.train(), task.train()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"two trainings differ in {name}"
    seen: list[int] = []
    original = task.sampler

    class Spy:
        def sample(self, s: int) -> int:
            seen.append(s)
            return original().sample(s)

    object.__setattr__(task, "sampler", lambda: Spy())
    task.train_from(task.model(), steps=3, first_step=task.steps)
    assert seen == [task.steps, task.steps + 1, task.steps + 2]
    with pytest.raises(lt.ConfigError, match="depth_mean"):
        _tiny_depth_task(depth_mean=9.0)


def test_the_pair_counterfactual_measures_what_sdi_predicts_and_fails_on_reversed_steps() -> None:
    """With a learning rate small enough for first order (1e-5), the measured per-step loss changes of every
    (train, query) pair, summed over checkpoints, equal the exact full-BPTT SDI to 1e-3 relative error, and the
    update applied at every step equals TracIn; the same measurement against SDI with its steps reversed errs by
    more than 10 %. Catches an update applied at the wrong step, eta not read from the checkpoint, or the tied
    update left in the model afterwards."""
    import tempfile
    from pathlib import Path

    from looptrace.apps.evaluation.applications.cancellation import pair_counterfactual
    from looptrace.apps.evaluation.applications.collect import full_attribution

    task = _tiny_depth_task(lr=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        task.train(record=Path(tmp))
        data = task.data()
        sdi = full_attribution(task, Path(tmp), data["query"])  # [N, M, T]
        pairs = [(i, j) for i in (0, 5, 11) for j in range(task.n_query)]
        measured = pair_counterfactual(task, Path(tmp), pairs)
        again = pair_counterfactual(task, Path(tmp), pairs[:2])
    predicted = np.stack([sdi[i, j] for i, j in pairs])
    err = np.linalg.norm(measured["steps"] - predicted) / np.linalg.norm(predicted)
    assert err < 1e-3, (
        f"per-step counterfactual vs SDI: relative error {err:.2e} (norms {np.linalg.norm(predicted):.3e})"
    )
    tied = np.linalg.norm(measured["all"] - predicted.sum(-1)) / np.linalg.norm(predicted.sum(-1))
    assert tied < 1e-3, f"all-step update vs TracIn: relative error {tied:.2e}"
    rev = np.linalg.norm(measured["steps"] - predicted[:, ::-1]) / np.linalg.norm(predicted)
    assert rev > 0.1, f"reversed steps agree too ({rev:.2e}): the measurement cannot tell steps apart"
    np.testing.assert_allclose(again["steps"], measured["steps"][:2], rtol=1e-10, atol=1e-18)


def test_the_applications_command_runs_end_to_end(tmp_path) -> None:
    """`looptrace eval applications --smoke`: the sampled-depth task trained over two seeds, the horizon rules, the
    pair counterfactual, the removals and the curation wired together; every section of results.json filled, its
    verdicts derived from its numbers, the figures and report written. Catches a section dropped from the run or a
    verdict computed before its numbers."""
    import json

    pytest.importorskip("matplotlib")
    from looptrace.apps.evaluation.applications.verdicts import verdicts
    from looptrace.cli import main

    assert main(["eval", "applications", "--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("horizon", "cancellation", "curation", "verdicts", "config", "machine", "seconds"):
        assert key in res, f"results.json lost its {key!r} section (keys: {sorted(res)})"
    h = res["horizon"]["majority-depth"]
    assert h["seeds"] == 2 and set(h["families"]) >= {"fixed", "horizon_peak", "stable", "confident", "oracle"}
    assert -1.0 <= h["rank_correlation"]["peak_pseudo"]["mean"] <= 1.0
    assert res["verdicts"] == verdicts(res)
    for fig in ("fig_horizon_majority-depth.png", "fig_cancellation_pairs.png", "fig_add_back.png", "report.html"):
        assert (tmp_path / fig).exists(), f"{fig} was not written"


_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "applications"


@pytest.mark.skipif(not (_RESULTS / "results.json").exists(), reason="no committed applications run")
def test_the_committed_application_verdicts_follow_from_their_numbers() -> None:
    """Every verdict of docs/results/applications (fields of results.json, quoted by the README through
    placeholders) is what :func:`verdicts` derives from the committed numbers, and planting a rank correlation
    whose interval lies at 1 or a flag the counterfactual always confirms changes the words. Catches a verdict left
    behind when the numbers changed, or a template that writes a verdict itself."""
    import json

    from looptrace.apps.evaluation.applications.verdicts import verdicts

    r = json.loads((_RESULTS / "results.json").read_text())
    assert r["verdicts"] == verdicts(r), "results.json's verdicts do not follow from its numbers: rerun the command"
    planted = json.loads(json.dumps(r))
    for h in planted["horizon"].values():
        h["rank_correlation"]["peak_pseudo"].update(mean=1.0, lo=1.0, hi=1.0)
    assert verdicts(planted)["horizon"]["tasks"]["majority-depth"]["rank_pseudo"] == "tracks"
    fl = planted["cancellation"]["summary"]["pairs"]["flagged"]
    fl["cancels"].update(mean=1.0, lo=1.0, hi=1.0)
    assert verdicts(planted)["cancellation"]["flag"] == "right"
    fl["cancels"].update(mean=0.1, lo=0.0, hi=0.2)
    assert verdicts(planted)["cancellation"]["flag"] == "mostly wrong"
    template = (_RESULTS / "README.template.md").read_text()
    for word in ("does not work", "works only", "tracks the", "mostly right", "mostly wrong", "not distinguishable"):
        assert word not in template, f"the template writes the verdict {word!r} itself; quote it from verdicts"

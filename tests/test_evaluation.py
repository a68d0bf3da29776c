"""Counterfactual metrics on planted answers, the step counterfactual where first order is exact, and the
Adam-preconditioned inner product against its exact definition."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import looptrace as lt
from looptrace.evaluation import bootstrap_ci, lds, rank, removal_effect, spearman, step_counterfactual
from tests.conftest import assert_close, lm_loss, oracle_per_step, per_example_grads, tiny_batches, tiny_model


def test_spearman_ties_and_constants() -> None:
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1, 1, 1, 1]), np.array([1, 2, 3, 4])) == 0.0, "a constant side has no ranking: 0, not NaN"


def test_ties_share_their_average_rank() -> None:
    """Catches ordinal ranks (argsort order) in place of average ranks: on these data the two differ, and
    Spearman's correlation with ties is Pearson's on average ranks (scipy.stats.spearmanr's definition)."""
    stats = pytest.importorskip("scipy.stats")
    x = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 2.0, 4.0, 1.0])
    y = np.array([1.0, 2.0, 7.0, 3.0, 5.0, 4.0, 4.0, 0.0])
    assert np.array_equal(rank(x), stats.rankdata(x)), f"average ranks: {rank(x)} vs {stats.rankdata(x)}"
    ordinal = stats.rankdata(x, method="ordinal")
    assert not np.array_equal(ordinal, stats.rankdata(x)), "the data must separate average from ordinal ranks"
    want = stats.spearmanr(x, y).statistic
    assert abs(float(np.corrcoef(ordinal, stats.rankdata(y))[0, 1]) - want) > 0.01, "the data must tell them apart"
    assert float(spearman(x, y)) == pytest.approx(want, abs=1e-12)
    both = np.stack([x, y[::-1]], axis=1)  # along an axis: each column on its own
    assert np.allclose(spearman(both, np.stack([y, x], axis=1)), [want, stats.spearmanr(y[::-1], x).statistic])


def test_lds_correlates_over_subsets_for_each_query() -> None:
    """outcomes = the subsets' predicted effect + noise, with M != S: each query's LDS is Spearman's correlation
    over the S subsets (checked against scipy one query at a time), an array of M values. Catches a correlation
    along the wrong axis (over queries: S values, or wrong ones), and masks or scores transposed."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    n, m, s = 50, 7, 30
    true = rng.normal(size=(n, m)) * rng.uniform(0.2, 3.0, size=m)  # queries on different scales
    masks = rng.random((s, n)) < 0.5
    outcomes = masks @ true + rng.normal(size=(s, m)) * np.linspace(0.5, 8.0, m)  # noisier for later queries
    got = lds(true, masks, outcomes)
    assert got.shape == (m,), f"one LDS per query: shape {got.shape}, expected ({m},)"
    predicted = masks.astype(float) @ true
    want = np.array([stats.spearmanr(predicted[:, j], outcomes[:, j]).statistic for j in range(m)])
    assert np.allclose(got, want, atol=1e-12), f"LDS {got} vs per-query Spearman over subsets {want}"
    assert got.max() - got.min() > 0.2, "the noise levels differ by query, so must the LDS"


def test_lds_on_a_planted_linear_datamodel() -> None:
    """Outcomes that are exactly linear in the kept examples' true effects: the true scores get LDS 1,
    random scores about 0, negated scores -1."""
    rng = np.random.default_rng(0)
    n, m, s = 60, 7, 80
    true = rng.normal(size=(n, m))
    masks = rng.random((s, n)) < 0.5
    outcomes = masks @ true
    assert np.allclose(lds(true, masks, outcomes), 1.0)
    assert np.allclose(lds(-true, masks, outcomes), -1.0)
    noise = lds(rng.normal(size=(n, m)), masks, outcomes)
    assert abs(float(noise.mean())) < 3 / np.sqrt(s * m), f"random scores must give LDS ~ 0, got {noise.mean():.3f}"
    flat = lds(true, masks, np.ones((s, m)))
    assert np.all(flat == 0.0), "a constant outcome has no ranking: 0, not NaN"


@pytest.mark.parametrize(
    ("scores", "masks", "outcomes", "words"),
    [
        (np.zeros((5, 2)), np.zeros((4, 6), bool), np.zeros((4, 2)), r"masks must be \[S subsets, N train\]"),
        (np.zeros((5, 2)), np.zeros((4, 5), bool), np.zeros((4, 3)), r"outcomes must be \[S subsets, M queries\]"),
        (np.zeros(5), np.zeros((4, 5), bool), np.zeros((4, 2)), r"scores must be \[N train, M queries\]"),
        (np.zeros((5, 2)), np.full((4, 5), 0.5), np.zeros((4, 2)), "boolean"),
    ],
)
def test_lds_refuses_shape_mismatches(scores, masks, outcomes, words) -> None:
    with pytest.raises(lt.ConfigError, match=words):
        lds(scores, masks, outcomes)


def test_bootstrap_interval_covers_a_known_mean() -> None:
    """Over many samples from a distribution with a known mean, the 95% interval covers it about 95% of the
    time (percentile bootstrap at n = 40 runs slightly under). Catches an interval of the data instead of
    the mean (always covers: too wide), one that ignores the sample (never), or a wrong level. The number
    of repetitions makes the binomial standard error of the coverage 0.01."""
    rng = np.random.default_rng(1)
    reps, n, mean = 500, 40, 0.3
    covered = 0
    widths = []
    for r in range(reps):
        sample = rng.gamma(2.0, mean / 2.0, size=n)  # skewed, mean 0.3
        ci = bootstrap_ci(sample, n_boot=1000, seed=r)
        covered += ci["lo"] <= mean <= ci["hi"]
        widths.append(ci["hi"] - ci["lo"])
        assert ci["n"] == n and ci["mean"] == pytest.approx(sample.mean())
    coverage = covered / reps
    assert 0.90 <= coverage <= 0.98, f"95% bootstrap interval covered the true mean {coverage:.1%} of the time"
    se = mean / np.sqrt(2.0) / np.sqrt(n)  # gamma(2, theta): sd = sqrt(2) theta = mean / sqrt(2)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * se, rel=0.15), "the width of a 95% interval is ~ 3.9 SE"
    nan = bootstrap_ci([np.nan, 1.0, 2.0, 3.0])
    assert nan["n"] == 3 and nan["mean"] == pytest.approx(2.0), "non-finite values are dropped, not averaged"


def test_removal_effect() -> None:
    eff = removal_effect([1.0, 2.0, 0.0], [1.5, 2.5, 1.0])
    assert eff["mean_loss_increase"] == pytest.approx(2.0 / 3.0)
    assert eff["se"] == pytest.approx(np.std([0.5, 0.5, 1.0], ddof=1) / np.sqrt(3))


class InjectOnly(nn.Module):
    """h_t = h_{t-1} + W e: the query loss is linear in W (first order is exact)."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.w = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + self.w(e)


class LinearLoop(nn.Module):
    def __init__(self, core: nn.Module, loops: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(4, 5)
        self.core = core
        self.readout = nn.Linear(5, 1)
        self.loops = loops
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        h = torch.zeros_like(e)
        for _ in range(self.loops):
            h = self.core(h, e)
        return self.readout(h).squeeze(-1)


def _linear_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)  # linear in the output, so linear in W


@pytest.mark.parametrize("side", ["test", "train"])
def test_step_counterfactual_is_exact_where_first_order_is(side: str) -> None:
    model = LinearLoop(InjectOnly())
    g = torch.Generator().manual_seed(1)
    train, query = (
        torch.randn(4, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    res = step_counterfactual(model, model.core, _linear_loss, train, query, etas=[1.0, 0.1], side=side)
    assert np.abs(res["predicted"]).max() > 0
    for eta, errs in res["rel_error"].items():
        assert max(errs) < 1e-10, f"{side}: loss linear in the weights, yet actual != eta * SDI_t at eta={eta}: {errs}"
    assert all(r > 0.99 for row in res["spearman"] for r in row)


@pytest.mark.parametrize("side", ["test", "train"])
def test_preconditioned_step_counterfactual_is_exact_where_first_order_is(side: str) -> None:
    """With ``precondition=P^-1`` (a random SPD matrix on the body's flat gradient), the prediction
    ``eta * g . P^-1 phi_t`` must equal the loss change of the preconditioned step when the loss is linear in
    the weights, on both sides, and differ from the plain prediction. Catches a preconditioner applied to the
    prediction but not to the update, or the reverse (break: drop the ``_apply`` lines in step_counterfactual:
    both sides fail)."""
    model = LinearLoop(InjectOnly())
    g = torch.Generator().manual_seed(1)
    train, query = (
        torch.randn(4, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    n = sum(p.numel() for p in model.core.parameters())
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    pinv = a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)  # symmetric positive definite, far from identity

    def pre(x: torch.Tensor) -> torch.Tensor:
        return x.double() @ pinv

    res = step_counterfactual(model, model.core, _linear_loss, train, query, etas=[1.0, 0.1], side=side,
                              precondition=pre)  # fmt: skip
    plain = step_counterfactual(model, model.core, _linear_loss, train, query, etas=[1.0, 0.1], side=side)
    assert np.abs(res["predicted"]).max() > 0
    assert np.abs(res["predicted"] - plain["predicted"]).max() > 0.1 * np.abs(plain["predicted"]).max()
    for eta, errs in res["rel_error"].items():
        assert max(errs) < 1e-10, f"{side}: preconditioned step, linear loss, yet actual != prediction at {eta}: {errs}"


@pytest.mark.parametrize("side", ["test", "train"])
def test_step_counterfactual_error_falls_linearly_in_eta(side: str) -> None:
    """On a nonlinear looped transformer (float64) the error is second order: slope ~ 1 in log-log."""
    model = tiny_model(injection="concat")
    batches = tiny_batches(1, b=2)
    train, query = batches[0], tiny_batches(1, b=2)[0]
    res = step_counterfactual(model, model.core, lm_loss, train, query, etas=[1e-2, 1e-3, 1e-4], side=side)
    for t, slope in enumerate(res["slope"]):
        assert 0.8 < slope < 1.2, (
            f"{side}, step {t + 1}: error ~ eta^{slope:.2f}; a first-order prediction errs as eta^1"
        )
    smallest = res["rel_error"][1e-4]
    assert max(smallest) < 5e-2, f"{side}: relative error at eta=1e-4 should be small, got {smallest}"


def test_untied_step_grads_are_the_per_step_terms_of_autograd_s_gradient() -> None:
    """The train side's update phi_t(z) is computed apart from looptrace's capture: it equals the untied oracle
    step by step and sums to autograd's gradient of the tied body. Catches copies shared between steps
    (every step then gets the sum) or a step dropped."""
    from looptrace.evaluation.counterfactual import untied_step_grads

    model = tiny_model(bptt_k=3)  # the first step gets no gradient: a zero row must stay zero
    batch = tiny_batches(1, b=3)[0]
    got = untied_step_grads(model, model.core, lm_loss, batch)
    names = sorted(dict(model.core.named_parameters()))
    flat = torch.stack([torch.stack([torch.cat([s[n].reshape(-1) for n in names]) for s in ex]) for ex in got])
    assert_close(flat, oracle_per_step(model, model.core, [batch], lm_loss), "per-step copies vs the untied oracle")
    tied = per_example_grads(model, list(model.core.named_parameters()), [batch], lm_loss)
    assert_close(flat.sum(1), tied, "sum over steps vs autograd's gradient of the tied body")
    assert torch.count_nonzero(flat[:, 0]) == 0 and bool((flat[:, 1:].norm(dim=-1) > 0).all())
    assert "forward" not in vars(model.core), "the step module's forward must be restored"


def _corrupt(monkeypatch: pytest.MonkeyPatch, how: str, which: str) -> None:
    """Make lt.featurize return wrong per-step features (what a capture bug would do) for the train batch (its
    first call in the counterfactual) or the query batch (its second)."""
    real = lt.featurize
    g = torch.Generator().manual_seed(0)
    calls = {"n": 0}

    def wrong(*args: Any, **kwargs: Any) -> lt.Features:
        f = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] != {"train": 1, "query": 2}[which]:
            return f
        steps = f.require_steps("corruption")
        if how == "reversed":
            steps = steps.flip(1)
        elif how == "noise":  # noise as large as the features' own entries, a few times over
            steps = steps + 5 * steps.std() * torch.randn(steps.shape, generator=g, dtype=steps.dtype)
        elif how == "other example":  # each row holds the next example's features
            steps = torch.roll(steps, 1, dims=0)
        return dataclasses.replace(f, per_step=steps, _total=None)

    monkeypatch.setattr(lt, "featurize", wrong)


#: (side, which batch's features are wrong, how): on the test side SDI_t = g(z) . phi_t(z'), so reversing the
#: train batch's steps leaves its total (and the score) unchanged and is not a wrong score there.
WRONG = {
    "train": [("train", "reversed"), ("train", "noise"), ("train", "other example")],
    "test": [("train", "noise"), ("train", "other example"), ("query", "reversed"), ("query", "noise"),
             ("query", "other example")],
}  # fmt: skip


@pytest.mark.parametrize("side", ["test", "train"])
def test_the_step_counterfactual_fails_on_wrong_features(monkeypatch, side: str) -> None:
    """The updates come from autograd, not from the features under test: with looptrace's per-step features of
    the train or the query batch reversed, noised or taken from another example the relative error is large,
    while the right features agree to second order. Catches a counterfactual that applies the features' own
    rows as the update (the train side used to: it then agreed with reversed or noised features to 1e-15, by
    Taylor expansion), on either side."""
    model = tiny_model(injection="concat")
    train, query = tiny_batches(1, b=3)[0], tiny_batches(1, b=2)[0]
    good = step_counterfactual(model, model.core, lm_loss, train, query, [1e-4], side=side)["rel_error"][1e-4]
    assert max(good) < 0.05, f"{side}: the right features must agree, {good}"
    for which, how in WRONG[side]:
        with monkeypatch.context() as m:
            _corrupt(m, how, which)
            bad = step_counterfactual(model, model.core, lm_loss, train, query, [1e-4], side=side)["rel_error"][1e-4]
        assert max(bad) > 0.2 and max(bad) > 10 * max(good), (
            f"{side} side, {which} features {how}: relative error {bad} - the counterfactual does not see wrong "
            "features (is the update taken from the features themselves?)"
        )


def adam_dataset(role: str) -> torch.utils.data.TensorDataset:
    """A few examples of the store fixtures' task (``--dataset tests.test_evaluation:adam_dataset``)."""
    from tests.store_fixtures import make_dataset

    x, y = make_dataset(role).tensors
    n = 10 if role == "train" else 4
    return torch.utils.data.TensorDataset(x[:n], y[:n])


def _adam_by_hand(opt: torch.optim.Optimizer, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Adam's diagonal geometry written out from ``optimizer.state``: the update divides by sqrt(v_hat) + eps with
    v_hat = v / (1 - beta2^t), so the inner product g^T P g' has P = 1 / (sqrt(v_hat) + eps) and the features
    carry P^(1/2) = (sqrt(v_hat) + eps)^(-1/2)."""
    (group,) = opt.param_groups
    beta2, eps = group["betas"][1], group["eps"]
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        state = opt.state[params[name]]
        t = int(state["step"])
        v_hat = state["exp_avg_sq"].double() / (1.0 - beta2**t)
        out[name] = 1.0 / torch.sqrt(torch.sqrt(v_hat) + eps)
    return out


def test_adam_preconditioned_scores_equal_adam_s_formula_in_memory_in_a_store_and_from_the_cli(tmp_path) -> None:
    """featurize(precondition=...) in exact mode is P^(1/2) phi_t, and attribute(precondition="adam"), a store filled
    with precondition="adam" and `looptrace featurize --adam` + `looptrace score --kind tracin` all give
    sum_k eta_k g^T P_k g' with P_k from Adam's state at checkpoint k (bias correction, eps and the square roots
    written out above; non-default betas and eps). Catches a wrong formula in adam_preconditioner (a missing bias
    correction or square root, hard-coded defaults), and a store or command line that drops the preconditioner."""
    from looptrace.cli import main
    from looptrace.store import featurize_to_store, score_to_disk
    from tests.store_fixtures import loss_fn, make_model

    model = make_model().double()
    names = sorted(n for n, _ in model.core.named_parameters(prefix="core"))
    train, query = adam_dataset("train"), adam_dataset("query")  # what the command line reads
    x, y = train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-3)
    recorder = lt.CheckpointRecorder(tmp_path / "ck", every=1, body=model.core)
    by_hand = []
    for step in range(3):
        opt.zero_grad()
        loss_fn(model, (x[3 * step : 3 * step + 4], y[3 * step : 3 * step + 4])).mean().backward()
        opt.step()
        recorder.step(model, opt)
        by_hand.append(({k: v.clone() for k, v in model.state_dict().items()}, _adam_by_hand(opt, model, names)))
    checkpoints = lt.load_checkpoints(tmp_path / "ck")
    loaders = [[train.tensors], [query.tensors]]
    probe = make_model().double()
    want = torch.zeros(10, 4, dtype=torch.float64)
    for ck, (state, scale) in zip(checkpoints, by_hand, strict=True):
        full = ck.load_full()
        lt.influence.checkpoints.load_into(probe, full.state, full.name)
        assert all(torch.equal(probe.state_dict()[k], v) for k, v in state.items())
        flat = torch.cat([scale[n].reshape(-1) for n in names])
        if ck is checkpoints[-1]:
            few = [(x[:5], y[:5])]
            phi = oracle_per_step(probe, probe.core, few, loss_fn)  # [N, tau, P]
            feats = lt.featurize(probe, few, loss_fn, step_module=probe.core, sketch=lt.SketchSpec.exact(),
                                 precondition=scale)  # fmt: skip
            assert_close(feats.per_step, phi * flat, "preconditioned exact features vs P^(1/2) phi_t")
        g = per_example_grads(probe, list(probe.core.named_parameters(prefix="core")), loaders[0], loss_fn)
        gq = per_example_grads(probe, list(probe.core.named_parameters(prefix="core")), loaders[1], loss_fn)
        want += full.lr * (g * flat**2) @ gq.T
    res = lt.attribute(model, checkpoints, *loaders, loss_fn, step_module=model.core, sketch=lt.SketchSpec.exact(),
                       precondition="adam")  # fmt: skip
    assert_close(res.tracin, want, "attribute(precondition='adam') vs sum_k eta_k g^T P_k g' from Adam's state")
    assert_close(res.sdi.sum(-1), want, "conservation with the preconditioner, against autograd's gradients")

    fresh = make_model().double()
    store = featurize_to_store(fresh, checkpoints, {"train": train, "query": query}, loss_fn, tmp_path / "store",
                               step_module=fresh.core, sketch=lt.SketchSpec.exact(), batch_size=6, shard_size=8,
                               precondition="adam")  # fmt: skip
    assert store.options["precondition"] == "adam"
    got = torch.from_numpy(np.load(score_to_disk(store, tmp_path / "store_tracin.npy", kind="tracin"))).double()
    assert_close(got, want, "store filled with precondition='adam' vs Adam's formula", rtol=1e-4, atol=1e-7)

    args = ["featurize", "--model", "tests.store_fixtures:make_model", "--loss", "tests.store_fixtures:loss_fn",
            "--dataset", "tests.test_evaluation:adam_dataset", "--step-module", "core", "--checkpoint-dir",
            str(tmp_path / "ck"), "--method", "exact", "--batch-size", "8", "--quiet", "--adam"]  # fmt: skip
    assert main([*args, "--store", str(tmp_path / "cli")]) == 0
    assert (
        main(["score", "--store", str(tmp_path / "cli"), "--out", str(tmp_path / "cli.npy"), "--kind", "tracin"]) == 0
    )
    cli = torch.from_numpy(np.load(tmp_path / "cli.npy")).double()
    assert_close(cli, want, "`looptrace featurize --adam` vs Adam's formula", rtol=1e-4, atol=1e-7)

    no_moments = lt.Checkpoint(model.state_dict(), lr=1.0)
    with pytest.raises(lt.CheckpointError, match="second moments"):
        lt.attribute(model, [no_moments], *loaders, loss_fn, step_module=model.core, precondition="adam")


def test_the_eval_command_runs_end_to_end(tmp_path) -> None:
    """`looptrace eval --smoke`: retraining, LDS, removal, the step counterfactual and the depth curation wired
    together, with every section of results.json filled, its verdicts derived from its numbers, and its report
    written."""
    pytest.importorskip("matplotlib")
    from looptrace.apps.evaluation.verdicts import verdicts
    from looptrace.cli import main

    assert main(["eval", "--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("lds", "removal", "step_counterfactual", "depth_curation", "verdicts", "config", "data"):
        assert key in res, f"results.json lost its {key!r} section (keys: {sorted(res)})"
    scores = [m["mean"] for m in res["lds"]["methods"].values()]
    assert scores and all(-1.0 <= s <= 1.0 for s in scores), f"LDS outside [-1, 1]: {scores}"
    assert res["verdicts"] == verdicts(res)
    assert len(res["depth_curation"]["per_seed"]) == len(res["config"]["depth_seeds"])
    assert (tmp_path / "report.html").exists()


def test_the_evaluation_queries_are_unseen_distinct_inputs() -> None:
    """No query or held-out test input is a training input, none repeats, and the training set cannot cover the
    input space. Catches queries drawn from the training distribution with replacement (the old task: 79 % of
    its 128 inputs were in training, with duplicates)."""
    from looptrace.apps.evaluation.task import MajorityTask, _codes

    for seed in (0, 3):
        task = MajorityTask(seed=seed)
        data = task.data()
        codes = {role: _codes(x) for role, (x, _) in data.items()}
        assert len(set(codes["query"])) == task.n_query and len(set(codes["test"])) == task.n_test
        assert not set(codes["query"]) & set(codes["train"]) and not set(codes["test"]) & set(codes["train"])
        assert not set(codes["query"]) & set(codes["test"])
        assert task.overlap()["query_in_train"] == 0 and task.n_train < 0.25 * task.input_space()
        x, y = data["query"]
        assert torch.equal(y, (x.sum(1) * 2 > task.bits).long()), "queries and test inputs carry clean labels"
        assert 0.05 < task.noisy_labels().mean() < 0.15, "about 10 % of the training labels are flipped"
    with pytest.raises(lt.ConfigError, match="odd"):
        MajorityTask(bits=10)


def test_methods_are_registered_in_one_place() -> None:
    """A new estimator is one decorated function: it joins every table; a clash or an unknown name is refused."""
    from looptrace.apps.evaluation.harness import EvalConfig
    from looptrace.apps.evaluation.methods import METHODS, register_method

    @register_method("_test_constant", "a constant (test)")
    def constant(ctx: Any) -> np.ndarray:
        return np.ones((ctx.task.n_train, ctx.task.n_query))

    try:
        assert METHODS["_test_constant"].scores is constant and "_test_constant" in EvalConfig().method_keys()
        with pytest.raises(lt.ConfigError, match="registered twice"):
            register_method("_test_constant", "again")(constant)
    finally:
        del METHODS["_test_constant"]
    with pytest.raises(lt.ConfigError, match="unknown attribution method"):
        EvalConfig(methods=("tracin", "no_such_method")).method_keys()


ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_evaluation_verdicts_follow_from_its_numbers() -> None:
    """Every verdict word of docs/results/eval (a field of results.json, quoted by the README through placeholders)
    is what :func:`verdicts` derives from the committed numbers. Catches a verdict left behind when the numbers
    changed (e.g. an interval that now includes zero still called "higher than")."""
    from looptrace.apps.evaluation.verdicts import verdicts

    r = json.loads((ROOT / "docs" / "results" / "eval" / "results.json").read_text())
    assert r["verdicts"] == verdicts(r), "results.json's verdicts do not follow from its numbers: rerun looptrace eval"
    planted = json.loads(json.dumps(r))
    pair = planted["lds"]["paired"]["sdi_full-tracin"]
    pair.update(lo=-abs(pair["hi"]), hi=abs(pair["hi"]) + 1.0)  # an interval around zero
    assert verdicts(planted)["lds"]["paired"]["sdi_full-tracin"] == "not distinguishable from"
    template = (ROOT / "docs" / "results" / "eval" / "README.template.md").read_text()
    for word in ("higher than", "lower than", "holds at every step", "in every seed", "not distinguishable"):
        assert word not in template, f"the template writes the verdict {word!r} itself; quote it from verdicts"


def test_verdicts_follow_the_thresholds() -> None:
    """The verdict words on planted numbers, one per branch."""
    from looptrace.apps.evaluation.verdicts import verdicts

    side = {"slope": [1.0, 1.1], "rel_error_smallest_eta": [0.01, 0.02], "rel_error_training_lr": [0.3, 0.1],
            "spearman_at_training_lr": [0.95, 0.6], "negative_control": {"rel_error_smallest_eta": [0.5, 0.3]}}  # fmt: skip
    bad = {**side, "slope": [2.0, 1.0]}
    v = verdicts({"step_counterfactual": {"test": side, "train": bad}})["counterfactual"]
    assert v["test"]["first_order"] == "holds at every step" and v["train"]["first_order"] == "holds at steps [2] only"
    assert v["test"]["ranking"] == "partly matches" and v["test"]["control"] == "fails on the reversed features"
    assert v["test"]["training_lr_error_max_step"] == 1

"""Counterfactual metrics on planted answers, the step counterfactual where first order is exact, and the
Adam-preconditioned inner product against its exact definition."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import looptrace as lt
from looptrace.evaluation import bootstrap_ci, lds, removal_effect, spearman, step_counterfactual
from tests.conftest import assert_close, lm_loss, oracle_per_step, tiny_batches, tiny_model


def test_spearman_ties_and_constants() -> None:
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1, 1, 1, 1]), np.array([1, 2, 3, 4])) == 0.0, "a constant side has no ranking: 0, not NaN"
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 2, 3])) == pytest.approx(1.0), "ties share their rank"


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
    assert abs(float(noise.mean())) < 3 / np.sqrt(s), f"random scores must give LDS ~ 0, got {noise.mean():.3f}"
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


def test_bootstrap_and_removal_effect() -> None:
    ci = bootstrap_ci(np.linspace(0, 1, 101))
    assert ci["lo"] < 0.5 < ci["hi"] and ci["mean"] == pytest.approx(0.5)
    eff = removal_effect([1.0, 2.0], [1.5, 2.5])
    assert eff["mean_loss_increase"] == pytest.approx(0.5)


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


def test_adam_preconditioned_features_equal_the_exact_definition(tmp_path) -> None:
    """featurize(precondition=P^(1/2)) in exact mode equals P^(1/2) * phi_t of the oracle, and
    attribute(precondition="adam") equals sum_k eta_k g^T P_k g' from the recorded second moments."""
    model = tiny_model()
    batches = tiny_batches(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    recorder = lt.CheckpointRecorder(tmp_path, every=1, body=model.core)
    for _ in range(2):
        opt.zero_grad()
        lm_loss(model, batches[0]).mean().backward()
        opt.step()
        recorder.step(model, opt)
    checkpoints = lt.load_checkpoints(tmp_path)
    want = torch.zeros(3, 3, dtype=torch.float64)
    names = sorted(n for n, _ in model.core.named_parameters(prefix="core"))
    for ck in checkpoints:
        full = ck.load_full()
        lt.influence.checkpoints.load_into(model, full.state, full.name)
        scale = lt.adam_preconditioner(full.second_moments)
        flat_scale = torch.cat([scale[n].reshape(-1) for n in names])
        phi = oracle_per_step(model, model.core, batches, lm_loss)  # [N, tau, P]
        feats = lt.featurize(
            model, batches, lm_loss, step_module=model.core, sketch=lt.SketchSpec.exact(), precondition=scale
        )
        assert_close(feats.per_step, phi * flat_scale, "preconditioned exact features vs P^(1/2) phi_t")
        g = phi.sum(1)
        want += full.lr * (g * flat_scale**2) @ g.T
    res = lt.attribute(model, checkpoints, batches, batches, lm_loss, step_module=model.core,
                       sketch=lt.SketchSpec.exact(), precondition="adam")  # fmt: skip
    assert_close(res.tracin, want, "attribute(precondition='adam') vs sum_k eta_k g^T P_k g'")
    assert_close(res.sdi.sum(-1), res.tracin, "conservation with the preconditioner")
    no_moments = lt.Checkpoint(model.state_dict(), lr=1.0)
    with pytest.raises(lt.CheckpointError, match="second moments"):
        lt.attribute(model, [no_moments], batches, batches, lm_loss, step_module=model.core, precondition="adam")


def test_the_eval_command_runs_end_to_end(tmp_path) -> None:
    """`looptrace eval --smoke`: retraining, LDS, removal and the step counterfactual wired together, with every
    section of results.json filled and its report written."""
    pytest.importorskip("matplotlib")
    from looptrace.cli import main

    assert main(["eval", "--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("lds", "removal", "step_counterfactual", "config"):
        assert key in res, f"results.json lost its {key!r} section (keys: {sorted(res)})"
    scores = [m["mean"] for m in res["lds"]["methods"].values()]
    assert scores and all(-1.0 <= s <= 1.0 for s in scores), f"LDS outside [-1, 1]: {scores}"
    assert (tmp_path / "report.html").exists()

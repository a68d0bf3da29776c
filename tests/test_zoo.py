"""Task generators, the depth sampler, the presets' models and the training loop's checkpoints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import looptrace as lt
from looptrace.apps.catalog import study as get_study
from looptrace.apps.registry import Preset
from looptrace.apps.runs import make_record
from looptrace.apps.studies.parity.task import ParityTask
from looptrace.apps.tasks import parity, sudoku, text
from looptrace.apps.training import train
from looptrace.errors import CorruptFileError
from looptrace.influence.checkpoints import load_into
from looptrace.models.depth import DepthSampler
from looptrace.models.looped import LoopedTransformer

FIXTURE = Path(__file__).parent / "data" / "sudoku24.npz"


def preset(study: str, size: str) -> tuple:
    p: Preset = get_study(study).preset(size)
    return p.model, p.train, p.task


def run_train(study: str, size: str, task, mc, tc, out: Path) -> dict:
    """The training loop with a run record for these (possibly edited) configs."""
    return train(task, mc, tc, out, record=make_record(study, size, task, mc, tc, {}), progress=False)


def checkpoint_paths(run: Path) -> list[Path]:
    return [Path(str(c.source)) for c in lt.load_checkpoints(run / "checkpoints")]


def _valid_solution(grid: torch.Tensor) -> bool:
    g = grid.view(9, 9)
    boxes = g.view(3, 3, 3, 3).permute(0, 2, 1, 3).reshape(9, 9)
    want = torch.arange(1, 10)
    return all(bool((torch.sort(m, dim=1).values == want).all()) for m in (g, g.T, boxes))


# ---------------------------------------------------------------------------------------- sudoku
def test_sudoku_generator_unique_solutions_in_satnet_layout() -> None:
    feats, labels = sudoku.generate(6, min_blanks=30, max_blanks=45, seed=3)
    assert feats.shape == labels.shape == (6, 9, 9, 9), "SATNet layout is (N, 9, 9, 9)"
    assert set(feats.sum(-1).unique().tolist()) <= {0.0, 1.0}, "a given cell is one-hot, a blank all zeros"
    assert bool((labels.sum(-1) == 1).all()), "every solution cell is one-hot"
    b, s = sudoku.boards(feats), sudoku.solutions(labels)
    blanks = (b == 0).sum(1)
    assert bool(((blanks >= 30) & (blanks <= 45)).all()), f"blank counts {blanks.tolist()} outside [30, 45]"
    for i in range(len(b)):
        assert _valid_solution(s[i]), f"solution {i} breaks a row, column or box"
        given = b[i] != 0
        assert torch.equal(b[i][given], s[i][given]), f"puzzle {i}'s givens disagree with its solution"
        assert sudoku.count_solutions(b[i].tolist(), limit=2) == 1, f"puzzle {i} does not have a unique solution"


def test_sudoku_generator_is_seeded() -> None:
    a, b = sudoku.generate(3, seed=7), sudoku.generate(3, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], sudoku.generate(3, seed=8)[0])


def test_sudoku_fixture_satnet_loader_and_difficulty_split(tmp_path) -> None:
    feats, labels = sudoku.load(FIXTURE)
    assert feats.shape == (24, 9, 9, 9)
    for i in range(len(feats)):
        assert sudoku.count_solutions(sudoku.boards(feats[i : i + 1])[0].tolist()) == 1
    # the same puzzles written as a SATNet directory read back identically
    satnet = tmp_path / "satnet"
    satnet.mkdir()
    torch.save(feats, satnet / "features.pt")
    torch.save(labels, satnet / "labels.pt")
    f2, l2 = sudoku.load(satnet)
    assert torch.equal(f2, feats) and torch.equal(l2, labels)
    torch.save(feats[:, :8], satnet / "features.pt")
    with pytest.raises(CorruptFileError, match="expected"):
        sudoku.load(satnet)
    # the paper's non-IID split: easiest 80 % train, hardest 20 % test
    sp = sudoku.difficulty_split(feats, labels)
    tr, te = sudoku.n_blanks(sp["train"][0]), sudoku.n_blanks(sp["test"][0])
    assert len(tr) == 19 and len(te) == 5
    assert int(tr.max()) <= int(te.min()), "every training puzzle must be at most as hard as every test puzzle"


# ---------------------------------------------------------------------------------------- parity
def test_parity_labels_format_and_probes() -> None:
    g = torch.Generator().manual_seed(0)
    b = parity.sample(64, 1, 9, g)
    assert b.x.shape == (64, 11), "T = longest n + 2"
    for i in range(64):
        n = int(b.n[i])
        bits = b.x[i, :n]
        assert set(bits.tolist()) <= {0, 1}
        assert int(b.x[i, n]) == parity.EQ and bool((b.x[i, n + 1 :] == parity.PAD).all())
        assert int(b.y[i]) == int(bits.sum()) % 2
    probes = parity.alternating_probes(40)
    assert probes.x.shape == (2, 42) and probes.y.tolist() == [0, 0]  # twenty ones each
    assert probes.x[0, :4].tolist() == [0, 1, 0, 1] and probes.x[1, :4].tolist() == [1, 0, 1, 0]


def test_parity_readout_ignores_later_loops() -> None:
    mc, _, _ = preset("parity", "tiny")
    torch.manual_seed(0)
    model = LoopedTransformer(mc).eval()
    b = parity.sample(8, 1, 6, torch.Generator().manual_seed(1))
    with torch.no_grad():
        short = parity.logits_at_answer(model, b, loops=b.loops)
        long = parity.logits_at_answer(model, b, loops=b.loops + 5)
    assert torch.equal(short, long), "the answer is read out at step n; loops after it must not change it"


def test_length_bucketed_parity_loss_equals_the_padded_loss() -> None:
    """The small preset trains on length groups cut to their longest example: the per-example losses and the
    gradient must be those of the whole padded batch (float64), in the batch's order."""
    mc, _, _ = preset("parity", "small")
    torch.manual_seed(0)
    model = LoopedTransformer(mc).double()
    b = parity.sample(40, 1, 21, torch.Generator().manual_seed(3))
    ref = parity.loss(model, b)
    (g_ref,) = torch.autograd.grad(ref.sum(), [next(model.core.parameters())])
    for buckets in (2, 4, 7):
        got = parity.bucketed_loss(model, b, buckets)
        (g,) = torch.autograd.grad(got.sum(), [next(model.core.parameters())])
        torch.testing.assert_close(
            got, ref, rtol=1e-12, atol=1e-12, msg=f"{buckets} buckets: per-example losses differ"
        )
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12, msg=f"{buckets} buckets: the gradient differs")
    assert get_study("parity").preset("small").task.length_buckets > 1, "the small preset should train on length groups"


# ---------------------------------------------------------------------------------------- text
def test_arithmetic_templates_are_disjoint_and_in_gsm8k_format() -> None:
    tr, te = text.arithmetic_problems(50, "train", 0), text.arithmetic_problems(50, "test", 0)
    for q, a in tr + te:
        prompt, answer = text.render(q, a)
        assert "####" in prompt + answer and answer.strip().split()[-1].lstrip("-").isdigit()
    assert not {q for q, _ in tr} & {q for q, _ in te}


# ---------------------------------------------------------------------------------------- depth sampler
def test_depth_sampler_matches_poisson_lognormal_formula() -> None:
    """E[r] = E[Poisson(e^tau)] + 1 = mean + 1 before clipping; Var[r] = mean + mean^2 (e^{sigma^2} - 1).
    The tolerance is 5 standard errors of the Monte Carlo mean."""
    s = DepthSampler(mean=8.0, r_max=10_000, sigma=0.5, seed=3)
    assert math.isclose(s.mu, math.log(8.0) - 0.125)
    r = s.samples(range(20_000)).astype(float)
    var = 8.0 + 64.0 * (math.exp(0.25) - 1)
    se = math.sqrt(var / len(r))
    assert abs(r.mean() - 9.0) < 5 * se, f"mean depth {r.mean():.3f} vs 9.0 (+-{5 * se:.3f}): mu or the +1 is wrong"
    assert abs(r.var() - var) < 0.1 * var, f"depth variance {r.var():.2f} vs {var:.2f}: sigma is wrong"
    assert r.min() >= 1
    clipped = DepthSampler(mean=8.0, r_max=12, seed=3).samples(range(2000))
    assert clipped.max() == 12 and clipped.min() >= 1
    assert s.sample(123) == s.sample(123), "a step's depth must replay"
    assert len(np.unique(s.samples(range(50)))) > 3


# ---------------------------------------------------------------------------------------- training
def test_checkpoints_carry_what_attribution_needs(tmp_path) -> None:
    mc, tc, task = preset("sudoku", "tiny")
    task = dataclasses.replace(task, data_path=str(FIXTURE), budgets=(2,), eval_n=4)
    tc = dataclasses.replace(tc, steps=6, ckpt_every=3)
    metrics = run_train("sudoku", "tiny", task, mc, tc, tmp_path / "run")
    assert "board_accuracy" in metrics and "cell_accuracy" in metrics
    cks = checkpoint_paths(tmp_path / "run")
    assert [p.name for p in cks] == ["ckpt_00000003.pt", "ckpt_00000006.pt"]
    raw = torch.load(cks[-1], weights_only=True)
    for key in ("model", "lr", "step", "depth", "meta", "optimizer_second_moments"):
        assert key in raw, f"TracIn checkpoint lacks {key!r}"
    meta = lt.Checkpoint(cks[-1]).load_full().meta
    for key in ("depth_seed", "data_seed", "run", "task_state"):
        assert key in meta, f"TracIn checkpoint metadata lacks {key!r}"
    moments = raw["optimizer_second_moments"]["exp_avg_sq"]
    assert set(moments) == {n for n, _ in LoopedTransformer(mc).named_parameters() if n.startswith("core.")}
    assert raw["lr"] == tc.lr_at(5), "eta_k is the learning rate of the step that produced the weights"
    assert raw["depth"] == tc.depth_sampler().sample(5), "the recorded depth must replay from the seed"
    state, eta, _ = lt.Checkpoint(cks[-1]).load()
    model = LoopedTransformer(mc)
    load_into(model, state, "ck")
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    assert eta == raw["lr"]


def test_training_stops_early_once_the_curriculum_is_learned(tmp_path) -> None:
    mc, tc, task = preset("parity", "tiny")
    # a threshold of 0 passes every check: the curriculum advances each check_every steps, then stops
    task = dataclasses.replace(task, advance_at=0.0, final_max=4, stop_after=2, stop_accuracy=0.0)
    tc = dataclasses.replace(tc, steps=100, ckpt_every=50)
    m = run_train("parity", "tiny", task, mc, tc, tmp_path / "run")
    # 2 -> 4 takes two checks (steps 5, 10), then two passing checks at the final length (15, 20)
    assert m["steps"] == 20 and m.get("stopped_early"), f"stopped at {m['steps']}, expected 20"
    cks = checkpoint_paths(tmp_path / "run")
    assert cks[-1].name == "ckpt_00000020.pt", "the stopping step must leave a TracIn checkpoint"
    again = run_train("parity", "tiny", dataclasses.replace(task), mc, tc, tmp_path / "run")
    assert again["steps"] == 20, "a stopped run must not train further when resumed"


def test_parity_task_without_stop_never_stops() -> None:
    assert not ParityTask(adaptive=True).done()


def test_learning_rate_anneals_once_the_final_length_is_reached(tmp_path) -> None:
    mc, tc, task = preset("parity", "tiny")
    task = dataclasses.replace(task, advance_at=0.0, final_max=4, anneal_steps=10, anneal_to=0.1)
    tc = dataclasses.replace(tc, steps=30, warmup=0, min_lr_ratio=1.0, ckpt_every=30, log_every=1)
    m = run_train("parity", "tiny", task, mc, tc, tmp_path / "run")
    lrs = {h["step"]: h["lr"] for h in m["history"] if "lr" in h}
    # 2 -> 4 digits at the checks after steps 5 and 10: the anneal starts at step 10 (the 11th step)
    assert all(lrs[s] == tc.lr for s in range(1, 11)), "the learning rate must not change before the final length"
    assert lrs[16] == pytest.approx(tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert all(lrs[s] == pytest.approx(0.1 * tc.lr) for s in range(21, 31)), "after anneal_steps: anneal_to x lr"
    task.load_state_dict(task.state_dict())
    assert task.final_step == 10, "the anneal's start is training state, saved for resuming"


def test_final_length_check_rejects_a_poor_model_on_a_quarter_of_the_inputs(monkeypatch) -> None:
    seen: list[int] = []

    def fake_accuracy(model, batch, loops=None) -> float:
        seen.append(len(batch))
        return 0.8

    monkeypatch.setattr(parity, "accuracy", fake_accuracy)
    model = torch.nn.Linear(1, 1)
    g = torch.Generator().manual_seed(0)
    task = ParityTask(check_examples=256, reject_margin=0.05)
    assert not task._passes(model, (21, 21), 0.99, g) and seen == [64], "0.8 is far below 0.99: a quarter decides"
    seen.clear()
    assert not task._passes(model, (21, 21), 0.82, g) and seen == [64, 256], (
        "0.8 is within the margin: all inputs decide"
    )
    seen.clear()
    assert not ParityTask(check_examples=256)._passes(model, (21, 21), 0.99, g) and seen == [256], (
        "no margin: one check"
    )


def test_stop_check_draws_the_final_evaluation_s_lengths(monkeypatch) -> None:
    lengths: list[set[int]] = []

    def fake_accuracy(model, batch, loops=None) -> float:
        lengths.append(set(batch.n.tolist()))
        return 1.0

    monkeypatch.setattr(parity, "accuracy", fake_accuracy)
    _, tc, _ = preset("parity", "tiny")
    task = ParityTask(adaptive=True, check_every=1, final_max=6, stop_after=1, stop_length=9, stop_in_distribution=True)
    task.current_max = 6
    task.after_step(torch.nn.Linear(1, 1), 0, tc)
    assert len(lengths) == 2 and lengths[0] == set(range(1, 7)) and lengths[1] == {9}, lengths
    assert task.done()


def test_checks_at_the_final_length_run_every_stop_check_every_steps(monkeypatch) -> None:
    checked: list[int] = []
    monkeypatch.setattr(parity, "accuracy", lambda model, batch, loops=None: checked.append(len(batch)) or 0.0)
    _, tc, _ = preset("parity", "tiny")
    task = ParityTask(adaptive=True, check_every=1, stop_check_every=3, final_max=6, stop_after=1, check_examples=8)
    task.current_max = 6
    for step in range(6):
        task.after_step(torch.nn.Linear(1, 1), step, tc)
    assert len(checked) == 2, f"at the final length a check every 3 steps (after steps 3 and 6), got {len(checked)}"


def test_a_passing_stop_check_counts_only_if_the_same_weights_pass_again(monkeypatch) -> None:
    seen: list[int] = []
    answers = iter([1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0])  # check 1 passes, its confirmation fails; check 2 both

    def fake_accuracy(model, batch, loops=None) -> float:
        seen.append(len(batch))
        return next(answers)

    monkeypatch.setattr(parity, "accuracy", fake_accuracy)
    _, tc, _ = preset("parity", "tiny")
    task = ParityTask(adaptive=True, check_every=1, final_max=6, stop_after=1, stop_length=9, check_examples=8,
                      confirm_examples=32)  # fmt: skip
    task.current_max = 6
    task.after_step(torch.nn.Linear(1, 1), 0, tc)
    assert seen == [8, 8, 32, 32] and not task.done(), f"a failed confirmation must not stop training: {seen}"
    task.after_step(torch.nn.Linear(1, 1), 1, tc)
    assert seen[4:] == [8, 8, 32, 32] and task.done(), "a confirmed pass stops training"

"""Parity (Fan et al. 2024): the task with its length curriculum, the presets and the influence sets."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from looptrace.apps.registry import InfluenceSets, Preset
from looptrace.apps.runs import Run
from looptrace.apps.tasks import parity
from looptrace.apps.train_config import TrainConfig
from looptrace.models.looped import LoopedConfig


@dataclasses.dataclass
class ParityTask:
    """Parity with a length curriculum: the maximum digit count starts at ``start_max`` and rises to
    ``final_max``. Fixed (Fan et al.: one more every ``curriculum_every`` steps) or adaptive: one
    more once the model gets ``advance_at`` of a held-out batch at the current maximum right (checked
    every ``check_every`` steps; at the final length every ``stop_check_every``). The current maximum is
    training state, saved for resuming.

    With ``stop_after`` > 0 training ends early once the model has got ``stop_accuracy`` of fresh
    held-out inputs at the final length (with ``stop_in_distribution``: of lengths drawn as the final evaluation
    draws them) and ``stop_length_accuracy`` at ``stop_length``, if set (a validation length beyond the
    curriculum), right at ``stop_after`` checks in a row. With ``confirm_examples`` > 0 a check that passes
    is repeated at once on that many fresh inputs, on the same weights, and counts only if it passes again:
    a model that passed on a lucky draw is turned down without asking a later model (which training has
    moved) to pass too. The adaptive curriculum reaches the final
    length at a step that depends on the run, and length generalisation comes and goes after it.

    With ``anneal_steps`` > 0 the learning rate then falls (half a cosine) to ``anneal_to`` of its scheduled
    value over that many steps, which settles it. A check at the final length looks at ``check_examples``
    fresh inputs; with ``reject_margin`` > 0 it first looks at a quarter of them and stops there if that
    quarter is already more than the margin below the threshold (a model at 80 % is turned down for a
    quarter of the cost; one near the threshold is judged on them all)."""

    name: str = "parity"
    min_digits: int = 1
    start_max: int = 2
    final_max: int = 21
    curriculum_every: int = 500
    adaptive: bool = False
    advance_at: float = 0.95
    check_every: int = 50
    eval_examples: int = 512
    test_length: int = 40
    stop_after: int = 0
    stop_accuracy: float = 0.99
    stop_length: int = 0
    stop_length_accuracy: float = 0.0  # at stop_length (0: stop_accuracy)
    same_length_batches: bool = (
        False  # one length per batch, uniform in [min_digits, max]: a batch costs (n+2)^2, not (max+2)^2
    )
    length_buckets: int = 1  # the loss on this many length groups, each cut to its longest (same values, cheaper)
    check_examples: int = 256
    stop_in_distribution: bool = False  # the stop's first check on the trained lengths (as evaluate()), not the longest
    stop_check_every: int = 0  # checks at the final length (dearer: long inputs) every this many steps (0: check_every)
    reject_margin: float = 0.0  # 0: every check at the final length looks at all check_examples
    anneal_steps: int = 0
    anneal_to: float = 0.1
    confirm_examples: int = 0  # a passing stop check is re-run on this many fresh inputs (same weights; 0: not)
    current_max: int = dataclasses.field(default=0, init=False)  # training state, not configuration
    passes_at_final: int = dataclasses.field(default=0, init=False)
    final_step: int = dataclasses.field(default=-1, init=False)  # the step the final length was reached

    def __post_init__(self) -> None:
        self.current_max = self.start_max

    def max_digits(self, step: int) -> int:
        if self.adaptive:
            return self.current_max
        return min(self.final_max, self.start_max + step // self.curriculum_every)

    def state_dict(self) -> dict[str, Any]:
        return {"current_max": self.current_max, "passes_at_final": self.passes_at_final, "final_step": self.final_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current_max = int(state.get("current_max", self.start_max))
        self.passes_at_final = int(state.get("passes_at_final", 0))
        self.final_step = int(state.get("final_step", -1))

    def lr_scale(self, step: int) -> float:
        """1 until the final length is reached, then half a cosine down to ``anneal_to`` over ``anneal_steps``."""
        if not self.anneal_steps or self.final_step < 0:
            return 1.0
        frac = min(1.0, (step - self.final_step) / self.anneal_steps)
        return self.anneal_to + (1 - self.anneal_to) * 0.5 * (1 + math.cos(math.pi * frac))

    def _passes(
        self, model: nn.Module, lengths: tuple[int, int], threshold: float, g: torch.Generator, n: int = 0
    ) -> bool:
        """Whether ``n`` (default ``check_examples``) fresh inputs of ``lengths[0]..lengths[1]`` digits are
        ``threshold`` right (see the class)."""
        device = next(model.parameters()).device
        n = n or self.check_examples
        if self.reject_margin > 0:
            first = parity.sample(max(1, n // 4), *lengths, g).to(device)
            if parity.accuracy(model, first) < threshold - self.reject_margin:
                return False
        return parity.accuracy(model, parity.sample(n, *lengths, g).to(device)) >= threshold

    def _stop_check(self, model: nn.Module, g: torch.Generator, n: int = 0) -> bool:
        """One stopping check at the final length (see the class), on ``n`` inputs per length."""
        first = (self.min_digits, self.final_max) if self.stop_in_distribution else (self.final_max, self.final_max)
        if not self._passes(model, first, self.stop_accuracy, g, n):
            return False
        if not self.stop_length:
            return True
        long = (self.stop_length, self.stop_length)
        return self._passes(model, long, self.stop_length_accuracy or self.stop_accuracy, g, n)

    def done(self) -> bool:
        return self.stop_after > 0 and self.passes_at_final >= self.stop_after

    def after_step(self, model: nn.Module, step: int, cfg: TrainConfig) -> None:
        """Adaptive curriculum: advance the maximum length once it is learned; at the final length,
        count consecutive passing checks for early stopping."""
        if not self.adaptive:
            return
        at_final = self.current_max >= self.final_max
        if at_final and not self.stop_after:
            return
        if (step + 1) % ((self.stop_check_every or self.check_every) if at_final else self.check_every):
            return
        g = torch.Generator().manual_seed(1_000_000 + cfg.seed * 7919 + step)
        device = next(model.parameters()).device
        model.eval()
        if at_final:
            passed = self._stop_check(model, g)
            if passed and self.confirm_examples:  # the same weights again, on fresh inputs: no lucky draw
                passed = self._stop_check(model, g, self.confirm_examples)
            self.passes_at_final = self.passes_at_final + 1 if passed else 0
        elif parity.accuracy(model, parity.fixed_length(64, self.current_max, g).to(device)) >= self.advance_at:
            self.current_max += 1
            if self.current_max >= self.final_max:
                self.final_step = step + 1
        model.train()

    def batch(self, step: int, cfg: TrainConfig) -> parity.ParityBatch:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        if self.same_length_batches:
            n = int(torch.randint(self.min_digits, self.max_digits(step) + 1, (1,), generator=g))
            return parity.fixed_length(cfg.batch_size, n, g)
        return parity.sample(cfg.batch_size, self.min_digits, self.max_digits(step), g)

    def loss(self, model: nn.Module, batch: Any, loops: int | None) -> torch.Tensor:
        return parity.bucketed_loss(model, batch, self.length_buckets)

    def evaluate(self, model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
        g = torch.Generator().manual_seed(2**40 + cfg.seed)  # disjoint from the training and check seeds
        device = next(model.parameters()).device
        in_dist = parity.sample(self.eval_examples, self.min_digits, self.final_max, g).to(device)
        long = parity.fixed_length(self.eval_examples, self.test_length, g).to(device)
        return {
            "accuracy_in_distribution": parity.accuracy(model, in_dist),
            f"accuracy_length_{self.test_length}": parity.accuracy(model, long),
            "test_loops": self.test_length + 2,
            "readout_step": self.test_length,
        }


_MODEL: dict[str, Any] = dict(
    vocab_size=parity.VOCAB,
    causal=True,
    injection="additive",
    read_in="linear",
    positions="none",
    core_norm=True,
    head_norm=False,
    head_bias=True,
    max_len=64,
    n_loops=23,
)


def small() -> Preset:
    """d=96 (4 heads, MLP 384), AdamW lr 1e-3 with beta2 = 0.95, constant after warm-up, weight decay 0.1; an
    adaptive curriculum (one more digit once 95 % of a held-out batch at the current maximum is right, checked
    every 25 steps), and early stopping once 512 fresh held-out inputs are 99.5 % right at the trained lengths
    (1-21 digits, drawn as the final evaluation draws them) and 97 % at 40, confirmed on the same weights by
    1024 more inputs of each (a check turns a model far below either after a quarter of them). The margins over
    the targets (99 % and 95 %) and the confirmation keep a model that passes on target: with one unconfirmed
    check, seed 0 stopped on a lucky draw at 98.8 %; with two checks in a row (two models 25 steps apart), it
    never stopped within 600 s. The loss runs on four length groups of the
    batch (the same values as the padded batch, about half the cost). With beta2 = 0.999 and checks every 50
    steps one seed in two lost the curriculum (its loss rose at 9 digits and never recovered); the training time
    over seeds is in docs/results/parity (train_time.json)."""
    return Preset(
        LoopedConfig(d_model=96, n_heads=4, d_mlp=384, **_MODEL),
        TrainConfig(
            steps=5000,
            batch_size=64,
            lr=1e-3,
            betas=(0.9, 0.95),
            warmup=100,
            min_lr_ratio=1.0,
            weight_decay=0.1,
            ckpt_every=250,
            eval_every=10_000,
        ),
        ParityTask(
            adaptive=True,
            check_every=25,
            stop_after=1,
            confirm_examples=1024,
            stop_length=40,
            stop_length_accuracy=0.97,
            length_buckets=4,
            check_examples=512,
            reject_margin=0.05,
            stop_in_distribution=True,
            stop_accuracy=0.995,
        ),
    )


def paper() -> Preset:
    """Fan et al.: d=256, 64 heads, MLP 1024, lr 1e-4, batch 64, one more digit every 500 steps."""
    return Preset(
        LoopedConfig(d_model=256, n_heads=64, d_mlp=1024, **_MODEL),
        TrainConfig(steps=100_000, batch_size=64, lr=1e-4, warmup=1000, ckpt_every=5000, eval_every=5000),
        ParityTask(curriculum_every=500),
    )


def tiny() -> Preset:
    """Seconds on a CPU: a smoke-test size."""
    return Preset(
        LoopedConfig(d_model=16, n_heads=2, d_mlp=32, **_MODEL),
        TrainConfig(steps=40, batch_size=16, lr=1e-3, warmup=5, ckpt_every=20, eval_every=1000, log_every=10),
        ParityTask(adaptive=True, advance_at=0.5, check_every=5, final_max=6, eval_examples=32, test_length=8),
    )


PRESETS = {"small": small, "paper": paper, "tiny": tiny}


def train_sample(n: int, max_digits: int, seed: int = 0) -> parity.ParityBatch:
    """Train examples stratified over length: a quarter from each tercile of 1..max_digits and a
    quarter at length 20 (or ``max_digits`` if shorter)."""
    g = torch.Generator().manual_seed(seed + 11)
    quarter = n // 4
    edges = np.linspace(1, max_digits, 4).round().astype(int)
    bits: list[list[int]] = []
    for lo, hi in itertools.pairwise(edges):
        b = parity.sample(quarter, int(lo), int(hi), g)
        bits += b.bit_lists()
    bits += parity.fixed_length(n - 3 * quarter, min(20, max_digits), g).bit_lists()
    return parity.encode(bits, pad_to=max_digits + 2)


def query_set(n: int, length: int, seed: int = 0) -> parity.ParityBatch:
    """The two alternating probes (queries 0 and 1) followed by ``n`` held-out examples of ``length`` bits."""
    test = parity.fixed_length(n, length, torch.Generator().manual_seed(seed + 22))
    return parity.encode(parity.alternating_probes(length).bit_lists() + test.bit_lists())


def parity_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-example loss of a ``(x, y, n)`` tuple batch (what a TensorDataset loader yields)."""
    return parity.loss(model, parity.ParityBatch(*batch))


def influence_sets(run: Run, n_train: int, n_query: int, loops: int | None) -> InfluenceSets:
    """A length-stratified sample of the training distribution (1..final_max digits, from the recorded
    task) and, as queries, the two alternating probes plus held-out examples at the test length."""
    task: ParityTask = run.task
    train = train_sample(n_train, task.final_max)
    queries = query_set(n_query, task.test_length)
    return InfluenceSets(
        {"train": TensorDataset(train.x, train.y, train.n), "query": TensorDataset(queries.x, queries.y, queries.n)},
        parity_loss,
        {"task": task.name, "digits": [task.min_digits, task.final_max], "query_note": "queries 0, 1 are the probes"},
    )

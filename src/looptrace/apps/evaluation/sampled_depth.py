"""The evaluation task trained with sampled depth: a fast looped model whose queries differ in how many
loops they need (issue #27's test-time compute application).

:class:`SampledDepthMajorityTask` is :class:`~looptrace.apps.evaluation.task.MajorityTask` (a looped
residual MLP on the majority of ``bits`` bits, 10 % of the training labels flipped, truncated BPTT
through the last ``bptt_k`` steps) with two changes: every full-batch training step runs a loop count
drawn from the Poisson log-normal sampler of recurrent-depth models
(:class:`~looptrace.models.depth.DepthSampler`, mean ``depth_mean``, clipped to ``[1, loops]``; Geiping et
al. 2025), and the default sizes are larger (15 bits, 800 training examples, 200 queries, 2000 held-out
test inputs) so that a few hundred queries' per-step predictions can be read at every budget
``1..loops``. ``loops`` is the largest depth the sampler may draw and the analysis horizon tau.

Measured while choosing it (``task_choice`` in ``docs/results/applications/results.json``): with full BPTT
almost every held-out input is right from one loop on, so there is nothing for a test-time compute rule to
allocate; with truncated BPTT and sampled depth about a tenth of them need two or more loops (on 11 bits
as on 15; 15 bits leave room for distinct training, query and test inputs at these sizes). The task is
still easy: a majority vote is linear, so the loops refine a decision the read-in nearly makes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.apps.evaluation.task import TASKS, MajorityTask, logits
from looptrace.models.depth import DepthSampler


@dataclasses.dataclass(frozen=True)
class SampledDepthMajorityTask(MajorityTask):
    """Majority of bits, a looped residual MLP trained with Poisson log-normal depth (see the module)."""

    name: ClassVar[str] = "majority-depth"
    description: ClassVar[str] = (
        "majority of bits, looped residual MLP trained with Poisson log-normal depth (truncated BPTT)"
    )
    bits: int = 15
    n_train: int = 800
    n_query: int = 200
    n_test: int = 2000
    loops: int = 12
    steps: int = 120
    ckpt_every: int = 12
    depth_mean: float = 6.0
    budgets: tuple[int, ...] = tuple(range(1, 13))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.depth_mean <= self.loops:
            raise lt.ConfigError(f"depth_mean must lie in [1, loops={self.loops}], got {self.depth_mean}")
        if max(self.budgets) > 2 * self.loops:
            raise lt.ConfigError(f"budgets go past twice the largest trained depth ({self.loops}): {self.budgets}")

    def sampler(self) -> DepthSampler:
        """The depth of training step s is ``sampler().sample(s)``: a pure function of (seed, s)."""
        return DepthSampler(mean=self.depth_mean, r_max=self.loops, seed=self.seed)

    def train(self, keep: torch.Tensor | None = None, record: Path | None = None) -> nn.Module:
        """As :meth:`EvalTask.train` (full batch, AdamW, TracIn checkpoints with ``record``), with the loop
        count of each step drawn by :meth:`sampler`."""
        return self.train_from(self.model(), keep=keep, record=record)

    def train_from(
        self,
        model: nn.Module,
        keep: torch.Tensor | None = None,
        record: Path | None = None,
        steps: int | None = None,
        first_step: int = 0,
    ) -> nn.Module:
        """Train ``model`` for ``steps`` more steps (default ``self.steps``) on the kept examples, drawing
        the depths of steps ``first_step, first_step + 1, ...`` (a fresh optimizer: continuing a run
        restarts AdamW's moments)."""
        x, y = self.data()["train"]
        depth = self.sampler()
        return self.fit(
            model, lambda step: F.cross_entropy(logits(model, x, loops=depth.sample(step)), y, reduction="none"),
            keep=keep, record=record, steps=steps, first_step=first_step,
        )  # fmt: skip


TASKS[SampledDepthMajorityTask.name] = SampledDepthMajorityTask

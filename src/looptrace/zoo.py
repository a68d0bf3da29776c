"""Presets: the paper's three looped models with their tasks and training settings.

``preset(task, size)`` gives (model config, training config, task). ``size="small"`` trains on two
CPU cores in minutes; ``size="paper"`` follows appendix D (and the public code it cites).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from looptrace.errors import ConfigError
from looptrace.models.looped import LoopedConfig
from looptrace.tasks import parity
from looptrace.train import TrainConfig

TASKS = ("parity", "sudoku", "recursive-gpt")
SIZES = ("small", "paper", "tiny")


@dataclasses.dataclass
class ParityTask:
    """Parity with a length curriculum (max digits 2 -> 21, one more every ``curriculum_every`` steps,
    advanced early once training accuracy at the current maximum passes ``advance_at``)."""

    name: str = "parity"
    min_digits: int = 1
    start_max: int = 2
    final_max: int = 21
    curriculum_every: int = 500
    eval_examples: int = 512
    test_length: int = 40

    def max_digits(self, step: int) -> int:
        return min(self.final_max, self.start_max + step // self.curriculum_every)

    def batch(self, step: int, cfg: TrainConfig) -> parity.ParityBatch:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return parity.sample(cfg.batch_size, self.min_digits, self.max_digits(step), g)

    def loss(self, model: nn.Module, batch: Any, loops: int | None) -> torch.Tensor:
        return parity.loss(model, batch)

    def evaluate(self, model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
        g = torch.Generator().manual_seed(10_000 + cfg.seed)
        ind = parity.sample(self.eval_examples, self.min_digits, self.final_max, g)
        ood = parity.fixed_length(self.eval_examples, self.test_length, g)
        return {
            "accuracy_in_distribution": parity.accuracy(model, ind),
            f"accuracy_length_{self.test_length}": parity.accuracy(model, ood),
            "test_loops": self.test_length + 2,
            "readout_step": self.test_length,
        }


def preset(task: str, size: str = "small") -> tuple[LoopedConfig, TrainConfig, Any]:
    """The model config, training config and task of a named preset."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {TASKS}")
    if size not in SIZES:
        raise ConfigError(f"unknown preset size {size!r}; choose one of {SIZES}")
    if task == "parity":
        common = dict(
            vocab_size=parity.VOCAB, causal=True, injection="additive", read_in="linear", positions="none",
            core_norm=True, head_norm=False, head_bias=True, max_len=64, n_loops=23,
        )  # fmt: skip
        if size == "paper":  # Fan et al.: d=256, 64 heads, MLP 1024, lr 1e-4, batch 64, ~100k steps
            mc = LoopedConfig(d_model=256, n_heads=64, d_mlp=1024, **common)  # type: ignore[arg-type]
            tc = TrainConfig(steps=100_000, batch_size=64, lr=1e-4, warmup=1000, ckpt_every=5000, eval_every=5000)
            return mc, tc, ParityTask(curriculum_every=500)
        if size == "tiny":
            mc = LoopedConfig(d_model=16, n_heads=2, d_mlp=32, **common)  # type: ignore[arg-type]
            tc = TrainConfig(steps=40, batch_size=16, lr=1e-3, warmup=5, ckpt_every=20, eval_every=1000, log_every=10)
            return mc, tc, ParityTask(curriculum_every=10, final_max=6, eval_examples=32, test_length=8)
        mc = LoopedConfig(d_model=64, n_heads=4, d_mlp=256, **common)  # type: ignore[arg-type]
        # one thread: at d=64 the per-op work is too small for two threads to pay off
        tc = TrainConfig(steps=6000, batch_size=64, lr=1e-3, warmup=100, ckpt_every=500, eval_every=1000, threads=1)
        return mc, tc, ParityTask(curriculum_every=250)
    raise ConfigError(f"preset {task!r} is not available yet")

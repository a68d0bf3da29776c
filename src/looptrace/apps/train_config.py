"""The training configuration of a run (recorded in its ``config.json``)."""

from __future__ import annotations

import dataclasses
import math

from looptrace.errors import ConfigError
from looptrace.models.depth import DepthSampler

__all__ = ["TrainConfig"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW, warm-up + cosine decay, clipping) and checkpointing."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0
    ckpt_every: int = 250
    eval_every: int = 500
    log_every: int = 50
    seed: int = 0
    depth_mean: float | None = None  # Poisson log-normal depth; None = the task decides the loops
    depth_max: int | None = None
    threads: int | None = None
    stage: str = "train"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.ckpt_every < 1:
            raise ConfigError(f"invalid training config {self}")

    def lr_at(self, step: int) -> float:
        """Learning rate in force at optimizer step ``step`` (0-based): linear warm-up, cosine decay."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)

    def depth_sampler(self) -> DepthSampler | None:
        if self.depth_mean is None:
            return None
        return DepthSampler(mean=self.depth_mean, r_max=self.depth_max or int(2 * self.depth_mean), seed=self.seed)

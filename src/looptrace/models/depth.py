"""Training-time recurrence sampling: Poisson log-normal depth (Geiping et al. 2025, McLeish et al. 2025).

    sigma = 0.5, mu = ln(mean) - sigma^2 / 2
    rate  ~ LogNormal(mu, sigma),  r = Poisson(rate) + 1,  clipped to [1, r_max]

Each draw is seeded by (seed, training step), so the depth used at any step can be replayed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class DepthSampler:
    """Poisson log-normal loop-count sampler; ``sample(step)`` is a pure function of (seed, step)."""

    mean: float = 32.0
    r_max: int = 64
    sigma: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mean <= 0 or self.r_max < 1 or self.sigma <= 0:
            raise ValueError(f"invalid depth sampler {self}")

    @property
    def mu(self) -> float:
        return math.log(self.mean) - self.sigma**2 / 2

    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step, 0x5DEECE66D])

    def sample(self, step: int) -> int:
        rng = self.rng(step)
        rate = rng.lognormal(self.mu, self.sigma)
        return int(min(max(rng.poisson(rate) + 1, 1), self.r_max))

    def samples(self, steps: range | list[int]) -> np.ndarray:
        return np.array([self.sample(s) for s in steps])

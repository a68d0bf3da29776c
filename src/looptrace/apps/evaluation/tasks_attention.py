"""A second evaluation task with attention: which of two tokens occurs more often, learned by a looped
causal transformer.

Each input is ``length`` tokens drawn uniformly from ``vocab`` symbols; the label is 1 when token 0 occurs
more often than token 1 (ties: 0), and ``label_noise`` of the training labels are flipped. The model is
:class:`looptrace.models.looped.LoopedTransformer`: token embedding, one pre-norm transformer block (causal
multi-head self-attention and an MLP, LayerNorms) looped tau times with additive injection, read out at the
last position (which attends to every token: without attention it would see only its own). Trained full batch
with AdamW and truncated BPTT (the last ``bptt_k`` steps), like :class:`~looptrace.apps.evaluation.task.MajorityTask`,
in about two seconds on one thread. With ``vocab ** length`` (16.8 million) possible inputs, the queries and the
held-out test inputs are distinct inputs outside the training set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.apps.evaluation.task import Batch, EvalTask, register_task
from looptrace.models.looped import LoopedConfig, LoopedTransformer


def _last(model: nn.Module, x: torch.Tensor, loops: int | None = None, bptt_k: int | None = -1) -> torch.Tensor:
    """``[B, 2]``: the logits at the last position (the one that has seen every token)."""
    return model(x, n_loops=loops, bptt_k=bptt_k)[:, -1]


def attention_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-example loss as trained (truncated BPTT)."""
    x, y = batch
    return F.cross_entropy(_last(model, x), y, reduction="none")


def attention_full_bptt_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-example loss with every loop step backpropagated."""
    x, y = batch
    return F.cross_entropy(_last(model, x, bptt_k=None), y, reduction="none")


@register_task
@dataclasses.dataclass(frozen=True)
class CountAttentionTask(EvalTask):
    """Does token 0 occur more often than token 1? A looped causal transformer with attention."""

    name: ClassVar[str] = "count-attention"
    description: ClassVar[str] = "which of two tokens occurs more often, looped causal transformer with attention"
    #: ``looptrace eval --task count-attention``'s sizes where they differ from the defaults: a training takes
    #: about twice the MLP's, so the removal test keeps fewer queries and methods (the LDS keeps its subsets).
    eval_sizes: ClassVar[dict[str, Any]] = {
        "removal_queries": 12,
        "removal_fractions": (0.05, 0.1),
        "removal_methods": ("tracin", "tracin_last", "sdi_full"),
        "depth_seeds": tuple(range(6)),
        "depth_random_draws": 5,
    }
    vocab: int = 4
    length: int = 12
    label_noise: float = 0.1
    d_model: int = 16
    n_heads: int = 2
    lr: float = 2e-2

    def __post_init__(self) -> None:
        if self.vocab < 3:
            raise lt.ConfigError(f"vocab must be at least 3 (two counted tokens and a distractor), got {self.vocab}")
        if self.n_query + self.n_test > self.input_space() - self.n_train:
            raise lt.ConfigError(f"{self.vocab} ** {self.length} inputs are too few for the unseen queries")

    def model(self) -> LoopedTransformer:
        torch.manual_seed(self.seed)
        cfg = LoopedConfig(vocab_size=self.vocab, out_size=2, d_model=self.d_model, n_heads=self.n_heads,
                           d_mlp=2 * self.d_model, n_loops=self.loops, max_len=self.length, causal=True,
                           bptt_k=self.bptt_k)  # fmt: skip
        return LoopedTransformer(cfg)

    def logits(
        self, model: nn.Module, x: torch.Tensor, loops: int | None = None, bptt_k: int | None = -1
    ) -> torch.Tensor:
        return _last(model, x, loops, bptt_k)

    loss_fn = staticmethod(attention_loss)
    full_bptt_loss = staticmethod(attention_full_bptt_loss)

    def input_space(self) -> int:
        return int(self.vocab**self.length)

    def codes(self, x: torch.Tensor) -> list[int]:
        weights = self.vocab ** torch.arange(x.shape[1], dtype=torch.int64)
        return (x.to(torch.int64) * weights).sum(1).tolist()

    def clean_labels(self, x: torch.Tensor) -> torch.Tensor:
        return ((x == 0).sum(1) > (x == 1).sum(1)).long()

    def data(self) -> dict[str, Batch]:
        """Train (labels flipped with probability ``label_noise``; inputs may repeat) and the unseen sets:
        query and test inputs are distinct, none is a training input, and their labels are clean."""
        key = (self.vocab, self.length, self.n_train, self.n_query, self.n_test, self.label_noise, self.seed)
        if key not in _DATA_CACHE:
            g = torch.Generator().manual_seed(self.seed * 1000)
            x = torch.randint(0, self.vocab, (self.n_train, self.length), generator=g)
            y = self.clean_labels(x)
            flip = torch.rand(self.n_train, generator=g) < self.label_noise
            out = {"train": (x, torch.where(flip, 1 - y, y))}
            seen = set(self.codes(x))
            rows: list[torch.Tensor] = []
            g = torch.Generator().manual_seed(self.seed * 1000 + 1)
            while len(rows) < self.n_query + self.n_test:  # rejection: distinct inputs outside the training set
                cand = torch.randint(0, self.vocab, (2 * (self.n_query + self.n_test), self.length), generator=g)
                for row, c in zip(cand, self.codes(cand), strict=True):
                    if c not in seen and len(rows) < self.n_query + self.n_test:
                        seen.add(c)
                        rows.append(row)
            xs = torch.stack(rows)
            ys = self.clean_labels(xs)
            out["query"] = (xs[: self.n_query], ys[: self.n_query])
            out["test"] = (xs[self.n_query :], ys[self.n_query :])
            _DATA_CACHE[key] = out
        return _DATA_CACHE[key]

    def noisy_labels(self) -> np.ndarray:
        x, y = self.data()["train"]
        return (self.clean_labels(x) != y).numpy()


_DATA_CACHE: dict[tuple[Any, ...], dict[str, Batch]] = {}

"""The evaluation task: a looped transformer that trains in about a second, so that it can be retrained
hundreds of times.

Majority of 7 bits with 10 % of the training labels flipped (so that examples differ in what they
teach), a looped residual MLP block (read-in Linear(7, d), h_t = h_{t-1} + MLP(LN(h_{t-1} + e)) for
t = 1..tau, read-out Linear(d, 2)), trained full batch with AdamW and truncated BPTT (the last k = 2 of
4 steps), as recurrent-depth models are. It is small on purpose: a training takes a fraction of a
second, so the evaluation can retrain hundreds of times on two cores. Every run is a pure function of
(kept examples, seed): the same initialisation and the same data order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """The task, its model and its training (recorded in results.json)."""

    n_train: int = 200
    n_query: int = 60
    bits: int = 7
    label_noise: float = 0.1
    d_model: int = 32
    loops: int = 4
    bptt_k: int = 2
    steps: int = 120
    lr: float = 1e-2
    ckpt_every: int = 12
    seed: int = 0

    def model(self) -> LoopedMLP:
        torch.manual_seed(self.seed)
        return LoopedMLP(self.bits, self.d_model, self.loops, self.bptt_k)

    def data(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Train (with flipped labels) and query (clean) examples: (bits [n, 7], labels [n])."""
        out = {}
        for role, n, noise, seed in (("train", self.n_train, self.label_noise, 0), ("query", self.n_query, 0.0, 1)):
            g = torch.Generator().manual_seed(self.seed * 1000 + seed)
            x = torch.randint(0, 2, (n, self.bits), generator=g)
            y = (x.sum(1) * 2 > self.bits).long()
            flip = torch.rand(n, generator=g) < noise
            out[role] = (x, torch.where(flip, 1 - y, y))
        return out


class Block(nn.Module):
    """One loop step: h + MLP(LN(h + e))."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + self.out(F.gelu(self.fc(self.norm(h + e))))


class LoopedMLP(nn.Module):
    """Read-in, a residual MLP block looped tau times with additive injection, read-out."""

    def __init__(self, bits: int, d: int, loops: int, bptt_k: int | None) -> None:
        super().__init__()
        self.read_in = nn.Linear(bits, d)
        self.core = Block(d)
        self.head = nn.Linear(d, 2)
        self.loops, self.bptt_k = loops, bptt_k

    def forward(self, x: torch.Tensor, n_loops: int | None = None, bptt_k: int | None = -1) -> torch.Tensor:
        r = n_loops or self.loops
        k = self.bptt_k if bptt_k == -1 else bptt_k
        e = self.read_in(x.to(self.head.weight.dtype) * 2 - 1)  # bits as +-1
        h = torch.zeros_like(e)
        for t in range(1, r + 1):
            h = self.core(h, e)
            if k is not None and t <= r - k:
                h = h.detach()  # truncated BPTT: only the last k steps get gradient
        return self.head(h)


def logits(model: nn.Module, x: torch.Tensor, loops: int | None = None, bptt_k: int | None = -1) -> torch.Tensor:
    return model(x, n_loops=loops, bptt_k=bptt_k)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-example loss as trained (truncated BPTT)."""
    x, y = batch
    return F.cross_entropy(logits(model, x), y, reduction="none")


def full_bptt_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-example loss with every loop step backpropagated."""
    x, y = batch
    return F.cross_entropy(logits(model, x, bptt_k=None), y, reduction="none")


def margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loops: int | None = None) -> torch.Tensor:
    out = logits(model, x, loops)
    return out.gather(1, y[:, None])[:, 0] - out.gather(1, (1 - y)[:, None])[:, 0]


def train(
    task: EvalTask, keep: torch.Tensor | None = None, record: Path | None = None, weights: torch.Tensor | None = None
) -> LoopedMLP:
    """Train on the kept training examples (bool mask, default all; or per-example ``weights``); with
    ``record``, TracIn checkpoints are written there every ``ckpt_every`` steps."""
    data = task.data()
    x, y = data["train"]
    w = torch.ones(len(x)) if weights is None else weights.float()
    if keep is not None:
        w = w * keep.float()
    model = task.model()
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.0)
    recorder = lt.CheckpointRecorder(record, every=task.ckpt_every, body=model.core) if record is not None else None
    total = w.sum().clamp_min(1.0)
    for _ in range(task.steps):
        loss = (loss_fn(model, (x, y)) * w).sum() / total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if recorder is not None:
            recorder.step(model, opt)
    return model.eval()


@torch.no_grad()
def query_losses(model: nn.Module, task: EvalTask) -> torch.Tensor:
    x, y = task.data()["query"]
    return F.cross_entropy(logits(model, x), y, reduction="none")


@torch.no_grad()
def loop_curve(model: nn.Module, task: EvalTask, budgets: tuple[int, ...] = (1, 2, 3, 4, 6, 8)) -> dict[str, float]:
    """Query accuracy at each test-time loop budget."""
    x, y = task.data()["query"]
    return {str(r): float((logits(model, x, loops=r).argmax(-1) == y).float().mean()) for r in budgets}


def flip_fraction(task: EvalTask) -> float:
    x, y = task.data()["train"]
    return float(((x.sum(1) * 2 > task.bits).long() != y).float().mean())

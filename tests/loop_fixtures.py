"""A looped model in Inkling-2-Loop's shape, small enough for float64 tests (and importable by the CLI tests:
``--model tests.loop_fixtures:make_range_loop``).

Two blocks are looped ``passes`` times. Every pass restarts from the pre-loop state; passes after the first
receive messages from the previous pass through a ``Messenger`` that is tied across passes and called
before each block (so it runs inside the passes, outside the step modules). Each block holds what made
Inkling hard: a short convolution that reads its ``conv1d.weight`` in its own forward (never calling the
``Conv1d``), a parent that reads a child Linear's weight besides calling it, and a router whose two
outputs are computed one from the other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

D, T, VOCAB, CLASSES = 6, 5, 9, 4


class ShortConv(nn.Module):
    """A causal depthwise convolution that reads ``conv1d.weight`` functionally (as Inkling's kernels do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(D, D, 3, groups=D, bias=False, padding=2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.conv1d.weight.squeeze(1)  # [D, 3]
        x = F.conv1d(h.transpose(1, 2), w.unsqueeze(1), padding=2, groups=D)[..., : h.shape[1]]
        return (h + x.transpose(1, 2)) / 2


class Router(nn.Module):
    """Returns (logits, weights) with the weights computed from the logits (only the weights are used)."""

    def __init__(self, experts: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, D))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = h @ self.weight.T
        return logits, logits.softmax(-1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.conv = ShortConv()
        self.router = Router()
        self.experts = nn.Linear(D, 3 * D)
        self.gate = nn.Linear(2 * D, D, bias=False)

    def forward(self, h: torch.Tensor, message: torch.Tensor | None = None) -> torch.Tensor:
        if message is not None:
            h = h + torch.tanh(self.gate(torch.cat([h, message], -1)))
        u = self.conv(torch.tanh(self.fc(self.norm(h))))
        u = u + 0.5 * F.linear(h, self.fc.weight)  # the child's weight read again, in the parent's forward
        _, w = self.router(u)  # [B, T, 3]
        e = self.experts(u).view(*u.shape[:-1], 3, D)
        return h + (w.unsqueeze(-1) * torch.tanh(e)).sum(-2)


class Messenger(nn.Module):
    """Messages for block ``i`` of a pass from the previous pass's block outputs (tied across passes)."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(blocks, D))
        self.proj = nn.Linear(D, D)

    def forward(self, states: torch.Tensor, last: torch.Tensor, i: int) -> torch.Tensor:
        # states [B, T, blocks, D], last [B, T, D] -> [B, T, D]
        score = (states * self.query[i]).sum(-1).softmax(-1)  # [B, T, blocks]
        return self.proj((score.unsqueeze(-1) * states).sum(-2) + last)


class RangeLoop(nn.Module):
    def __init__(self, passes: int = 3, blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, D)
        self.pre = nn.Linear(D, D)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.messenger = Messenger(blocks)
        self.head = nn.Linear(D, CLASSES)
        self.passes = passes
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = torch.tanh(self.pre(self.emb(x)))  # [B, T, D]
        h, states = start, []
        for blk in self.blocks:
            h = blk(h)
            states.append(h)
        for _ in range(1, self.passes):  # later passes restart from the pre-loop state, linked by messages
            prev, last = torch.stack(states, -2), h
            h, states = start, []
            for i, blk in enumerate(self.blocks):
                h = blk(h, self.messenger(prev, last, i))
                states.append(h)
        return self.head(h).mean(1)


def make_range_loop() -> nn.Module:
    return RangeLoop()


def range_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def range_batches(n: int = 2, b: int = 3, seed: int = 3) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (b, T), generator=g), torch.randint(0, CLASSES, (b,), generator=g)) for _ in range(n)
    ]


def make_range_dataset(role: str) -> torch.utils.data.Dataset:
    g = torch.Generator().manual_seed(0 if role == "train" else 1)
    n = 8 if role == "train" else 4
    return torch.utils.data.TensorDataset(
        torch.randint(0, VOCAB, (n, T), generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    )

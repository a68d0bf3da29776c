"""Parity (Fan et al. 2024): n random bits, "=", padding; the target is the parity bit at "=".

Token format: 0/1 bits, 2 is "=", 3 is padding, vocabulary 6 (4 and 5 unused, as in the original
code). An n-bit example is ``bits + [=] + [pad]`` (T = n + 2) padded to the batch's longest; the
model loops tau = T_max times and is read out per example at loop step n (``readout``, 1-based).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 6
EQ, PAD = 2, 3


@dataclasses.dataclass
class ParityBatch:
    """x [B, T] tokens, y [B] parity labels, n [B] bit counts (= the 1-based read-out step)."""

    x: torch.Tensor
    y: torch.Tensor
    n: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def loops(self) -> int:
        return int(self.x.shape[1])

    def bit_lists(self) -> list[list[int]]:
        """The examples' bits, unpadded."""
        return [self.x[i, : self.n[i]].tolist() for i in range(len(self))]

    def to(self, device: torch.device | str) -> ParityBatch:
        return ParityBatch(self.x.to(device), self.y.to(device), self.n.to(device))


def encode(bits: list[list[int]], pad_to: int | None = None) -> ParityBatch:
    """Encode lists of bits; rows are padded to ``pad_to`` (default: the longest n + 2)."""
    longest = max(len(b) for b in bits) + 2
    t = max(longest, pad_to or 0)
    x = torch.full((len(bits), t), PAD, dtype=torch.long)
    for i, b in enumerate(bits):
        x[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        x[i, len(b)] = EQ
    y = torch.tensor([sum(b) % 2 for b in bits], dtype=torch.long)
    n = torch.tensor([len(b) for b in bits], dtype=torch.long)
    return ParityBatch(x, y, n)


def sample(
    batch_size: int, min_len: int, max_len: int, generator: torch.Generator, pad_to: int | None = None
) -> ParityBatch:
    """Random parity examples with n uniform in [min_len, max_len]."""
    ns = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator).tolist()
    bits = [torch.randint(0, 2, (n,), generator=generator).tolist() for n in ns]
    return encode(bits, pad_to)


def fixed_length(batch_size: int, length: int, generator: torch.Generator) -> ParityBatch:
    return sample(batch_size, length, length, generator)


def alternating_probes(length: int = 40) -> ParityBatch:
    """The two alternating probes 0101... and 1010... of ``length`` bits (T = length + 2)."""
    a = [i % 2 for i in range(length)]
    return encode([a, [1 - v for v in a]])


def logits_at_answer(model: nn.Module, batch: ParityBatch, loops: int | None = None, **kwargs: Any) -> torch.Tensor:
    """[B, V] logits at the "=" position, read out at step n of each example."""
    batch = batch.to(next(model.parameters()).device)
    out = model(batch.x, n_loops=loops or batch.loops, readout_steps=batch.n, **kwargs)
    logits = out["logits"] if isinstance(out, dict) else out
    return logits[torch.arange(len(batch)), batch.n]


def loss(model: nn.Module, batch: ParityBatch) -> torch.Tensor:
    """Per-example cross-entropy of the parity bit (the masked loss of the paper)."""
    logits = logits_at_answer(model, batch)
    return F.cross_entropy(logits, batch.y.to(logits.device), reduction="none")


def bucketed_loss(model: nn.Module, batch: ParityBatch, buckets: int) -> torch.Tensor:
    """:func:`loss` computed on ``buckets`` groups of similar length, each cut to its own longest example.

    The same per-example values as :func:`loss` (attention is causal and example i is read out at step n_i at
    position n_i, so the padding after it and the loop steps after n_i never reach its logits), at a fraction of
    the cost when lengths vary: a batch padded to T costs about T^2 token-steps, four length groups about half.
    """
    if buckets <= 1 or len(batch) < 2 * buckets:
        return loss(model, batch)
    order = torch.argsort(batch.n)
    values = []
    for idx in torch.tensor_split(order, buckets):
        t = int(batch.n[idx].max()) + 2
        values.append(loss(model, ParityBatch(batch.x[idx, :t], batch.y[idx], batch.n[idx])))
    flat = torch.cat(values)
    out = torch.empty_like(flat)
    out[order.to(flat.device)] = flat
    return out


@torch.no_grad()
def accuracy(model: nn.Module, batch: ParityBatch, loops: int | None = None) -> float:
    pred = logits_at_answer(model, batch, loops).argmax(-1)
    return float((pred == batch.y.to(pred.device)).float().mean())


def as_tuples(batch: ParityBatch, batch_size: int) -> list[ParityBatch]:
    """Split into loader-ordered batches (for featurisation)."""
    return [
        ParityBatch(batch.x[i : i + batch_size], batch.y[i : i + batch_size], batch.n[i : i + batch_size])
        for i in range(0, len(batch), batch_size)
    ]

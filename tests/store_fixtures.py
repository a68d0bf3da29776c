"""Importable factories for the CLI tests (``--model tests.store_fixtures:make_model`` ...)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from looptrace.models.looped import LoopedConfig, LoopedTransformer


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return LoopedTransformer(
        LoopedConfig(vocab_size=11, d_model=16, n_heads=2, d_mlp=24, n_loops=3, max_len=8, injection="concat")
    )


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def make_dataset(role: str, n: int | None = None) -> torch.utils.data.Dataset:
    n = n or (40 if role == "train" else 12)
    g = torch.Generator().manual_seed(0 if role == "train" else 1)
    x = torch.randint(0, 11, (n, 6), generator=g)
    y = torch.randint(0, 11, (n, 6), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def save_checkpoints(directory: str, k: int = 2) -> list[str]:
    model = make_model()
    paths = []
    for i in range(k):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1))
        path = f"{directory}/ck{i}.pt"
        torch.save({"model": model.state_dict(), "lr": 0.1 / (i + 1)}, path)
        paths.append(path)
    return paths

"""The evaluation tasks: small looped models that train in a fraction of a second, so that they can be
retrained hundreds of times on two cores.

A task is a frozen dataclass with the interface :class:`EvalTask` documents (model, data, train,
query losses, loop curve, losses); :data:`TASKS` names them, so a second task (say a small looped
transformer with attention) is one class and one entry.

The built-in task, :class:`MajorityTask`: majority of ``bits`` (odd) bits with 10 % of the training
labels flipped (so that examples differ in what they teach); a **looped residual MLP** (read-in
Linear(bits, d), h_t = h_{t-1} + MLP(LN(h_{t-1} + e)) for t = 1..tau, read-out Linear(d, 2); no attention)
trained full batch with AdamW and truncated BPTT (the last k = 2 of 4 steps), as recurrent-depth models
are. Queries are inputs the training set does not contain: with 11 bits there are 2048 inputs, the 400
training examples cover under a fifth of them, and the query and held-out test inputs are drawn without
replacement from the inputs not in the training set, so no query repeats a training input or another
query. Every run is a pure function
of (kept examples, seed): the same initialisation and the same data order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt

Batch = tuple[torch.Tensor, torch.Tensor]


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
        e = self.read_in(x.to(self.head.weight.dtype) * 2 - 1)  # bits as +-1: [B, d]
        h = torch.zeros_like(e)
        for t in range(1, r + 1):
            h = self.core(h, e)
            if k is not None and t <= r - k:
                h = h.detach()  # truncated BPTT: only the last k steps get gradient
        return self.head(h)  # [B, 2]


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


def _codes(x: torch.Tensor) -> list[int]:
    """Each row of bits as one integer (to compare inputs)."""
    weights = 2 ** torch.arange(x.shape[1], dtype=torch.int64)
    return (x.to(torch.int64) * weights).sum(1).tolist()


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """What the harness needs from a task; :class:`MajorityTask` is the built-in one.

    A task is frozen and recorded in results.json (``dataclasses.asdict``); ``seed`` draws the data and
    the initialisation, so ``dataclasses.replace(task, seed=s)`` is an independent replicate.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    n_train: int = 400
    n_query: int = 60
    n_test: int = 1000
    loops: int = 4
    bptt_k: int = 2
    steps: int = 60
    lr: float = 1e-2
    ckpt_every: int = 6
    seed: int = 0
    budgets: tuple[int, ...] = (1, 2, 3, 4, 6, 8)

    # --- what a task defines ------------------------------------------------------------------------
    def model(self) -> nn.Module:
        raise NotImplementedError

    def data(self) -> dict[str, Batch]:
        """``{"train", "query", "test"}``: (inputs, labels). Queries and test inputs are unseen in training."""
        raise NotImplementedError

    def step_module(self, model: nn.Module) -> nn.Module:
        return model.core  # type: ignore[return-value]

    def logits(
        self, model: nn.Module, x: torch.Tensor, loops: int | None = None, bptt_k: int | None = -1
    ) -> torch.Tensor:
        """``[B, classes]`` with ``loops`` loop steps (default the trained depth) and ``bptt_k`` (-1: as trained)."""
        return logits(model, x, loops, bptt_k)

    loss_fn = staticmethod(loss_fn)
    full_bptt_loss = staticmethod(full_bptt_loss)

    # --- shared by every task -----------------------------------------------------------------------
    def train(self, keep: torch.Tensor | None = None, record: Path | None = None) -> nn.Module:
        """Train on the kept training examples (bool mask, default all); with ``record``, TracIn
        checkpoints are written there every ``ckpt_every`` steps. Full batch, so the run depends only on
        (kept examples, seed)."""
        x, y = self.data()["train"]
        model = self.model()
        return self.fit(model, lambda step: self.loss_fn(model, (x, y)), keep=keep, record=record)

    def fit(
        self,
        model: nn.Module,
        per_example: Callable[[int], torch.Tensor],
        keep: torch.Tensor | None = None,
        record: Path | None = None,
        steps: int | None = None,
        first_step: int = 0,
    ) -> nn.Module:
        """The training loop every task shares: full-batch AdamW (a fresh optimizer) for ``steps`` steps (default
        ``self.steps``) on the mean over the kept examples of ``per_example(step)`` (the training set's per-example
        losses at that step), TracIn checkpoints written to ``record`` every ``ckpt_every`` steps, with the
        optimizer's second moments of every parameter (``precondition="adam"`` with ``outside=True`` needs the ones
        outside the loop too)."""
        n = len(self.data()["train"][1])
        w = torch.ones(n) if keep is None else keep.float()
        total = w.sum().clamp_min(1.0)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.0)
        recorder = lt.CheckpointRecorder(record, every=self.ckpt_every) if record is not None else None
        model.train()
        for step in range(first_step, first_step + (self.steps if steps is None else steps)):
            loss = (per_example(step) * w).sum() / total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if recorder is not None:
                recorder.step(model, opt)
        return model.eval()

    @torch.no_grad()
    def query_losses(self, model: nn.Module, role: str = "query") -> torch.Tensor:
        return self.loss_fn(model, self.data()[role])

    @torch.no_grad()
    def loop_curve(self, model: nn.Module, role: str = "test") -> dict[str, float]:
        """Accuracy on ``role``'s examples at each test-time loop budget."""
        x, y = self.data()[role]
        return {str(r): float((self.logits(model, x, loops=r).argmax(-1) == y).float().mean()) for r in self.budgets}

    def overlap(self) -> dict[str, int]:
        """How the sets relate: distinct inputs per set, and inputs shared between sets (0 by construction)."""
        d = {role: set(self.codes(x)) for role, (x, _) in self.data().items()}
        return {
            "input_space": self.input_space(),
            **{f"distinct_{role}": len(s) for role, s in d.items()},
            "query_in_train": len(d["query"] & d["train"]),
            "test_in_train": len(d["test"] & d["train"]),
            "test_in_query": len(d["test"] & d["query"]),
        }

    def input_space(self) -> int:
        raise NotImplementedError

    def codes(self, x: torch.Tensor) -> list[int]:
        """Each input as one integer (to compare inputs between sets)."""
        return _codes(x)

    def noisy_labels(self) -> np.ndarray | None:
        """``[N]`` bool: which training labels were corrupted on purpose (``None``: the task plants none)."""
        return None


@dataclasses.dataclass(frozen=True)
class MajorityTask(EvalTask):
    """Majority of ``bits`` bits, label noise on the training set, a looped residual MLP."""

    name: ClassVar[str] = "majority"
    description: ClassVar[str] = "majority of bits, looped residual MLP (no attention)"
    bits: int = 11
    label_noise: float = 0.1
    d_model: int = 32

    def __post_init__(self) -> None:
        if self.bits % 2 == 0:
            raise lt.ConfigError(f"bits must be odd (a majority with no ties), got {self.bits}")
        if self.n_query + self.n_test > 2**self.bits - self.n_train:
            raise lt.ConfigError(f"{self.bits} bits have too few inputs outside the training set for the queries")

    def model(self) -> LoopedMLP:
        torch.manual_seed(self.seed)
        return LoopedMLP(self.bits, self.d_model, self.loops, self.bptt_k)

    def input_space(self) -> int:
        return 2**self.bits

    def data(self) -> dict[str, Batch]:
        """Train (labels flipped with probability ``label_noise``; inputs may repeat) and the unseen sets:
        query and test inputs are distinct, and none is a training input."""
        return _majority_data(self.bits, self.n_train, self.n_query, self.n_test, self.label_noise, self.seed)

    def noisy_labels(self) -> np.ndarray:
        x, y = self.data()["train"]
        return ((x.sum(1) * 2 > self.bits).long() != y).numpy()


_DATA_CACHE: dict[tuple[Any, ...], dict[str, Batch]] = {}


def _majority_data(bits: int, n_train: int, n_query: int, n_test: int, noise: float, seed: int) -> dict[str, Batch]:
    key = (bits, n_train, n_query, n_test, noise, seed)
    if key not in _DATA_CACHE:
        g = torch.Generator().manual_seed(seed * 1000)
        x = torch.randint(0, 2, (n_train, bits), generator=g)
        y = (x.sum(1) * 2 > bits).long()
        flip = torch.rand(n_train, generator=g) < noise
        out = {"train": (x, torch.where(flip, 1 - y, y))}
        seen = set(_codes(x))
        unseen: list[int] = []
        g = torch.Generator().manual_seed(seed * 1000 + 1)
        while len(unseen) < n_query + n_test:  # rejection: distinct inputs outside the training set
            for c in torch.randint(0, 2**bits, (2 * (n_query + n_test),), generator=g).tolist():
                if c not in seen and len(unseen) < n_query + n_test:
                    seen.add(c)
                    unseen.append(c)
        codes = torch.tensor(unseen, dtype=torch.int64)
        xs = (codes[:, None] >> torch.arange(bits)) & 1
        ys = (xs.sum(1) * 2 > bits).long()
        out["query"] = (xs[:n_query], ys[:n_query])
        out["test"] = (xs[n_query:], ys[n_query:])
        _DATA_CACHE[key] = out
    return _DATA_CACHE[key]


#: The tasks ``looptrace eval --task NAME`` offers. A task in another module registers itself with
#: :func:`register_task`; ``looptrace.apps.evaluation`` imports those modules, so the table is complete.
TASKS: dict[str, type[EvalTask]] = {MajorityTask.name: MajorityTask}


def register_task(cls: type[EvalTask]) -> type[EvalTask]:
    """Class decorator: offer ``cls`` as ``looptrace eval --task cls.name``."""
    if not cls.name or cls.name in TASKS:
        raise lt.ConfigError(f"evaluation task name {cls.name!r} is empty or registered twice")
    TASKS[cls.name] = cls
    return cls

"""Sudoku (Yang et al. 2023): the task on generated unique-solution puzzles, the presets and the
influence sets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from looptrace.apps.registry import InfluenceSets, Preset
from looptrace.apps.runs import Run
from looptrace.apps.tasks import sudoku
from looptrace.apps.train_config import TrainConfig
from looptrace.models.looped import LoopedConfig

#: where generated puzzles are cached (relative to the working directory)
CACHE = Path("runs/.cache")


@dataclasses.dataclass
class SudokuTask:
    """Sudoku on generated unique-solution puzzles, split easy (train) / hard (test) by blanks."""

    name: str = "sudoku"
    n_puzzles: int = 3000
    min_blanks: int = 30
    max_blanks: int = 50
    data_seed: int = 0
    data_path: str | None = None  # a SATNet directory or our .npz; default: generate
    budgets: tuple[int, ...] = (4, 8, 16, 32, 64)
    eval_n: int = 300
    _split: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def split(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"train": (boards, solutions), "test": ...} as token tensors [N, 81]."""
        if self._split is None:
            if self.data_path:
                feats, labels = sudoku.load(self.data_path)
            else:
                feats, labels = _cached_puzzles(
                    "sudoku", self.n_puzzles, self.min_blanks, self.max_blanks, self.data_seed
                )
            parts = sudoku.difficulty_split(feats, labels, seed=self.data_seed)
            self._split = {k: (sudoku.boards(f), sudoku.solutions(lab)) for k, (f, lab) in parts.items()}
        return self._split

    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh puzzles of the training difficulty (blanks up to the train split's maximum), from
        another generator seed: in-distribution accuracy without scoring puzzles trained on."""
        x_train = self.split()["train"][0]
        hi = int((x_train == 0).sum(1).max())
        feats, labels = _cached_puzzles("sudoku_heldout", self.eval_n, self.min_blanks, hi, self.data_seed + 10_007)
        return sudoku.boards(feats), sudoku.solutions(labels)

    def batch(self, step: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.split()["train"]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        return x[idx], y[idx]

    def loss(self, model: nn.Module, batch: Any, loops: int | None) -> torch.Tensor:
        return sudoku.loss(model, batch[0], batch[1], loops)

    def evaluate(self, model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
        device = next(model.parameters()).device
        x, y = self.split()["test"]
        x, y = x[: self.eval_n].to(device), y[: self.eval_n].to(device)
        board, cell = {}, {}
        for b in self.budgets:
            board[str(b)], cell[str(b)] = sudoku.accuracy(model, x, y, loops=b)
        blanks = (x == 0).sum(1)
        hx, hy = (t.to(device) for t in self.heldout())
        held = {str(b): sudoku.accuracy(model, hx, hy, loops=b) for b in self.budgets}
        hb = (hx == 0).sum(1)
        return {
            "board_accuracy": board,
            "cell_accuracy": cell,
            "test_blanks": [int(blanks.min()), int(blanks.max())],
            "in_distribution": {
                "board_accuracy": {k: v[0] for k, v in held.items()},
                "cell_accuracy": {k: v[1] for k, v in held.items()},
                "blanks": [int(hb.min()), int(hb.max())],
            },
            "train_depth_mean": cfg.depth_mean,
        }


def _cached_puzzles(
    kind: str, n: int, min_blanks: int, max_blanks: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated puzzles in SATNet layout, cached under runs/.cache (written atomically)."""
    cache = CACHE / f"{kind}_{n}_{min_blanks}_{max_blanks}_{seed}.npz"
    if cache.exists():
        return sudoku.load(cache)
    feats, labels = sudoku.generate(n, min_blanks, max_blanks, seed=seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".partial.npz")  # np.savez appends .npz to any other name
    sudoku.save(tmp, feats, labels)
    tmp.replace(cache)
    return feats, labels


_MODEL: dict[str, Any] = dict(
    vocab_size=10,
    out_size=9,
    causal=False,
    injection="none",
    state_init="embedding",
    positions="learned",
    max_len=81,
    head_bias=False,
    head_norm=True,
)


def small() -> Preset:
    """CPU-sized: d=64 and depth mean 8 (max 16) so that training fits in under an hour on one CPU thread (measured: docs/results/sudoku), on
    puzzles with 10-40 blanks (train: the easiest 80 %, test: the hardest 20 %, 34-40 blanks).
    Measured here: with 30-50 blanks and 3000 steps blank-cell accuracy stayed at 0.2; with 10-40 it
    reached 0.34 in 3000 steps and was still improving."""
    return Preset(
        LoopedConfig(d_model=64, n_heads=4, n_loops=8, **_MODEL),
        TrainConfig(
            steps=6000,
            batch_size=32,
            lr=2e-3,
            warmup=150,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            depth_mean=8,
            depth_max=16,
            ckpt_every=600,
            eval_every=3000,
        ),
        SudokuTask(n_puzzles=3000, min_blanks=10, max_blanks=40),
    )


def paper() -> Preset:
    """Yang et al. / appendix D.3: d=128, 4 heads, depth mean 32 (max 64), batch 16, dropout 0.1."""
    return Preset(
        LoopedConfig(d_model=128, n_heads=4, n_loops=32, dropout=0.1, **_MODEL),
        TrainConfig(
            steps=50_000,
            batch_size=16,
            lr=1e-3,
            warmup=500,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            depth_mean=32,
            depth_max=64,
            ckpt_every=2500,
            eval_every=5000,
        ),
        SudokuTask(n_puzzles=10_000),
    )


def tiny() -> Preset:
    """Seconds on a CPU: a smoke-test size."""
    return Preset(
        LoopedConfig(d_model=16, n_heads=2, d_mlp=32, n_loops=4, **_MODEL),
        TrainConfig(
            steps=20,
            batch_size=8,
            lr=1e-3,
            warmup=5,
            depth_mean=3,
            depth_max=6,
            ckpt_every=10,
            eval_every=1000,
            log_every=5,
        ),
        SudokuTask(n_puzzles=40, budgets=(2, 4), eval_n=8),
    )


PRESETS = {"small": small, "paper": paper, "tiny": tiny}


def influence_sets(run: Run, n_train: int, n_query: int, loops: int | None) -> InfluenceSets:
    """The recorded task's easy train split and hard test split, at a fixed horizon (default: the
    model's loop count)."""
    task: SudokuTask = run.task
    split = task.split()
    horizon = loops or run.model_config.n_loops

    def sudoku_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        return sudoku.loss(model, batch[0], batch[1], horizon)

    datasets = {
        "train": TensorDataset(*(t[:n_train] for t in split["train"])),
        "query": TensorDataset(*(t[:n_query] for t in split["test"])),
    }
    blanks = [int((split["train"][0] == 0).sum(1).min()), int((split["train"][0] == 0).sum(1).max())]
    return InfluenceSets(datasets, sudoku_loss, {"task": task.name, "horizon": horizon, "train_blanks": blanks})

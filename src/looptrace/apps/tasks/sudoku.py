"""Sudoku: an offline generator of unique-solution puzzles in the SATNet tensor layout.

SATNet layout (Wang et al. 2019): ``features`` and ``labels`` are ``(N, 9, 9, 9)``; a given cell is
the one-hot of its digit, a blank cell is an all-zero 9-vector; labels are the one-hot solution.
``boards(features)`` gives tokens ``[N, 81]`` with 0 for blanks and 1..9 for digits.

The generator fills a grid by randomised backtracking, then blanks cells in random order while the
solution stays unique (a bitmask solver that stops at two solutions), up to the requested number
of blanks. Difficulty is the number of blanks, as in the paper.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from looptrace.errors import CorruptFileError

_ALL = 0x3FE  # bits 1..9
_BOX = [(r // 3) * 3 + c // 3 for r in range(9) for c in range(9)]


def _popcount(x: int) -> int:
    return bin(x).count("1")


def count_solutions(grid: list[int], limit: int = 2) -> int:
    """Number of solutions of ``grid`` (81 ints, 0 = blank), counting up to ``limit``."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    blanks = []
    for i, v in enumerate(grid):
        if v:
            bit = 1 << v
            r, c, b = i // 9, i % 9, _BOX[i]
            if rows[r] & bit or cols[c] & bit or boxes[b] & bit:
                return 0
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
        else:
            blanks.append(i)
    found = 0

    def search() -> None:
        nonlocal found
        best, best_free, best_n = -1, 0, 10
        for i in blanks:
            if grid[i]:
                continue
            free = _ALL & ~(rows[i // 9] | cols[i % 9] | boxes[_BOX[i]])
            n = _popcount(free)
            if n < best_n:
                best, best_free, best_n = i, free, n
                if n <= 1:
                    break
        if best < 0:
            found += 1
            return
        r, c, b = best // 9, best % 9, _BOX[best]
        free = best_free
        while free and found < limit:
            bit = free & -free
            free ^= bit
            grid[best] = bit.bit_length() - 1
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            search()
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            grid[best] = 0

    search()
    return found


def random_solution(rng: random.Random) -> list[int]:
    grid = [0] * 81
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9

    def fill(i: int) -> bool:
        if i == 81:
            return True
        r, c, b = i // 9, i % 9, _BOX[i]
        digits = [d for d in range(1, 10) if not ((rows[r] | cols[c] | boxes[b]) >> d) & 1]
        rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            grid[i] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            if fill(i + 1):
                return True
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
        grid[i] = 0
        return False

    fill(0)
    return grid


def make_puzzle(rng: random.Random, blanks: int) -> tuple[list[int], list[int]]:
    """(puzzle, solution): up to ``blanks`` cells removed, the solution still unique."""
    solution = random_solution(rng)
    puzzle = list(solution)
    order = list(range(81))
    rng.shuffle(order)
    removed = 0
    for i in order:
        if removed >= blanks:
            break
        v = puzzle[i]
        puzzle[i] = 0
        if count_solutions(list(puzzle)) == 1:
            removed += 1
        else:
            puzzle[i] = v
    return puzzle, solution


def generate(n: int, min_blanks: int = 30, max_blanks: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` unique-solution puzzles with blank counts drawn uniformly from [min, max], SATNet layout."""
    rng = random.Random(seed)
    puzzles, solutions = [], []
    for _ in range(n):
        p, s = make_puzzle(rng, rng.randint(min_blanks, max_blanks))
        puzzles.append(p)
        solutions.append(s)
    return to_satnet(torch.tensor(puzzles), torch.tensor(solutions))


def to_satnet(puzzles: torch.Tensor, solutions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boards ``[N, 81]`` (0 = blank) and solutions -> SATNet ``(N, 9, 9, 9)`` float tensors."""
    feats = F.one_hot(puzzles, 10)[..., 1:].float().view(-1, 9, 9, 9)
    labels = F.one_hot(solutions, 10)[..., 1:].float().view(-1, 9, 9, 9)
    return feats, labels


def boards(features: torch.Tensor) -> torch.Tensor:
    """SATNet features -> tokens ``[N, 81]``: 0 for a blank (all-zero vector), else digit 1..9."""
    f = features.reshape(features.shape[0], 81, 9)
    return ((f.sum(-1) != 0) * (f.argmax(-1) + 1)).long()


def solutions(labels: torch.Tensor) -> torch.Tensor:
    """SATNet labels -> digits ``[N, 81]`` in 1..9."""
    return labels.reshape(labels.shape[0], 81, 9).argmax(-1).long() + 1


def n_blanks(features: torch.Tensor) -> torch.Tensor:
    return (boards(features) == 0).sum(-1)


def save(path: str | os.PathLike[str], features: torch.Tensor, labels: torch.Tensor) -> None:
    """Save compactly as .npz (uint8 boards and solutions; no pickle)."""
    np.savez_compressed(
        path, boards=boards(features).numpy().astype(np.uint8), solutions=solutions(labels).numpy().astype(np.uint8)
    )


def load(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read puzzles: our .npz, or a SATNet directory with ``features.pt`` and ``labels.pt``."""
    path = Path(path)
    if path.is_dir():
        try:
            feats = torch.load(path / "features.pt", map_location="cpu", weights_only=True)
            labels = torch.load(path / "labels.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CorruptFileError(f"cannot read SATNet tensors from {path}: {exc}") from exc
        if feats.shape[1:] != (9, 9, 9) or labels.shape != feats.shape:
            raise CorruptFileError(
                f"SATNet tensors in {path} have shapes {tuple(feats.shape)}, {tuple(labels.shape)}; expected (N, 9, 9, 9)"
            )
        return feats.float(), labels.float()
    try:
        with np.load(path, allow_pickle=False) as z:
            b, s = torch.from_numpy(z["boards"].astype(np.int64)), torch.from_numpy(z["solutions"].astype(np.int64))
    except Exception as exc:
        raise CorruptFileError(f"cannot read Sudoku puzzles from {path}: {exc}") from exc
    return to_satnet(b, s)


def difficulty_split(
    features: torch.Tensor, labels: torch.Tensor, train_frac: float = 0.8, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The paper's non-IID split: sort by blanks, easiest 80 % train, hardest 20 % test, each shuffled."""
    order = torch.argsort(n_blanks(features), stable=True)
    cut = int(train_frac * len(order))
    g = torch.Generator().manual_seed(seed)
    tr, te = order[:cut], order[cut:]
    tr, te = tr[torch.randperm(len(tr), generator=g)], te[torch.randperm(len(te), generator=g)]
    return {"train": (features[tr], labels[tr]), "test": (features[te], labels[te])}


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loops: int | None = None) -> torch.Tensor:
    """Per-puzzle mean cross-entropy over blank cells. x: boards [B, 81]; y: digits 1..9 [B, 81]."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    logits = model(x, n_loops=loops)  # [B, 81, 9]
    ce = F.cross_entropy(logits.flatten(0, 1), (y - 1).flatten(), reduction="none").view(y.shape)
    blank = (x == 0).to(ce.dtype)
    return (ce * blank).sum(1) / blank.sum(1).clamp_min(1)


@torch.no_grad()
def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loops: int, batch_size: int = 256
) -> tuple[float, float]:
    """(board accuracy, blank-cell accuracy) at a loop budget; a board counts only if every blank is right."""
    boards_ok, cells_ok, cells = 0, 0.0, 0.0
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        pred = model(xb, n_loops=loops).argmax(-1) + 1
        blank = xb == 0
        right = (pred == yb) | ~blank
        boards_ok += int(right.all(1).sum())
        cells_ok += float(((pred == yb) & blank).sum())
        cells += float(blank.sum())
    return boards_ok / len(x), cells_ok / max(cells, 1)

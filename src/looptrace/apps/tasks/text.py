"""A tiny offline language-modelling task: stdlib docstrings, arithmetic word problems, a BPE tokenizer.

* Pretraining text: docstrings of the Python standard library, read with ``ast`` from the source
  files on this machine (nothing is imported or downloaded), in a fixed order.
* Arithmetic word problems with worked answers in GSM8K's ``#### answer`` format, generated from
  templates; train and test use disjoint templates.
* A byte-level BPE tokenizer trained offline on that text.
"""

from __future__ import annotations

import ast
import collections
import itertools
import json
import os
import random
import re
import sysconfig
from pathlib import Path

import torch

_WORD = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")


def stdlib_docstrings(max_bytes: int = 400_000) -> str:
    """Docstrings of the standard library's modules, classes and functions, in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    size = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    out.append(doc.strip())
                    size += len(doc)
        if size >= max_bytes:
            break
    return "\n\n".join(out)


_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "shells"]

# (question template, worked answer template, answer function); {a}, {b}, {c} are numbers
_TRAIN_TEMPLATES = [
    ("{n} has {a} {i}. {n} buys {b} more. How many {i} does {n} have now?", "{a} + {b} = {r}", lambda a, b, c: a + b),
    ("{n} had {a} {i} and gave away {b}. How many {i} are left?", "{a} - {b} = {r}", lambda a, b, c: a - b),
    ("{n} packs {a} boxes with {b} {i} each. How many {i} in total?", "{a} * {b} = {r}", lambda a, b, c: a * b),
    (
        "{n} has {a} {i}, finds {b} and then {c} more. How many {i} now?",
        "{a} + {b} = {s}, {s} + {c} = {r}",
        lambda a, b, c: a + b + c,
    ),
]
_TEST_TEMPLATES = [
    (
        "There are {a} {i} in a jar. {n} adds {b}. How many {i} are in the jar?",
        "{a} + {b} = {r}",
        lambda a, b, c: a + b,
    ),
    ("{n} sells {b} of {a} {i}. How many {i} remain?", "{a} - {b} = {r}", lambda a, b, c: a - b),
    ("Each of {a} bags holds {b} {i}. How many {i} are there?", "{a} * {b} = {r}", lambda a, b, c: a * b),
]


def arithmetic_problems(n: int, split: str = "train", seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs; the answer ends with ``#### <number>`` (GSM8K format)."""
    templates = _TRAIN_TEMPLATES if split == "train" else _TEST_TEMPLATES
    rng = random.Random(f"{split}-{seed}")
    out = []
    for _ in range(n):
        q, w, f = templates[rng.randrange(len(templates))]
        a, b, c = rng.randint(2, 20), rng.randint(1, 9), rng.randint(1, 9)
        if "-" in w and b > a:
            a, b = b, a
        r = f(a, b, c)
        fmt = dict(n=rng.choice(_NAMES), i=rng.choice(_ITEMS), a=a, b=b, c=c, r=r, s=a + b)
        out.append((q.format(**fmt), w.format(**fmt) + f" #### {r}"))
    return out


def render(question: str, answer: str) -> tuple[str, str]:
    """(prompt, completion): the loss of fine-tuning is on the completion only."""
    return f"Question: {question}\nAnswer:", f" {answer}\n"


class BPETokenizer:
    """Byte-level BPE: bytes 0..255 plus learned merges; id 256 + k is merge k."""

    def __init__(self, merges: list[tuple[int, int]]) -> None:
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for i, (a, b) in enumerate(self.merges):
            self.vocab[256 + i] = self.vocab[a] + self.vocab[b]
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    @classmethod
    def train(cls, text: str, vocab_size: int = 512) -> BPETokenizer:
        """Learn ``vocab_size - 256`` merges (incremental pair counts over unique words)."""
        counts = collections.Counter(_WORD.findall(text))
        words = [list(w.encode()) for w in counts]
        freq = list(counts.values())
        pairs: collections.Counter[tuple[int, int]] = collections.Counter()
        where: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
        for wi, w in enumerate(words):
            for p in itertools.pairwise(w):
                pairs[p] += freq[wi]
                where[p].add(wi)
        merges: list[tuple[int, int]] = []
        while 256 + len(merges) < vocab_size and pairs:
            best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
            if pairs[best] < 2:
                break
            new = 256 + len(merges)
            merges.append(best)
            for wi in list(where[best]):
                w = words[wi]
                for p in itertools.pairwise(w):
                    pairs[p] -= freq[wi]
                    if pairs[p] <= 0:
                        del pairs[p]
                merged, i = [], 0
                while i < len(w):
                    if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                        merged.append(new)
                        i += 2
                    else:
                        merged.append(w[i])
                        i += 1
                words[wi] = merged
                for p in itertools.pairwise(merged):
                    pairs[p] += freq[wi]
                    where[p].add(wi)
            where.pop(best, None)
        return cls(merges)

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids = list(word.encode())
        while len(ids) > 1:
            ranked = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(ids))]
            rank, i = min(ranked)
            if rank == 1 << 30:
                break
            ids = [*ids[:i], 256 + rank, *ids[i + 2 :]]
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [t for w in _WORD.findall(text) for t in self._encode_word(w)]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps({"merges": self.merges}))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        return cls([tuple(m) for m in json.loads(Path(path).read_text())["merges"]])  # type: ignore[misc]


def pack(ids: list[int], seq: int) -> torch.Tensor:
    """Non-overlapping windows [n, seq + 1] of a token stream (inputs and next-token targets)."""
    n = (len(ids) - 1) // seq
    t = torch.tensor(ids[: n * seq + 1], dtype=torch.long)
    return torch.stack([t[i * seq : i * seq + seq + 1] for i in range(n)])


def finetune_examples(
    tok: BPETokenizer, pairs: list[tuple[str, str]], seq: int, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, seq], y [n, seq], mask [n, seq]): the mask marks completion (answer) tokens only.

    A prompt too long for the window loses its beginning, never the answer."""
    xs, ys, ms = [], [], []
    for q, a in pairs:
        prompt, completion = render(q, a)
        p, c = tok.encode(prompt), tok.encode(completion)
        ids = (p + c)[-(seq + 1) :]
        mask = ([0] * len(p) + [1] * len(c))[-(seq + 1) :]
        ids += [pad] * (seq + 1 - len(ids))
        mask += [0] * (seq + 1 - len(mask))
        xs.append(ids[:-1])
        ys.append(ids[1:])
        ms.append(mask[1:])
    return torch.tensor(xs), torch.tensor(ys), torch.tensor(ms, dtype=torch.float32)

"""The recursive LM (nanochat-style prelude / recurrent core / coda): the task (pretraining on the
standard library's docstrings and generated arithmetic problems, then fine-tuning on the answers),
the presets, the two-stage training and the influence sets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from looptrace.apps.registry import InfluenceSets, Preset
from looptrace.apps.runs import Run, make_record
from looptrace.apps.studies.sudoku.task import CACHE
from looptrace.apps.tasks import text
from looptrace.apps.train_config import TrainConfig
from looptrace.apps.training import train
from looptrace.io import atomic_write_json
from looptrace.models.looped import LoopedConfig


@dataclasses.dataclass
class TextData:
    tok: text.BPETokenizer
    stream: torch.Tensor  # [n, seq + 1] pretraining windows
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x, y, answer mask
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class RecursiveGPTTask:
    """Pretrain on stdlib docstrings + arithmetic problems, then fine-tune on the answers only."""

    name: str = "recursive-gpt"
    stage: str = "pretrain"
    seq: int = 96
    vocab: int = 512
    n_train: int = 4000
    n_test: int = 256
    doc_bytes: int = 300_000
    eval_loops: tuple[int, ...] = tuple(range(1, 17))
    seed: int = 0
    _data: TextData | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def data(self) -> TextData:
        if self._data is None:
            cache = CACHE / f"bpe_{self.vocab}_{self.doc_bytes}_{self.n_train}_{self.seed}.json"
            train_pairs = text.arithmetic_problems(self.n_train, "train", self.seed)
            test_pairs = text.arithmetic_problems(self.n_test, "test", self.seed)
            docs = text.stdlib_docstrings(self.doc_bytes)
            corpus = docs + "\n\n" + "\n".join("".join(text.render(q, a)) for q, a in train_pairs)
            if cache.exists():
                tok = text.BPETokenizer.load(cache)
            else:
                tok = text.BPETokenizer.train(corpus, self.vocab)
                cache.parent.mkdir(parents=True, exist_ok=True)
                tok.save(cache)  # atomic: BPETokenizer.save writes a temporary file and renames it
            self._data = TextData(
                tok,
                text.pack(tok.encode(corpus), self.seq),
                text.finetune_examples(tok, train_pairs, self.seq),
                text.finetune_examples(tok, test_pairs, self.seq),
            )
        return self._data

    def batch(self, step: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.data()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        if self.stage == "pretrain":
            idx = torch.randint(0, len(d.stream), (cfg.batch_size,), generator=g)
            w = d.stream[idx]
            return w[:, :-1], w[:, 1:], torch.ones(cfg.batch_size, self.seq)
        x, y, m = d.train
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        return x[idx], y[idx], m[idx]

    def loss(self, model: nn.Module, batch: Any, loops: int | None) -> torch.Tensor:
        return masked_lm_loss(model, batch, loops)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
        device = next(model.parameters()).device
        x, y, m = (t.to(device) for t in self.data().test)
        acc, loss = {}, {}
        for r in self.eval_loops:
            logits = model(x, n_loops=r)
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
            loss[str(r)] = float(((ce * m).sum(1) / m.sum(1)).mean())
            right = (logits.argmax(-1) == y) | (m == 0)
            acc[str(r)] = float(right.all(1).float().mean())
        return {"answer_accuracy": acc, "answer_loss": loss, "stage": self.stage}


def masked_lm_loss(model: nn.Module, batch: Any, loops: int | None = None, bptt_k: int | None = -1) -> torch.Tensor:
    """Per-example mean token cross-entropy over the mask (all tokens, or the answer only); ``bptt_k`` as the
    model takes it (-1: as configured; None: full BPTT)."""
    x, y, m = batch
    logits = model(x, n_loops=loops, bptt_k=bptt_k)
    ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    return (ce * m).sum(1) / m.sum(1).clamp_min(1)


_MODEL: dict[str, Any] = dict(
    causal=True,
    injection="concat",
    state_init="embedding",
    positions="rotary",
    norm="rmsnorm",
    mlp="relu2",
    bias=False,
    qk_norm=True,
    softcap=15.0,
    bptt_k=4,
    head_norm=True,
)


def small() -> Preset:
    """CPU-sized: d=64, sequences of 64 tokens, 1/2/1 blocks; both stages take minutes on a CPU (measured: docs/results/recursive-gpt).
    Truncated BPTT k=4, depth mean 4 (max 16), s_0 = e (nanochat's recursive branch)."""
    return Preset(
        LoopedConfig(
            vocab_size=512, d_model=64, n_heads=4, n_prelude=1, n_core=2, n_coda=1, n_loops=4, max_len=64, **_MODEL
        ),
        TrainConfig(
            steps=1600, batch_size=16, lr=3e-3, warmup=100, depth_mean=4, depth_max=16, ckpt_every=100, eval_every=800
        ),
        RecursiveGPTTask(seq=64),
    )


def paper() -> Preset:
    """The recursive nanochat shape (2/4/2 blocks, d=256) at a size a GPU trains in hours."""
    return Preset(
        LoopedConfig(
            vocab_size=512, d_model=256, n_heads=4, n_prelude=2, n_core=4, n_coda=2, n_loops=4, max_len=256, **_MODEL
        ),
        TrainConfig(
            steps=20_000,
            batch_size=32,
            lr=1e-3,
            warmup=500,
            weight_decay=0.0,
            depth_mean=4,
            depth_max=16,
            ckpt_every=1000,
            eval_every=5000,
        ),
        RecursiveGPTTask(seq=256),
    )


def tiny() -> Preset:
    """Seconds on a CPU: a smoke-test size."""
    return Preset(
        LoopedConfig(
            vocab_size=300,
            d_model=16,
            n_heads=2,
            d_mlp=32,
            n_prelude=1,
            n_core=1,
            n_coda=1,
            n_loops=3,
            max_len=64,
            **_MODEL,
        ),
        TrainConfig(
            steps=10,
            batch_size=4,
            lr=1e-3,
            warmup=2,
            depth_mean=3,
            depth_max=6,
            ckpt_every=5,
            eval_every=1000,
            log_every=5,
        ),
        RecursiveGPTTask(seq=48, vocab=300, n_train=40, n_test=8, doc_bytes=20_000, eval_loops=(1, 2, 4)),
    )


PRESETS = {"small": small, "paper": paper, "tiny": tiny}


def train_two_stages(
    preset: Preset, out: Path, record: dict[str, Any], progress: bool, device: str = "cpu"
) -> dict[str, Any]:
    """Pretraining into ``out/pretrain``, then fine-tuning on the answers into ``out/finetune`` (half
    the steps, a third of the learning rate), each stage with its own full run record."""
    task, cfg = preset.task, preset.train
    pre_task = dataclasses.replace(task, stage="pretrain")
    pre_cfg = dataclasses.replace(cfg, stage="pretrain")
    pre_record = make_record(record["study"], record["preset"], pre_task, preset.model, pre_cfg, record["overrides"])
    pre = train(pre_task, preset.model, pre_cfg, out / "pretrain", record=pre_record, progress=progress, device=device)
    init = torch.load(out / "pretrain" / "model.pt", map_location="cpu", weights_only=True)
    ft_task = dataclasses.replace(task, stage="finetune")
    ft_task._data = pre_task._data  # the tokenizer and examples are the same
    ft_cfg = dataclasses.replace(
        cfg, stage="finetune", steps=max(1, cfg.steps // 2), lr=cfg.lr / 3, warmup=max(1, cfg.warmup // 2)
    )
    ft_record = make_record(record["study"], record["preset"], ft_task, preset.model, ft_cfg, record["overrides"])
    fin = train(
        ft_task, preset.model, ft_cfg, out / "finetune", record=ft_record, init=init, progress=progress, device=device
    )
    metrics = {
        "task": task.name,
        "pretrain": {k: v for k, v in pre.items() if k != "history"},
        **{k: v for k, v in fin.items() if k != "history"},
    }
    metrics["train_time_s"] = pre.get("train_time_s", 0.0) + fin.get("train_time_s", 0.0)
    atomic_write_json(metrics, out / "metrics.json")
    return metrics


def influence_sets(run: Run, n_train: int, n_query: int, loops: int | None) -> InfluenceSets:
    """Fine-tuning arithmetic problems (train) and problems from disjoint templates (query), at a
    fixed recurrence (default 8), built from the recorded task."""
    task: RecursiveGPTTask = dataclasses.replace(run.task, stage="finetune")
    data = task.data()
    recurrence = loops or 8

    def lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        return masked_lm_loss(model, batch, recurrence)

    datasets = {
        "train": TensorDataset(*(t[:n_train] for t in data.train)),
        "query": TensorDataset(*(t[:n_query] for t in data.test)),
    }
    return InfluenceSets(datasets, lm_loss, {"task": task.name, "recurrence": recurrence})

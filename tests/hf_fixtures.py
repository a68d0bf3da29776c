"""Importable factories for the Hugging Face and Lightning tests (``--model tests.hf_fixtures:make_albert``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from looptrace.models.looped import LoopedConfig, LoopedTransformer

VOCAB, SEQ = 30, 7
ALBERT_BODY = "albert.encoder.albert_layer_groups.0"


def albert_config(**overrides: Any) -> Any:
    from transformers import AlbertConfig

    cfg = dict(
        vocab_size=VOCAB, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=24, num_hidden_groups=1, inner_group_num=1, max_position_embeddings=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
    )  # fmt: skip
    cfg.update(overrides)
    return AlbertConfig(**cfg)


def make_albert() -> nn.Module:
    from transformers import AlbertForMaskedLM

    torch.manual_seed(0)
    return AlbertForMaskedLM(albert_config())


class MLMData(torch.utils.data.Dataset):
    """Masked-LM examples as dicts (what a DataCollator yields), with padding on some rows."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
        self.mask = torch.ones(n, SEQ, dtype=torch.long)
        lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
        self.mask[torch.arange(SEQ)[None, :] >= lengths[:, None]] = 0
        self.ids[self.mask == 0] = 0  # the pad token
        self.labels = torch.full((n, SEQ), -100)
        pick = torch.rand(n, SEQ, generator=g) < 0.4
        pick[:, 1] = True
        pick &= self.mask.bool()
        self.labels[pick] = self.ids[pick]
        self.ids = self.ids.masked_fill(pick, 4)  # [MASK]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def make_mlm_dataset(role: str) -> torch.utils.data.Dataset:
    return MLMData(24 if role == "train" else 6, 0 if role == "train" else 1)


def mlm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    from looptrace.integrations import hf

    return hf.masked_lm_loss(model, batch)


# ------------------------------------------------------------------------------------------ Lightning
def _lightning_base() -> type:
    try:
        import lightning.pytorch as pl
    except ImportError:  # pragma: no cover
        import pytorch_lightning as pl  # type: ignore[no-redef]
    return pl.LightningModule


def make_lightning_module() -> nn.Module:
    base = _lightning_base()

    class LoopedLM(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = LoopedTransformer(
                LoopedConfig(vocab_size=11, d_model=16, n_heads=2, d_mlp=24, n_loops=3, max_len=8, injection="concat")
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return lightning_loss(self, batch).mean()

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return LoopedLM()


def lightning_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def make_lm_dataset(role: str) -> torch.utils.data.Dataset:
    n = 32 if role == "train" else 6
    g = torch.Generator().manual_seed(0 if role == "train" else 1)
    x = torch.randint(0, 11, (n, 6), generator=g)
    return torch.utils.data.TensorDataset(x, torch.roll(x, -1, 1))

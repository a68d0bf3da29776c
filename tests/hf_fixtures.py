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


# ------------------------------------------------------------------------------------------ looped LMs
INKLING_LOOP = (2, 4)  # the looped decoder layers: model.model.layers[2:4]
INKLING_TYPES = ["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"]


def inkling_config(**overrides: Any) -> Any:
    """A tiny Inkling-2-Loop: six decoder layers (sliding and full attention alternating, so the loop holds
    one of each), layers 2 and 3 looped three times, four experts (two per token), short convolutions. Every
    layer closes a residual block, so a pass leaves block states behind and ``message_input`` attends over
    more than one (with one, its softmax is constant and its query gets no gradient)."""
    from transformers.models.inkling2_loop.configuration_inkling2_loop import Inkling2LoopTextConfig

    cfg = dict(
        vocab_size=VOCAB, unpadded_vocab_size=VOCAB, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=8,
        sliding_window_size=4, d_rel=4, rel_extent=8, log_scaling_n_floor=4, layer_types=INKLING_TYPES,
        max_position_embeddings=64, conv_kernel_size=3, moe_intermediate_size=8, n_routed_experts=4,
        num_experts_per_tok=2, n_layers_per_attn_res_block=1, loop_layer_index_start=INKLING_LOOP[0],
        loop_layer_index_end=INKLING_LOOP[1], loop_num_passes=3, loop_gate_rank=4, pad_token_id=0,
        bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    cfg.update(overrides)
    return Inkling2LoopTextConfig(**cfg)


def make_inkling(**overrides: Any) -> nn.Module:
    """An Inkling2LoopForCausalLM in float32 (its router and convolutions run in float32 by design), its
    weights moved off their initialisation (zero queries would make the attention residuals trivial)."""
    from transformers import Inkling2LoopForCausalLM

    torch.manual_seed(0)
    model = Inkling2LoopForCausalLM(inkling_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def hrm_config(**overrides: Any) -> Any:
    """A tiny HRM-Text: one layer per stack, 2 H cycles of 3 L cycles; gradient through the last L cycle of
    the first H cycle and the last two of the second (``L_bp_cycles=[2]`` padded to ``[1, 2]``)."""
    from transformers import HrmTextConfig

    cfg = dict(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        head_dim=8, max_position_embeddings=32, H_cycles=2, L_cycles=3, L_bp_cycles=[2], pad_token_id=0,
    )  # fmt: skip
    cfg.update(overrides)
    return HrmTextConfig(**cfg)


def make_hrm(**overrides: Any) -> nn.Module:
    """An HrmTextForCausalLM in float64, weights moved off their initialisation."""
    from transformers import HrmTextForCausalLM

    torch.manual_seed(0)
    model = HrmTextForCausalLM(hrm_config(**overrides)).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


class TextData(torch.utils.data.Dataset):
    """Causal-LM examples as dicts (``input_ids``, ``attention_mask``), right-padded on some rows."""

    def __init__(self, n: int, seed: int, length: int = SEQ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[1::3, length - 2 :] = 0
        self.ids[self.mask == 0] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def make_text_dataset(role: str) -> torch.utils.data.Dataset:
    return TextData(6 if role == "train" else 3, 0 if role == "train" else 1)


def causal_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    from looptrace.integrations import hf

    return hf.causal_lm_loss(model, batch)


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

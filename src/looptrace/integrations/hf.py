"""Hugging Face ``transformers``: per-example losses and a ``Trainer`` callback that records TracIn
checkpoints (``pip install "looptrace[hf]"``).

    import looptrace as lt
    from looptrace.integrations import hf

    model = AlbertForMaskedLM(config)                      # one shared layer group: a weight-tied loop
    step = lt.find_step_module(model, batch)               # -> model.albert.encoder.albert_layer_groups[0]
    feats = lt.featurize(model, loader, hf.masked_lm_loss, step_module=step, sketch=lt.SketchSpec(dim=2048))

    # Inkling-2-Loop: a step is a pass over the looped layers, with the message module called inside it
    layers = list(model.model.layers[config.loop_layer_index_start : config.loop_layer_index_end])
    feats = lt.featurize(model, loader, hf.causal_lm_loss, step_module=layers,
                         body=[*layers, model.model.message_input])
    # HRM-Text: step_module=model.model.L_module (one step per L cycle), then model.model.H_module

Batches are dicts as the ``DataCollator`` s make them (``input_ids``, ``attention_mask``, ``labels``,
...). The loss helpers call the model without ``labels`` (so it does not average over the batch) and
return one loss per example: the mean cross-entropy over the example's labelled tokens. Padding never
counts: label ``-100`` (the Hugging Face convention) and, for causal LMs without labels, positions
where ``attention_mask`` is 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from looptrace.capture.discover import modules_at
from looptrace.errors import LossError
from looptrace.extras import require
from looptrace.influence.recorder import Body, CheckpointRecorder, optimizer_lr, params_of

require("hf", "looptrace.integrations.hf")
from transformers import TrainerCallback  # noqa: E402

__all__ = ["IGNORE", "TracInCallback", "causal_lm_loss", "masked_lm_loss", "sequence_classification_loss"]

IGNORE = -100


def _inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise LossError(
            f"Hugging Face loss helpers take dict batches (input_ids, labels, ...), got {type(batch).__name__}"
        )
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    out = model(**_inputs(batch))
    return out.logits if hasattr(out, "logits") else out[0]


def _token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits and [B, L] labels (-100 ignored) -> [B] mean cross-entropy per example."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    mask = (labels != IGNORE).to(ce.dtype)
    return (ce.view(labels.shape) * mask).sum(1) / mask.sum(1).clamp_min(1)


def masked_lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Per-example masked-LM loss: mean cross-entropy over the tokens whose label is not -100."""
    if "labels" not in batch:
        raise LossError("a masked-LM batch needs 'labels' (-100 where a token is not predicted)")
    return _token_mean(_logits(model, batch), batch["labels"])


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Per-example next-token loss: token t predicts label t+1; labels default to ``input_ids`` with
    padding (``attention_mask == 0``) ignored."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE)
    logits = _logits(model, batch)
    return _token_mean(logits[:, :-1], labels[:, 1:])


def sequence_classification_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Per-example classification loss (cross-entropy; squared error when the model has one label)."""
    if "labels" not in batch:
        raise LossError("a sequence-classification batch needs 'labels'")
    logits = _logits(model, batch)
    labels = batch["labels"]
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)).pow(2)
    return F.cross_entropy(logits, labels, reduction="none")


class TracInCallback(TrainerCallback):  # type: ignore[misc]
    """Records TracIn checkpoints from a ``transformers.Trainer`` every ``every`` optimizer steps.

    eta_k is the learning rate the step used (read right after ``optimizer.step()``, before the
    scheduler moves it); the optimizer's second moments of ``body`` are saved with the weights. ``body``
    takes the forms ``featurize`` and the command line take: a module, a list of modules, or attribute
    paths: ``"albert.encoder.albert_layer_groups.0"``, a range of a ModuleList
    (``"model.layers.2:4"``), several separated by commas (``"model.layers.2:4,model.message_input"``),
    or a list of such paths. The directory reads back with :func:`looptrace.load_checkpoints` or
    ``looptrace featurize --checkpoint-dir``.
    """

    def __init__(
        self, directory: str | os.PathLike[str], every: int = 100, *, body: Body | Sequence[str | nn.Module] = None
    ) -> None:
        self.recorder = CheckpointRecorder(directory, every=every, body=None)
        self.every = every
        self._spec = body
        self.body: Body = None
        self._resolved = body is None
        self._lr: float | None = None

    def _body(self, model: nn.Module) -> Body:
        """``body`` as modules of ``model`` (paths are resolved on the first call, when the model is known)."""
        if not self._resolved:
            spec = self._spec
            if isinstance(spec, str):
                found = modules_at(model, spec)
                self.body = found if isinstance(found, nn.Module) else list(found)
            elif isinstance(spec, nn.Module):
                self.body = spec
            else:
                mods: list[nn.Module] = []
                for item in spec or []:
                    got = modules_at(model, item) if isinstance(item, str) else item
                    mods.extend([got] if isinstance(got, nn.Module) else got)
                self.body = mods
            self.recorder.body = self.body
            self._resolved = True
        return self.body

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, model: Any = None, **kw: Any
    ) -> None:
        if optimizer is not None:
            body = self._body(model) if model is not None else None
            names = params_of(body, model) if (body is not None and model is not None) else None
            self._lr = optimizer_lr(optimizer, names)

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any
    ) -> None:
        step = int(state.global_step)
        if model is None or step % self.every:
            return
        self._body(model)
        self.recorder.save(model, optimizer, step=step, lr=self._lr, trainer="transformers")

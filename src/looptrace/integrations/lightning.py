"""Lightning: a callback that records TracIn checkpoints (``pip install "looptrace[lightning]"``).

    trainer = L.Trainer(max_steps=1000, callbacks=[TracInCallback("ckpts/", every=100, body="core")])
    trainer.fit(module, loader)
    checkpoints = lt.load_checkpoints("ckpts/")

The learning rate is read in ``on_before_optimizer_step`` (Lightning steps per-step schedulers before
``on_train_batch_end``, so it would otherwise be the next step's); a checkpoint is saved once the
optimizer step has happened, every ``every`` optimizer steps (gradient accumulation counts steps,
not batches). The saved weights are the ``LightningModule``'s state dict.
"""

from __future__ import annotations

import os
from typing import Any

from looptrace.extras import require
from looptrace.influence.recorder import Body, CheckpointRecorder, optimizer_lr, params_of

require("lightning", "looptrace.integrations.lightning")
try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]

__all__ = ["TracInCallback"]


class TracInCallback(Callback):  # type: ignore[misc]
    """Records TracIn checkpoints (weights, eta_k, Adam second moments of ``body``) every ``every``
    optimizer steps, in the :class:`looptrace.CheckpointRecorder` format."""

    def __init__(self, directory: str | os.PathLike[str], every: int = 100, *, body: Body = None) -> None:
        super().__init__()
        self.recorder = CheckpointRecorder(directory, every=every, body=body)
        self.every = every
        self.body = body
        self._lr: float | None = None
        self._saved_at = -1

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        names = params_of(self.body, pl_module) if self.body is not None else None
        self._lr = optimizer_lr(optimizer, names)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == 0 or step % self.every or step == self._saved_at:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.recorder.save(pl_module, optimizer, step=step, lr=self._lr, trainer="lightning")
        self._saved_at = step

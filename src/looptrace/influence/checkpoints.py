"""TracIn checkpoints: weights plus the learning rate eta_k in force when they were saved."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from looptrace.errors import CheckpointError


@dataclasses.dataclass
class Checkpoint:
    """One TracIn checkpoint.

    Args:
        source: a state dict, or a path to a file saved by ``torch.save`` holding either a state dict
            or a dict with keys ``"model"`` (the state dict) and optionally ``"lr"`` (as written by
            ``looptrace train``). Files are loaded with ``weights_only=True``: no code is executed.
        lr: eta_k. ``None``: read the learning rate recorded in the file.
        name: an identifier (default: the path, or a hash of the weights).
    """

    source: Mapping[str, torch.Tensor] | str | os.PathLike[str]
    lr: float | None = None
    name: str | None = None

    def load(self) -> tuple[dict[str, torch.Tensor], float, str]:
        """Return (state dict, eta, name); raises :class:`CheckpointError` with what to do."""
        meta: dict[str, Any] = {}
        if isinstance(self.source, str | os.PathLike):
            path = Path(self.source)
            if not path.exists():
                raise CheckpointError(f"checkpoint {path} does not exist")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
                raise CheckpointError(
                    f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                    "looptrace loads with weights_only=True and never executes pickled code; save the "
                    "checkpoint as a plain state dict of tensors (torch.save(model.state_dict(), ...))"
                ) from exc
            name = self.name or str(path)
        else:
            obj = self.source
            name = self.name or ""
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            meta = {k: v for k, v in obj.items() if k != "model"}
            state = dict(obj["model"])
        elif isinstance(obj, Mapping):
            state = dict(obj)
        else:
            raise CheckpointError(f"checkpoint {name or '<state dict>'} holds a {type(obj).__name__}, not a state dict")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"checkpoint entries {bad[:5]} are not tensors; pass a model state dict")
        lr = self.lr if self.lr is not None else meta.get("lr")
        if lr is None:
            raise CheckpointError(
                f"no learning rate for checkpoint {name or '<state dict>'}: none was recorded in it; pass "
                "Checkpoint(..., lr=eta)"
            )
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise CheckpointError(
                f"learning rate eta={lr} of checkpoint {name or '<state dict>'} must be finite and >= 0"
            )
        if not name:
            h = hashlib.sha256()
            for k in sorted(state):
                h.update(k.encode())
                h.update(state[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()[:4096])
            name = "sd:" + h.hexdigest()[:12]
        return state, lr, name


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Copy ``state`` into ``model`` exactly, listing every missing, unexpected or misshapen key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:10]}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:10]}")
        raise CheckpointError(
            f"checkpoint {name} does not fit the model: "
            + "; ".join(parts)
            + ". Build the model with the config the checkpoint was trained with"
        )
    model.load_state_dict(state, strict=True)

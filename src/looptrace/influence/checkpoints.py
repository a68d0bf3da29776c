"""TracIn checkpoints: weights plus the learning rate eta_k in force when they were saved.

A :class:`Checkpoint` reads, without ever executing pickled code:

* a state dict in memory;
* a file saved by ``torch.save`` (``.pt`` / ``.bin``), loaded with ``weights_only=True``: a plain
  state dict, or a dict with ``"model"`` and ``"lr"`` (``looptrace train`` and
  :class:`looptrace.CheckpointRecorder` write this);
* a ``.safetensors`` file;
* a directory: a Hugging Face checkpoint (``model.safetensors``, sharded
  ``model.safetensors.index.json``, or ``pytorch_model.bin[.index.json]``), or one recorded
  ``ckpt_*.pt``.

The learning rate comes from ``lr=``, else from the file (``"lr"``), else from a sidecar JSON
(``<file>.json`` or ``looptrace.json`` in the directory: ``{"lr": ...}``), else from a Hugging Face
``trainer_state.json`` (the last logged ``learning_rate`` at or before ``global_step``).
:func:`load_checkpoints` lists a recorded directory in training order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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

__all__ = ["Checkpoint", "LoadedCheckpoint", "load_checkpoints", "load_into"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclasses.dataclass
class LoadedCheckpoint:
    """What a checkpoint holds once read: weights, eta_k and what was recorded with them."""

    state: dict[str, torch.Tensor]
    lr: float
    name: str
    step: int | None = None
    depth: int | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    second_moments: dict[str, Any] | None = None

    def adam_geometry(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Adam's diagonal geometry of the named parameters at this checkpoint (:func:`looptrace.adam_preconditioner`);
        :class:`CheckpointError` when the moments, or those of one of the parameters, were not recorded (a parameter
        left unscaled would silently mix two geometries)."""
        from looptrace.featurize import adam_preconditioner

        if self.second_moments is None:
            raise CheckpointError(
                f"checkpoint {self.name} has no optimizer second moments; record it with "
                "looptrace.CheckpointRecorder(..., moments=True) or drop precondition='adam'"
            )
        missing = [n for n in names if n not in self.second_moments["exp_avg_sq"]]
        if missing:
            raise CheckpointError(
                f"checkpoint {self.name} has no optimizer second moments for {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}; record them (looptrace.CheckpointRecorder(..., moments=True) "
                "without body= covers every parameter, which outside=True needs) or drop precondition='adam'"
            )
        return adam_preconditioner(self.second_moments, names=names)


@dataclasses.dataclass
class Checkpoint:
    """One TracIn checkpoint.

    Args:
        source: a state dict, or a path (file or directory; see the module docstring for formats).
        lr: eta_k. ``None``: read the learning rate recorded with the weights.
        name: an identifier (default: the path, or a hash of the weights).
    """

    source: Mapping[str, torch.Tensor] | str | os.PathLike[str]
    lr: float | None = None
    name: str | None = None

    def load(self) -> tuple[dict[str, torch.Tensor], float, str]:
        """Return (state dict, eta, name); raises :class:`CheckpointError` with what to do."""
        full = self.load_full()
        return full.state, full.lr, full.name

    def load_full(self) -> LoadedCheckpoint:
        """Everything recorded with the weights (step, depth, optimizer second moments, metadata)."""
        if isinstance(self.source, str | os.PathLike):
            path = Path(self.source)
            obj, sidecar_lr = _read_path(path)
            name = self.name or str(path)
        else:
            obj, sidecar_lr, name = self.source, None, self.name or ""
        record: dict[str, Any] = {}
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            record = {k: v for k, v in obj.items() if k != "model"}
            state = dict(obj["model"])
        elif isinstance(obj, Mapping):
            state = dict(obj)
        else:
            raise CheckpointError(f"checkpoint {name or '<state dict>'} holds a {type(obj).__name__}, not a state dict")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"checkpoint entries {bad[:5]} are not tensors; pass a model state dict")
        lr = self.lr if self.lr is not None else record.get("lr", sidecar_lr)
        if lr is None:
            raise CheckpointError(
                f"no learning rate for checkpoint {name or '<state dict>'}: none was recorded with it (in the file, a "
                "sidecar JSON or trainer_state.json); pass Checkpoint(..., lr=eta)"
            )
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise CheckpointError(
                f"learning rate eta={lr} of checkpoint {name or '<state dict>'} must be finite and >= 0"
            )
        if not name:
            name = "sd:" + _weights_hash(state)
        meta = record.get("meta", {})
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError:
                meta = {"text": meta}
        return LoadedCheckpoint(
            state=state,
            lr=lr,
            name=name,
            step=_int_or_none(record.get("step")),
            depth=_int_or_none(record.get("depth")),
            meta=dict(meta) if isinstance(meta, Mapping) else {},
            second_moments=record.get("optimizer_second_moments"),
        )


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def _weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()[:4096])
    return h.hexdigest()[:12]


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "looptrace loads with weights_only=True and never executes pickled code; save the "
            "checkpoint as a plain state dict of tensors (torch.save(model.state_dict(), ...)) or as safetensors"
        ) from exc


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc


def _sharded(directory: Path, index_name: str) -> dict[str, torch.Tensor]:
    index = _read_json(directory / index_name)
    files = sorted(set(index.get("weight_map", {}).values()))
    if not files:
        raise CheckpointError(f"{directory / index_name} lists no shards (no weight_map)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        shard = directory / f
        if Path(f).is_absolute() or ".." in Path(f).parts or not shard.exists():
            raise CheckpointError(f"{directory / index_name} names shard {f!r}, which is not a file in {directory}")
        part = _safetensors_load(shard) if f.endswith(".safetensors") else _torch_load(shard)
        state.update(part)
    return state


def _hf_trainer_lr(directory: Path) -> float | None:
    """The last ``learning_rate`` logged at or before ``global_step`` in an HF ``trainer_state.json``."""
    path = directory / "trainer_state.json"
    if not path.exists():
        return None
    state = _read_json(path)
    step = int(state.get("global_step", 0))
    logged = [e for e in state.get("log_history", []) if "learning_rate" in e and int(e.get("step", 0)) <= step]
    if not logged:
        return None
    return float(max(logged, key=lambda e: int(e.get("step", 0)))["learning_rate"])


def _sidecar_lr(path: Path) -> float | None:
    for side in (path.with_name(path.name + ".json"), (path if path.is_dir() else path.parent) / "looptrace.json"):
        if side.exists():
            data = _read_json(side)
            if isinstance(data, dict) and "lr" in data:
                return float(data["lr"])
    return None


def _read_path(path: Path) -> tuple[Any, float | None]:
    """(the loaded object, a learning rate found beside it) for a file or checkpoint directory."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    lr = _sidecar_lr(path)
    if path.is_dir():
        lr = lr if lr is not None else _hf_trainer_lr(path)
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).exists():
                return _sharded(path, index), lr
        if (path / "model.safetensors").exists():
            return _safetensors_load(path / "model.safetensors"), lr
        if (path / "pytorch_model.bin").exists():
            return _torch_load(path / "pytorch_model.bin"), lr
        raise CheckpointError(
            f"{path} is a directory without model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
            "pass the checkpoint file itself, or use looptrace.load_checkpoints() for a recorded directory"
        )
    if path.suffix == ".safetensors":
        return _safetensors_load(path), lr
    return _torch_load(path), lr


def load_checkpoints(directory: str | os.PathLike[str]) -> list[Checkpoint]:
    """The TracIn checkpoints recorded in ``directory``, in training order, each reading its own eta_k.

    Reads a :class:`looptrace.CheckpointRecorder` directory (``checkpoints.json``), a directory of
    ``ckpt_*.pt`` files, or a Hugging Face output directory with ``checkpoint-<step>/`` folders."""
    from looptrace.influence.recorder import INDEX

    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory of checkpoints")
    if (root / INDEX).exists():
        entries = _read_json(root / INDEX).get("checkpoints", [])
        out = []
        for e in sorted(entries, key=lambda e: int(e["step"])):
            f = str(e["file"])
            if "/" in f or ".." in f:
                raise CheckpointError(f"{root / INDEX} names {f!r}, not a file in {root}")
            out.append(Checkpoint(root / f))
        return out
    # in step order: ckpt_9.pt before ckpt_10.pt even when the names are not zero-padded
    files = sorted(root.glob("ckpt_*.pt"), key=lambda p: (_step_of(p.stem.removeprefix("ckpt_")), p.name))
    if files:
        return [Checkpoint(p) for p in files]
    hf = sorted(
        (p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if hf:
        return [Checkpoint(p) for p in hf]
    raise CheckpointError(
        f"{root} holds no recorded checkpoints (no {INDEX}, ckpt_*.pt or checkpoint-<step>/); record them with "
        "looptrace.CheckpointRecorder or one of the looptrace.integrations callbacks"
    )


def _step_of(text: str) -> float:
    """The step a checkpoint's name ends with (``inf`` when it names none, so such files sort last)."""
    return int(text) if text.isdigit() else float("inf")


def _tied_aliases(model: nn.Module) -> dict[str, set[str]]:
    """State-dict keys that name the same tensor (tied weights: Hugging Face checkpoints store one of them)."""
    by_tensor: dict[int, set[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(v), set()).add(k)
    return {k: keys for keys in by_tensor.values() for k in keys if len(keys) > 1}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Copy ``state`` into ``model`` exactly, listing every missing, unexpected or misshapen key.

    A key missing only because the checkpoint stored a tied weight once (under another of its names) is
    not missing. A model with an ``upgrade_state_dict(state)`` method (looptrace's own models) first renames the keys
    older versions wrote."""
    upgrade = getattr(model, "upgrade_state_dict", None)
    if callable(upgrade):
        state = upgrade(dict(state))
    own = model.state_dict()
    aliases = _tied_aliases(model)
    missing = sorted(k for k in set(own) - set(state) if not (aliases.get(k, set()) & set(state)))
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
    model.load_state_dict(state, strict=not aliases)

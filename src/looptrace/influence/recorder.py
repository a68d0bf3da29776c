"""Recording TracIn checkpoints from any training loop.

    recorder = lt.CheckpointRecorder("ckpts/", every=100, body=model.core)
    for step, batch in enumerate(loader):
        loss.backward(); optimizer.step()
        recorder.step(model, optimizer, depth=r)      # right after optimizer.step()
    ...
    checkpoints = lt.load_checkpoints("ckpts/")       # in training order, each with its eta_k

A recorded checkpoint is one ``ckpt_<step>.pt`` file holding only tensors and plain values (it
loads with ``weights_only=True``): the model's weights, the learning rate the step that produced
them used (eta_k), the step, the sampled depth if any, and the optimizer's second moments of the
body (Adam's ``exp_avg_sq`` with its ``eps``, ``beta2`` and step count) for the preconditioned
inner product. ``checkpoints.json`` lists them in order and is rewritten atomically after each save.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from looptrace.errors import CheckpointError, ConfigError
from looptrace.io import atomic_torch_save, atomic_write_json, make_dirs

__all__ = ["INDEX", "CheckpointRecorder", "optimizer_lr", "second_moments"]

INDEX = "checkpoints.json"
FORMAT = "looptrace-checkpoints"
#: What to do after the machine refused to write a checkpoint.
RESUME = (
    "free space (or fix the permissions), then save again: the checkpoints already listed in "
    f"{INDEX} are complete and intact"
)


Body = nn.Module | Iterable[nn.Module] | str | None


def params_of(body: Body, model: nn.Module) -> dict[int, str]:
    """{id(parameter): name in the model} of the body (a module, modules, a dotted path, or all)."""
    names = {id(p): n for n, p in model.named_parameters()}
    if body is None:
        return names
    if isinstance(body, str):
        try:
            body = model.get_submodule(body)
        except AttributeError as exc:
            raise ConfigError(f"the model has no submodule {body!r} (body= of the checkpoint recorder)") from exc
    mods = [body] if isinstance(body, nn.Module) else list(body)
    return {id(p): names[id(p)] for m in mods for p in m.parameters() if id(p) in names}


def optimizer_lr(optimizer: torch.optim.Optimizer, params: Mapping[int, str] | None = None) -> float:
    """The learning rate of the parameter group holding the body (the first group if unknown).

    Refuses groups with different rates over the body: a TracIn checkpoint has one eta_k."""
    rates = set()
    for group in optimizer.param_groups:
        if params is None or any(id(p) in params for p in group["params"]):
            lr = group["lr"]
            rates.add(float(lr.item() if isinstance(lr, torch.Tensor) else lr))
            if params is None:
                break
    if not rates:
        raise ConfigError("the optimizer holds none of the body's parameters; pass the optimizer that trains them")
    if len(rates) > 1:
        raise ConfigError(
            f"the body's parameters are in optimizer groups with different learning rates {sorted(rates)}; "
            "TracIn weights a checkpoint by one eta: record with body= limited to one group"
        )
    return rates.pop()


def second_moments(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> dict[str, Any] | None:
    """Adam-style second moments of the named parameters, with what bias correction needs; ``None``
    when the optimizer keeps none (SGD) or has not stepped yet."""
    moments: dict[str, torch.Tensor] = {}
    step = None
    eps = beta2 = None
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                continue
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                continue
            moments[names[id(p)]] = state["exp_avg_sq"].detach().to("cpu", copy=True)
            s = state.get("step", 0)
            step = int(s.item() if isinstance(s, torch.Tensor) else s)
            eps = float(group.get("eps", 1e-8))
            betas = group.get("betas", (0.9, 0.999))
            beta2 = float(betas[1])
    if not moments:
        return None
    return {"exp_avg_sq": moments, "eps": eps, "beta2": beta2, "step": step}


class CheckpointRecorder:
    """Saves a TracIn checkpoint every ``every``-th call of :meth:`step` (call it right after
    ``optimizer.step()``), and at any step with :meth:`save`.

    Args:
        directory: where the checkpoints and the ``checkpoints.json`` index go (created).
        every: save on every ``every``-th call (the first save is after ``every`` steps).
        body: the loop body's module(s) or its dotted path in the model (e.g. ``"core"``), whose optimizer
            second moments are saved (default: every parameter's); also picks the parameter group whose
            learning rate is eta_k.
        moments: save the optimizer's second moments (for the Adam-preconditioned inner product).
        meta: plain values stored with every checkpoint (e.g. the run's configuration).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        every: int = 100,
        *,
        body: Body = None,
        moments: bool = True,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be a positive int, got {every!r}")
        self.directory = Path(directory)
        self.every = every
        self.body = body
        self.moments = moments
        self.meta = dict(meta or {})
        self.calls = 0
        make_dirs(self.directory, resume=RESUME)
        self._index = self._read_index()
        if self._index:  # resuming: count from the last recorded step
            self.calls = max(int(e["step"]) for e in self._index)

    def _read_index(self) -> list[dict[str, Any]]:
        path = self.directory / INDEX
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is damaged ({exc}); delete it to start a new record") from exc
        return list(data.get("checkpoints", []))

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, depth: int | None = None, **extra: Any
    ) -> Path | None:
        """Count one optimizer step; on every ``every``-th, save and return the checkpoint's path."""
        self.calls += 1
        if self.calls % self.every:
            return None
        return self.save(model, optimizer, step=self.calls, depth=depth, **extra)

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        step: int | None = None,
        lr: float | None = None,
        depth: int | None = None,
        **extra: Any,
    ) -> Path:
        """Save the model now (e.g. at the last step of a run that stops early).

        ``lr`` defaults to the optimizer's current rate over the body (the rate the last step used)."""
        step = self.calls if step is None else int(step)
        names = params_of(self.body, model)
        if lr is None:
            if optimizer is None:
                raise ConfigError("pass lr= or the optimizer whose learning rate is eta_k")
            lr = optimizer_lr(optimizer, names if self.body is not None else None)
        if not math.isfinite(lr) or lr < 0:
            raise CheckpointError(f"learning rate {lr} is not a finite eta >= 0")
        record: dict[str, Any] = {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
            "lr": float(lr),
            "step": step,
            "depth": depth,
            "meta": json.dumps({**self.meta, **extra}, default=str),
        }
        if self.moments and optimizer is not None:
            m = second_moments(optimizer, names)
            if m is not None:
                record["optimizer_second_moments"] = m
        path = self.directory / f"ckpt_{step:08d}.pt"
        atomic_torch_save(record, path, resume=RESUME)
        self._index = [e for e in self._index if int(e["step"]) != step]
        self._index.append({"file": path.name, "step": step, "lr": float(lr), "depth": depth})
        self._index.sort(key=lambda e: int(e["step"]))
        atomic_write_json(
            {"format": FORMAT, "version": 1, "checkpoints": self._index}, self.directory / INDEX, resume=RESUME
        )
        return path

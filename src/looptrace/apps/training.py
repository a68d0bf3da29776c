"""One training loop for every preset, recording TracIn checkpoints.

The loop writes a run directory (see :mod:`looptrace.apps.runs`). Every file is written to a
temporary name and renamed when complete, so a kill at any point leaves either the old or the new
file, never a partial one. Data and depth at step s are pure functions of (seed, s), so a resumed run
continues exactly where the killed one stopped. Checkpoints are recorded by the library's
:class:`looptrace.CheckpointRecorder` (weights, eta_k, depth, Adam second moments of the body).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from looptrace import batching
from looptrace.apps.runs import write_record
from looptrace.apps.train_config import TrainConfig
from looptrace.errors import CheckpointError, ConfigError
from looptrace.influence.recorder import CheckpointRecorder
from looptrace.io import atomic_torch_save, atomic_write_json
from looptrace.models.looped import LoopedConfig, LoopedTransformer

__all__ = ["Task", "TrainConfig", "train"]


class Task(Protocol):
    """What the loop needs from a task (see :mod:`looptrace.apps.studies`).

    Optional hooks, used when present: ``after_step(model, step, cfg)`` (curricula),
    ``lr_scale(step) -> float`` (a factor on the scheduled learning rate, e.g. an anneal once a
    curriculum is complete), ``done() -> bool`` (end training early; the stopping step leaves a checkpoint), and
    ``state_dict()`` / ``load_state_dict(state)`` (task state saved for resuming)."""

    name: str

    def batch(self, step: int, cfg: TrainConfig) -> Any: ...

    def loss(self, model: nn.Module, batch: Any, loops: int | None) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, cfg: TrainConfig) -> dict[str, Any]: ...


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _task_done(task: Task) -> bool:
    """A task may end training early (``task.done()``, e.g. once its curriculum is learned)."""
    done = getattr(task, "done", None)
    return bool(done()) if callable(done) else False


def _task_lr_scale(task: Task, step: int) -> float:
    scale = getattr(task, "lr_scale", None)
    return float(scale(step)) if callable(scale) else 1.0


def _task_state(task: Task) -> str:
    return json.dumps(task.state_dict()) if hasattr(task, "state_dict") else "{}"


def train(
    task: Task,
    model_cfg: LoopedConfig,
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    record: dict[str, Any],
    init: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train ``task`` into ``out`` (resuming if ``out/state.pt`` exists); returns the final metrics.

    ``record`` is the run record (:func:`looptrace.apps.runs.make_record`) written as ``config.json``;
    a directory holding another record is refused. ``device`` moves the model and batches; checkpoints
    are saved on the CPU, so they load anywhere."""
    out = Path(out)
    write_record(out, record)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = LoopedTransformer(model_cfg)
    if init is not None:
        model.load_state_dict(init)
    model.to(device)
    opt = torch.optim.AdamW(_decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    recorder = CheckpointRecorder(out / "checkpoints", every=cfg.ckpt_every, body=model.core)
    start, history = _resume(out / "state.pt", model, opt, task)
    sampler = cfg.depth_sampler()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {task.name}", unit="step")
    # wall time accumulates across resumes
    t0 = time.perf_counter() - next((h["time_s"] for h in reversed(history) if "time_s" in h), 0.0)
    model.train()
    for step in range(start, cfg.steps):
        if _task_done(task):  # a resumed run that had already stopped early
            break
        lr = cfg.lr_at(step) * _task_lr_scale(task, step)
        for g in opt.param_groups:
            g["lr"] = lr
        loops = sampler.sample(step) if sampler is not None else None
        batch = batching.to_device(task.batch(step, cfg), device)
        loss = task.loss(model, batch, loops).mean()
        if not torch.isfinite(loss):
            raise ConfigError(f"training diverged at step {step} (loss {float(loss)}); lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        if hasattr(task, "after_step"):
            task.after_step(model, step, cfg)
        done = step + 1
        last = done == cfg.steps or _task_done(task)
        if done % cfg.log_every == 0 or last:
            entry = {"step": done, "loss": loss.item(), "lr": lr, "loops": loops, "time_s": time.perf_counter() - t0}
            if hasattr(task, "state_dict"):
                entry.update(task.state_dict())
            history.append(entry)
        if done % cfg.eval_every == 0 and not last:
            model.eval()
            history.append({"step": done, "eval": task.evaluate(model, cfg)})
            model.train()
        if done % cfg.ckpt_every == 0 or last:
            # eta_k is the learning rate of the step that produced these weights
            recorder.save(
                model, opt, step=done, lr=lr, depth=loops, depth_seed=cfg.seed, data_seed=cfg.seed,
                stage=cfg.stage, task_state=_task_state(task), run=record,
            )  # fmt: skip
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": done,
                    "history": json.dumps(history),
                    "task_state": _task_state(task),
                },
                out / "state.pt",
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", **(task.state_dict() if hasattr(task, "state_dict") else {}))
    if bar is not None:
        bar.close()
    model.eval()
    final = task.evaluate(model, cfg)
    steps_done = next((h["step"] for h in reversed(history) if "loss" in h), cfg.steps)
    metrics = {"task": task.name, "steps": steps_done, "history": history, **final}
    if steps_done < cfg.steps:  # the last step run is always logged
        metrics["stopped_early"] = True
    metrics["train_time_s"] = next((h["time_s"] for h in reversed(history) if "time_s" in h), 0.0)
    atomic_write_json(metrics, out / "metrics.json")
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    return metrics


def _resume(
    state_path: Path, model: nn.Module, opt: torch.optim.Optimizer, task: Task
) -> tuple[int, list[dict[str, Any]]]:
    """(first step to run, history so far) from ``state.pt``; (0, []) for a new run."""
    if not state_path.exists():
        return 0, []
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot resume from {state_path}: {exc}; delete it to start over") from exc
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if hasattr(task, "load_state_dict") and "task_state" in state:
        task.load_state_dict(json.loads(state["task_state"]))
    return int(state["step"]), list(json.loads(state["history"]))

"""One training loop for every preset, recording TracIn checkpoints.

A run directory holds::

    config.json                 model and training config (replayable)
    checkpoints/ckpt_000500.pt  {"model": state dict, "lr": eta_k, "step", "depth", "depth_seed",
                                 "data_seed", "config"}: everything attribution needs
    state.pt                    model + optimizer + step, for resuming after a kill
    metrics.json                the training log and the final evaluation

Every file is written to a temporary name and renamed when complete, so a kill at any point leaves
either the old or the new file, never a partial one. Data and depth at step s are pure functions of
(seed, s), so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from looptrace.errors import CheckpointError, ConfigError
from looptrace.io import atomic_torch_save as atomic_save
from looptrace.io import atomic_write_json
from looptrace.models.depth import DepthSampler
from looptrace.models.looped import LoopedConfig, LoopedTransformer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW, warm-up + cosine decay, clipping) and checkpointing."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0
    ckpt_every: int = 250
    eval_every: int = 500
    log_every: int = 50
    seed: int = 0
    depth_mean: float | None = None  # Poisson log-normal depth; None = the task decides the loops
    depth_max: int | None = None
    threads: int | None = None
    stage: str = "train"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.ckpt_every < 1:
            raise ConfigError(f"invalid training config {self}")

    def lr_at(self, step: int) -> float:
        """Learning rate in force at optimizer step ``step`` (0-based): linear warm-up, cosine decay."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)

    def depth_sampler(self) -> DepthSampler | None:
        if self.depth_mean is None:
            return None
        return DepthSampler(mean=self.depth_mean, r_max=self.depth_max or int(2 * self.depth_mean), seed=self.seed)


class Task(Protocol):
    """What the loop needs from a task (see :mod:`looptrace.zoo`).

    Optional hooks, used when present: ``after_step(model, step, cfg)`` (curricula),
    ``done() -> bool`` (end training early; the stopping step leaves a checkpoint), and
    ``state_dict()`` / ``load_state_dict(state)`` (task state saved in checkpoints, for resuming)."""

    name: str

    def batch(self, step: int, cfg: TrainConfig) -> Any: ...

    def loss(self, model: nn.Module, batch: Any, loops: int | None) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, cfg: TrainConfig) -> dict[str, Any]: ...


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train(
    task: Task,
    model_cfg: LoopedConfig,
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    init: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``task`` into ``out`` (resuming if ``out/state.pt`` exists); returns the final metrics."""
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config = {"task": task.name, "model": model_cfg.to_dict(), "train": dataclasses.asdict(cfg)}
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old != json.loads(json.dumps(config, default=str)):
            raise ConfigError(
                f"{out} holds a run with another config; use a new --out directory or delete it.\n"
                f"existing: {json.dumps(old, sort_keys=True)}\nrequested: {json.dumps(config, sort_keys=True, default=str)}"
            )
    else:
        atomic_write_json(config, cfg_path)

    torch.manual_seed(cfg.seed)
    model = LoopedTransformer(model_cfg)
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.AdamW(_decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    start, history = 0, []
    state_path = out / "state.pt"
    if state_path.exists():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot resume from {state_path}: {exc}; delete it to start over") from exc
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, history = int(st["step"]), list(json.loads(st["history"]))
        if hasattr(task, "load_state_dict") and "task_state" in st:
            task.load_state_dict(json.loads(st["task_state"]))
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
        lr = cfg.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        loops = sampler.sample(step) if sampler is not None else None
        batch = task.batch(step, cfg)
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
            task_state = json.dumps(task.state_dict()) if hasattr(task, "state_dict") else "{}"
            # eta_k is the learning rate of the step that produced these weights
            ck: dict[str, Any] = {
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "lr": lr,
                "step": done,
                "depth": loops,
                "depth_seed": cfg.seed,
                "data_seed": cfg.seed,
                "stage": cfg.stage,
                "task_state": task_state,
                "config": json.dumps(config, default=str),
            }
            atomic_save(ck, out / "checkpoints" / f"ckpt_{cfg.stage}_{done:06d}.pt")
            atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": done,
                    "history": json.dumps(history),
                    "task_state": task_state,
                },
                state_path,
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
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
    atomic_save(model.state_dict(), out / "model.pt")
    return metrics


def _task_done(task: Task) -> bool:
    """A task may end training early (``task.done()``, e.g. once its curriculum is learned)."""
    done = getattr(task, "done", None)
    return bool(done()) if callable(done) else False


def load_run(run: str | os.PathLike[str]) -> tuple[LoopedTransformer, dict[str, Any]]:
    """The trained model of a run directory and its config."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise ConfigError(f"{run} is not a looptrace run directory (no config.json); train one with `looptrace train`")
    config = json.loads((run / "config.json").read_text())
    model = LoopedTransformer(LoopedConfig(**config["model"]))
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, config


def checkpoint_paths(run: str | os.PathLike[str], stage: str | None = None) -> list[Path]:
    paths = sorted(Path(run, "checkpoints").glob("ckpt_*.pt"))
    if stage is not None:
        paths = [p for p in paths if p.name.startswith(f"ckpt_{stage}_")]
    return paths

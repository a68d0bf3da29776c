"""Run directories and their records: everything that reads a run rebuilds it from ``config.json``.

A run directory (one training stage) holds::

    config.json            the run record: study, preset, the task's full configuration, the model's and the
                           training's, the overrides given on the command line, the looptrace version
    checkpoints/           TracIn checkpoints (looptrace.CheckpointRecorder format, with checkpoints.json)
    state.pt               model + optimizer + step + task state, for resuming after a kill
    metrics.json           the training log and the final evaluation
    model.pt               the final weights

A study trained in stages (pretraining, then fine-tuning) keeps one such directory per stage under
the run directory; readers use the last stage. Records written before version 2 named the task
only; they are refused with the command that upgrades them (``looptrace upgrade-run``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from looptrace.apps.train_config import TrainConfig
from looptrace.config import config_from_dict, config_to_dict, diff_configs
from looptrace.errors import ConfigError
from looptrace.influence.checkpoints import Checkpoint, load_checkpoints
from looptrace.io import atomic_write_json
from looptrace.models.looped import LoopedConfig, LoopedTransformer

RUN_FORMAT = "looptrace-run"
RUN_VERSION = 2
STAGES = ("finetune", "train")  # readers use the first stage directory that exists

__all__ = ["RUN_FORMAT", "RUN_VERSION", "Run", "RunRecord", "make_record", "read_record", "stage_dir", "write_record"]


def make_record(
    study: str, preset: str, task: Any, model: LoopedConfig, train: TrainConfig, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The replayable record of a run: enough to rebuild its task, model and training exactly."""
    from looptrace import __version__

    return {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "study": study,
        "preset": preset,
        "task": config_to_dict(task),
        "model": config_to_dict(model),
        "train": config_to_dict(train),
        "overrides": overrides,
        "looptrace": __version__,
    }


def write_record(out: Path, record: dict[str, Any]) -> None:
    """Write ``out/config.json``, or check that an existing run there has the same record (resume)."""
    path = out / "config.json"
    if path.exists():
        have = json.loads(path.read_text())
        keys = ("study", "preset", "task", "model", "train")
        if have.get("version") != RUN_VERSION or any(have.get(k) != record[k] for k in keys):
            diffs = diff_configs({k: have.get(k) for k in keys}, {k: record[k] for k in keys})
            raise ConfigError(
                f"{out} holds a run with another configuration; use a new --out directory or delete it. "
                f"Differences (existing != requested): {'; '.join(diffs[:12]) or 'record version'}"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, path)


def stage_dir(path: Path) -> Path:
    """The directory of the run's last stage (a fine-tuning stage when there is one)."""
    for stage in STAGES:
        if (path / stage / "config.json").exists():
            return path / stage
    return path


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A parsed ``config.json`` (the task stays a dict until its study rebuilds it)."""

    path: Path
    study: str
    preset: str
    task: dict[str, Any]
    model: LoopedConfig
    train: TrainConfig
    raw: dict[str, Any]


def read_record(path: Path) -> RunRecord:
    """The record of the run at ``path`` (or of its last stage); refuses records it cannot replay."""
    stage = stage_dir(path)
    cfg_path = stage / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{path} is not a looptrace run directory (no config.json); train one with `looptrace train`")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{cfg_path} is not valid JSON ({exc})") from exc
    if raw.get("format") != RUN_FORMAT:
        task = raw.get("task")
        if isinstance(task, str):
            raise ConfigError(
                f"{path} was written by looptrace 0.1: its config.json names the task ({task!r}) but not its "
                "settings, so the data it was trained on cannot be rebuilt for sure. If it was trained with an "
                f"unchanged preset, record that with `looptrace upgrade-run --run {path} --preset SIZE` (it checks "
                "the model and training configs against the preset's); otherwise train it again"
            )
        raise ConfigError(f"{cfg_path} is not a looptrace run record (format {raw.get('format')!r})")
    if raw.get("version") != RUN_VERSION:
        raise ConfigError(
            f"{cfg_path} is run record version {raw.get('version')}; this looptrace reads version {RUN_VERSION}"
        )
    return RunRecord(
        path=stage,
        study=str(raw["study"]),
        preset=str(raw["preset"]),
        task=dict(raw["task"]),
        model=config_from_dict(LoopedConfig, raw["model"], f"the model record of {cfg_path}"),
        train=config_from_dict(TrainConfig, raw["train"], f"the training record of {cfg_path}"),
        raw=raw,
    )


@dataclasses.dataclass
class Run:
    """A trained run: its record and its task rebuilt from the record (by the study's task type)."""

    record: RunRecord
    task: Any

    @property
    def path(self) -> Path:
        return self.record.path

    @property
    def study(self) -> str:
        return self.record.study

    @property
    def preset(self) -> str:
        return self.record.preset

    @property
    def model_config(self) -> LoopedConfig:
        return self.record.model

    @property
    def train_config(self) -> TrainConfig:
        return self.record.train

    def load_model(self, device: str | torch.device = "cpu") -> LoopedTransformer:
        """The final model of the run, in eval mode."""
        model = LoopedTransformer(self.record.model)
        weights = self.path / "model.pt"
        if not weights.exists():
            raise ConfigError(f"{self.path} has no model.pt: training has not finished; run `looptrace train` again")
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.to(device).eval()

    def checkpoints(self) -> list[Checkpoint]:
        """The run's TracIn checkpoints in training order."""
        return load_checkpoints(self.path / "checkpoints")

    def checkpoint_paths(self) -> list[Path]:
        return [Path(str(c.source)) for c in self.checkpoints()]

"""Upgrading run directories written by looptrace 0.1 (whose ``config.json`` named the task only).

A 0.1 record holds the model and training configs in full but not the task's settings. When the
recorded model config equals the named preset's and the training config differs from it at most in
``steps``, ``seed`` and ``threads`` (the command-line overrides 0.1 had), the run was trained with
that preset's task, and the full version-2 record can be written. Otherwise it is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

from looptrace.apps.catalog import studies
from looptrace.apps.runs import make_record, stage_dir
from looptrace.apps.train_config import TrainConfig
from looptrace.config import config_from_dict, config_to_dict, diff_configs
from looptrace.errors import ConfigError
from looptrace.io import atomic_write_json
from looptrace.models.looped import LoopedConfig

OVERRIDABLE = ("steps", "seed", "threads")


def upgrade_run(run: Path, size: str) -> Path:
    """Rewrite ``config.json`` of every stage of ``run`` as a version-2 record of preset ``size``."""
    stages = [d for d in (run / "pretrain", run / "finetune") if (d / "config.json").exists()] or [stage_dir(run)]
    written = []
    for stage in stages:
        path = stage / "config.json"
        old = json.loads(path.read_text())
        name = old.get("task")
        if not isinstance(name, str):
            raise ConfigError(f"{path} is not a looptrace 0.1 run record (nothing to upgrade)")
        registry = studies()
        if name not in registry:
            raise ConfigError(f"{path} names task {name!r}, which no registered case study provides")
        study = registry[name]
        preset = study.preset(size)
        model = config_from_dict(LoopedConfig, old["model"], f"the model record of {path}")
        train = config_from_dict(TrainConfig, old["train"], f"the training record of {path}")
        if model != preset.model:
            diffs = diff_configs(config_to_dict(model), config_to_dict(preset.model))
            raise ConfigError(f"{path}: the model is not the {size!r} preset's ({'; '.join(diffs[:8])}); retrain it")
        task = preset.task
        stage_name = train.stage
        if hasattr(task, "stage") and stage_name in ("pretrain", "finetune"):
            import dataclasses

            task = dataclasses.replace(task, stage=stage_name)
        want = config_to_dict(preset.train)
        have = config_to_dict(train)
        ignore = set(OVERRIDABLE) | ({"stage", "steps", "lr", "warmup"} if stage_name == "finetune" else {"stage"})
        diffs = [d for d in diff_configs(have, want) if d.split(":")[0] not in ignore]
        if diffs:
            raise ConfigError(
                f"{path}: the training config is not the {size!r} preset's ({'; '.join(diffs[:8])}); retrain it"
            )
        overrides = {f"train.{k}": have[k] for k in OVERRIDABLE if have[k] != want[k]}
        record = make_record(study.name, size, task, model, train, overrides)
        record["upgraded_from"] = "looptrace 0.1 config.json (task name only), checked against the preset"
        os.replace(path, stage / "config.v1.json")
        atomic_write_json(record, path)
        written.append(path)
    return run

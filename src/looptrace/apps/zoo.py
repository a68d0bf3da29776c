"""Training a registered case study's preset, with overrides, into a recorded run directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from looptrace.apps.catalog import study as get_study
from looptrace.apps.registry import Preset
from looptrace.apps.runs import make_record
from looptrace.apps.training import train
from looptrace.config import config_from_dict, config_to_dict
from looptrace.errors import ConfigError
from looptrace.models.looped import LoopedConfig

SECTIONS = ("task", "model", "train")

__all__ = ["SECTIONS", "apply_overrides", "train_preset"]


def apply_overrides(preset: Preset, overrides: dict[str, Any]) -> Preset:
    """``preset`` with ``{"section.field": value}`` replaced (sections: task, model, train).

    Values are validated by rebuilding each config from its dict, so an unknown field or a bad value
    raises :class:`ConfigError` naming it."""
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name or "." in name:
            raise ConfigError(f"override {key!r} must be one of {SECTIONS} and a field, e.g. train.steps=100")
        parts[section][name] = value
    if not overrides:
        return preset
    task = config_from_dict(type(preset.task), {**config_to_dict(preset.task), **parts["task"]}, "the task")
    model = config_from_dict(LoopedConfig, {**config_to_dict(preset.model), **parts["model"]}, "the model")
    train_cfg = config_from_dict(type(preset.train), {**config_to_dict(preset.train), **parts["train"]}, "training")
    return dataclasses.replace(preset, task=task, model=model, train=train_cfg)


def train_preset(
    study_name: str,
    size: str,
    out: Path,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the ``size`` preset of a registered study into ``out`` (resumed when it exists)."""
    study = get_study(study_name)
    overrides = dict(overrides or {})
    preset = apply_overrides(study.preset(size), overrides)
    record = make_record(study.name, size, preset.task, preset.model, preset.train, overrides)
    if study.train is not None:
        return study.train(preset, out, record, progress, device)
    return train(preset.task, preset.model, preset.train, out, record=record, progress=progress, device=device)

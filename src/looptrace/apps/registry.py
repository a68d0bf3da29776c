"""The case-study registry: a case study is one module that calls :func:`register_study`.

A :class:`CaseStudy` bundles what the command line and the run records need: its presets (model,
training and task configuration), how its task is rebuilt from a run record, the attribution sets of
a trained run, and its analysis with a full and a quick configuration. ``looptrace train``,
``analyze``, ``featurize --run`` and ``report`` take their choices from here, through
:mod:`looptrace.apps.catalog`, which registers the built-in studies and those of installed packages
(the ``looptrace.studies`` entry-point group); importing any module that registers also works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from looptrace.apps.runs import Run
from looptrace.apps.train_config import TrainConfig
from looptrace.errors import ConfigError
from looptrace.models.looped import LoopedConfig

__all__ = ["CaseStudy", "InfluenceSets", "Preset", "get_study", "register_study", "registered"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named configuration of a case study: the model, its training and its task."""

    model: LoopedConfig
    train: TrainConfig
    task: Any  # a task dataclass: init fields are configuration, init=False fields are training state
    note: str = ""


@dataclasses.dataclass
class InfluenceSets:
    """What attribution needs for a trained run: train/query datasets, a per-example loss, notes."""

    datasets: dict[str, Any]
    loss_fn: Callable[..., Any]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CaseStudy:
    """One case study.

    Attributes:
        name: the CLI name (``looptrace train NAME``).
        summary: one line for ``--help``.
        task_type: the task dataclass (its init fields are recorded in every run's ``config.json``).
        presets: size -> a function returning the :class:`Preset` (sizes in CLI order; the first is
            the default).
        influence_sets: ``(run, n_train, n_query, loops) -> InfluenceSets``: the attribution sets of a
            trained run, built from the run's recorded task.
        study_config: the analysis' config dataclass (its defaults are the full analysis).
        quick_config: the analysis config of a smoke run (seconds).
        run_study: ``(run, out_dir, study_config) -> results dict``: the analysis, writing its report.
        train: ``(preset, out_dir, record, progress, device) -> metrics``: custom training (several
            stages); ``None`` uses the one training loop.
        aggregate: ``(results of several runs) -> summary``: the spread over training seeds
            (``looptrace analyze NAME --run A --run B ...`` writes it as ``seeds.json``).
    """

    name: str
    summary: str
    task_type: type
    presets: Mapping[str, Callable[[], Preset]]
    influence_sets: Callable[[Run, int, int, int | None], InfluenceSets]
    study_config: type
    quick_config: Callable[[], Any]
    run_study: Callable[[Run, Path, Any], dict[str, Any]]
    train: Callable[[Preset, Path, dict[str, Any], bool, str], dict[str, Any]] | None = None
    aggregate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"a case study name is letters, digits, '-' and '_', got {self.name!r}")
        if not self.presets:
            raise ConfigError(f"case study {self.name!r} has no presets")

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(self.presets)

    def preset(self, size: str) -> Preset:
        if size not in self.presets:
            raise ConfigError(f"{self.name} has no preset {size!r}; choose one of {list(self.presets)}")
        return self.presets[size]()


_STUDIES: dict[str, CaseStudy] = {}


def register_study(study: CaseStudy) -> CaseStudy:
    """Add ``study`` to the registry (re-registering the same name replaces it); returns it."""
    _STUDIES[study.name] = study
    return study


def registered() -> dict[str, CaseStudy]:
    """The studies registered so far, in registration order."""
    return dict(_STUDIES)


def get_study(name: str) -> CaseStudy:
    """A registered study (see :func:`looptrace.apps.catalog.study` for one that may be a built-in)."""
    if name not in _STUDIES:
        raise ConfigError(f"unknown case study {name!r}; registered: {list(_STUDIES)}")
    return _STUDIES[name]

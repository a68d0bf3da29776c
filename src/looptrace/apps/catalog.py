"""The case studies the command line offers: the built-in ones and those of installed packages.

Built-ins are imported here (each registers itself); a package adds its own with an entry point in
the ``looptrace.studies`` group naming a module that calls
:func:`looptrace.apps.registry.register_study`. Importing any module that registers a study also
works (the registry is read when the command line is built).
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from pathlib import Path

import looptrace.apps.studies.parity
import looptrace.apps.studies.recursive_gpt
import looptrace.apps.studies.sudoku  # noqa: F401  (registers)
from looptrace.apps.registry import CaseStudy, get_study, registered
from looptrace.apps.runs import Run, read_record
from looptrace.config import config_from_dict

ENTRY_POINT_GROUP = "looptrace.studies"
_loaded = False


def studies() -> dict[str, CaseStudy]:
    """Every registered case study (built-in first, then entry points), by name."""
    global _loaded
    if not _loaded:
        _loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not take the command line down
                warnings.warn(f"case study plugin {ep.name!r} failed to load: {exc}", RuntimeWarning, stacklevel=2)
    return registered()


def study(name: str) -> CaseStudy:
    """The case study ``name`` (built-in, from an installed package, or registered by an import)."""
    studies()
    return get_study(name)


def open_run(path: str | Path) -> Run:
    """A trained run rebuilt from its record: its study, model, training and task configuration.

    Runs written before looptrace recorded the task's settings are refused with the upgrade command."""
    record = read_record(Path(path))
    task: object = config_from_dict(study(record.study).task_type, record.task, f"the task record of {record.path}")
    return Run(record, task)

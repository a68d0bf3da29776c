"""Peer libraries' scores on the evaluation's own checkpoints, each run in its own environment.

kronfluence is never imported here: :func:`run_kronfluence` runs :mod:`looptrace.apps.evaluation.kronfluence_probe`
with a Python that has kronfluence installed (a throwaway virtual environment), on the full-data run's
checkpoints and the task named by its registry name and fields, and reads back ``[N train, M query]`` scores
(looptrace's sign: bigger = the training example lowered the query's loss more) and what the probe reports
besides them (its settings, and the tied-body finding).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import looptrace as lt
from looptrace.apps.evaluation.task import EvalTask

#: The environment variable naming kronfluence's Python when ``--kronfluence-python`` is not given.
KRONFLUENCE_PYTHON = "LOOPTRACE_KRONFLUENCE_PYTHON"


def task_args(task: EvalTask) -> list[str]:
    """The probe's arguments that rebuild ``task``: its registry name and its fields as JSON."""
    return ["--task-name", task.name, "--task", json.dumps(dataclasses.asdict(task))]


def run_kronfluence(python: str, task: EvalTask, ckpt_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the kronfluence probe with ``python``; returns ``({method key: [N, M]}, the probe's report)``."""
    src = Path(__file__).resolve().parents[3]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kronfluence"
        cmd = [python, "-m", "looptrace.apps.evaluation.kronfluence_probe", "--checkpoints", str(ckpt_dir),
               "--out", str(out), *task_args(task)]  # fmt: skip
        env = {"PYTHONPATH": str(src), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise lt.ConfigError(
                f"the kronfluence probe failed in {python} (is kronfluence installed there?):\n{r.stderr[-3000:]}"
            )
        meta = json.loads((out / "scores.json").read_text())
        scores = {key: np.load(out / f) for key, f in meta.pop("files").items()}
    return scores, meta

"""The reference implementation of the paper (PyPI ``step-decomposed-influence``), run side by side.

It is installed into a throwaway virtual environment and run in a subprocess
(``python -m looptrace.apps.bench.reference_probe``) on the same model, batches and settings: its
TensorSketch at m = 2048 per tensor, timed over the same loader as ours, and its SDI and TracIn errors
against our exact features of the first batch (the same model and weights)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import looptrace as lt
from looptrace.apps.bench.common import BenchConfig, rel


def peer_venv(root: Path) -> Path | None:
    """A throwaway venv with the reference implementation (created once, reused)."""
    py = root / "bin" / "python"
    if py.exists():
        return py
    try:
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True, capture_output=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "step-decomposed-influence", "numpy", "tqdm"],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"reference implementation unavailable: {exc}", file=sys.stderr)
        return None
    return py


def reference(
    cfg: BenchConfig, exact: lt.Features, venv: Path, dims: list[int], ours: dict[str, Any]
) -> dict[str, Any] | None:
    """The reference's timings and errors at ``dims`` (m per tensor), or ``None`` if it cannot run here.
    ``ours`` (label -> [SketchSpec dict, featurize keywords]) are timed head to head with it in its process."""
    py = peer_venv(venv)
    if py is None:
        return None
    src = str(Path(__file__).resolve().parents[3])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.pt"
        r = subprocess.run(
            [str(py), "-m", "looptrace.apps.bench.reference_probe", json.dumps(dataclasses.asdict(cfg)), json.dumps(dims),
             str(cfg.seeds), str(out), json.dumps(ours)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src},
        )  # fmt: skip
        if r.returncode != 0:
            print("reference implementation failed:\n" + r.stderr[-3000:], file=sys.stderr)
            return None
        res = json.loads(r.stdout.strip().splitlines()[-1])
        feats = torch.load(out, weights_only=True)
    s_ex, t_ex = lt.sdi(exact, exact), lt.tracin(exact, exact)
    sdi_err: dict[int, list[float]] = {}
    tracin_err: dict[int, list[float]] = {}
    d_of: dict[int, int] = {}
    for key, phi in feats.items():
        m = int(key.split("_")[0])
        total = phi.sum(1)
        sdi_err.setdefault(m, []).append(rel(torch.einsum("nd,mtd->nmt", total, phi), s_ex))
        tracin_err.setdefault(m, []).append(rel(total @ total.T, t_ex))
        d_of[m] = int(phi.shape[-1])
    res["errors"] = [
        {"m": m, "D": d_of[m], "sdi_rel_error": statistics.mean(sdi_err[m]), "sdi_sd": statistics.pstdev(sdi_err[m]),
         "tracin_rel_error": statistics.mean(tracin_err[m]), "tracin_sd": statistics.pstdev(tracin_err[m])}
        for m in sorted(sdi_err)
    ]  # fmt: skip
    return res

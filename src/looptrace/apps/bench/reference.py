"""The reference implementation of the paper (PyPI ``step-decomposed-influence``), run side by side.

It is installed into a throwaway virtual environment and run in a subprocess
(``python -m looptrace.apps.bench.reference_probe``) on the same model, batch and settings."""

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


def reference(cfg: BenchConfig, exact: lt.Features, ours_overhead_s: float, venv: Path) -> dict[str, Any] | None:
    py = peer_venv(venv)
    if py is None:
        return None
    n_tensors = len(exact.layout)
    dims = sorted({2048, *[max(2, d // n_tensors) // 2 * 2 for d in cfg.total_dims]})
    src = str(Path(__file__).resolve().parents[3])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.pt"
        r = subprocess.run(
            [str(py), "-m", "looptrace.apps.bench.reference_probe", json.dumps(dataclasses.asdict(cfg)), json.dumps(dims),
             str(cfg.seeds), str(out)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src},
        )  # fmt: skip
        if r.returncode != 0:
            print("reference implementation failed:\n" + r.stderr[-3000:], file=sys.stderr)
            return None
        res = json.loads(r.stdout.strip().splitlines()[-1])
        feats = torch.load(out, weights_only=True)
    s_ex = lt.sdi(exact, exact)
    errs: dict[int, list[float]] = {}
    for key, phi in feats.items():
        m = int(key.split("_")[0])
        s = torch.einsum("nd,mtd->nmt", phi.sum(1), phi)
        errs.setdefault(m, []).append(rel(s, s_ex))
    res["equal_total_dim"] = [
        {"m": m, "D": m * n_tensors, "sdi_rel_error": statistics.mean(v), "sdi_sd": statistics.pstdev(v)}
        for m, v in sorted(errs.items())
    ]
    res["speedup_of_ours_at_same_settings"] = res["overhead_m2048"] / ours_overhead_s
    return res

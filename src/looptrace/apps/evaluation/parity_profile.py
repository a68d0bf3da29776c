"""The parity probe's per-step SDI profile, plain and preconditioned (issue #24).

The parity study (docs/results/parity) reads the summed SDI profile of its training sample on the probe
0101... (length 40): ``sum_z SDI_t(z, probe)`` per loop step t, over the shipped run's checkpoints, exact.
This recomputes that profile with each curvature-aware geometry of ``lt.attribute(precondition=...)`` at its
defaults, on the same training sample, checkpoints and loss, and compares the shapes with the plain one:
the correlation over the steps up to the read-out, where the largest magnitude sits, the sign balance, and
the parity study's margin alignment (:func:`looptrace.apps.studies.parity.study.profile_shape`).

Run: ``python -m looptrace.apps.evaluation.parity_profile --out docs/results/eval/curvature/parity-profile.json``
(``--n-train`` to shrink the training sample; the default is the study's 128).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.apps.catalog import open_run
from looptrace.apps.studies.parity import circuit as pc
from looptrace.apps.studies.parity.study import ParityStudyConfig, _answer_trajectory, profile_shape
from looptrace.apps.studies.parity.task import train_sample
from looptrace.apps.tasks import parity
from looptrace.io import atomic_write_json

#: The shipped run of the parity study.
RUN = Path(__file__).resolve().parents[1] / "data" / "runs" / "parity-small"
#: The parity study's committed results (its exact all-checkpoint profile is the plain one here).
STUDY = Path(__file__).resolve().parents[4] / "docs" / "results" / "parity" / "results.json"
#: ``precondition=`` values compared with the plain profile (``None``).
KINDS: tuple[str | None, ...] = (None, "kfac", "ekfac", "gauss-newton")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / d) if d > 0 else float("nan")


def profiles(n_train: int | None = None, kinds: tuple[str | None, ...] = KINDS) -> dict[str, Any]:
    """Each geometry's summed probe profile ``[tau]`` and its shape beside the plain one."""
    cfg = ParityStudyConfig()
    run = open_run(RUN)
    model = run.load_model()
    ckpts = run.checkpoints()
    trainset = train_sample(n_train or cfg.n_train, run.task.final_max, cfg.seed)
    probes = parity.alternating_probes(min(cfg.probe_length, run.task.test_length))
    margins, _ = _answer_trajectory(model, probes, probes.loops)
    readout = int(probes.n[0])
    margin = margins[0]
    period = pc.detect_period(margin[:readout], min_lag=2, max_lag=readout // 2)
    train_loader = parity.as_tuples(trainset, cfg.batch_size)
    probe_loader = parity.as_tuples(probes, 2)
    out: dict[str, Any] = {}
    raw: dict[str, np.ndarray] = {}
    for kind in kinds:
        t0 = time.perf_counter()
        res = lt.attribute(model, ckpts, train_loader, probe_loader, parity.loss, step_module=model.core,
                           sketch=lt.SketchSpec.exact(), verify=False, precondition=kind)  # type: ignore[arg-type]  # fmt: skip
        p = res.sdi.double().numpy()[:, 0].sum(0)  # probe 0101..., summed over the training sample
        name = kind or "plain"
        raw[name] = p
        out[name] = {"profile": p.tolist(), "seconds": time.perf_counter() - t0,
                     **profile_shape(p, margin, readout, period)}  # fmt: skip
    plain = raw["plain"][:readout]
    for name, p in raw.items():
        q = p[:readout]
        out[name]["correlation_with_plain"] = _corr(q, plain)
        out[name]["sign_agreement_with_plain"] = float(np.mean(np.sign(q) == np.sign(plain)))
        out[name]["peak_step"] = int(np.argmax(np.abs(q)) + 1)
    curv = [k for k in raw if k != "plain"]
    study = np.asarray(json.loads(STUDY.read_text())["profile_variants"]["all_exact"]["profile"] if STUDY.exists()
                       else [], dtype=np.float64)  # fmt: skip
    check = None
    if len(trainset) == cfg.n_train and study.shape == raw["plain"].shape:
        check = {"what": "max |plain - the parity study's all_exact profile| / max |that profile| (the same computation)",
                 "relative_difference": float(np.abs(raw["plain"] - study).max() / np.abs(study).max())}  # fmt: skip
    return {
        "what": "summed SDI profile of the parity study's training sample on the probe 0101..., every checkpoint of "
        "the shipped run, exact features, lt.attribute defaults for each precondition (damping=None, empirical "
        "Fisher); shapes compared on the steps up to the read-out",
        "run": "src/looptrace/apps/data/runs/parity-small",
        "n_train": len(trainset),
        "checkpoints": len(ckpts),
        "readout": readout,
        "tau": int(raw["plain"].shape[0]),
        "margin_period": period,
        "profiles": out,
        "min_correlation_with_plain": min(out[k]["correlation_with_plain"] for k in curv) if curv else None,
        "same_peak_as_plain": {k: out[k]["peak_step"] == out["plain"]["peak_step"] for k in curv},
        "plain_vs_parity_study": check,
        "peak_word": peak_word({k: out[k]["peak_step"] == out["plain"]["peak_step"] for k in curv}),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }


def peak_word(same_peak: dict[str, bool]) -> str:
    """Whether the preconditioners move the step of largest magnitude, in words (from ``same_peak_as_plain``)."""
    moved = [k for k, same in same_peak.items() if not same]
    if not moved:
        return "stays at the plain profile's step for every preconditioner"
    if len(moved) == len(same_peak):
        return "moves away from the plain profile's step for every preconditioner"
    return f"moves away from the plain profile's step for {', '.join(moved)} only"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the parity probe's SDI profile, plain and preconditioned")
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--n-train", type=int, default=None, help="training sample size (default: the study's)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = profiles(args.n_train)
    atomic_write_json(res, Path(args.out))
    print(
        {k: {f: v[f] for f in ("correlation_with_plain", "peak_step", "seconds")} for k, v in res["profiles"].items()}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reference implementation on the benchmark model, in its own virtual environment:
``python -m looptrace.apps.bench.reference_probe CONFIG DIMS SEEDS OUT OURS`` (the environment has torch,
numpy and ``step-decomposed-influence``; ``looptrace`` comes from PYTHONPATH). Prints timings as JSON
and saves the reference's per-step features of the first batch to OUT for the error measurement.

The time is taken head to head with OURS (a JSON dict of label -> [SketchSpec dict, featurize keywords]):
in each round, in this process, on the same model and the whole loader (``n_batches`` batches), the
reference and each of ours run back to back between two plain forward+backward runs; overheads are
against those plain runs, and a round's speed-up is the reference's time over ours (no ratio of figures
taken minutes apart)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch

import looptrace as lt
from looptrace.apps.bench.common import BenchConfig, Workload, bracketed_rounds, loss_fn, synthetic_workload


def main(argv: list[str]) -> None:
    from sdi import ProjectedTracInSDI  # type: ignore[import-not-found]  # the peer, only in its venv

    cfg = BenchConfig(**json.loads(argv[0]))
    dims, seeds, out_path, ours = json.loads(argv[1]), int(argv[2]), argv[3], json.loads(argv[4])
    work = synthetic_workload(cfg)
    model, batches = work.model, work.batches

    def featurize(m: int, seed: int, loader: list[Any]) -> Any:
        est = ProjectedTracInSDI(
            model=model, target_modules=model.core, projection_size=m, seed=seed, loss_reduction="sum"
        )
        try:
            return est.featurize_loader(loader=loader, loss_fn=loss_fn)
        finally:
            est.close()

    res: dict[str, Any] = {"runs": []}
    feats = {}
    for m in dims:
        for seed in range(seeds):
            t0 = time.perf_counter()
            fs = featurize(m, seed, batches[:1])
            phi = torch.cat([fs.phi[k] for k in sorted(fs.phi)], dim=-1)  # [N, steps, alpha * m]
            feats[f"{m}_{seed}"] = phi
            res["runs"].append({"m": m, "seed": seed, "seconds": time.perf_counter() - t0, "D": phi.shape[-1]})
    res.update(head_to_head(cfg, work, lambda loader=batches: featurize(2048, 0, loader), ours))
    torch.save(feats, out_path)
    print(json.dumps(res))


def head_to_head(cfg: BenchConfig, work: Workload, ref: Any, ours: dict[str, Any]) -> dict[str, Any]:
    """Rounds of plain, the reference and each of ours (in reverse order every other round, so that no one
    always runs first), plain: overheads against the mean of the round's two plain runs, and each of ours'
    speed-up as the reference's time over its own in the same round. ``ref(loader)`` and each of ours
    default to the whole loader."""
    batches = work.batches

    def featurizer(d: dict[str, Any], kw: dict[str, Any]) -> Any:
        spec = lt.SketchSpec.from_dict(d)
        return lambda loader=batches: work.featurize(spec, loader, **kw)

    def plain() -> None:
        work.plain_step(batches)

    calls = {"reference": ref, **{label: featurizer(d, kw) for label, (d, kw) in ours.items()}}
    plain()
    ref()  # warm-up: the reference's first call over the whole loader is slow (a first round without it was)
    for fn in list(calls.values())[1:]:  # ours on one batch (the first call sets up hooks, plans and tables)
        fn(batches[:1])
    timed_rounds = bracketed_rounds(plain, [calls], max(cfg.reps, 3), alternate=True)
    times, base = timed_rounds.times, timed_rounds.base["reference"]  # one group: one baseline for every call
    rounds = [
        {"plain_before": p[0], **{label: times[label][i] for label in calls}, "plain_after": p[1]}
        for i, p in enumerate(timed_rounds.plain)
    ]
    ref_over = timed_rounds.ratios("reference")
    out: dict[str, Any] = {
        "plain_s": statistics.median(base),
        "featurize_m2048_s": statistics.median(times["reference"]),
        "overhead_m2048": statistics.median(ref_over),
        "overhead_m2048_rounds": ref_over,
        "head_to_head": {},
    }
    for label in ours:
        speedups = [r / o for r, o in zip(times["reference"], times[label], strict=True)]
        over = timed_rounds.ratios(label)
        out["head_to_head"][label] = {"speedup": statistics.median(speedups), "speedup_rounds": speedups, "overhead": statistics.median(over),
                                      "overhead_rounds": over, "featurize_s": statistics.median(times[label])}  # fmt: skip
    out["rounds"] = rounds
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

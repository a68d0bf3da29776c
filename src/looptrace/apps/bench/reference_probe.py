"""The reference implementation on the benchmark model, in its own virtual environment:
``python -m looptrace.apps.bench.reference_probe CONFIG DIMS SEEDS OUT`` (the environment has torch,
numpy and ``step-decomposed-influence``; ``looptrace`` comes from PYTHONPATH). Prints timings as JSON and
saves the reference's per-step features to OUT for the error measurement."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from looptrace.apps.bench.common import BenchConfig, build, loss_fn, median_time, paired_times


def main(argv: list[str]) -> None:
    from sdi import ProjectedTracInSDI  # type: ignore[import-not-found]  # the peer, only in its venv

    cfg = BenchConfig(**json.loads(argv[0]))
    dims, seeds, out_path = json.loads(argv[1]), int(argv[2]), argv[3]
    model, batch = build(cfg)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).sum().backward()

    res: dict[str, Any] = {"plain_fwd_bwd_s": median_time(plain, cfg.reps), "runs": []}
    feats = {}
    for m in dims:
        for seed in range(seeds):
            est = ProjectedTracInSDI(
                model=model, target_modules=model.core, projection_size=m, seed=seed, loss_reduction="sum"
            )
            t0 = time.perf_counter()
            fs = est.featurize_loader(loader=[batch], loss_fn=loss_fn)
            t = time.perf_counter() - t0
            est.close()
            phi = torch.cat([fs.phi[k] for k in sorted(fs.phi)], dim=-1)  # [N, steps, alpha * m]
            feats[f"{m}_{seed}"] = phi
            res["runs"].append({"m": m, "seed": seed, "seconds": t, "D": phi.shape[-1], "steps": fs.steps})

    def timed() -> None:
        est = ProjectedTracInSDI(
            model=model, target_modules=model.core, projection_size=2048, seed=0, loss_reduction="sum"
        )
        est.featurize_loader(loader=[batch], loss_fn=loss_fn)
        est.close()

    _, res["featurize_m2048_s"], res["overhead_m2048"] = paired_times(plain, timed, cfg.reps)
    torch.save(feats, out_path)
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])

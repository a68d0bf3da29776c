"""The reference implementation on the benchmark model, in its own virtual environment:
``python -m looptrace.apps.bench.reference_probe CONFIG DIMS SEEDS OUT`` (the environment has torch,
numpy and ``step-decomposed-influence``; ``looptrace`` comes from PYTHONPATH). Prints timings as JSON
and saves the reference's per-step features of the first batch to OUT for the error measurement.

The time is taken like ours: the whole loader (``n_batches`` batches), alternating with a plain
forward+backward over the same batches, the median of the per-round ratios."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from looptrace.apps.bench.common import BenchConfig, build, loss_fn, paired_times


def main(argv: list[str]) -> None:
    from sdi import ProjectedTracInSDI  # type: ignore[import-not-found]  # the peer, only in its venv

    cfg = BenchConfig(**json.loads(argv[0]))
    dims, seeds, out_path = json.loads(argv[1]), int(argv[2]), argv[3]
    model, batches = build(cfg)

    def plain() -> None:
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, b).sum().backward()

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
    t_plain, t_ref, ratio, ratios = paired_times(plain, lambda: featurize(2048, 0, batches), cfg.reps)
    res.update(plain_s=t_plain, featurize_m2048_s=t_ref, overhead_m2048=ratio, overhead_m2048_rounds=ratios)
    torch.save(feats, out_path)
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Scale benchmark: featurise >= 100k synthetic examples into a feature store with a small model,
then report store size, throughput with 1 and 2 processes, and top-k latency over the whole store.

``looptrace bench scale [--n 100000]`` writes ``benchmarks/results/scale.json`` and ``scale.md``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from looptrace.apps.bench.common import machine
from looptrace.io import atomic_write_bytes, atomic_write_json
from looptrace.models.looped import LoopedConfig, LoopedTransformer

N_DEFAULT = 100_000


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return LoopedTransformer(
        LoopedConfig(vocab_size=32, d_model=16, n_heads=2, d_mlp=32, n_loops=3, max_len=8, injection="additive")
    )


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x)[:, -1], y, reduction="none")


def make_dataset(role: str) -> torch.utils.data.Dataset:
    n = int(os.environ.get("LOOPTRACE_SCALE_N", N_DEFAULT)) if role == "train" else 256
    g = torch.Generator().manual_seed(0 if role == "train" else 1)
    return torch.utils.data.TensorDataset(
        torch.randint(0, 32, (n, 8), generator=g), torch.randint(0, 32, (n,), generator=g)
    )


def format_measurement(shards: int = 64, rows: int = 1024, dim: int = 256) -> dict[str, Any]:
    """Write and memory-map-read the same float16 shards as safetensors and as .npy (the choice of the
    store's format was made from this; zarr was not installed here and is not measured)."""
    import numpy as np
    from safetensors.torch import save_file

    from looptrace.store.shards import read_safetensors

    tmp = Path(tempfile.mkdtemp(prefix="looptrace-fmt-"))
    x = torch.randn(rows, dim).half()
    out: dict[str, Any] = {"shards": shards, "rows": rows, "dim": dim}
    try:
        t0 = time.perf_counter()
        for i in range(shards):
            save_file({"features": x}, str(tmp / f"{i}.safetensors"))
        out["safetensors_write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tot = sum(
            float(np.asarray(read_safetensors(tmp / f"{i}.safetensors"), dtype=np.float32).sum()) for i in range(shards)
        )
        out["safetensors_read_s"] = time.perf_counter() - t0
        a = x.numpy()
        t0 = time.perf_counter()
        for i in range(shards):
            np.save(tmp / f"{i}.npy", a)
        out["npy_write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tot2 = sum(float(np.load(tmp / f"{i}.npy", mmap_mode="r").astype(np.float32).sum()) for i in range(shards))
        out["npy_read_s"] = time.perf_counter() - t0
        out["same_values"] = abs(tot - tot2) < 1e-3 * max(1.0, abs(tot))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run(n: int = N_DEFAULT, out_dir: Path = Path("benchmarks/results")) -> dict[str, Any]:
    from looptrace.store import FeatureStore, topk

    tmp = Path(tempfile.mkdtemp(prefix="looptrace-scale-"))
    src = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": src, "LOOPTRACE_SCALE_N": str(n), "OMP_NUM_THREADS": "1"}
    ck = tmp / "ck.pt"
    torch.save({"model": make_model().state_dict(), "lr": 1e-3}, ck)
    common = [
        "featurize", "--model", "looptrace.apps.bench.scale:make_model", "--loss", "looptrace.apps.bench.scale:loss_fn",
        "--dataset", "looptrace.apps.bench.scale:make_dataset", "--step-module", "core", "--checkpoint", str(ck),
        "--dim", "256", "--dtype", "float16", "--shard-size", "8192", "--batch-size", "512", "--quiet",
    ]  # fmt: skip
    res: dict[str, Any] = {
        "machine": machine(),
        "n_train": n,
        "n_query": 256,
        "sketch": {"dim": 256, "method": "countsketch", "budget": "shared"},
        "dtype": "float16",
    }
    try:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "looptrace.cli", *common, "--store", str(tmp / "one")], check=True, env=env
        )
        res["seconds_1_process"] = time.perf_counter() - t0
        torchrun = str(Path(sys.executable).parent / "torchrun")
        t0 = time.perf_counter()
        subprocess.run(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "looptrace.cli",
                *common,
                "--store",
                str(tmp / "two"),
            ],
            check=True,
            env=env,
        )
        res["seconds_2_processes"] = time.perf_counter() - t0
        res["examples_per_s_1_process"] = (n + 256) / res["seconds_1_process"]
        res["examples_per_s_2_processes"] = (n + 256) / res["seconds_2_processes"]
        store = FeatureStore.open(tmp / "one")
        res["store_bytes"] = store.summary()["bytes"]
        for index in ("flat", "ivf"):
            t0 = time.perf_counter()
            topk(store, k=10, index=index)  # type: ignore[arg-type]
            res[f"topk_{index}_seconds_256_queries"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["format"] = format_measurement()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, out_dir / "scale.json")
    m = res["machine"]
    md = [
        "# Scale benchmark",
        "",
        f"{n:,} train + 256 query synthetic examples, looped model d=16, tau=3, sketch D=256 stored as float16, "
        f"on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, {m['date']}. Wall times include process start-up.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| store size | {res['store_bytes'] / 2**20:.1f} MiB |",
        f"| featurisation, 1 process | {res['examples_per_s_1_process']:.0f} examples/s ({res['seconds_1_process']:.1f} s) |",
        f"| featurisation, 2 processes (torchrun, gloo) | {res['examples_per_s_2_processes']:.0f} examples/s ({res['seconds_2_processes']:.1f} s) |",
        f"| top-10 proponents+opponents for 256 queries, exact FAISS (flat) | {res['topk_flat_seconds_256_queries']:.2f} s |",
        f"| same, IVF (approximate, exactly re-scored) | {res['topk_ivf_seconds_256_queries']:.2f} s |",
        "",
        "Shard format (64 float16 shards of 1024 x 256, write / memory-mapped read):",
        f"safetensors {res['format']['safetensors_write_s']:.3f} s / {res['format']['safetensors_read_s']:.3f} s; "
        f".npy {res['format']['npy_write_s']:.3f} s / {res['format']['npy_read_s']:.3f} s. Both memory-map; safetensors "
        "was kept: equal speed within noise, a self-describing header checked against the sidecar, and no pickle path.",
    ]
    atomic_write_bytes(out_dir / "scale.md", ("\n".join(md) + "\n").encode())
    return res

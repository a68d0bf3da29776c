"""The on-disk format of one shard: safetensors files, their checksums, dataset fingerprints."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from looptrace.errors import CorruptFileError
from looptrace.io import sha256_file

__all__ = ["dataset_fingerprint", "read_safetensors", "sha256_file"]

_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "BF16": None}


def dataset_fingerprint(dataset: Any) -> str:
    """Length plus a hash of the first and last examples' tensors (cheap, catches swapped datasets)."""
    from looptrace import batching

    n = len(dataset)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({0, n - 1} if n else set()):
        for t in batching.tensors(dataset[i]):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def read_safetensors(path: Path, name: str = "features") -> np.ndarray:
    """Memory-map one tensor of a safetensors file (read-only, no copy)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 10_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        info = header[name]
        dtype = _NP[info["dtype"]]
        if dtype is None:
            raise ValueError(f"dtype {info['dtype']} cannot be memory-mapped")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize or 8 + n + end > path.stat().st_size:
            raise ValueError("data offsets do not match the shape or the file size")
        return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
    except (OSError, ValueError, KeyError, struct.error, json.JSONDecodeError) as exc:
        raise CorruptFileError(
            f"{path} is not a readable looptrace shard ({exc}); delete it and its .json sidecar to recompute"
        ) from exc

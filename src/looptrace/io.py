"""Atomic file output: everything looptrace writes appears under its name only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = partial_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = partial_path(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_npy(path: Path, shape: tuple[int, ...], dtype: Any, *, update: bool = False) -> Iterator[np.ndarray]:
    """A memory-mapped .npy being written: renamed onto ``path`` on success, removed on failure.

    ``update=True`` starts from a copy of the existing file (which must have ``shape``), so a failure
    leaves the old contents intact.
    """
    from numpy.lib.format import open_memmap

    from looptrace.errors import ConfigError

    tmp = partial_path(path)
    if update:
        shutil.copyfile(path, tmp)
        arr = open_memmap(tmp, mode="r+")
        if arr.shape != shape:
            have = arr.shape
            del arr
            tmp.unlink()
            raise ConfigError(f"{path} holds scores of shape {have}, not {shape}; write to a new file")
    else:
        arr = open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    try:
        yield arr
        arr.flush()
    except BaseException:
        del arr
        tmp.unlink(missing_ok=True)
        raise
    del arr
    os.replace(tmp, path)

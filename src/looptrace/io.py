"""Atomic file output: everything looptrace writes appears under its name only when complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes (read in 4 MiB blocks): the checksum sidecars record."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


#: What to do after a refused write, when the caller has nothing more specific to say.
RESUME = "fix that and rerun the same command (nothing partial was kept under that name)"

_REASONS = {
    errno.ENOSPC: "no space left on device (the disk is full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for this file system",
    errno.EIO: "input/output error (a failing disk or a network file system that went away)",
}


def machine_error(exc: BaseException) -> str | None:
    """What the machine refused, if ``exc`` is a refused write (an OSError of one of the :data:`REFUSALS` kinds,
    or the same error wrapped by safetensors or torch's zip writer); ``None`` for anything else (a file that
    already exists is somebody's logic, and a bug must keep its traceback)."""
    code: int | None = None
    if isinstance(exc, OSError):
        code = exc.errno
    elif type(exc).__name__ == "SafetensorError" or isinstance(exc, RuntimeError):
        text = str(exc)
        found = re.search(r"os error (\d+)", text)
        if found:
            code = int(found.group(1))
        elif isinstance(exc, RuntimeError) and ("file write failed" in text or "PytorchStreamWriter" in text):
            return "the write failed (is the disk full?)"
        else:
            return None
    return None if code is None else _REASONS.get(code)  # other errors (a file that exists, ...) are not refusals


#: The errno values of a write the machine refused (as opposed to, say, a file that does not exist).
REFUSALS = frozenset(_REASONS)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], *, partial: Path | None = None, resume: str = RESUME) -> Iterator[None]:
    """Turn a write the machine refuses (disk full, permission denied, read-only) into a
    :class:`looptrace.StorageError` that names ``path``, what happened and ``resume``; ``partial`` (the
    temporary file being written) is removed so that a full disk is not left fuller."""
    from looptrace.errors import StorageError

    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        reason = machine_error(exc)
        if reason is None:
            raise
        if partial is not None:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {reason}; {resume}", str(path)) from exc


def atomic_write_bytes(path: Path, data: bytes, *, resume: str = RESUME) -> None:
    tmp = partial_path(path)
    with writing(path, partial=tmp, resume=resume):
        tmp.write_bytes(data)
        os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path, *, resume: str = RESUME) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), resume=resume)


def atomic_torch_save(obj: Any, path: Path, *, resume: str = RESUME) -> None:
    tmp = partial_path(path)
    with writing(path, partial=tmp, resume=resume):
        torch.save(obj, tmp)
        os.replace(tmp, path)


def make_dirs(path: Path, *, resume: str = RESUME) -> None:
    """``mkdir -p``, with a refused creation reported like a refused write."""
    with writing(path, resume=resume):
        path.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_npy(path: Path, shape: tuple[int, ...], dtype: Any, *, update: bool = False) -> Iterator[np.ndarray]:
    """A memory-mapped .npy being written: renamed onto ``path`` on success, removed on failure.

    ``update=True`` starts from a copy of the existing file (which must have ``shape``), so a failure
    leaves the old contents intact.
    """
    from numpy.lib.format import open_memmap

    from looptrace.errors import ConfigError

    tmp = partial_path(path)
    with writing(path, partial=tmp):
        if update:
            shutil.copyfile(path, tmp)
        else:
            open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
        _reserve(tmp)
    if update:
        arr = open_memmap(tmp, mode="r+")
        if arr.shape != shape:
            have = arr.shape
            del arr
            tmp.unlink()
            raise ConfigError(f"{path} holds scores of shape {have}, not {shape}; write to a new file")
    else:
        arr = open_memmap(tmp, mode="r+")
    try:
        yield arr
        arr.flush()
    except BaseException:
        del arr
        tmp.unlink(missing_ok=True)
        raise
    del arr
    os.replace(tmp, path)


def _reserve(path: Path) -> None:
    """Allocate every block of a (sparse) file now: a full disk then refuses here, with an error, instead
    of killing the process with SIGBUS when a memory-mapped page is first written."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the memory map fails later, less gracefully
        return
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            os.posix_fallocate(f.fileno(), 0, size)

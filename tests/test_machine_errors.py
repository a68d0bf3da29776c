"""Errors from the machine (disk full, read-only, permission denied) end in one line that names the path and how
to resume, exit status 1, no traceback; the rerun resumes to the same scores as a clean run."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError

import looptrace as lt
from looptrace.cli import main
from looptrace.io import atomic_write_bytes, machine_error
from tests.store_fixtures import save_checkpoints

ARGS = [
    "--model", "tests.store_fixtures:make_model", "--loss", "tests.store_fixtures:loss_fn",
    "--dataset", "tests.store_fixtures:make_dataset", "--step-module", "core", "--dim", "64",
    "--shard-size", "8", "--batch-size", "8", "--quiet",
]  # fmt: skip


def _featurize(store: Path, ckpt: str) -> int:
    return main(["featurize", "--store", str(store), *ARGS, "--checkpoint", f"{ckpt}@0.1"])


def _shards(store: Path) -> dict[str, tuple[int, int]]:
    """Every finished shard file with its inode and modification time (a rewrite changes one of them)."""
    return {
        str(p.relative_to(store)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.rglob("shard_*.safetensors")
    }


def test_disk_full_during_featurize_is_one_line_and_the_rerun_resumes_identically(tmp_path, monkeypatch, capsys):
    """Catches: a raw SafetensorError traceback, a partial shard left behind, finished shards recomputed on
    resume, or a resumed store that scores differently from a clean one."""
    import safetensors.torch

    (ckpt,) = save_checkpoints(str(tmp_path), k=1)
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def full_after_three(tensors, filename, *a, **k):  # the fourth shard finds the disk full, as safetensors says it
        calls["n"] += 1
        if calls["n"] == 4:
            Path(filename).write_bytes(b"half a shard")  # what a full disk leaves: a partial file
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                                  'space left on device" }) (os error 28)')  # fmt: skip
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full_after_three)
    store = tmp_path / "store"
    assert _featurize(store, ckpt) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "no space left on device" in err and "shard_000000024_000000032.safetensors" in err, err
    assert "rerun the same command" in err and "resumes" in err, err
    assert not list(store.rglob("*.partial")), "the partial shard must be removed from a full disk"
    before = _shards(store)
    assert len(before) == 3

    monkeypatch.setattr(safetensors.torch, "save_file", real)  # space freed
    assert _featurize(store, ckpt) == 0
    after = _shards(store)
    assert {k: after[k] for k in before} == before, "finished shards were rewritten on resume"
    clean = tmp_path / "clean"
    assert _featurize(clean, ckpt) == 0
    assert main(["score", "--store", str(store), "--out", str(tmp_path / "a.npy")]) == 0
    assert main(["score", "--store", str(clean), "--out", str(tmp_path / "b.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


@pytest.mark.parametrize(
    ("code", "words"), [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")]
)
def test_refused_writes_of_small_files_name_the_path(tmp_path, monkeypatch, code, words):
    """Catches: an OSError from a sidecar / manifest / score write escaping as a traceback, or a partial file
    kept under the final name."""
    target = tmp_path / "out.json"

    def refuse(self, data):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(lt.StorageError, match=words) as info:
        atomic_write_bytes(target, b"{}")
    assert str(target) in str(info.value) and info.value.path == str(target)
    assert not target.exists()


def test_only_refusals_count_as_machine_errors():
    """Catches: a bug (any RuntimeError) reported as a disk problem and losing its traceback."""
    assert machine_error(OSError(errno.ENOSPC, "x")) is not None
    assert machine_error(SafetensorError("IoError ... (os error 30)")) == "read-only file system"
    assert machine_error(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert machine_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert machine_error(ValueError("bad")) is None
    assert machine_error(FileExistsError(errno.EEXIST, "File exists")) is None  # the store's lock: logic, not disk
    assert machine_error(SafetensorError("IoError ... (os error 2)")) is None


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    """Catches: --debug / LOOPTRACE_DEBUG=1 swallowing the error."""
    with pytest.raises(lt.ConfigError):
        main(["inspect", "--store", str(tmp_path / "none"), "--debug"])
    monkeypatch.setenv("LOOPTRACE_DEBUG", "1")
    with pytest.raises(lt.ConfigError):
        main(["inspect", "--store", str(tmp_path / "none")])


def test_a_real_full_disk(tmp_path):
    """On a real 256 KiB tmpfs (needs root and mount; skipped otherwise): the one-line error, then the resumed
    store scores exactly like a clean one. Catches error paths that only real ENOSPC takes (e.g. safetensors'
    own wording, a sidecar or the manifest failing instead of a shard)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    try:
        (ckpt,) = save_checkpoints(str(tmp_path), k=1)
        big = [*ARGS, "--dim", "2048", "--checkpoint", f"{ckpt}@0.1"]  # 40 x 2048 floats: more than 256 KiB
        cmd = [sys.executable, "-m", "looptrace.cli", "featurize", "--store", str(disk / "st"), *big]
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": f"{root / 'src'}:{root}"}  # this checkout's looptrace, not an installed one
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert run.returncode == 1, run.stderr
        assert run.stderr.startswith("looptrace: error: ") and run.stderr.count("\n") == 1, run.stderr
        assert "no space left on device" in run.stderr and "resumes" in run.stderr
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        assert subprocess.run(cmd, capture_output=True, env=env).returncode == 0
        assert main(["featurize", "--store", str(tmp_path / "clean"), *big]) == 0
        assert main(["score", "--store", str(disk / "st"), "--out", str(tmp_path / "a.npy")]) == 0
        assert main(["score", "--store", str(tmp_path / "clean"), "--out", str(tmp_path / "b.npy")]) == 0
        np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)

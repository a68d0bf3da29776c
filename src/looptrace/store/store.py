"""The feature store: per checkpoint and role, shards of features in safetensors files.

Layout::

    store/manifest.json                                  spec, body layout, fingerprints, checkpoints (eta)
    store/ck000/train/shard_000000000_000001024.safetensors   "features" [n, D] (train: totals)
    store/ck000/train/shard_000000000_000001024.json          sidecar: range, shape, dtype, sha256
    store/ck000/query/...                                "features" [n, tau, D] (query: per step)

A shard is written to a temporary name and renamed, then its sidecar (with the shard's sha256) is
written the same way: a shard counts as done only once its sidecar exists, so an interrupted run
resumes by redoing just the shards without one. Shards are plain tensors in safetensors (no pickle)
and are memory-mapped on read. Reopening a store with another spec, model body, dataset or shard
size raises and says what differs. Several processes (``torch.distributed`` ranks, or machines
sharing a file system) can fill one store: shard i belongs to rank i mod world_size.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looptrace.errors import ConfigError, CorruptFileError, SpecMismatchError
from looptrace.features import layout_fingerprint
from looptrace.io import atomic_write_bytes, make_dirs, writing
from looptrace.sketch.spec import SketchSpec
from looptrace.store.shards import read_safetensors, sha256_file

FORMAT = "looptrace-feature-store"
VERSION = 2  # 2: the manifest records the featurisation options (``options``)
READABLE = (1, 2)
ROLES = ("train", "query")
#: the companion store of the parameters outside the loop body, under the store's root
OUTSIDE_DIR = "outside"
#: What to do after the machine refused a write into a store.
RESUME = (
    "free space (or fix the permissions, or pick another --store), then rerun the same command: "
    "the store resumes and keeps every finished shard"
)


class FeatureStore:
    """A directory of feature shards with a manifest. Create with :meth:`open` (mode "a" or "r")."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._verified: set[Path] = set()

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        spec: SketchSpec | None = None,
        layout: list[dict[str, Any]] | None = None,
        checkpoints: Sequence[dict[str, Any]] | None = None,
        datasets: dict[str, dict[str, Any]] | None = None,
        shard_size: int = 1024,
        dtype: str = "float32",
        options: dict[str, Any] | None = None,
    ) -> FeatureStore:
        """Open ``root``; with ``spec`` (and the rest) create it, or check that it matches.

        ``options``: the featurisation options that change the numbers (see
        :func:`looptrace.store.featurize_to_store`); a store filled with other options is refused."""
        root = Path(root)
        path = root / "manifest.json"
        if spec is None:
            if not path.exists():
                raise ConfigError(
                    f"{root} is not a looptrace feature store (no manifest.json); featurise into it first"
                )
            return cls(root, cls._read_manifest(path))
        if dtype not in ("float32", "float16"):
            raise ConfigError(f"store dtype must be 'float32' or 'float16', got {dtype!r}")
        if shard_size < 1:
            raise ConfigError("shard_size must be >= 1")
        want: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "spec": spec.to_dict(),
            "layout": layout or [],
            "model_fingerprint": layout_fingerprint(layout or []),
            "checkpoints": list(checkpoints or []),
            "datasets": datasets or {},
            "shard_size": shard_size,
            "dtype": dtype,
            "options": options or {},
        }
        if path.exists():
            have = cls._read_manifest(path)
            diffs = [
                k
                for k in ("spec", "model_fingerprint", "checkpoints", "shard_size", "dtype", "options")
                if have.get(k, {} if k == "options" else None) != want[k]
            ]
            for role, d in want["datasets"].items():
                if role in have["datasets"] and have["datasets"][role] != d:
                    diffs.append(f"datasets.{role}")
            if diffs:
                detail = "; ".join(
                    f"{k}: store has {have.get(k.split('.')[0])!r}, asked for {want.get(k.split('.')[0])!r}"
                    for k in diffs[:3]
                )
                raise SpecMismatchError(
                    f"{root} was created with a different {', '.join(diffs)} ({detail[:600]}); use another store "
                    "directory or the same settings"
                )
            merged = dict(have)
            merged["datasets"] = {**have["datasets"], **want["datasets"]}
            if merged != have:
                atomic_write_bytes(path, json.dumps(merged, indent=1, sort_keys=True).encode(), resume=RESUME)
            return cls(root, merged)
        make_dirs(root, resume=RESUME)
        try:  # exclusive create: when several ranks start at once, one writes and the others re-check
            with writing(root / "manifest.lock", resume=RESUME):
                fd = os.open(root / "manifest.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            atomic_write_bytes(path, json.dumps(want, indent=1, sort_keys=True).encode(), resume=RESUME)
        except FileExistsError:
            for _ in range(600):
                if path.exists():
                    break
                time.sleep(0.05)
            return cls.open(
                root,
                spec=spec,
                layout=layout,
                checkpoints=checkpoints,
                datasets=datasets,
                shard_size=shard_size,
                dtype=dtype,
                options=options,
            )
        return cls(root, want)

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"{path} is not valid JSON ({exc}); the store is damaged") from exc
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise CorruptFileError(f"{path} is not a looptrace feature store manifest")
        if m.get("version") not in READABLE:
            raise CorruptFileError(f"{path} has store version {m.get('version')}, this looptrace reads {VERSION}")
        return m

    # ------------------------------------------------------------------ properties
    @property
    def spec(self) -> SketchSpec:
        return SketchSpec.from_dict(self.manifest["spec"])

    @property
    def options(self) -> dict[str, Any]:
        """The featurisation options the store was filled with (horizon, train mode, route)."""
        return dict(self.manifest.get("options", {}))

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        return list(self.manifest["checkpoints"])

    def n(self, role: str) -> int:
        return int(self.manifest["datasets"].get(role, {}).get("n", 0))

    def _dir(self, ck: int, role: str) -> Path:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
        if not 0 <= ck < len(self.manifest["checkpoints"]):
            raise ConfigError(
                f"checkpoint index {ck} is not in this store (it has {len(self.manifest['checkpoints'])})"
            )
        return self.root / f"ck{ck:03d}" / role

    def shard_ranges(self, role: str) -> list[tuple[int, int]]:
        n, s = self.n(role), int(self.manifest["shard_size"])
        return [(i, min(i + s, n)) for i in range(0, n, s)]

    # ------------------------------------------------------------------ shards
    def shard_path(self, ck: int, role: str, start: int, stop: int) -> Path:
        return self._dir(ck, role) / f"shard_{start:09d}_{stop:09d}.safetensors"

    def is_done(self, ck: int, role: str, start: int, stop: int) -> bool:
        p = self.shard_path(ck, role, start, stop)
        return p.exists() and p.with_suffix(".json").exists()

    def done(self, ck: int, role: str) -> list[tuple[int, int]]:
        return [r for r in self.shard_ranges(role) if self.is_done(ck, role, *r)]

    def write_shard(
        self,
        ck: int,
        role: str,
        start: int,
        stop: int,
        features: torch.Tensor,
        losses: torch.Tensor,
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Path:
        """Write one shard: ``features`` rows (train: totals ``[n, D]``; query: ``[n, tau, D]``), their losses and,
        for per-position train rows, ``positions = (rows [R, D], offsets [n + 1])`` (example i's positions are
        rows ``offsets[i]:offsets[i + 1]``), in one safetensors file whose checksum the sidecar keeps."""
        from safetensors.torch import save_file

        expect = (stop - start,)
        if tuple(features.shape[:1]) != expect:
            raise ConfigError(f"shard {start}:{stop} got {features.shape[0]} rows")
        make_dirs(self._dir(ck, role), resume=RESUME)
        path = self.shard_path(ck, role, start, stop)
        tmp = path.with_name(path.name + ".partial")
        dt = torch.float16 if self.manifest["dtype"] == "float16" else torch.float32
        tensors = {
            "features": features.detach().to("cpu", dt).contiguous(),
            "losses": losses.detach().to("cpu", torch.float32).contiguous(),
        }
        if positions is not None:
            rows, offsets = positions
            if tuple(offsets.shape) != (stop - start + 1,) or int(offsets[-1]) != rows.shape[0]:
                raise ConfigError(f"shard {start}:{stop}: position offsets do not match the rows")
            tensors["positions"] = rows.detach().to("cpu", dt).contiguous()
            tensors["offsets"] = offsets.detach().to("cpu", torch.int64).contiguous()
        with writing(path, partial=tmp, resume=RESUME):
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
        side = {
            "file": path.name,
            "start": start,
            "stop": stop,
            "shape": list(features.shape),
            "sha256": sha256_file(path),
            "spec": self.spec.fingerprint(),
        }
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(side).encode(), resume=RESUME)
        return path

    def _check(self, path: Path) -> dict[str, Any]:
        side_path = path.with_suffix(".json")
        try:
            side = json.loads(side_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptFileError(
                f"{side_path} is missing or damaged ({exc}); delete the shard to recompute it"
            ) from exc
        if side.get("file") != path.name or "/" in str(side.get("file")) or ".." in str(side.get("file")):
            raise CorruptFileError(
                f"{side_path} names {side.get('file')!r}, not its own shard; refusing a path outside the store"
            )
        if side.get("spec") != self.spec.fingerprint():
            raise SpecMismatchError(f"{path} was written with another sketch spec than this store's")
        if path not in self._verified:
            if sha256_file(path) != side.get("sha256"):
                raise CorruptFileError(
                    f"{path} does not match its checksum (truncated or corrupted); delete it and its sidecar to recompute"
                )
            self._verified.add(path)
        return side

    def read_shard(self, ck: int, role: str, start: int, stop: int) -> np.ndarray:
        path = self.shard_path(ck, role, start, stop)
        if not path.exists():
            raise ConfigError(
                f"shard {role}[{start}:{stop}] of checkpoint {ck} is not in {self.root}; featurise it first"
            )
        side = self._check(path)
        arr = read_safetensors(path)
        if list(arr.shape) != side["shape"]:
            raise CorruptFileError(f"{path} holds shape {arr.shape}, its sidecar says {side['shape']}")
        return arr

    def read_positions(self, ck: int, role: str, index: int) -> np.ndarray:
        """``[r, D]``: example ``index``'s per-position rows (spans of ``options["positions"]`` positions; its real
        positions only) at checkpoint ``ck``; needs a store filled with ``positions=``."""
        if not self.options.get("positions"):
            raise ConfigError(
                f"{self.root} holds no per-position features; featurise the training set with --positions"
            )
        start, stop = next((a, b) for a, b in self.shard_ranges(role) if a <= index < b)
        path = self.shard_path(ck, role, start, stop)
        if not path.exists():
            raise ConfigError(f"shard {role}[{start}:{stop}] of checkpoint {ck} is not in {self.root}; featurise it")
        self._check(path)
        offsets = read_safetensors(path, "offsets")
        rows = read_safetensors(path, "positions")
        return np.asarray(rows[int(offsets[index - start]) : int(offsets[index - start + 1])])

    def iter_shards(self, ck: int, role: str) -> Iterator[tuple[int, int, np.ndarray]]:
        missing = [r for r in self.shard_ranges(role) if not self.is_done(ck, role, *r)]
        if missing:
            raise ConfigError(
                f"{len(missing)} {role} shard(s) of checkpoint {ck} are not done (first: {missing[0]}); finish featurising"
            )
        for start, stop in self.shard_ranges(role):
            yield start, stop, self.read_shard(ck, role, start, stop)

    def read(self, ck: int, role: str) -> np.ndarray:
        """All rows of one checkpoint and role (a copy; use :meth:`iter_shards` for streaming)."""
        return np.concatenate([a for _, _, a in self.iter_shards(ck, role)])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "root": str(self.root),
            "spec": self.manifest["spec"],
            "model_fingerprint": self.manifest["model_fingerprint"],
            "dtype": self.manifest["dtype"],
            "options": self.options,
            "shard_size": self.manifest["shard_size"],
            "checkpoints": self.checkpoints,
            "datasets": self.manifest["datasets"],
        }
        progress = {}
        size = 0
        for k in range(len(self.checkpoints)):
            for role in ROLES:
                if self.n(role):
                    progress[f"ck{k:03d}/{role}"] = f"{len(self.done(k, role))}/{len(self.shard_ranges(role))} shards"
                    size += sum(self.shard_path(k, role, *r).stat().st_size for r in self.done(k, role))
        out["progress"] = progress
        out["bytes"] = size
        if (self.root / OUTSIDE_DIR / "manifest.json").exists():
            out["outside"] = FeatureStore.open(self.root / OUTSIDE_DIR).summary()
        return out

    def outside(self) -> FeatureStore:
        """The companion store of the parameters outside the loop body (``featurize_to_store(outside=True)``, under
        ``outside/``): their features, one pass per forward, in their own feature space."""
        path = self.root / OUTSIDE_DIR
        if not (path / "manifest.json").exists():
            raise ConfigError(
                f"{self.root} holds no features of the parameters outside the loop body; featurise it again with "
                "outside=True (`looptrace featurize ... --outside`: finished shards are kept) to score the whole model"
            )
        return FeatureStore.open(path)

"""``Curvature``: the fitted blocks of one checkpoint, applied to flat body gradients, saved and loaded.

A flat body gradient is laid out as in exact features: body parameter tensors in sorted-name order,
each flattened row-major (:class:`looptrace.sketch.plan.SketchPlan` with the exact spec). Each block
reads its parameters' entries, solves its damped system and writes them back, so
``Curvature.precondition`` is the block-diagonal ``(F + lambda I)^-1`` over the whole body.

On disk: one safetensors file of float64 tensors (no pickle) and a JSON sidecar with the block list,
the fitting metadata and the file's sha256; the file is written to a temporary name and renamed, then
the sidecar, so a factor file counts only once its sidecar exists (as feature shards do).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from looptrace.curvature.blocks import DAMPING_SCALE, DiagonalBlock, Kind, KroneckerBlock, _check_kind
from looptrace.errors import ConfigError, CorruptFileError, SpecMismatchError
from looptrace.io import RESUME, atomic_write_bytes, make_dirs, sha256_file, writing

FORMAT = "looptrace-curvature"
VERSION = 1


@dataclasses.dataclass
class Curvature:
    """Block-diagonal curvature of a looped body at one checkpoint.

    Attributes:
        params: ``(name, shape)`` of every body parameter tensor, sorted by name (the flat layout).
        kronecker: one block per body ``nn.Linear`` (weight and bias).
        diagonal: one block per other body parameter tensor.
        fisher: ``"true"`` (targets sampled from the model) or ``"empirical"`` (the data's targets).
        n: examples the factors were fitted on.
        kinds: which of ``"kfac"``, ``"ekfac"`` can be applied.
        checkpoint: the checkpoint's name, or ``None``.
        ekfac_route: how the EK-FAC eigenvalues were fitted: ``"rows"`` (rows rotated per example in the
            hooks) or ``"exact"`` (exact per-example tied gradients, for rows that are not batch-first).
    """

    params: list[tuple[str, tuple[int, ...]]]
    kronecker: list[KroneckerBlock]
    diagonal: list[DiagonalBlock]
    fisher: str
    n: int
    kinds: tuple[str, ...]
    checkpoint: str | None = None
    ekfac_route: str | None = None

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, numel)`` in the flat layout."""
        out, off = {}, 0
        for name, shape in self.params:
            out[name] = (off, math.prod(shape))
            off += math.prod(shape)
        return out

    @property
    def dim(self) -> int:
        return sum(math.prod(s) for _, s in self.params)

    def precondition(
        self, g: torch.Tensor, kind: Kind, damping: float | None = None, damping_scale: float = DAMPING_SCALE
    ) -> torch.Tensor:
        """``(F + lambda I)^-1 g`` for flat gradients ``g [..., P]`` (a new tensor, float64 for float64 ``g``,
        else float32: the model's precision or better; the factors are float64, cast for the products).

        ``damping=None``: per block, ``lambda = damping_scale x`` its mean eigenvalue (of the float64
        spectrum); a float: that lambda for every block. Block by block, so no float64 copy of ``g`` is made."""
        _check_kind(kind)
        if kind not in self.kinds:
            raise ConfigError(f"these factors were fitted for {list(self.kinds)}, not {kind!r}; refit with it")
        if g.shape[-1] != self.dim:
            raise SpecMismatchError(
                f"gradients have {g.shape[-1]} entries, the curvature's body has {self.dim}; fit and apply on one body"
            )
        lead = g.shape[:-1]
        work = torch.float64 if g.dtype == torch.float64 else torch.float32
        flat = g.reshape(-1, self.dim)
        out = torch.empty(flat.shape, dtype=work, device=flat.device)
        off = self.offsets
        dev = flat.device
        for blk in self.kronecker:
            w0, wn = off[blk.weight]
            d_out = blk.shape[0]
            parts = [flat[:, w0 : w0 + wn].reshape(-1, d_out, wn // d_out).to(work)]
            if blk.bias is not None:
                b0, bn = off[blk.bias]
                parts.append(flat[:, b0 : b0 + bn].reshape(-1, d_out, 1).to(work))
            solved = _on(blk, dev).solve(torch.cat(parts, dim=2), kind, damping, damping_scale)
            out[:, w0 : w0 + wn] = solved[:, :, : wn // d_out].reshape(-1, wn)
            if blk.bias is not None:
                out[:, b0 : b0 + bn] = solved[:, :, -1]
        for dia in self.diagonal:
            s0, sn = off[dia.name]
            out[:, s0 : s0 + sn] = DiagonalBlock(dia.name, dia.diag.to(dev)).solve(flat[:, s0 : s0 + sn].to(work),
                                                                                   damping, damping_scale)  # fmt: skip
        return out.reshape(*lead, self.dim)

    def dense(self, kind: Kind, damping: float | None = None, damping_scale: float = DAMPING_SCALE) -> torch.Tensor:
        """The ``[P, P]`` inverse ``(F + lambda I)^-1`` itself (small bodies only: for tests and inspection)."""
        return self.precondition(torch.eye(self.dim, dtype=torch.float64), kind, damping, damping_scale).T

    # ------------------------------------------------------------------ disk
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, blk in enumerate(self.kronecker):
            for field in ("a_cov", "s_cov", "eig_a", "q_a", "eig_s", "q_s", "ekfac"):
                t = getattr(blk, field)
                if t is not None:
                    out[f"kron{i}.{field}"] = t.detach().to("cpu", torch.float64).contiguous()
        for i, dia in enumerate(self.diagonal):
            out[f"diag{i}"] = dia.diag.detach().to("cpu", torch.float64).contiguous()
        return out

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "params": [[n, list(s)] for n, s in self.params],
            "kronecker": [
                {"module": b.module, "weight": b.weight, "bias": b.bias, "rows": b.rows} for b in self.kronecker
            ],
            "diagonal": [d.name for d in self.diagonal],
            "fisher": self.fisher,
            "n": self.n,
            "kinds": list(self.kinds),
            "checkpoint": self.checkpoint,
            "ekfac_route": self.ekfac_route,
        }

    def save(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write ``path`` (safetensors) and ``path.json`` (meta, ``extra``, sha256), each atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        make_dirs(path.parent, resume=RESUME)
        tmp = path.with_name(path.name + ".partial")
        with writing(path, partial=tmp, resume=RESUME):
            save_file(self.tensors(), str(tmp))
            os.replace(tmp, path)
        side = {**self.meta(), **(extra or {}), "file": path.name, "sha256": sha256_file(path)}
        atomic_write_bytes(sidecar_path(path), json.dumps(side, indent=1).encode(), resume=RESUME)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple[Curvature, dict[str, Any]]:
        """Read a factor file and its sidecar, checking the checksum; returns the curvature and the sidecar."""
        from safetensors.torch import load_file

        path = Path(path)
        side_path = sidecar_path(path)
        if not path.exists() or not side_path.exists():
            raise ConfigError(f"no curvature factors at {path} (file and .json sidecar); fit them first")
        try:
            side = json.loads(side_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"{side_path} is damaged ({exc}); delete both files and fit again") from exc
        if side.get("format") != FORMAT or side.get("version") != VERSION or side.get("file") != path.name:
            raise CorruptFileError(f"{side_path} is not a looptrace curvature sidecar for {path.name}")
        if sha256_file(path) != side.get("sha256"):
            raise CorruptFileError(f"{path} does not match its checksum (truncated or corrupted); delete it and refit")
        t = load_file(str(path))
        kron = []
        for i, b in enumerate(side["kronecker"]):
            fields = {f: t.get(f"kron{i}.{f}") for f in ("eig_a", "q_a", "eig_s", "q_s", "ekfac")}
            kron.append(KroneckerBlock(b["module"], b["weight"], b["bias"], t[f"kron{i}.a_cov"], t[f"kron{i}.s_cov"],
                                       int(b["rows"]), **fields))  # fmt: skip
        diag = [DiagonalBlock(name, t[f"diag{i}"]) for i, name in enumerate(side["diagonal"])]
        params = [(n, tuple(s)) for n, s in side["params"]]
        curv = cls(params, kron, diag, side["fisher"], int(side["n"]), tuple(side["kinds"]), side["checkpoint"],
                   side.get("ekfac_route"))  # fmt: skip
        return curv, side


def sidecar_path(path: Path) -> Path:
    """Where a factor file's sidecar (meta, the fit's settings, checksum) is: beside it, ``.json`` appended."""
    return path.with_name(path.name + ".json")


def _on(blk: KroneckerBlock, device: torch.device) -> KroneckerBlock:
    if blk.q_a is None or blk.q_a.device == device:
        return blk
    moved = {f.name: getattr(blk, f.name) for f in dataclasses.fields(blk)}
    for k, v in moved.items():
        if isinstance(v, torch.Tensor):
            moved[k] = v.to(device)
    return KroneckerBlock(**moved)

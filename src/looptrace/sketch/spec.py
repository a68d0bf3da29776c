"""SketchSpec: what projection turns per-step gradients into features.

A spec is a frozen, validated value. It travels with every feature tensor, is saved beside every
output, and two features can only be combined when their specs are equal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Literal

from looptrace.errors import ConfigError

Method = Literal["auto", "tensorsketch", "countsketch", "exact"]
Budget = Literal["auto", "per_tensor", "proportional", "shared"]

_METHODS = ("auto", "tensorsketch", "countsketch", "exact")
_BUDGETS = ("auto", "per_tensor", "proportional", "shared")
MAX_DIM = 1 << 26


@dataclasses.dataclass(frozen=True)
class SketchSpec:
    """How per-example, per-step body gradients are projected to features.

    Attributes:
        dim: sketch dimension. With ``budget="per_tensor"`` it is the paper's m, the dimension given
            to *each* parameter tensor (the feature dimension is then m times the number of tensors);
            with ``"proportional"`` or ``"shared"`` it is the *total* feature dimension D.
            ``None`` only for the exact (identity) spec.
        seed: seeds every hash; hashes are drawn from (seed, parameter name, role).
        method: ``"auto"`` (the default): TensorSketch for *wide* matrices (see
            :data:`looptrace.sketch.plan.WIDE`), which can then be computed by FFT from the (delta, a) factors
            without ever forming the per-example gradient, and CountSketch for every other tensor;
            ``"tensorsketch"`` (the paper: TensorSketch for matrix parameters, CountSketch for
            vectors; variance <= (4/m^2 + 6/m)|g|^2|p|^2), ``"countsketch"`` (CountSketch of each
            flattened parameter gradient: a 4-wise independent bucket hash on the flattened index and a
            separable sign s1(row) s2(col), which folds into outer-product factors; variance <=
            (2/m + 2/m^2)|g|^2|p|^2),
            or ``"exact"`` (identity: the full per-step gradient).
        budget: how ``dim`` is spent across parameter tensors: ``"auto"`` (the default: every tensor but
            the wide matrices hashed into one shared space, which gets a fair share of ``dim``, at least its
            tensors' share of all entries and never more than they have; each wide matrix a block of its own,
            the rest split equally, rounded down to an FFT-friendly size and at most
            :data:`looptrace.sketch.plan.AUTO_BLOCK`; see
            :meth:`looptrace.sketch.plan.SketchPlan._auto`), ``"per_tensor"`` (dim each, as in
            the paper), ``"proportional"`` (D split in proportion to tensor size, tensors no larger than
            their share kept exactly), or ``"shared"`` (every tensor hashed into the same D
            coordinates with independent hashes, the sketches summed).

    The default (``auto``) was chosen by measurement across widths (benchmarks/results/widths.md): with no
    wide matrix (width 128 on the benchmark model) it is exactly CountSketch with a shared budget, the most
    accurate per dimension there at the same speed; at widths 512 and 768 the wide matrices' TensorSketch
    blocks are computed by FFT, which costs O(T (d_in + d_out) + m log m) per example instead of
    O(d_in d_out). ``SketchSpec(dim=2048, method="tensorsketch", budget="per_tensor")`` is the paper's
    configuration.
    """

    dim: int | None = 4096
    seed: int = 0
    method: Method = "auto"
    budget: Budget = "auto"

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ConfigError(f"SketchSpec.method must be one of {_METHODS}, got {self.method!r}")
        if self.budget not in _BUDGETS:
            raise ConfigError(f"SketchSpec.budget must be one of {_BUDGETS}, got {self.budget!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"SketchSpec.seed must be a non-negative int, got {self.seed!r}")
        if self.method == "exact":
            if self.dim is not None:
                raise ConfigError("the exact spec has no dimension: use SketchSpec.exact()")
            return
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0:
            raise ConfigError(
                f"SketchSpec.dim must be a positive int, got {self.dim!r}; "
                "use SketchSpec.exact() for the unprojected baseline"
            )
        if self.dim > MAX_DIM:
            raise ConfigError(
                f"SketchSpec.dim={self.dim} is absurdly large (limit {MAX_DIM}); "
                "use SketchSpec.exact() if you want unprojected gradients"
            )
        if self.method in ("tensorsketch", "auto") and self.dim % 2:
            raise ConfigError(
                f"SketchSpec.dim={self.dim} is odd; the TensorSketch variance bound "
                "(4/m^2 + 6/m) assumes an even m: use an even dim such as "
                f"{self.dim + 1}"
            )

    @classmethod
    def exact(cls) -> SketchSpec:
        """The identity spec: features are the full flattened per-step gradients (the baseline)."""
        return cls(dim=None, seed=0, method="exact", budget="per_tensor")

    @property
    def is_exact(self) -> bool:
        return self.method == "exact"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SketchSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown SketchSpec fields {sorted(unknown)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """A short stable hash of the spec (used to refuse mixing features of different specs)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __str__(self) -> str:
        if self.is_exact:
            return "SketchSpec.exact()"
        return f"SketchSpec(dim={self.dim}, seed={self.seed}, method={self.method!r}, budget={self.budget!r})"

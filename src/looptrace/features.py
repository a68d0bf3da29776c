"""Features: per-example, per-step sketched (or exact) body gradients, with their provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from looptrace.errors import SpecMismatchError
from looptrace.sketch.spec import SketchSpec


def layout_fingerprint(layout: list[dict[str, Any]]) -> str:
    """Hash of the body parameter layout (names, shapes, sketch slots): identifies the model body."""
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Features:
    """Per-example features of one checkpoint.

    Attributes:
        per_step: ``[N, tau, D]`` per-step features phi~_t (zero rows where a step got no gradient),
            or ``None`` when only totals were kept (``per_step=False`` in :func:`looptrace.featurize`).
        spec: the :class:`SketchSpec` they were computed with.
        layout: one dict per body parameter tensor: name, shape, kind, m, offset in D.
        checkpoint: an identifier of the weights (set by :func:`looptrace.attribute`), or ``None``.
        losses: ``[N]`` per-example losses seen while featurising.
        settings: the featurisation options that change the numbers (horizon ``tau``, ``train_mode``,
            the TensorSketch route ``outer_path``, ...), recorded with every store.
        positions: ``[N, L, D]`` with ``featurize(positions=True)``: each sequence position's part of the
            example's body gradient, summed over loop steps (``per_step`` is then ``None``); else ``None``.
        routes: body layer -> how its per-example gradients were captured (its rule on batch-first
            rows, the rule on rows regrouped from the data flow, or the per-example step route); and
            ``"<parameter> (sketch)"`` -> how a TensorSketch block was computed (by FFT from the factors, or by
            materialising the per-example gradient: the same numbers, the route measured faster here).
    """

    per_step: torch.Tensor | None
    spec: SketchSpec
    layout: list[dict[str, Any]]
    losses: torch.Tensor
    checkpoint: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    routes: dict[str, str] = dataclasses.field(default_factory=dict)
    _total: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        """``[N, D]``: sum over steps (or over positions), the sketch of each example's whole body gradient."""
        if self._total is None:
            if self.per_step is not None:
                self._total = self.per_step.sum(dim=1)
            else:
                assert self.positions is not None
                self._total = self.positions.sum(dim=1)
        return self._total

    def require_positions(self, what: str) -> torch.Tensor:
        if self.positions is None:
            raise SpecMismatchError(
                f"{what} needs per-position features; featurise the training set with positions=True"
            )
        return self.positions

    @property
    def n(self) -> int:
        return int(self.losses.shape[0])

    @property
    def tau(self) -> int | None:
        return None if self.per_step is None else int(self.per_step.shape[1])

    @property
    def dim(self) -> int:
        return int(self.total.shape[-1])

    @property
    def model_fingerprint(self) -> str:
        return layout_fingerprint(self.layout)

    def require_steps(self, what: str) -> torch.Tensor:
        if self.per_step is None:
            raise SpecMismatchError(
                f"{what} needs per-step features, but these were featurised with per_step=False; "
                "featurise again with per_step=True"
            )
        return self.per_step

    def compatible_with(self, other: Features) -> None:
        """Raise :class:`SpecMismatchError` unless ``other`` lives in the same feature space."""
        if self.spec != other.spec:
            raise SpecMismatchError(
                f"features were computed with different sketch specs ({self.spec} vs {other.spec}); "
                "featurise both sides with the same SketchSpec"
            )
        if self.model_fingerprint != other.model_fingerprint:
            raise SpecMismatchError(
                "features come from different model bodies (parameter names or shapes differ); "
                "featurise both sides with the same model and step module"
            )
        if self.checkpoint != other.checkpoint:
            raise SpecMismatchError(
                f"features come from different checkpoints ({self.checkpoint!r} vs {other.checkpoint!r}); "
                "scores combine features of the same checkpoint, then weight checkpoints by eta"
            )

    def to(self, *args: Any, **kwargs: Any) -> Features:
        return dataclasses.replace(
            self,
            per_step=None if self.per_step is None else self.per_step.to(*args, **kwargs),
            _total=None if self._total is None else self._total.to(*args, **kwargs),
            positions=None if self.positions is None else self.positions.to(*args, **kwargs),
        )

"""Curvature blocks of a looped body and their damped inverses.

A body parameter belongs to exactly one block:

* :class:`KroneckerBlock`: an ``nn.Linear`` of the body, weight and bias together. Its gradient is
  ``G = sum_r g_r a_r^T`` over the layer's rows r (every token of every loop step), with ``a = [x, 1]``
  (the bias folded in as an appended 1) and ``g`` the backprop signal at the layer's output, so
  ``G`` is ``[d_out, d_in + 1]`` and ``vec(G) = sum_r g_r (x) a_r`` (row-major). K-FAC approximates
  the Fisher ``E_n[vec(G_n) vec(G_n)^T]`` by ``S (x) A`` with

      A = sum_r a_r a_r^T / R          (mean over every row that receives gradient)
      S = sum_r g_r g_r^T / N          (sum over an example's rows, mean over examples)

  (K-FAC-"expand" for a weight-sharing dimension, Eschenhagen et al. 2023). A tied body is then
  weighted like an untied stack: unrolled, each loop step t would have its own block ``A_t (x) S_t``;
  with ``A_t ~ A`` the tied Fisher ``sum_t A_t (x) S_t = A (x) sum_t S_t`` is what ``A (x) S`` holds, because
  ``S`` sums the steps' signals. EK-FAC keeps the eigenbases ``Q_A``, ``Q_S`` and replaces the
  eigenvalue products by the second moments of the true per-example tied gradients in that basis,
  ``Lambda = E_n[(Q_S^T G_n Q_A)^2]`` (George et al. 2018; Grosse et al. 2023, sec. 3.1).
* :class:`DiagonalBlock`: any other body parameter tensor (LayerNorm / RMSNorm scales and shifts,
  embeddings, convolution kernels, a Linear whose weight is shared with another body module): the
  diagonal ``E_n[g_n^2]`` of its per-example tied gradients.

Damping: every block solves ``(F + lambda I)^-1 g``. ``damping=None`` takes ``lambda = 0.1 x`` the mean
eigenvalue of the block (K-FAC: ``mean(eig A) mean(eig S)``; EK-FAC: ``mean(Lambda)``; diagonal: the mean
of the diagonal), the heuristic of Grosse et al. 2023 and kronfluence; a float sets one absolute lambda
for every block.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from looptrace.errors import ConfigError

Kind = Literal["kfac", "ekfac"]
KINDS: tuple[Kind, ...] = ("kfac", "ekfac")
#: lambda = DAMPING_SCALE x the block's mean eigenvalue when ``damping=None``.
DAMPING_SCALE = 0.1


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"a curvature kind is 'kfac' or 'ekfac', got {kind!r}")


def block_damping(mean_eigenvalue: float, damping: float | None, scale: float, name: str) -> float:
    """The block's lambda: ``damping`` if given, else ``scale x mean_eigenvalue``."""
    if damping is not None:
        if not (damping > 0 and damping < float("inf")):
            raise ConfigError(f"damping must be a positive finite float (or None for the heuristic), got {damping!r}")
        return float(damping)
    lam = scale * mean_eigenvalue
    if not lam > 0:
        raise ConfigError(
            f"curvature block {name!r} is zero on the fitting set (no gradient reached it), so the heuristic "
            "damping is 0; pass damping=<a positive float>"
        )
    return lam


@dataclasses.dataclass
class KroneckerBlock:
    """K-FAC / EK-FAC factors of one body ``nn.Linear`` (float64).

    Attributes:
        module: the module's name in the model.
        weight, bias: the parameter names (``bias`` is ``None`` for a Linear without one).
        a_cov: ``[d_in (+1), d_in (+1)]`` mean of ``a a^T`` over rows that receive gradient.
        s_cov: ``[d_out, d_out]`` per-example sum of ``g g^T``, averaged over examples.
        rows: how many rows ``A`` averages.
        eig_a, q_a, eig_s, q_s: eigendecompositions of ``a_cov`` and ``s_cov`` (float64, eigenvalues
            clamped at 0).
        ekfac: ``[d_out, d_in (+1)]`` EK-FAC eigenvalues ``E_n[(Q_S^T G_n Q_A)^2]``, or ``None`` before
            the second pass.
    """

    module: str
    weight: str
    bias: str | None
    a_cov: torch.Tensor
    s_cov: torch.Tensor
    rows: int
    eig_a: torch.Tensor | None = None
    q_a: torch.Tensor | None = None
    eig_s: torch.Tensor | None = None
    q_s: torch.Tensor | None = None
    ekfac: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in + 1)`` with a bias, else ``(d_out, d_in)``."""
        return int(self.s_cov.shape[0]), int(self.a_cov.shape[0])

    def eigendecompose(self) -> None:
        """Eigendecompose both factors in float64 (symmetrised first; eigenvalues clamped at 0)."""
        for name in ("a", "s"):
            cov = getattr(self, f"{name}_cov").double()
            vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
            setattr(self, f"eig_{name}", vals.clamp_min(0))
            setattr(self, f"q_{name}", vecs)

    def spectrum(self, kind: Kind) -> torch.Tensor:
        """``[d_out, d_in (+1)]`` eigenvalues of the block in the Kronecker eigenbasis."""
        _check_kind(kind)
        if self.eig_a is None or self.eig_s is None:
            raise ConfigError(f"block {self.module!r} has not been eigendecomposed")
        if kind == "kfac":
            return self.eig_s[:, None] * self.eig_a[None, :]
        if self.ekfac is None:
            raise ConfigError(f"block {self.module!r} has no EK-FAC eigenvalues; fit with kinds including 'ekfac'")
        return self.ekfac

    def rotate(self, g: torch.Tensor) -> torch.Tensor:
        """``Q_S^T G Q_A`` for ``g [R, d_out, d_in (+1)]`` (in ``g``'s precision)."""
        assert self.q_a is not None and self.q_s is not None
        return self.q_s.T.to(g.dtype) @ g @ self.q_a.to(g.dtype)

    def solve(self, g: torch.Tensor, kind: Kind, damping: float | None, scale: float = DAMPING_SCALE) -> torch.Tensor:
        """``(F + lambda I)^-1 vec(G)`` for ``g [R, d_out, d_in (+1)]``, F the K-FAC or EK-FAC block: rotate
        into the eigenbasis, divide by eigenvalue + lambda, rotate back (in ``g``'s precision; lambda from the
        float64 spectrum)."""
        spec = self.spectrum(kind)
        lam = block_damping(float(spec.mean()), damping, scale, self.module)
        assert self.q_a is not None and self.q_s is not None
        scaled = self.rotate(g) / (spec + lam).to(g.dtype)
        return self.q_s.to(g.dtype) @ scaled @ self.q_a.T.to(g.dtype)


@dataclasses.dataclass
class DiagonalBlock:
    """The diagonal Fisher ``E_n[g_n^2]`` of one body parameter tensor (float64, the parameter's shape)."""

    name: str
    diag: torch.Tensor

    def solve(self, g: torch.Tensor, damping: float | None, scale: float = DAMPING_SCALE) -> torch.Tensor:
        """``g / (diag + lambda)`` for ``g [R, numel]``."""
        lam = block_damping(float(self.diag.mean()), damping, scale, self.name)
        return g / (self.diag.reshape(-1) + lam).to(g.dtype)

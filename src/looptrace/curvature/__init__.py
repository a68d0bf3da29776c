"""Curvature of a looped body for preconditioned, step-resolved influence.

``blocks``: K-FAC / EK-FAC blocks of body Linear layers and diagonal blocks of the rest; ``factors``:
:class:`Curvature` (apply, save, load); ``fit``: fitting the factors on a training set; ``query``: the
preconditioned query side (K-FAC / EK-FAC in parameter space, Gauss-Newton in feature space).
"""

from looptrace.curvature.blocks import DAMPING_SCALE, DiagonalBlock, KroneckerBlock
from looptrace.curvature.factors import Curvature
from looptrace.curvature.fit import fit_curvature, resolve_fisher, sampled_cross_entropy
from looptrace.curvature.query import gauss_newton, gauss_newton_damping, preconditioned_features, sketch_flat

__all__ = [
    "DAMPING_SCALE",
    "Curvature",
    "DiagonalBlock",
    "KroneckerBlock",
    "fit_curvature",
    "gauss_newton",
    "gauss_newton_damping",
    "preconditioned_features",
    "resolve_fisher",
    "sampled_cross_entropy",
    "sketch_flat",
]

"""looptrace: step-resolved training-data attribution for looped (weight-tied, depth-recurrent) models.

import looptrace as lt
spec = lt.SketchSpec(dim=2048, seed=0)
feats = lt.featurize(model, loader, loss_fn, step_module=model.core, sketch=spec)
scores = lt.sdi(train_feats, query_feats)          # [N, M, tau]
"""

from looptrace.capture.discover import find_loop, find_step_module
from looptrace.capture.rules import Rule, register_rule
from looptrace.capture.tracer import loop_step
from looptrace.errors import (
    CheckpointError,
    ConfigError,
    CorruptFileError,
    LoaderError,
    LooptraceError,
    LossError,
    MemoryBudgetError,
    MissingExtraError,
    SpecMismatchError,
    StepError,
    StorageError,
    TiedParameterError,
    UnsupportedLayerError,
    VerificationError,
)
from looptrace.features import Features
from looptrace.featurize import adam_preconditioner, featurize
from looptrace.influence.attribute import Attribution, attribute, outside_modules
from looptrace.influence.checkpoints import Checkpoint, LoadedCheckpoint, load_checkpoints
from looptrace.influence.recorder import CheckpointRecorder
from looptrace.influence.scores import sdi, sdi_positions, self_influence, step_matrix, stream_sdi, tracin
from looptrace.sketch.spec import SketchSpec

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Checkpoint",
    "CheckpointError",
    "CheckpointRecorder",
    "ConfigError",
    "CorruptFileError",
    "Features",
    "LoadedCheckpoint",
    "LoaderError",
    "LooptraceError",
    "LossError",
    "MemoryBudgetError",
    "MissingExtraError",
    "Rule",
    "SketchSpec",
    "SpecMismatchError",
    "StepError",
    "StorageError",
    "TiedParameterError",
    "UnsupportedLayerError",
    "VerificationError",
    "adam_preconditioner",
    "attribute",
    "featurize",
    "find_loop",
    "find_step_module",
    "load_checkpoints",
    "loop_step",
    "outside_modules",
    "register_rule",
    "sdi",
    "sdi_positions",
    "self_influence",
    "step_matrix",
    "stream_sdi",
    "tracin",
]

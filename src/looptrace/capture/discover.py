"""Finding the loop body of a model you did not write: the module that runs once per iteration."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from looptrace.errors import StepError

__all__ = ["find_step_module", "run_model"]


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch the way Hugging Face models are called: a dict as keyword arguments
    (its ``labels`` included), a tuple or list as positional arguments, anything else as one argument."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def find_step_module(model: nn.Module, batch: Any, run: Callable[[nn.Module, Any], Any] | None = None) -> nn.Module:
    """The outermost module that owns parameters and runs more than once in one forward pass.

    Runs one forward (without gradients, in eval mode, hooks removed afterwards) and counts the calls of
    every module. For a Hugging Face ALBERT with one shared layer group that is the layer group; for a
    looped transformer, its recurrent core. ``run(model, batch)`` runs the forward (default
    :func:`run_model`). Raises :class:`StepError` when no parameter-owning module repeats (the model
    is not weight-tied across depth, or ``batch`` did not exercise the loop). When two unrelated
    modules repeat, the one with more parameters is returned, with a warning naming the other.
    """
    calls: dict[int, int] = {}
    handles = [m.register_forward_pre_hook(_counter(calls, id(m))) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            (run or run_model)(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    names = {id(m): n for n, m in model.named_modules()}
    repeated = [m for m in model.modules() if calls.get(id(m), 0) > 1 and any(True for _ in m.parameters())]
    outermost = [m for m in repeated if not any(m is not o and _contains(o, m) for o in repeated)]
    if not outermost:
        raise StepError(
            "no module that owns parameters ran more than once in one forward pass, so the model has no "
            "weight-tied loop to attribute per step (check that the batch runs the model's loop, or pass "
            "step_module= / body= yourself)"
        )
    best = max(outermost, key=lambda m: (sum(p.numel() for p in m.parameters()), calls[id(m)]))
    others = [names.get(id(m), type(m).__name__) for m in outermost if m is not best]
    if others:
        warnings.warn(
            f"several modules repeat: using {names.get(id(best))!r} ({calls[id(best)]} calls); also repeating: "
            f"{others}. Pass body=[...] with looptrace.loop_step() markers if one iteration spans them all",
            RuntimeWarning,
            stacklevel=2,
        )
    return best


def _counter(calls: dict[int, int], key: int) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any) -> None:
        calls[key] = calls.get(key, 0) + 1

    return hook


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())

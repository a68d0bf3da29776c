"""Finding the loop of a model you did not write: the module(s) one loop pass calls, and the modules
tied across passes that run inside them.

One forward pass is run with a counter on every module. The loop is the outermost parameter-owning
module that runs more than once (ALBERT's shared layer group, HRM-Text's L stack), or a range of such
modules that run in lockstep, one after the other, the same number of times (Inkling-2-Loop's looped
decoder layers). The other parameter-owning modules are sorted into two kinds: those called in every
pass after the first and never after the last are tied to the passes (Inkling's ``message_input``: they
belong in ``body=``); the others that repeat are another loop (HRM-Text's H stack: featurize it with its
own ``step_module=``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from looptrace.errors import ConfigError, StepError

__all__ = ["Loop", "find_loop", "find_step_module", "modules_at", "run_model"]


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch the way Hugging Face models are called: a dict as keyword arguments
    (its ``labels`` included), a tuple or list as positional arguments, anything else as one argument."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


@dataclasses.dataclass
class Loop:
    """What :func:`find_loop` found.

    Attributes:
        step_module: the module one pass calls, or the modules one pass calls in order (a list): pass it as
            ``step_module=``.
        body: the step module(s) and the modules tied to the passes: pass it as ``body=``.
        passes: how many passes the forward ran.
        tied: modules called inside the passes, besides the step modules (in ``body``).
        others: other repeating modules that are not tied to the passes (another loop), with their call counts.
        names: ``id(module) -> name`` for the modules above.
    """

    step_module: nn.Module | list[nn.Module]
    body: list[nn.Module]
    passes: int
    tied: list[nn.Module]
    others: list[tuple[nn.Module, int]]
    names: dict[int, str]

    def describe(self) -> str:
        seq = self.step_module if isinstance(self.step_module, list) else [self.step_module]
        parts = [f"{self.passes} passes over {[self.names.get(id(m)) for m in seq]}"]
        if self.tied:
            parts.append(f"tied modules called inside the passes: {[self.names.get(id(m)) for m in self.tied]}")
        if self.others:
            parts.append(f"other repeating modules: {[(self.names.get(id(m)), n) for m, n in self.others]}")
        return "; ".join(parts)


def find_step_module(
    model: nn.Module, batch: Any, run: Callable[[nn.Module, Any], Any] | None = None
) -> nn.Module | list[nn.Module]:
    """The module that runs once per loop pass, or the modules one pass calls in order.

    Runs one forward (without gradients, in eval mode, hooks removed afterwards) and counts the calls of
    every module. For a Hugging Face ALBERT with one shared layer group that is the layer group; for
    HRM-Text its L stack (``model.model.L_module``, the loop that runs most); for Inkling-2-Loop the list of
    its looped decoder layers (``list(model.model.layers[start:end])``, a list even when the range holds one
    layer: a looped range of a layer stack is always returned as a list); for a looped transformer, its
    recurrent core. ``run(model, batch)`` runs the forward (default :func:`run_model`). Raises
    :class:`StepError` when no parameter-owning module repeats, or when two loops are equally plausible.
    Warns, naming them, when other modules repeat too: modules tied to the passes (pass them in ``body=``
    with the step modules, see :func:`find_loop`) or another loop.
    """
    loop = find_loop(model, batch, run)
    named = loop.names
    if loop.tied:
        steps = loop.step_module if isinstance(loop.step_module, list) else [loop.step_module]
        warnings.warn(
            f"besides the step module(s), {[named.get(id(m)) for m in loop.tied]} run inside the loop passes and "
            f"look tied across them: attribute them too with body=[{', '.join(str(named.get(id(m))) for m in steps)}, "
            f"{', '.join(str(named.get(id(m))) for m in loop.tied)}] (lt.find_loop(model, batch).body)",
            RuntimeWarning,
            stacklevel=2,
        )
    if loop.others:
        warnings.warn(
            f"several modules repeat: using {_label(loop, named)} ({loop.passes} passes); also repeating, not tied "
            f"to its passes: {[(named.get(id(m)), n) for m, n in loop.others]}. A second loop (such as HRM-Text's "
            "H stack) is featurized with its own step_module=; pass body=[...] with looptrace.loop_step() markers "
            "if one iteration spans them all",
            RuntimeWarning,
            stacklevel=2,
        )
    return loop.step_module


def _label(loop: Loop, named: dict[int, str]) -> str:
    if isinstance(loop.step_module, list):
        return repr([named.get(id(m)) for m in loop.step_module])
    return repr(named.get(id(loop.step_module)))


def find_loop(model: nn.Module, batch: Any, run: Callable[[nn.Module, Any], Any] | None = None) -> Loop:
    """The loop's step module(s), the modules tied to its passes and the other repeating modules (see
    :func:`find_step_module`, which returns ``find_loop(...).step_module``)."""
    trace: list[int] = []
    handles = [m.register_forward_pre_hook(_recorder(trace, id(m))) for m in model.modules()]
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
    calls: dict[int, list[int]] = {}
    for t, key in enumerate(trace):
        calls.setdefault(key, []).append(t)
    repeated = [m for m in model.modules() if len(calls.get(id(m), ())) > 1 and any(True for _ in m.parameters())]
    outermost = [m for m in repeated if not any(m is not o and _contains(o, m) for o in repeated)]
    if not outermost:
        raise StepError(
            "no module that owns parameters ran more than once in one forward pass, so the model has no "
            "weight-tied loop to attribute per step (check that the batch runs the model's loop, or pass "
            "step_module= / body= yourself)"
        )
    groups = _lockstep_groups(outermost, calls)
    size = {id(g[0]): sum(p.numel() for m in g for p in m.parameters()) for g in groups}

    def score(g: list[nn.Module]) -> tuple[int, int]:
        return size[id(g[0])], len(calls[id(g[0])])

    groups.sort(key=score, reverse=True)
    best = groups[0]
    if len(groups) > 1 and score(groups[1]) == score(best):
        raise StepError(
            "the loop is ambiguous: "
            f"{[[names.get(id(m)) for m in g] for g in groups if score(g) == score(best)]} each repeat "
            f"{score(best)[1]} times with the same number of parameters; pass the one you mean as step_module= "
            "(and featurize the other separately)"
        )
    passes = len(calls[id(best[0])])
    pass_of = _pass_index(calls[id(best[-1])])
    # the other parameter-owning modules that ran, outside the range (and not holding it), outermost first
    outside = [
        m
        for m in model.modules()
        if id(m) in calls
        and any(True for _ in m.parameters())
        and not any(_contains(b, m) or _contains(m, b) for b in best)
    ]
    outside = [m for m in outside if not any(m is not o and _contains(o, m) for o in outside)]
    tied: list[nn.Module] = []
    others: list[tuple[nn.Module, int]] = []
    for m in outside:
        hit = {pass_of(t) for t in calls[id(m)]}
        if passes > 1 and set(range(2, passes + 1)) <= hit <= set(range(1, passes + 1)):
            tied.append(m)  # called in every pass after the first, never after the last: tied to the passes
        elif len(calls[id(m)]) > 1:
            others.append((m, len(calls[id(m)])))
    # a range of a layer stack is a list, even of one layer (Inkling with loop_layer_index_end = start + 1): the
    # loop is "layers[a:b]" there; a shared module with no once-called siblings (ALBERT's group) is itself
    alone = len(best) == 1 and not _in_layer_stack(best[0], model, calls)
    step: nn.Module | list[nn.Module] = best[0] if alone else list(best)
    return Loop(step, [*best, *tied], passes, tied, others, names)


def _in_layer_stack(module: nn.Module, model: nn.Module, calls: dict[int, list[int]]) -> bool:
    """Whether ``module`` is one layer of a stack (a ``ModuleList`` / ``Sequential``) whose other layers with
    parameters ran fewer times than it: a looped range inside a deeper stack."""
    for parent in model.modules():
        if isinstance(parent, nn.ModuleList | nn.Sequential) and any(c is module for c in parent.children()):
            return any(
                c is not module
                and any(True for _ in c.parameters())
                and 0 < len(calls.get(id(c), ())) < len(calls[id(module)])
                for c in parent.children()
            )
    return False


def _lockstep_groups(modules: list[nn.Module], calls: dict[int, list[int]]) -> list[list[nn.Module]]:
    """Partition ``modules`` into ranges that run in lockstep: the same number of calls, and the calls of the
    range, in time order, are the range's modules in one fixed order, repeated (one pass after another).
    The largest range is taken first (seeded from every module in turn), the rest regrouped."""
    left = sorted(modules, key=lambda m: calls[id(m)][0])
    groups: list[list[nn.Module]] = []
    while left:
        best: list[nn.Module] = []
        for seed in left:
            group = [seed]
            for m in left:
                if m is not seed and len(calls[id(m)]) == len(calls[id(seed)]) and _periodic([*group, m], calls):
                    group.append(m)
            if len(group) > len(best):
                best = group
        best.sort(key=lambda m: calls[id(m)][0])
        groups.append(best)
        left = [m for m in left if not any(m is b for b in best)]
    return groups


def _periodic(group: list[nn.Module], calls: dict[int, list[int]]) -> bool:
    """Whether the calls of ``group`` in time order are the group's modules in one order, repeated."""
    events = sorted((t, i) for i, m in enumerate(group) for t in calls[id(m)])
    order = [i for _, i in events[: len(group)]]
    if sorted(order) != list(range(len(group))):
        return False
    return all(i == order[k % len(group)] for k, (_, i) in enumerate(events))


def _pass_index(last_calls: list[int]) -> Callable[[int], int]:
    """A call at trace position ``t`` belongs to the pass that the next call of the range's last module
    completes (1-based; ``len(last_calls) + 1`` after the last pass)."""

    def pass_of(t: int) -> int:
        return 1 + sum(1 for c in last_calls if c < t)

    return pass_of


def modules_at(model: nn.Module, spec: str) -> nn.Module | list[nn.Module]:
    """The module(s) a command line names: a dotted path (``albert.encoder.albert_layer_groups.0``), a range
    of a ModuleList (``model.layers.2:4``: layers 2 and 3) or several of those separated by commas. One
    path gives the module; a range or several paths give a list."""
    out: list[nn.Module] = []
    many = False
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        head, _, last = part.rpartition(".")
        if ":" in last:
            many = True
            container = _submodule(model, head)
            if not isinstance(container, nn.ModuleList | nn.Sequential):
                raise ConfigError(
                    f"{head!r} is a {type(container).__name__}, not a ModuleList: cannot take the range {last!r}"
                )
            lo, _, hi = last.partition(":")
            try:
                chosen = list(container)[slice(int(lo) if lo else None, int(hi) if hi else None)]
            except ValueError:
                raise ConfigError(f"{part!r}: a range is START:END with integers (e.g. model.layers.2:4)") from None
            if not chosen:
                raise ConfigError(f"{part!r} selects no module ({head!r} has {len(container)})")
            out.extend(chosen)
        else:
            out.append(_submodule(model, part))
    if not out:
        raise ConfigError(f"{spec!r} names no module")
    many = many or len(out) > 1
    return out if many else out[0]


def _submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"the model has no submodule {path!r}") from None


def _recorder(trace: list[int], key: int) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any) -> None:
        trace.append(key)

    return hook


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())

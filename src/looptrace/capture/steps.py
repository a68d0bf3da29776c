"""Loop-step bookkeeping: which absolute loop step each call of a body module belongs to.

Steps are marked in one of two ways.

* **Step modules**: a sequence ``[S_1, ..., S_k]`` that the model calls in this order once per loop
  pass (one module is a sequence of one: ALBERT's layer group, HRM-Text's L stack; several are a range of
  layers: Inkling-2-Loop's looped decoder layers). Pass ``p`` is complete when ``S_k`` returns for the
  ``p``-th time, and a call of a body module belongs to the pass that the next return of ``S_k``
  completes: everything done from the end of pass ``p - 1`` to the end of pass ``p`` is pass ``p``
  (messages computed for pass ``p`` before its first layer runs included). A call that no later return
  completes ran after the last pass and is refused, as is a call of a module that is part of a step module
  made outside that module's call (a body layer used in the read-in).
* **Markers**: :func:`looptrace.loop_step` blocks in the model's forward (``index`` given, or the next).

This module only counts. What a step's calls capture, and where their gradients go, is the tracer's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from looptrace.errors import ConfigError, StepError

__all__ = ["StepClock", "step_sequence", "units_in_passes"]


def step_sequence(step_module: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    """``step_module=`` as a list: one module, a sequence of modules, or an ``nn.ModuleList`` (which is
    never called itself, so it means its children in order). An ``nn.Sequential`` is one module: its call
    is one step."""
    if step_module is None:
        return []
    if isinstance(step_module, nn.ModuleList):
        seq = list(step_module)
    elif isinstance(step_module, nn.Module):
        seq = [step_module]
    elif isinstance(step_module, str | bytes):
        raise ConfigError(
            f"step_module={step_module!r} is a string; pass the module (model.get_submodule(path)), or use the "
            "CLI's --step-module for attribute paths"
        )
    else:
        try:
            seq = list(step_module)
        except TypeError:
            raise ConfigError(
                f"step_module must be a module or a sequence of modules, got {type(step_module).__name__}"
            ) from None
    bad = [type(m).__name__ for m in seq if not isinstance(m, nn.Module)]
    if bad:
        raise ConfigError(f"step_module must hold nn.Module objects only, got {bad}")
    if not seq:
        raise ConfigError("step_module is an empty sequence; pass the module(s) one loop pass calls")
    if len({id(m) for m in seq}) != len(seq):
        raise ConfigError(
            "step_module lists a module twice; a pass is one call of each module of the sequence, in order"
        )
    for i, a in enumerate(seq):
        for b in seq[i + 1 :]:
            if any(m is b for m in a.modules()) or any(m is a for m in b.modules()):
                raise ConfigError(
                    "step_module lists a module and one of its submodules; list the modules one pass calls "
                    "one after another (e.g. the looped decoder layers), not a module and its parts"
                )
    return seq


class StepClock:
    """Counts loop passes during one forward pass and says which step a call made now belongs to.

    ``sequence``: the step modules in the order one pass calls them (empty: ``loop_step()`` markers only).
    ``names``: ``id(module) -> name`` for messages.
    """

    def __init__(self, sequence: Sequence[nn.Module], names: Mapping[int, str]) -> None:
        self.sequence = list(sequence)
        self._position = {id(m): i for i, m in enumerate(self.sequence)}
        self._names = names
        self.reset()

    def reset(self) -> None:
        """A new forward pass: steps count from 1 again."""
        self.completed = 0  # passes whose last step module has returned
        self.expected = 0  # position in the sequence of the next step module call
        self.active: nn.Module | None = None  # the step module whose call is in progress
        self.marked: int | None = None  # the step of the loop_step() block in progress
        self.last_marked = 0  # the step of the last loop_step() block (the next one is this + 1)
        self.max_marked = 0
        self.tagged = 0  # the largest step a capture was tagged with
        self.tagged_by = ""

    def _name(self, module: nn.Module) -> str:
        return self._names.get(id(module), type(module).__name__)

    def is_step_module(self, module: nn.Module) -> bool:
        return id(module) in self._position

    @property
    def current(self) -> int:
        """The step a call made now belongs to."""
        return self.marked if self.marked is not None else self.completed + 1

    # ------------------------------------------------------------------ step modules
    def enter(self, module: nn.Module) -> None:
        """A step module is called."""
        if self.active is not None or self.marked is not None:
            raise StepError(
                "a loop step began inside another one: mark each iteration once (step_module= or "
                "looptrace.loop_step(), not both, and do not nest them)"
            )
        pos = self._position[id(module)]
        if pos != self.expected:
            order = [self._name(m) for m in self.sequence]
            again = (
                f"; {order[pos]!r} ran again before the pass was complete: if it loops on its own (as HRM-Text's "
                "L stack does between two calls of its H stack), featurize it alone as step_module="
                if pos < self.expected
                else ""
            )
            raise StepError(
                f"step module {self._name(module)!r} was called where {order[self.expected]!r} was expected "
                f"(pass {self.completed + 1}); a pass must call the step modules once each, in the order given: "
                f"{order}. Pass them in the order one loop pass calls them{again}"
            )
        self.active = module

    def leave(self, module: nn.Module) -> None:
        """A step module returns; the last one completes a pass."""
        self.active = None
        self.expected = self._position[id(module)] + 1
        if self.expected == len(self.sequence):
            self.expected = 0
            self.completed += 1

    # ------------------------------------------------------------------ markers
    def enter_marker(self, index: int | None) -> None:
        if self.marked is not None or self.active is not None:
            raise StepError(
                "a loop step began inside another one: mark each iteration once (step_module= or "
                "looptrace.loop_step(), not both, and do not nest them)"
            )
        if index is not None and index < 1:
            raise StepError(f"loop_step index must be >= 1 (absolute, 1-based), got {index}")
        self.marked = self.last_marked = index if index is not None else self.last_marked + 1
        self.max_marked = max(self.max_marked, self.marked)

    def leave_marker(self) -> None:
        self.marked = None

    # ------------------------------------------------------------------ captures
    def tag(self, name: str, part_of_step_module: bool) -> int:
        """The step of a capture that body module ``name`` makes now. ``part_of_step_module``: the module is
        a step module or inside one (such a module belongs to a step only while its step module runs)."""
        if self.marked is not None:
            step = self.marked
        elif self.active is not None or (self.sequence and not part_of_step_module):
            step = self.completed + 1
        else:
            raise StepError(
                f"body module {name!r} ran outside a loop step; its weights are used outside the step "
                "module. Mark each iteration with step_module= (or looptrace.loop_step()) and keep "
                "body weights out of the read-in/read-out"
            )
        if step > self.tagged:
            self.tagged, self.tagged_by = step, name
        return step

    def steps(self) -> int:
        """The steps the forward ran (checked: no capture after the last pass, no pass left half done)."""
        if not self.sequence:
            return self.max_marked
        if self.expected != 0:
            order = [self._name(m) for m in self.sequence]
            raise StepError(
                f"the forward pass ended in the middle of loop pass {self.completed + 1}: it called "
                f"{order[: self.expected]} but not {order[self.expected :]}; every pass must call all the step "
                "modules (pass the modules of one full pass as step_module=)"
            )
        if self.tagged > self.completed:
            last = self._name(self.sequence[-1])
            raise StepError(
                f"body module {self.tagged_by!r} ran after the last loop pass (after the last return of {last!r}), "
                "so its call belongs to no pass. Keep modules that run after the loop (read-out, a second "
                "stack such as HRM-Text's H module) out of body=, and featurize them separately if needed"
            )
        return self.completed


def units_in_passes(roots: list[nn.Module], step_modules: Sequence[nn.Module]) -> list[nn.Module]:
    """The body roots called inside a pass besides the step modules (Inkling-2-Loop's ``message_input``):
    roots outside every step module that hold none (a container such as a ModuleList of the looped layers is
    never called) and lie inside no other such root."""
    if not step_modules:
        return []
    inside = {id(m) for s in step_modules for m in s.modules()}
    out: list[nn.Module] = []
    for r in roots:
        if id(r) in inside or any(id(m) in inside for m in r.modules()):
            continue
        if any(r is not o and any(m is r for m in o.modules()) for o in roots) or any(o is r for o in out):
            continue
        out.append(r)
    return out

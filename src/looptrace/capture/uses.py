"""Where the body's parameters are read: covering the ones read outside their own module's forward.

A layer rule (or the exact fallback) runs when its module's forward hook fires and accounts for the
parameters that forward reads. A parameter can also be read somewhere else: a functional kernel that takes
``conv1d.weight`` inside its parent's forward (Inkling-2-Loop's short convolutions never call their
``nn.Conv1d``), or a parent that reads a child's weight besides calling the child. No hook sees that
read, and its share of the gradient would be lost (the first-batch check refuses such a model).

So the route of a parameter is chosen from the reads the forward actually makes. :class:`ParamUses` is a
``TorchFunctionMode`` active during the first batch's forward: every operation that reads a body
parameter and returns a tensor that carries gradient (an edge of the autograd graph out of that
parameter) is recorded with the body modules whose forwards are running. :func:`plan_covers` finds the
reads no hooked layer accounts for and covers each at the innermost running module that owns the
parameter: the exact per-example VJP of that module's call with respect to those parameters (the
torch.func fallback, every other parameter held fixed), per call and tagged with its loop step like any
layer. Layers inside a covering module stop reporting the covered parameters, so nothing counts twice.
Reads made outside every body module (a body weight used by the read-out) are left to the first-batch
check, which names them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from looptrace.errors import UnsupportedLayerError

__all__ = ["Cover", "ParamUses", "plan_covers"]


def _leaves(x: Any) -> Iterator[Any]:
    if isinstance(x, tuple | list):
        for v in x:
            yield from _leaves(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    else:
        yield x


def _carries_grad(out: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in _leaves(out))


class ParamUses(TorchFunctionMode):
    """Records, during one forward pass, which body modules' forwards read each body parameter.

    ``reads[id(param)][id(module)] = (module, stack)``: an operation inside ``module``'s own forward (the
    innermost body module running) read ``param`` and returned a tensor carrying gradient; ``stack`` is
    every body module running then, outermost first.
    """

    def __init__(self, params: Iterable[nn.Parameter], modules: Iterable[nn.Module]) -> None:
        super().__init__()
        self.params = {id(p) for p in params}
        self.modules = list(modules)
        self.stack: list[nn.Module] = []
        self.reads: dict[int, dict[int, tuple[nn.Module, tuple[nn.Module, ...]]]] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.stack and torch.is_grad_enabled():
            hits = [a for a in _leaves((args, kwargs)) if isinstance(a, torch.Tensor) and id(a) in self.params]
            if hits and _carries_grad(out):
                user = self.stack[-1]
                for p in hits:
                    self.reads.setdefault(id(p), {}).setdefault(id(user), (user, tuple(self.stack)))
        return out

    @contextlib.contextmanager
    def recording(self) -> Iterator[ParamUses]:
        """The mode, with hooks that keep the stack of running body modules, for one forward pass."""
        handles = []

        def push(module: nn.Module, args: Any) -> None:
            self.stack.append(module)

        def pop(module: nn.Module, args: Any, output: Any) -> None:
            if self.stack and self.stack[-1] is module:
                self.stack.pop()

        for m in self.modules:
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop, always_call=True))
        try:
            with self:
                yield self
        finally:
            for h in handles:
                h.remove()
            self.stack.clear()


@dataclasses.dataclass
class Cover:
    """Body parameters read in ``module``'s forward outside any layer that accounts for them: the exact
    per-example VJP of each call of ``module`` with respect to ``params`` (names relative to ``module``)."""

    module: nn.Module
    name: str
    params: dict[str, nn.Parameter]


def plan_covers(
    uses: ParamUses,
    accounted: Mapping[int, set[int]],
    module_names: Mapping[int, str],
    param_names: Mapping[int, str],
) -> list[Cover]:
    """The covers that the reads recorded in ``uses`` need.

    ``accounted``: ``id(module) -> ids of the parameters its hooked layer(s) account for``. A read by such
    a module of such a parameter is already captured; any other read is covered at the innermost running
    module that owns the parameter, and a cover inside another cover of the same parameter is dropped (the
    outer one's VJP includes it).
    """
    wanted: dict[int, tuple[nn.Module, dict[int, nn.Parameter]]] = {}
    for pid, by_user in uses.reads.items():
        for user, stack in by_user.values():
            if pid in accounted.get(id(user), ()):
                continue
            found = innermost_owner(stack, pid)
            if found is None:
                raise UnsupportedLayerError(
                    f"body parameter {param_names.get(pid)!r} is read in the forward of "
                    f"{module_names.get(id(user), type(user).__name__)!r}, which does not own it (nor does any "
                    "body module running then), so no per-example route can reach it; register the parameter on "
                    "the module that reads it, or read it through the module that owns it"
                )
            owner, p = found
            wanted.setdefault(id(owner), (owner, {}))[1][pid] = p
    covers: list[Cover] = []
    for owner, params in wanted.values():
        outer = [o for o, ps in wanted.values() if o is not owner and _contains(o, owner)]
        keep = {pid: p for pid, p in params.items() if not any(pid in wanted[id(o)][1] for o in outer)}
        if not keep:
            continue
        rel = {id(p): n for n, p in owner.named_parameters()}
        covers.append(
            Cover(owner, module_names.get(id(owner), type(owner).__name__), {rel[pid]: p for pid, p in keep.items()})
        )
    return covers


def innermost_owner(stack: tuple[nn.Module, ...], pid: int) -> tuple[nn.Module, nn.Parameter] | None:
    """The innermost module of ``stack`` that has the parameter ``pid``, and the parameter."""
    for m in reversed(stack):
        for q in m.parameters():
            if id(q) == pid:
                return m, q
    return None


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())

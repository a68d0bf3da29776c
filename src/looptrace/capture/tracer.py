"""Hooks that capture per-example, per-step gradient factors during one forward/backward pass.

Bookkeeping is by *absolute loop step* (:mod:`looptrace.capture.steps`): a step is one call of the step
module, one pass over a sequence of step modules, or a :func:`loop_step` block, and every capture made
in it is tagged with that index. Each captured layer output gets its own backward hook bound to (step,
saved activation), so shared parameters, several calls per step, truncated BPTT and per-example read-out
need no "last input" slot and no counting of parameter uses: a step whose output never receives gradient
simply contributes nothing at its true index.

The backward pass asks autograd for the gradient of a zero scalar *anchor*, never for the parameters:
autograd then computes every delta the hooks need but skips the weight-gradient products, and parameter
``.grad`` is never touched. The anchor is added to the step units' gradient-carrying inputs; a captured
output downstream of an anchored tensor (found by a walk of its autograd graph, memoised per batch) gets its
delta computed anyway and is hooked as it is. Any other captured output (no step module, recomputation, a layer
whose output does not depend on the step's inputs) gets the anchor added itself. The first version added it to
every captured output: one more elementwise pass forward and one reduction backward per layer call.

Each body layer takes one of three routes, chosen on the first batch and reported in ``routes``:

* **rule**: its rows are the batch (the batch is the first axis of its output): the layer rule (or
  the exact torch.func fallback) runs on them directly;
* **rows**: its leading axis is something else (tokens folded into the batch, gathered or routed
  rows): :class:`looptrace.capture.rows.RowTracker` learns each row's example from the data flow,
  the rows are regrouped per example, and the same rule runs on them;
* **step**: no row map could be learned: the per-example gradient of the call of the step unit that
  contains the layer (the step module, one module of a step sequence, or a body module called inside a
  pass), with respect to this layer's parameters, from that call's saved inputs and its output cotangent
  (:mod:`looptrace.capture.step_route`; exact, and as costly as re-running the call).

Which layer accounts for a parameter follows the reads the first forward actually makes
(:mod:`looptrace.capture.uses`): a parameter read outside its own module's forward (a functional kernel
taking ``conv1d.weight``) is covered by the module whose forward reads it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from looptrace import batching
from looptrace.capture.recompute import Recompute
from looptrace.capture.rows import RowTracker, group_rows
from looptrace.capture.rules import (
    FALLBACK,
    Rule,
    Saved,
    fallback_capture,
    find_rule,
    leaves,
    make_fallback_contribute,
    regroup_saved,
    unbatch,
)
from looptrace.capture.step_route import step_vjp
from looptrace.capture.steps import StepClock, units_in_passes
from looptrace.capture.uses import Cover, ParamUses, plan_covers
from looptrace.errors import StepError, TiedParameterError, UnsupportedLayerError
from looptrace.sketch.plan import CHUNK_BYTES, OuterPath, SketchPlan, Slot

_ACTIVE: list[Tracer] = []


class Reroute(Exception):
    """Raised from a hook when a layer needs another route: featurize switches and reruns the batch."""

    def __init__(self, module: nn.Module | None, name: str, need: str, covers: list[Cover] | None = None) -> None:
        super().__init__(f"{name}: {need}")
        self.module, self.name, self.need, self.covers = module, name, need, covers or []


@contextlib.contextmanager
def loop_step(index: int | None = None) -> Iterator[None]:
    """Mark one loop iteration whose body spans several modules (adapter + stack of blocks).

    ``index`` is the absolute 1-based step; by default the next one. Outside featurisation this is a
    no-op, so models can keep it in their forward permanently.
    """
    tracer = _ACTIVE[-1] if _ACTIVE else None
    if tracer is None:
        yield
        return
    tracer.enter_step(index)
    try:
        yield
    finally:
        tracer.exit_step()


@dataclasses.dataclass
class BodyParam:
    name: str
    param: nn.Parameter


def body_parameters(model: nn.Module, roots: list[nn.Module]) -> list[BodyParam]:
    """Body parameters named as in ``model.named_parameters()`` (first name of a tied tensor)."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    out: list[BodyParam] = []
    for root in roots:
        for p in root.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) not in names:
                raise StepError(
                    "a body module's parameter is not a parameter of the model; pass the model that "
                    "owns the step module"
                )
            out.append(BodyParam(names[id(p)], p))
    return out


def check_ties(model: nn.Module, roots: list[nn.Module], params: list[BodyParam]) -> None:
    """Refuse parameters shared between the body and modules outside it (read-in, read-out)."""
    inside = {id(m) for r in roots for m in r.modules()}
    body_ids = {id(bp.param): bp.name for bp in params}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in inside:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in body_ids:
                where = f"{mod_name}.{pname}" if mod_name else pname
                raise TiedParameterError(
                    f"body parameter {body_ids[id(p)]!r} is also used outside the loop body as {where!r}; "
                    "its gradient would mix loop steps with read-in/read-out use. Untie it, or widen the "
                    "body (step_module/body=) to include that module"
                )


@dataclasses.dataclass(eq=False)
class Target:
    """A hooked body layer: its module, rule, name (its key in ``routes``), the parameters it reports
    (``id -> parameter``; a parameter covered by an enclosing module is removed) and the step unit whose
    calls contain its calls (``None`` without step modules)."""

    module: nn.Module
    rule: Rule
    name: str
    params: dict[int, nn.Parameter]
    unit: nn.Module | None = None


@dataclasses.dataclass(eq=False)
class _Frame:
    """One call of a step unit in progress: its step, its inputs (kept when a layer inside takes the step
    route), whether a layer inside must be computed by the step route, whether anything was captured."""

    module: nn.Module
    step: int
    inputs: tuple[Any, Any] | None
    unbatched: frozenset[int] = frozenset()
    route_now: bool = False
    captured: bool = False


class Tracer:
    """Installs the hooks for one featurisation and routes contributions into a feature buffer.

    ``step_modules``: the modules one loop pass calls, in order (empty when the model marks its steps
    with :func:`loop_step`). The *step units* are those modules and the body roots called inside a pass
    outside them (Inkling-2-Loop's ``message_input``): each call of a unit is what the step route re-runs.
    """

    def __init__(
        self,
        model: nn.Module,
        roots: list[nn.Module],
        plan: SketchPlan,
        params: list[BodyParam],
        step_modules: Sequence[nn.Module],
        *,
        fallback: bool = True,
        outer_path: OuterPath = "auto",
        recompute: bool = False,
        scale: dict[str, torch.Tensor] | None = None,
        positions: bool = False,
    ) -> None:
        if recompute and not step_modules:
            raise StepError(
                "recompute=True re-runs each loop step inside backward and needs the step module: pass step_module="
            )
        self.recompute = recompute
        # per position: features [B, L, D], every token's term summed over the loop steps (see _target)
        self.positions = positions
        self.model = model
        self.plan = plan
        self.outer_path = outer_path
        self.slot_of: dict[int, Slot] = {id(bp.param): plan.slot(bp.name) for bp in params}
        self.name_of: dict[int, str] = {id(bp.param): bp.name for bp in params}
        # a diagonal preconditioner P^(1/2) applied to every per-step gradient before sketching
        self.scale_of: dict[int, torch.Tensor] = {}
        for bp in params:
            if scale is not None and bp.name in scale:
                self.scale_of[id(bp.param)] = scale[bp.name].to(bp.param.device)
        self._module_names = {id(m): n for n, m in model.named_modules()}
        self.clock = StepClock(step_modules, self._module_names)
        self.units = list(step_modules) + units_in_passes(roots, step_modules)
        self._unit_of: dict[int, nn.Module] = {}
        for u in self.units:
            for m in u.modules():
                self._unit_of.setdefault(id(m), u)
        self._in_step_modules = {id(m) for s in step_modules for m in s.modules()}
        self._body_modules = _unique(m for r in roots for m in r.modules())
        self._params = [bp.param for bp in params]
        self._handles: list[Any] = []
        self._targets = self._resolve(model, roots, fallback)
        self._units_with_targets = {id(t.unit) for t in self._targets if t.unit is not None}
        # routes (decided on the first batch, kept for the rest)
        self.track_rows = False
        self.step_routed: set[str] = set()  # names of the layers whose gradient comes from the step route
        self._routed_units: set[int] = set()
        self.routes: dict[str, str] = {t.name: t.rule.name for t in self._targets}
        self._uses_pending = True  # the first complete forward records where each parameter is read
        self._tracker: RowTracker | None = None
        # call -> leaf positions of its arguments that do not depend on the batch (see _batch_free)
        self._unbatched: dict[str, set[int]] = {}
        self._frames: list[_Frame] = []  # step-unit calls in progress, outermost first
        self._reporting: Target | None = None  # the layer whose rule is sending contributions now
        self._recompute = Recompute()  # the checkpointed unit calls ("regions") of a batch
        # per-batch state
        self.phase = "idle"
        self.max_step = 0
        self.anchors: dict[torch.dtype, torch.Tensor] = {}
        # anchors on the step units' inputs (not with recomputation: their forward hooks run in backward)
        self._input_anchors = bool(step_modules) and not recompute
        self._reach: dict[int, tuple[bool, Any]] = {}  # id(autograd node) -> (downstream of an anchor, node)
        self.feats: torch.Tensor | None = None
        self._feats_dtype, self._feats_device = torch.float32, torch.device("cpu")
        self.batch_size = 0
        self._cur_step = 0
        self._suspended = 0

    # ------------------------------------------------------------------ setup
    def _resolve(self, model: nn.Module, roots: list[nn.Module], fallback: bool) -> list[Target]:
        """Pick the hooked modules, parents before children (``modules()`` is pre-order), so a rule
        that accounts for its children's parameters (MultiheadAttention.out_proj) claims them first."""
        covered: set[int] = set()  # child modules whose parameters a parent's rule accounts for
        targets: list[Target] = []
        for mod in self._body_modules:
            direct = dict(mod.named_parameters(recurse=False))
            if id(mod) in covered:
                continue
            name = self._module_names.get(id(mod), type(mod).__name__)
            rule = find_rule(mod)
            if rule is not None:
                handled = rule.handles(mod)
                hids = {id(p) for p in handled.values()}
                missing = [n for n, p in direct.items() if id(p) not in hids]
                if missing:
                    raise UnsupportedLayerError(
                        f"the {rule.name} rule does not account for parameter(s) {missing} of "
                        f"{name!r} ({type(mod).__name__}); register a rule with "
                        "looptrace.register_rule for this layer type"
                    )
                for pname in handled:
                    if "." in pname:
                        covered.update(id(m) for m in mod.get_submodule(pname.rsplit(".", 1)[0]).modules())
                targets.append(self._target(mod, rule, name, handled))
            elif direct:
                # a parameter also registered on a submodule (a tied bias: ALBERT's MLM head holds the bias its
                # decoder Linear adds) is the submodule's to report; a read of it by this forward itself is
                # covered from the reads of the first forward (:mod:`looptrace.capture.uses`)
                inner = {id(p) for c in mod.modules() if c is not mod for p in c.parameters(recurse=False)}
                direct = {n: p for n, p in direct.items() if id(p) not in inner}
                if not direct:
                    continue
                if not fallback:
                    pnames = [f"{name}.{n}" if name else n for n in direct]
                    raise UnsupportedLayerError(
                        f"no layer rule for {type(mod).__name__} owning body parameter(s) {pnames}; "
                        "register one with looptrace.register_rule, or allow the exact per-example "
                        "fallback (fallback=True)"
                    )
                targets.append(self._target(mod, FALLBACK, name, direct))
        return targets

    def _target(self, module: nn.Module, rule: Rule, name: str, params: dict[str, nn.Parameter]) -> Target:
        return Target(module, rule, name, {id(p): p for p in params.values()}, self._unit_of.get(id(module)))

    def install(self) -> None:
        self._hook()
        if self.recompute:
            for unit in self.units:
                checkpointed = self._recompute.checkpointed(unit, partial(self._starts_region, unit))
                unit.forward = checkpointed  # type: ignore[method-assign]
        _ACTIVE.append(self)

    def _hook(self) -> None:
        for unit in self.units:
            self._handles.append(unit.register_forward_pre_hook(self._unit_pre, with_kwargs=True))
        for t in self._targets:
            hook = partial(self._on_forward, target=t)
            self._handles.append(t.module.register_forward_hook(hook, with_kwargs=True))
        for unit in self.units:  # after the capture hooks: a step module may itself be a layer
            self._handles.append(unit.register_forward_hook(self._unit_post, with_kwargs=True))

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def remove(self) -> None:
        self._unhook()
        if self.recompute:
            for unit in self.units:
                if "forward" in vars(unit):
                    del unit.forward
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def _starts_region(self, unit: nn.Module) -> bool:
        """Whether a call of ``unit`` now is a step unit's call of the forward pass (checkpointed then)."""
        frame = self._frames[-1] if self._frames else None
        return self.phase == "forward" and not self._suspended and frame is not None and frame.module is unit

    # ------------------------------------------------------------------ steps
    def _unit_pre(self, module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        if self.phase != "forward" or self._suspended:
            return None
        if self.clock.is_step_module(module):
            self.clock.enter(module)
        inputs, free = None, frozenset[int]()
        if id(module) in self._routed_units:  # what the step route re-runs per example, as autograd keeps them
            inputs = (
                batching.map_tensors(args, torch.Tensor.detach),
                batching.map_tensors(kwargs, torch.Tensor.detach),
            )
            free = self._batch_free(f"step unit {self._module_names.get(id(module))}", (args, kwargs))
        self._frames.append(_Frame(module, self.clock.current, inputs, free))
        if self._input_anchors and torch.is_grad_enabled():
            return self._anchor_inputs(args), self._anchor_inputs(kwargs)
        return None

    def _anchor_inputs(self, tree: Any) -> Any:
        """``tree`` with the anchor added to every floating tensor that carries gradient."""

        def add(t: torch.Tensor) -> torch.Tensor:
            if not (t.requires_grad and t.is_floating_point()):
                return t
            new = t + self.anchor(t.dtype, t.device)
            fn = new.grad_fn
            assert fn is not None
            self._reach[id(fn)] = (True, fn)
            return new

        return batching.map_tensors(tree, add)

    def _downstream_of_anchor(self, t: torch.Tensor) -> bool:
        """Whether ``t`` depends on an anchored tensor, so that autograd computes its gradient when asked for
        the anchors'. A walk of its autograd graph back to an anchor, memoised for the batch (later layers of a
        step stop at an earlier one); a walk longer than a bound answers False (the caller then anchors ``t``)."""
        fn = t.grad_fn
        if fn is None:
            return False
        memo = self._reach
        known = memo.get(id(fn))
        if known is not None:
            return bool(known[0])
        anchors = list(self.anchors.values())
        stack, visited, seen = [fn], [], {id(fn)}
        while stack:
            node = stack.pop()
            visited.append(node)
            if len(visited) > 10_000:
                return False
            if any(getattr(node, "variable", None) is a for a in anchors):
                memo[id(fn)] = (True, fn)
                return True
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                hit = memo.get(id(nxt))
                if hit is not None:
                    if hit[0]:
                        memo[id(fn)] = (True, fn)
                        return True
                    continue
                if id(nxt) not in seen:
                    seen.add(id(nxt))
                    stack.append(nxt)
        for node in visited:  # the whole graph behind t was walked: none of it reaches an anchor
            memo[id(node)] = (False, node)
        return False

    def _unit_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if self.phase != "forward" or self._suspended or not self._frames:
            return None
        frame = self._frames.pop()
        if self.clock.is_step_module(module):
            self.clock.leave(module)
        if frame.captured and self._frames:
            self._frames[-1].captured = True
        if (
            not frame.captured
            and id(module) in self._units_with_targets
            and isinstance(output, torch.Tensor)
            and output.requires_grad
        ):
            raise StepError(
                "the step module's output carries gradient but none of its layers ran with gradient "
                "enabled: the body ran under no_grad inside a gradient-carrying wrapper, as reentrant "
                "activation checkpointing does. Use torch.utils.checkpoint(..., use_reentrant=False)"
            )
        if not frame.route_now:
            return None
        inputs, step = frame.inputs, frame.step
        assert inputs is not None
        keys = list(output.keys()) if isinstance(output, Mapping) else None  # a dict or a transformers ModelOutput
        outs = [output] if isinstance(output, torch.Tensor) else [output[k] for k in keys] if keys else list(output)
        for i, o in enumerate(outs):
            if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point():
                if o.dim() == 0 or o.shape[0] != self.batch_size:
                    raise StepError(
                        f"the step module's output has shape {tuple(o.shape)}, so its batch axis is not the first "
                        f"(the batch has {self.batch_size} examples); looptrace needs the batch on the first axis "
                        "of the step module's inputs and outputs to take the per-example step route"
                    )
                new = o + self.anchor(o.dtype, o.device)
                hook = partial(self._on_step_grad, unit=module, step=step, inputs=inputs, index=i, free=frame.unbatched)
                new.register_hook(hook)
                outs[i] = new
        if isinstance(output, torch.Tensor):
            return outs[0]
        if keys is not None:
            rebuilt = copy.copy(output)  # the same type; a ModelOutput's items and attributes are set together
            for k, o in zip(keys, outs, strict=True):
                rebuilt[k] = o
            return rebuilt
        return type(output)(outs)

    def enter_step(self, index: int | None) -> None:
        """A :func:`loop_step` block begins."""
        if self.phase == "forward" and not self._suspended:
            self.clock.enter_marker(index)

    def exit_step(self) -> None:
        if self.phase == "forward" and not self._suspended:
            self.clock.leave_marker()

    # ------------------------------------------------------------------ per batch
    def start_batch(self, batch_size: int | None) -> None:
        """Begin one batch's forward pass: steps are counted from 1 again."""
        self.clock.reset()
        self._frames.clear()
        self._recompute.start_batch()
        self.phase = "forward"
        self.max_step = 0
        self.anchors = {}
        self._reach.clear()
        self.feats = None
        self.batch_size = batch_size or 0

    @contextlib.contextmanager
    def forward_pass(self) -> Iterator[None]:
        """The model's forward pass for one batch (with the row tracker when a layer needs it). The first
        complete one also records where each body parameter is read, and asks for the covers that needs."""
        # the row tracker also runs on the first complete forward, to learn which call arguments are batch-free
        self._tracker = RowTracker(self.batch_size) if self.track_rows or self._uses_pending else None
        if self._tracker is not None:
            self._tracker.mark_free(self.model.buffers())  # like parameters, buffers do not depend on the batch
        uses = ParamUses(self._params, self._body_modules) if self._uses_pending else None
        try:
            with contextlib.ExitStack() as modes:
                if uses is not None:
                    modes.enter_context(uses.recording())
                if self._tracker is not None:
                    modes.enter_context(self._tracker)
                yield
        finally:
            self._tracker = None
        if uses is not None:
            self._uses_pending = False
            accounted: dict[int, set[int]] = {}
            for t in self._targets:
                accounted.setdefault(id(t.module), set()).update(id(p) for p in t.rule.handles(t.module).values())
            covers = plan_covers(uses, accounted, self._module_names, self.name_of)
            if covers:
                raise Reroute(None, "parameters read outside their module", "cover", covers)

    def reroute(self, signal: Reroute) -> None:
        """Take the route a layer asked for (then the batch is run again)."""
        if signal.need == "rows":
            self.track_rows = True
        elif signal.need == "step":
            target = next(t for t in self._targets if t.name == signal.name)
            if target.unit is None:
                raise StepError(
                    f"looptrace cannot tell which example each row of body module {signal.name!r}'s output belongs "
                    "to (its batch axis is not the first, and the rows do not follow from the data flow), and "
                    "without step_module= there is no per-example step route to fall back on; pass the module "
                    "that is called once per loop step as step_module="
                )
            self.step_routed.add(target.name)
            self._routed_units.add(id(target.unit))
            self.routes[signal.name] = "step (exact per-example VJP of the loop step)"
        elif signal.need == "cover":
            self._cover(signal.covers)
        else:
            raise AssertionError(signal.need)

    def _cover(self, covers: list[Cover]) -> None:
        """Hook each cover's module for the parameters its forward reads; the layers inside it stop reporting
        them (a layer left with nothing to report is dropped: its module never read them itself)."""
        for c in covers:
            params_of = partial(_fixed, dict(c.params))
            rule = Rule(params_of, fallback_capture, make_fallback_contribute(params_of), "exact fallback")
            target = self._target(c.module, rule, f"{c.name} [{', '.join(c.params)}]", c.params)
            inside = {id(m) for m in c.module.modules()}
            for t in self._targets:
                lost = [pid for pid in target.params if pid in t.params and id(t.module) in inside]
                for pid in lost:
                    del t.params[pid]
                if lost and t.params:
                    self.routes[t.name] += f" ({', '.join(self.name_of[p] for p in lost)}: see {target.name!r})"
            for t in self._targets:
                if not t.params:
                    self.routes.pop(t.name, None)
            self._targets = [t for t in self._targets if t.params] + [target]
            self.routes[target.name] = (
                f"exact fallback of {', '.join(c.params)}, read in this module's forward (not by calling its module)"
            )
            if target.unit is not None:
                self._units_with_targets.add(id(target.unit))
        self._unhook()  # hooks again, in order: the capture hooks before the step units' exit hooks
        self._hook()

    def steps_observed(self, declared: int | None, batch_index: int) -> int:
        """The loop steps the forward ran; refuses a forward that ran none, or not the declared tau."""
        self.max_step = self.clock.steps()
        if self.max_step == 0:
            raise StepError(
                "the step module never ran (no loop step was observed); pass the module that is "
                "called once per iteration as step_module=, or mark iterations with looptrace.loop_step()"
            )
        if declared is not None and self.max_step != declared:
            raise StepError(
                f"batch {batch_index} ran {self.max_step} loop steps but tau={declared} was declared; pass the "
                "true tau (or tau=None to use the observed count)"
            )
        return self.max_step

    def backward(
        self, losses: torch.Tensor, dtype: torch.dtype, also: list[torch.Tensor], keep_graph: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """One backward pass with capture: the features ``[B, steps, D]`` and autograd's gradient of
        the summed loss w.r.t. ``also`` (for verification; empty to skip it)."""
        b = int(losses.shape[0])
        self.batch_size = b
        self._feats_dtype, self._feats_device = dtype, losses.device
        # per position, the token axis is learned from the first contribution (_position_feats)
        self.feats = (
            None if self.positions else torch.zeros(b, self.max_step, self.plan.dim, dtype=dtype, device=losses.device)
        )
        self.phase = "backward"
        anchors = list(self.anchors.values())
        inputs = anchors + also
        grads: tuple[torch.Tensor | None, ...] = ()
        try:
            if inputs:
                grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True, retain_graph=keep_graph)
            self._recompute.flush()
            self._recompute.rerun_waiting()
            if self._recompute.fired:
                raise StepError(
                    "reentrant activation checkpointing recomputes the body inside backward, where its "
                    "steps cannot be told apart; use torch.utils.checkpoint(..., use_reentrant=False)"
                )
            if self.feats is None:  # per position, and no layer sent anything (every step without gradient)
                self.feats = torch.zeros(b, 1, self.plan.dim, dtype=dtype, device=losses.device)
            return self.feats, grads[len(anchors) :]
        finally:
            self.phase = "idle"

    def end_batch(self) -> None:
        self.phase = "idle"
        self.feats = None
        self.anchors = {}
        self._reach.clear()
        self._frames.clear()
        self._recompute.end_batch()

    def anchor(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        a = self.anchors.get(dtype)
        if a is None:
            a = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
            self.anchors[dtype] = a
        return a

    # ------------------------------------------------------------------ capture
    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any, *, target: Target) -> Any:
        if self._suspended:
            return None
        rule, name = target.rule, target.name
        if self.phase == "backward":
            if self._recompute.region is not None:  # our recomputation of a region: the inputs the capture needs
                if _live(output) and target.name not in self.step_routed:
                    self._recompute.recomputed_call(partial(self._capture, target, args, kwargs, output))
            else:  # someone else's activation-checkpoint recomputation: the forward already captured this call
                self._recompute.guard(output)
            return None
        if self.phase != "forward":
            return None
        outs = (
            [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, tuple | list) else None
        )
        if outs is None:
            raise UnsupportedLayerError(
                f"body module {name!r} returned {type(output).__name__}; rules need a tensor or a tuple of tensors"
            )
        live = [
            i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point()
        ]
        if not live:
            return None  # no-grad step (or frozen input path): nothing to attribute, zero at this index
        step = self.clock.tag(name, id(module) in self._in_step_modules)
        if self._frames:
            self._frames[-1].captured = True
        if name in self.step_routed:
            frame = next((f for f in reversed(self._frames) if f.module is target.unit), None)
            if frame is None:
                raise StepError(
                    f"body module {name!r} ran outside a call of {self._module_names.get(id(target.unit))!r}, the "
                    "step unit whose per-example VJP computes its gradient"
                )
            frame.route_now = True  # the unit's output hook computes this layer's gradient
            return None
        rows = self._rows_of(module, rule, name, [outs[i] for i in live], live)
        key = None
        if self._recompute.region is not None:  # checkpointed: the inputs are taken when backward recomputes it
            key = self._recompute.expect(len(live))
            saved = None
        else:
            saved = self._capture(target, args, kwargs, output)
        replaced = False
        for i in live:
            hook = partial(self._on_grad, target=target, saved=saved, step=step, index=i, rows=rows)
            # hooked as it is when autograd computes its gradient for the anchors' sake; never when the layer has
            # several outputs: one may be computed from another (a router's logits and its top-k weights), and the
            # gradient at the tensor itself would count the other output's path too
            if key is None and self._input_anchors and len(live) == 1 and self._downstream_of_anchor(outs[i]):
                outs[i].register_hook(hook)
                continue
            o = outs[i] + self.anchor(outs[i].dtype, outs[i].device)
            o.register_hook(partial(self._on_region_grad, key=key, deliver=hook) if key is not None else hook)
            outs[i] = o
            replaced = True
        if not replaced:
            return None
        if isinstance(output, torch.Tensor):
            return outs[0]
        return type(output)(outs)

    def _rows_of(
        self, module: nn.Module, rule: Rule, name: str, outs: list[torch.Tensor], indices: list[int]
    ) -> torch.Tensor | None:
        """``None`` when the batch is the outputs' batch axis; the example of every leading row when the
        row tracker knows it; otherwise a :class:`Reroute` to the route that can handle the layer."""
        batch_dims = [rule.batch_dim(module, i) for i in indices]
        sizes = {int(o.shape[d]) if o.dim() > d else -1 for o, d in zip(outs, batch_dims, strict=True)}
        tracker = self._tracker if self.track_rows else None  # (it may run on the first forward for _batch_free)
        if tracker is None:
            if sizes == {self.batch_size}:
                return None  # the batch is the batch axis (checked against autograd on the first batch)
            if any(d != 0 for d in batch_dims):
                raise Reroute(module, name, "step")
            raise Reroute(module, name, "rows")
        if any(d != 0 for d in batch_dims):
            if sizes == {self.batch_size}:
                return None
            raise Reroute(module, name, "step")
        # with the tracker on, its map decides even when the row count happens to equal the batch size
        # (an expert that received exactly B tokens)
        maps = [tracker.rows(o) for o in outs]
        rows = maps[0]
        if rows is None or any(m is None or not torch.equal(m, rows) for m in maps[1:]):
            raise Reroute(module, name, "step")
        if rows.shape[0] == self.batch_size and torch.equal(rows, torch.arange(self.batch_size)):
            return None
        if not self.routes[name].endswith("(rows from the data flow)"):
            self.routes[name] = f"{self.routes[name]} (rows from the data flow)"
        return rows

    def _capture(self, target: Target, args: Any, kwargs: Any, output: Any) -> Any:
        """What the layer's rule saves; for the exact fallback, its batch-free arguments are marked unbatched."""
        saved = target.rule.capture(target.module, args, kwargs, output)
        if isinstance(saved, Saved):
            saved.in_dims = unbatch(saved.in_dims, (args, kwargs), self._batch_free(target.name, (args, kwargs)))
        return saved

    def _batch_free(self, key: str, tree: Any) -> frozenset[int]:
        """Leaf positions of a call's ``(args, kwargs)`` that do not depend on the batch, although their leading
        size may equal it: made under the row tracker from parameters and constants alone, more than one row,
        rows that differ (a ``[T, T]`` relative-distance table when ``T == B``). The per-example re-runs pass
        them whole instead of splitting them by example. Learned on a forward with the tracker (the first, and
        every one on the rows route), kept for the call's later forwards."""
        if self._tracker is not None:
            found = self._tracker.batch_free(leaves(tree))
            self._unbatched.setdefault(key, set()).update(found)
        return frozenset(self._unbatched.get(key, ()))

    def _on_region_grad(self, grad: torch.Tensor, *, key: tuple[int, int], deliver: Any) -> None:
        if self.phase == "backward":
            self._recompute.on_grad(grad, key=key, deliver=deliver)

    def _on_grad(
        self,
        grad: torch.Tensor,
        *,
        target: Target,
        saved: Any,
        step: int,
        index: int,
        rows: torch.Tensor | None,
    ) -> None:
        if self.phase != "backward":
            return
        self._recompute.flush()
        if rows is not None and self.positions:
            _plain_fold(rows, self.batch_size, target.name)
        if rows is not None:  # regroup the rows per example: [N, ...] -> [B, L, ...] (zero-padded)
            grad = group_rows(grad, rows, self.batch_size)
            saved = regroup_saved(saved, lambda t: group_rows(t, rows, self.batch_size), int(rows.shape[0]))
        self._cur_step = step
        self._suspended += 1
        self._reporting = target
        try:
            with torch.no_grad():
                target.rule.contribute(target.module, saved, grad, index, self)
        finally:
            self._suspended -= 1
            self._reporting = None

    def _on_step_grad(
        self,
        grad: torch.Tensor,
        *,
        unit: nn.Module,
        step: int,
        inputs: tuple[Any, Any],
        index: int,
        free: frozenset[int],
    ) -> None:
        """The step route: per-example gradients of the step-routed layers' parameters inside ``unit``, from
        the call's inputs and the cotangent of its output ``index``."""
        if self.phase != "backward":
            return
        routed = {pid for t in self._targets if t.name in self.step_routed and t.unit is unit for pid in t.params}
        named = {n: p for n, p in unit.named_parameters() if id(p) in routed}
        self._cur_step = step
        self._suspended += 1
        try:
            with torch.no_grad():
                grads = step_vjp(unit, named, inputs, grad, index, self.batch_size, free)
            for n, g in grads.items():
                self.dense(named[n], g.reshape(self.batch_size, -1))
        finally:
            self._suspended -= 1

    # ------------------------------------------------------------------ Sink protocol
    def _sink_out(self, param: torch.Tensor, n_tok: int | None = None) -> tuple[Slot, torch.Tensor] | None:
        """Where ``param``'s contribution at the current step goes: ``[B, m]`` features of this step, or per position
        ``[B * L, m]`` (row ``b * L + j``: example b's token j, summed over steps); ``None`` when the reporting
        layer's rule sends a parameter that an enclosing module covers instead (counted there, not twice)."""
        if self._reporting is not None and id(param) not in self._reporting.params:
            return None
        slot = self.slot_of.get(id(param))
        if slot is None:
            raise UnsupportedLayerError(
                "a layer rule sent a gradient for a parameter outside the body; this is a bug in the rule"
            )
        if not self.positions:
            assert self.feats is not None
            return slot, self.feats[:, self._cur_step - 1, slot.offset : slot.offset + slot.m]
        if n_tok is None:
            who = self._reporting.name if self._reporting is not None else "a step-routed layer"
            raise UnsupportedLayerError(
                f"per-position attribution: {who} ({self.name_of.get(id(param), '?')}) sends each example's gradient "
                "whole (the exact per-example fallback or the step route), with no term per position; give its layer "
                "type a rule (looptrace.register_rule) or featurise without positions"
            )
        return slot, self._position_feats(n_tok)[:, :, slot.offset : slot.offset + slot.m].flatten(0, 1)

    def _position_feats(self, n_tok: int) -> torch.Tensor:
        if self.feats is None:
            self.feats = torch.zeros(
                self.batch_size, n_tok, self.plan.dim, dtype=self._feats_dtype, device=self._feats_device
            )
        elif self.feats.shape[1] != n_tok:
            who = self._reporting.name if self._reporting is not None else "a layer"
            raise UnsupportedLayerError(
                f"per-position attribution: {who} sees {n_tok} tokens per example where other body layers see "
                f"{self.feats.shape[1]}; every body layer's token axis must be the sequence (a [B, T, d] activation)"
            )
        return self.feats

    def outer(self, param: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        where = self._sink_out(param, left.shape[1])
        if where is None:
            return
        slot, out = where
        if self.positions:  # one row per (example, position): [B * L, 1, .]
            left, right = left.reshape(-1, 1, left.shape[-1]), right.reshape(-1, 1, right.shape[-1])
        scale = self.scale_of.get(id(param))
        if scale is None:
            path = self.outer_path
            if slot.kind == "ts":  # which way the TensorSketch goes (the same numbers either way), reported
                path = slot.route(left.shape[0], left.shape[1], out.device, out.dtype, path)
                self.routes[f"{slot.name} (sketch)"] = f"TensorSketch m={slot.m} by {path}" + (
                    " (measured faster here)" if self.outer_path == "auto" else " (outer_path)"
                )
            slot.add_outer(out, left.to(out.dtype), right.to(out.dtype), path)
            return
        # an elementwise preconditioner breaks the outer-product factorisation: materialise per example
        # (in chunks bounding the transient block), scale, sketch
        b, rows, cols = left.shape[0], left.shape[-1], right.shape[-1]
        chunk = max(1, CHUNK_BYTES // max(rows * cols * out.element_size(), 1))
        flat = scale.reshape(1, rows * cols).to(out.dtype)
        for i in range(0, b, chunk):
            g = torch.bmm(left[i : i + chunk].transpose(1, 2).to(out.dtype), right[i : i + chunk].to(out.dtype))
            slot.add_dense(out[i : i + chunk], g.reshape(g.shape[0], -1) * flat)

    def dense(self, param: torch.Tensor, g: torch.Tensor) -> None:
        where = self._sink_out(param)
        if where is None:
            return
        slot, out = where
        scale = self.scale_of.get(id(param))
        g = g.to(out.dtype)
        slot.add_dense(out, g if scale is None else g * scale.reshape(1, -1).to(out.dtype))

    def dense_tokens(self, param: torch.Tensor, g: torch.Tensor) -> None:
        if not self.positions:
            self.dense(param, g.sum(1))
            return
        where = self._sink_out(param, g.shape[1])
        if where is None:
            return
        slot, out = where
        scale = self.scale_of.get(id(param))
        g = g.reshape(-1, g.shape[-1]).to(out.dtype)
        slot.add_dense(out, g if scale is None else g * scale.reshape(1, -1).to(out.dtype))

    def rows(self, param: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
        where = self._sink_out(param, idx.shape[1])
        if where is None:
            return
        slot, out = where
        if self.positions:
            idx, values = idx.reshape(-1, 1), values.reshape(-1, 1, values.shape[-1])
        scale = self.scale_of.get(id(param))
        values = values.to(out.dtype)
        if scale is not None:  # row r of the gradient is scaled by row r of the preconditioner
            values = values * scale.reshape(scale.shape[0], -1).to(out.dtype)[idx]
        slot.add_rows(out, idx, values)


def _plain_fold(rows: torch.Tensor, batch_size: int, name: str) -> None:
    """Per position, rows from the data flow must be a plain fold of the tokens into the batch axis (row ``b * T
    + j`` is example b's token j), so that an example's rows, in order, are its positions."""
    n = int(rows.shape[0])
    if batch_size and n % batch_size == 0:
        t = n // batch_size
        want = torch.arange(batch_size, device=rows.device).repeat_interleave(t)
        if torch.equal(rows.to(want.device), want):
            return
    raise UnsupportedLayerError(
        f"per-position attribution: {name}'s rows are reordered (gathered, routed or scattered) on their way from "
        "the examples, so their positions are not known; only a plain fold of the tokens into the batch axis "
        "([B, T, d] -> [B * T, d]) maps back to positions"
    )


def _live(output: Any) -> bool:
    """Whether a layer's output (a tensor or a tuple of them) carries gradient."""
    outs = [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, tuple | list) else []
    return any(isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point() for o in outs)


def _unique(modules: Iterator[nn.Module]) -> list[nn.Module]:
    seen: set[int] = set()
    out: list[nn.Module] = []
    for m in modules:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _fixed(params: dict[str, nn.Parameter], module: nn.Module) -> dict[str, nn.Parameter]:
    """A cover's parameters, whatever module asks (the rule's ``handles``)."""
    return params

"""Hooks that capture per-example, per-step gradient factors during one forward/backward pass.

Bookkeeping is by *absolute loop step*: a step begins when the step module is called (or a
:func:`loop_step` block is entered) and every capture made inside it is tagged with that index.
Each captured layer output gets its own backward hook bound to (step, saved activation), so
shared parameters, several calls per step, truncated BPTT and per-example read-out need no
"last input" slot and no counting of parameter uses: a step whose output never receives gradient
simply contributes nothing at its true index.

The backward pass asks autograd for the gradient of a zero scalar *anchor*, never for the parameters:
autograd then computes every delta the hooks need but skips the weight-gradient products, and parameter
``.grad`` is never touched. The anchor is added to the step module's gradient-carrying inputs; a captured
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
* **step**: no row map could be learned: the per-example gradient of the whole loop step with respect
  to this layer's parameters is computed from the step's saved inputs and its output cotangent
  (a per-example VJP through ``torch.func``; exact, and as costly as re-running the step).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from looptrace import batching
from looptrace.capture.rows import RowTracker, group_rows
from looptrace.capture.rules import FALLBACK, Rule, find_rule, regroup_saved, vmap_refused
from looptrace.errors import StepError, TiedParameterError, UnsupportedLayerError
from looptrace.sketch.plan import CHUNK_BYTES, OuterPath, SketchPlan, Slot

_ACTIVE: list[Tracer] = []


class Reroute(Exception):
    """Raised from a forward hook when a layer needs another route: featurize switches and reruns the batch."""

    def __init__(self, module: nn.Module | None, name: str, need: str) -> None:
        super().__init__(f"{name}: {need}")
        self.module, self.name, self.need = module, name, need


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


class Tracer:
    """Installs the hooks for one featurisation and routes contributions into a feature buffer."""

    def __init__(
        self,
        model: nn.Module,
        roots: list[nn.Module],
        plan: SketchPlan,
        params: list[BodyParam],
        step_module: nn.Module | None,
        *,
        fallback: bool = True,
        outer_path: OuterPath = "auto",
        recompute: bool = False,
        scale: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if recompute and step_module is None:
            raise StepError(
                "recompute=True re-runs each loop step inside backward and needs the step module: pass step_module="
            )
        self.recompute = recompute
        self.model = model
        self.plan = plan
        self.step_module = step_module
        self.outer_path = outer_path
        self.slot_of: dict[int, Slot] = {id(bp.param): plan.slot(bp.name) for bp in params}
        self.name_of: dict[int, str] = {id(bp.param): bp.name for bp in params}
        # a diagonal preconditioner P^(1/2) applied to every per-step gradient before sketching
        self.scale_of: dict[int, torch.Tensor] = {}
        for bp in params:
            if scale is not None and bp.name in scale:
                self.scale_of[id(bp.param)] = scale[bp.name].to(bp.param.device)
        self._handles: list[Any] = []
        self._targets = self._resolve(model, roots, fallback)
        # routes (decided on the first batch, kept for the rest)
        self.track_rows = False
        self.step_routed: set[int] = set()  # ids of modules whose gradient comes from the step route
        self.routes: dict[str, str] = {name: rule.name for _, rule, name in self._targets}
        self._tracker: RowTracker | None = None
        self._step_inputs: tuple[Any, Any] | None = None
        self._step_route_now = False
        # recomputation: calls inside a checkpointed step are keyed by (step, call number); their inputs
        # are captured when backward recomputes the step, their deltas when backward reaches them
        self._region: list[int] | None = None  # [step, calls so far] inside a checkpointed step
        self._recomputed: dict[tuple[int, int], list[Any]] = {}  # key -> [saved, deltas still to come]
        self._waiting: dict[tuple[int, int], list[tuple[torch.Tensor, Any]]] = {}
        # step -> what re-runs it (the region, its inputs, the RNG and autocast state of the forward), for steps
        # whose deltas all arrive without autograd ever unpacking the step's saved tensors (see _rerun_waiting)
        self._reruns: dict[int, tuple[Any, Any, Any, Any]] = {}
        self._ready: list[tuple[tuple[int, int], torch.Tensor, Any]] = []
        # per-batch state
        self.step = 0
        self.in_step = False
        self.phase = "idle"
        self.max_step = 0
        self.recompute_fired = False
        self.anchors: dict[torch.dtype, torch.Tensor] = {}
        # anchors on the step module's inputs (not with recomputation: its forward hooks run in backward)
        self._input_anchors = step_module is not None and not recompute
        self._reach: dict[int, tuple[bool, Any]] = {}  # id(autograd node) -> (downstream of an anchor, node)
        self.feats: torch.Tensor | None = None
        self.batch_size = 0
        self._cur_step = 0
        self._suspended = 0
        self._captured_in_step = False

    # ------------------------------------------------------------------ setup
    def _resolve(self, model: nn.Module, roots: list[nn.Module], fallback: bool) -> list[tuple[nn.Module, Rule, str]]:
        """Pick the hooked modules, parents before children (``modules()`` is pre-order), so a rule
        that accounts for its children's parameters (MultiheadAttention.out_proj) claims them first."""
        mod_names = {id(m): n for n, m in model.named_modules()}
        covered: set[int] = set()  # child modules whose parameters a parent's rule accounts for
        targets: list[tuple[nn.Module, Rule, str]] = []
        visited: set[int] = set()
        for root in roots:
            for mod in root.modules():
                if id(mod) in visited:
                    continue
                visited.add(id(mod))
                direct = dict(mod.named_parameters(recurse=False))
                if id(mod) in covered:
                    continue
                name = mod_names.get(id(mod), type(mod).__name__)
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
                    targets.append((mod, rule, name))
                elif direct:
                    if not fallback:
                        pnames = [f"{name}.{n}" if name else n for n in direct]
                        raise UnsupportedLayerError(
                            f"no layer rule for {type(mod).__name__} owning body parameter(s) {pnames}; "
                            "register one with looptrace.register_rule, or allow the exact per-example "
                            "fallback (fallback=True)"
                        )
                    targets.append((mod, FALLBACK, name))
        return targets

    def install(self) -> None:
        if self.step_module is not None:
            self._handles.append(self.step_module.register_forward_pre_hook(self._step_pre, with_kwargs=True))
        for mod, rule, name in self._targets:
            hook = partial(self._on_forward, rule=rule, name=name)
            self._handles.append(mod.register_forward_hook(hook, with_kwargs=True))
        if self.step_module is not None:  # after the capture hooks: a step module may itself be a layer
            self._handles.append(self.step_module.register_forward_hook(self._step_post, with_kwargs=True))
        if self.recompute:
            self._checkpoint_steps()
        _ACTIVE.append(self)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.recompute and self.step_module is not None and "forward" in vars(self.step_module):
            del self.step_module.forward
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def _checkpoint_steps(self) -> None:
        """Run every loop step under non-reentrant activation checkpointing: the forward keeps only the
        step's inputs; backward re-runs the step, and the capture takes the layers' inputs then."""
        assert self.step_module is not None
        original = self.step_module.forward
        tracer = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            if tracer.phase != "forward" or tracer._suspended or not tracer.in_step:
                return original(*args, **kwargs)
            step = tracer.step

            def region(*a: Any, **k: Any) -> Any:
                outer, tracer._region = tracer._region, [step, 0]
                try:
                    return original(*a, **k)
                finally:
                    tracer._region = outer

            tracer._reruns[step] = (region, args, kwargs, _forward_state(args, kwargs))
            # the whole step is re-run (no early stop), so every layer's forward hook sees its inputs again
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                return torch.utils.checkpoint.checkpoint(region, *args, use_reentrant=False, **kwargs)

        self.step_module.forward = forward  # type: ignore[method-assign]

    # ------------------------------------------------------------------ steps
    def _step_pre(self, module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        if self.phase == "forward" and not self._suspended and self.step_routed:
            # what the step route re-runs per example: the step's inputs, as autograd already keeps them
            self._step_inputs = (
                batching.map_tensors(args, torch.Tensor.detach),
                batching.map_tensors(kwargs, torch.Tensor.detach),
            )
            self._step_route_now = False
        self.enter_step(None)
        if self._input_anchors and self.phase == "forward" and not self._suspended and torch.is_grad_enabled():
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

    def _step_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if self.phase != "forward" or self._suspended:
            return None
        if not self._captured_in_step and isinstance(output, torch.Tensor) and output.requires_grad:
            raise StepError(
                "the step module's output carries gradient but none of its layers ran with gradient "
                "enabled: the body ran under no_grad inside a gradient-carrying wrapper, as reentrant "
                "activation checkpointing does. Use torch.utils.checkpoint(..., use_reentrant=False)"
            )
        self.exit_step()
        if not self._step_route_now:
            return None
        self._step_route_now = False
        inputs, step = self._step_inputs, self.step
        assert inputs is not None
        outs = [output] if isinstance(output, torch.Tensor) else list(output)
        for i, o in enumerate(outs):
            if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point():
                if o.dim() == 0 or o.shape[0] != self.batch_size:
                    raise StepError(
                        f"the step module's output has shape {tuple(o.shape)}, so its batch axis is not the first "
                        f"(the batch has {self.batch_size} examples); looptrace needs the batch on the first axis "
                        "of the step module's inputs and outputs to take the per-example step route"
                    )
                new = o + self.anchor(o.dtype, o.device)
                new.register_hook(partial(self._on_step_grad, step=step, inputs=inputs, index=i))
                outs[i] = new
        return outs[0] if isinstance(output, torch.Tensor) else type(output)(outs)

    def enter_step(self, index: int | None) -> None:
        if self.phase != "forward" or self._suspended:
            return
        if self.in_step:
            raise StepError(
                "a loop step began inside another one: mark each iteration once (step_module= or "
                "looptrace.loop_step(), not both, and do not nest them)"
            )
        if index is not None:
            if index < 1:
                raise StepError(f"loop_step index must be >= 1 (absolute, 1-based), got {index}")
            self.step = index
        else:
            self.step += 1
        self.max_step = max(self.max_step, self.step)
        self.in_step = True
        self._captured_in_step = False

    def exit_step(self) -> None:
        if self.phase != "forward" or self._suspended:
            return
        self.in_step = False

    # ------------------------------------------------------------------ per batch
    def start_batch(self, batch_size: int | None) -> None:
        """Begin one batch's forward pass: steps are counted from 1 again."""
        self.step = 0
        self.in_step = False
        self.phase = "forward"
        self.max_step = 0
        self.recompute_fired = False
        self.anchors = {}
        self._reach.clear()
        self.feats = None
        self.batch_size = batch_size or 0

    @contextlib.contextmanager
    def forward_pass(self) -> Iterator[None]:
        """The model's forward pass for one batch (with the row tracker when a layer needs it)."""
        self._tracker = RowTracker(self.batch_size) if self.track_rows else None
        try:
            if self._tracker is None:
                yield
            else:
                with self._tracker:
                    yield
        finally:
            self._tracker = None

    def reroute(self, signal: Reroute) -> None:
        """Take the route a layer asked for (then the batch is run again)."""
        if signal.need == "rows":
            self.track_rows = True
        elif signal.need == "step":
            if self.step_module is None:
                raise StepError(
                    f"looptrace cannot tell which example each row of body module {signal.name!r}'s output belongs "
                    "to (its batch axis is not the first, and the rows do not follow from the data flow), and "
                    "without step_module= there is no per-example step route to fall back on; pass the module "
                    "that is called once per loop step as step_module="
                )
            assert signal.module is not None
            self.step_routed.add(id(signal.module))
            self.routes[signal.name] = "step (exact per-example VJP of the loop step)"
        else:
            raise AssertionError(signal.need)

    def steps_observed(self, declared: int | None, batch_index: int) -> int:
        """The loop steps the forward ran; refuses a forward that ran none, or not the declared tau."""
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
        self.feats = torch.zeros(b, self.max_step, self.plan.dim, dtype=dtype, device=losses.device)
        self.phase = "backward"
        anchors = list(self.anchors.values())
        inputs = anchors + also
        grads: tuple[torch.Tensor | None, ...] = ()
        try:
            if inputs:
                grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True, retain_graph=keep_graph)
            self.flush()
            self._rerun_waiting()
            if self.recompute_fired:
                raise StepError(
                    "reentrant activation checkpointing recomputes the body inside backward, where its "
                    "steps cannot be told apart; use torch.utils.checkpoint(..., use_reentrant=False)"
                )
            return self.feats, grads[len(anchors) :]
        finally:
            self.phase = "idle"

    def end_batch(self) -> None:
        self.phase = "idle"
        self.feats = None
        self.anchors = {}
        self._reach.clear()
        self._recomputed.clear()
        self._waiting.clear()
        self._ready.clear()
        self._reruns.clear()

    def anchor(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        a = self.anchors.get(dtype)
        if a is None:
            a = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
            self.anchors[dtype] = a
        return a

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any, *, rule: Rule, name: str) -> Any:
        if self._suspended:
            return None
        if self.phase == "backward":
            if self._region is not None:  # our recomputation of a step: the inputs the capture needs
                self._on_recompute(module, args, kwargs, output, rule)
            else:  # someone else's activation-checkpoint recomputation: the forward already captured this call
                self._guard_recompute(output)
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
        if not self.in_step:
            raise StepError(
                f"body module {name!r} ran outside a loop step; its weights are used outside the step "
                "module. Mark each iteration with step_module= (or looptrace.loop_step()) and keep "
                "body weights out of the read-in/read-out"
            )
        self._captured_in_step = True
        if id(module) in self.step_routed:
            self._step_route_now = True  # the step's output hook computes this layer's gradient
            return None
        rows = self._rows_of(module, rule, name, [outs[i] for i in live], live)
        key = None
        if self._region is not None:  # checkpointed: the inputs are taken when backward recomputes the step
            key = (self._region[0], self._region[1])
            self._region[1] += 1
            self._recomputed[key] = [None, len(live)]
            saved = None
        else:
            saved = rule.capture(module, args, kwargs, output)
        step = self.step
        replaced = False
        for i in live:
            hook = partial(
                self._on_grad, module=module, rule=rule, saved=saved, step=step, index=i, name=name, rows=rows
            )
            if key is None and self._input_anchors and self._downstream_of_anchor(outs[i]):
                outs[i].register_hook(hook)  # autograd computes its gradient for the anchors' sake
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
        if self._tracker is None:
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
        maps = [self._tracker.rows(o) for o in outs]
        rows = maps[0]
        if rows is None or any(m is None or not torch.equal(m, rows) for m in maps[1:]):
            raise Reroute(module, name, "step")
        if rows.shape[0] == self.batch_size and torch.equal(rows, torch.arange(self.batch_size)):
            return None
        if not self.routes[name].endswith("(rows from the data flow)"):
            self.routes[name] = f"{rule.name} (rows from the data flow)"
        return rows

    def _on_recompute(self, module: nn.Module, args: Any, kwargs: Any, output: Any, rule: Rule) -> None:
        """A call of a checkpointed step, re-run by backward: capture its inputs, and contribute the deltas
        that already arrived (the step's last layers get theirs before backward recomputes the step)."""
        outs = (
            [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, tuple | list) else []
        )
        if not any(isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point() for o in outs):
            return
        if id(module) in self.step_routed:
            return
        assert self._region is not None
        key = (self._region[0], self._region[1])
        self._region[1] += 1
        slot = self._recomputed.get(key)
        if slot is None:
            return  # a call the forward did not capture (no gradient then)
        slot[0] = rule.capture(module, args, kwargs, output)
        # deltas that arrived before the recomputation are delivered once it is over (torch.func, which the
        # exact fallback uses, refuses to run inside checkpointing's saved-tensor hooks)
        self._ready.extend((key, grad, deliver) for grad, deliver in self._waiting.pop(key, []))

    def _rerun_waiting(self) -> None:
        """Re-run the checkpointed steps whose deltas are still waiting for their inputs, and deliver them.

        Autograd recomputes a checkpointed step only when it unpacks one of the step's saved tensors. When
        every captured output of a step lies at the step's boundary (a single layer is the whole body, e.g. a
        GRUCell) and nothing behind the step is asked for, backward takes the deltas at those outputs and
        never enters the step: the step's inputs are then never captured. Those steps are re-run here, with
        the forward's RNG and autocast state, in the backward phase, so the forward hooks capture the inputs."""
        if not self._waiting:
            return
        for step in sorted({key[0] for key in self._waiting}):
            region, args, kwargs, state = self._reruns[step]
            with _replay_state(state), torch.enable_grad():
                region(*args, **kwargs)
            self.flush()
        if self._waiting:
            raise StepError(
                f"deltas of checkpointed calls {sorted(self._waiting)} (step, call) found no inputs: the step did "
                "not make the same calls when re-run; recompute=True needs a deterministic step"
            )

    def flush(self) -> None:
        """Deliver the deltas whose inputs a recomputation has just captured."""
        while self._ready:
            key, grad, deliver = self._ready.pop()
            self._deliver(key, grad, deliver)

    def _on_region_grad(self, grad: torch.Tensor, *, key: tuple[int, int], deliver: Any) -> None:
        if self.phase != "backward":
            return
        self.flush()
        slot = self._recomputed.get(key)
        if slot is None or slot[0] is None:
            self._waiting.setdefault(key, []).append((grad, deliver))
        else:
            self._deliver(key, grad, deliver)

    def _deliver(self, key: tuple[int, int], grad: torch.Tensor, deliver: Any) -> None:
        slot = self._recomputed[key]
        deliver(grad, saved=slot[0])
        slot[1] -= 1
        if slot[1] <= 0:  # every delta of this call is in: free its inputs
            del self._recomputed[key]

    def _guard_recompute(self, output: Any) -> None:
        outs = (
            [output]
            if isinstance(output, torch.Tensor)
            else [o for o in output if isinstance(o, torch.Tensor)]
            if isinstance(output, tuple | list)
            else []
        )
        for o in outs:
            if o.requires_grad:
                o.register_hook(self._recompute_fired)

    def _recompute_fired(self, grad: torch.Tensor) -> None:
        self.recompute_fired = True

    def _on_grad(
        self,
        grad: torch.Tensor,
        *,
        module: nn.Module,
        rule: Rule,
        saved: Any,
        step: int,
        index: int,
        name: str,
        rows: torch.Tensor | None,
    ) -> None:
        if self.phase != "backward" or self.feats is None:
            return
        self.flush()
        if rows is not None:  # regroup the rows per example: [N, ...] -> [B, L, ...] (zero-padded)
            grad = group_rows(grad, rows, self.batch_size)
            saved = regroup_saved(saved, lambda t: group_rows(t, rows, self.batch_size), int(rows.shape[0]))
        self._cur_step = step
        self._suspended += 1
        try:
            with torch.no_grad():
                rule.contribute(module, saved, grad, index, self)
        finally:
            self._suspended -= 1

    def _on_step_grad(self, grad: torch.Tensor, *, step: int, inputs: tuple[Any, Any], index: int) -> None:
        """The step route: per-example gradients of the step-routed layers' parameters, from the step's
        inputs and the cotangent of its output ``index``."""
        if self.phase != "backward" or self.feats is None:
            return
        assert self.step_module is not None
        routed = {id(p) for m in self.step_module.modules() if id(m) in self.step_routed for p in m.parameters()}
        named = {n: p for n, p in self.step_module.named_parameters() if id(p) in routed}
        self._cur_step = step
        self._suspended += 1
        try:
            with torch.no_grad():
                grads = step_vjp(self.step_module, named, inputs, grad, index, self.batch_size)
            for n, g in grads.items():
                self.dense(named[n], g.reshape(self.batch_size, -1))
        finally:
            self._suspended -= 1

    # ------------------------------------------------------------------ Sink protocol
    def _out(self, param: torch.Tensor) -> tuple[Slot, torch.Tensor]:
        slot = self.slot_of.get(id(param))
        if slot is None:
            raise UnsupportedLayerError(
                "a layer rule sent a gradient for a parameter outside the body; this is a bug in the rule"
            )
        assert self.feats is not None
        return slot, self.feats[:, self._cur_step - 1, slot.offset : slot.offset + slot.m]

    def outer(self, param: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        slot, out = self._out(param)
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
        slot, out = self._out(param)
        scale = self.scale_of.get(id(param))
        g = g.to(out.dtype)
        slot.add_dense(out, g if scale is None else g * scale.reshape(1, -1).to(out.dtype))

    def rows(self, param: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
        slot, out = self._out(param)
        scale = self.scale_of.get(id(param))
        values = values.to(out.dtype)
        if scale is not None:  # row r of the gradient is scaled by row r of the preconditioner
            values = values * scale.reshape(scale.shape[0], -1).to(out.dtype)[idx]
        slot.add_rows(out, idx, values)


def _forward_state(args: Any, kwargs: Any) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]], Any]:
    """The RNG states (CPU, and each CUDA device the inputs are on) and the autocast setting of a forward call."""
    devices = sorted({t.device.index or 0 for t in batching.tensors((args, kwargs)) if t.device.type == "cuda"})
    cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]
    dev = "cuda" if devices else "cpu"
    return torch.get_rng_state(), cuda, (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))


@contextlib.contextmanager
def _replay_state(state: tuple[torch.Tensor, list[tuple[int, torch.Tensor]], Any]) -> Iterator[None]:
    cpu, cuda, (dev, enabled, dtype) = state
    with torch.random.fork_rng(devices=[d for d, _ in cuda]):
        torch.set_rng_state(cpu)
        for d, st in cuda:
            torch.cuda.set_rng_state(st, d)
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            yield


def step_vjp(
    step_module: nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: tuple[Any, Any],
    grad: torch.Tensor,
    index: int,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Per-example ``d <grad_b, step(inputs_b)> / d params`` ``{name: [B, *shape]}``.

    Each example's step is re-run as a batch of one (examples must not interact). ``torch.func.vmap``
    does all examples at once; a body it cannot batch (data-dependent shapes, such as routing tokens
    with ``nonzero``) is run one example at a time instead, with the same result."""
    args, kwargs = inputs
    detached = {n: p.detach() for n, p in params.items()}

    def per_example(p: dict[str, torch.Tensor], a: Any, k: Any, g: torch.Tensor) -> dict[str, torch.Tensor]:
        def f(pp: dict[str, torch.Tensor]) -> torch.Tensor:
            bufs = {n: b.clone() for n, b in step_module.named_buffers()}  # never update the real buffers
            out = torch.func.functional_call(step_module, (pp, bufs), tuple(a), k, strict=False)
            return out if isinstance(out, torch.Tensor) else out[index]

        pullback = torch.func.vjp(f, p)[1]
        return pullback(g)[0]

    dims_a = batching.map_tensors(args, lambda t: 0 if t.dim() > 0 and t.shape[0] == batch_size else None)
    dims_k = batching.map_tensors(kwargs, lambda t: 0 if t.dim() > 0 and t.shape[0] == batch_size else None)
    a_in = _with_dims(args, dims_a)
    k_in = _with_dims(kwargs, dims_k)
    try:
        with torch.enable_grad():
            return torch.func.vmap(
                lambda p, a, k, g: per_example(p, _unsqueeze(a, dims_a), _unsqueeze(k, dims_k), g.unsqueeze(0)),
                in_dims=(None, a_in, k_in, 0),
            )(detached, args, kwargs, grad)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        if not vmap_refused(exc):
            raise
    with torch.enable_grad():
        rows = [
            per_example(
                detached, batching.slice_rows(args, b, b + 1), batching.slice_rows(kwargs, b, b + 1), grad[b : b + 1]
            )
            for b in range(batch_size)
        ]
    return {n: torch.stack([r[n] for r in rows]) for n in detached}


def _with_dims(tree: Any, dims: Any) -> Any:
    """vmap in_dims for a tree: its tensors get their dims; other leaves None."""
    if isinstance(tree, torch.Tensor):
        return dims
    if isinstance(tree, tuple | list):
        return type(tree)(_with_dims(v, d) for v, d in zip(tree, dims, strict=True))
    if isinstance(tree, dict):
        return {k: _with_dims(v, dims[k]) for k, v in tree.items()}
    return None


def _unsqueeze(tree: Any, dims: Any) -> Any:
    """Inside vmap: give every batched tensor back its (now size-one) batch axis."""
    if isinstance(tree, torch.Tensor):
        return tree.unsqueeze(0) if dims == 0 else tree
    if isinstance(tree, tuple | list):
        return type(tree)(_unsqueeze(v, d) for v, d in zip(tree, dims, strict=True))
    if isinstance(tree, dict):
        return {k: _unsqueeze(v, dims[k]) for k, v in tree.items()}
    return tree

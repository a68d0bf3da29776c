"""Recomputation: each call of a step unit under non-reentrant activation checkpointing (``recompute=True``).

The forward keeps only a call's inputs; backward re-runs the call ("region"), and the capture takes the
layers' inputs then. A layer call inside a region is keyed by (region, call number): the forward records
how many deltas the call will receive, the recomputation fills in its saved inputs, and each delta is
delivered as soon as both are there. Deltas that arrive first (a region's last layers get theirs before
backward recomputes it) wait; regions whose deltas all arrive without autograd ever recomputing them are
re-run at the end of backward with the forward's RNG and autocast state.

It also watches for someone else's (reentrant) checkpointing, which re-runs the body inside backward
where its steps cannot be told apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from looptrace import batching
from looptrace.errors import StepError

__all__ = ["Recompute"]

Key = tuple[int, int]


class Recompute:
    """The regions of one batch and the captures waiting on them."""

    def __init__(self) -> None:
        self.region: list[int] | None = None  # [region, calls so far] while a region runs
        self.regions = 0
        self.recomputed: dict[Key, list[Any]] = {}  # key -> [saved, deltas still to come]
        self.waiting: dict[Key, list[tuple[torch.Tensor, Any]]] = {}
        # region -> what re-runs it (the call, its inputs, the RNG and autocast state of the forward), for regions
        # whose deltas all arrive without autograd ever unpacking their saved tensors (see rerun_waiting)
        self.reruns: dict[int, tuple[Any, Any, Any, Any]] = {}
        self.ready: list[tuple[Key, torch.Tensor, Any]] = []
        self.fired = False  # someone else's checkpointing recomputed the body inside backward

    def start_batch(self) -> None:
        self.regions = 0
        self.fired = False

    def end_batch(self) -> None:
        self.recomputed.clear()
        self.waiting.clear()
        self.ready.clear()
        self.reruns.clear()

    def checkpointed(self, unit: nn.Module, starts_region: Callable[[], bool]) -> Any:
        """``unit``'s forward as a region when ``starts_region()`` says so (its call is a step unit's call in the
        forward pass); a unit called inside a region is re-run with it."""
        original = unit.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.region is not None or not starts_region():
                return original(*args, **kwargs)
            rid = self.regions
            self.regions += 1

            def region(*a: Any, **k: Any) -> Any:
                outer, self.region = self.region, [rid, 0]
                try:
                    return original(*a, **k)
                finally:
                    self.region = outer

            self.reruns[rid] = (region, args, kwargs, _forward_state(args, kwargs))
            # the whole call is re-run (no early stop), so every layer's forward hook sees its inputs again
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                return torch.utils.checkpoint.checkpoint(region, *args, use_reentrant=False, **kwargs)

        return forward

    def next_key(self) -> Key:
        assert self.region is not None
        key = (self.region[0], self.region[1])
        self.region[1] += 1
        return key

    def expect(self, deltas: int) -> Key:
        """A layer call in a region, in the forward: its key; its inputs come with the recomputation."""
        key = self.next_key()
        self.recomputed[key] = [None, deltas]
        return key

    def recomputed_call(self, capture: Callable[[], Any]) -> None:
        """The same layer call re-run by backward: its inputs (``capture()``), and the deltas that waited for
        them queued for delivery once the recomputation is over (torch.func, which the exact fallback uses,
        refuses to run inside checkpointing's saved-tensor hooks)."""
        key = self.next_key()
        slot = self.recomputed.get(key)
        if slot is None:
            return  # a call the forward did not capture (no gradient then)
        slot[0] = capture()
        self.ready.extend((key, grad, deliver) for grad, deliver in self.waiting.pop(key, []))

    def on_grad(self, grad: torch.Tensor, *, key: Key, deliver: Any) -> None:
        """A delta of a layer call in a region: delivered now if its inputs are in, else when they are."""
        self.flush()
        slot = self.recomputed.get(key)
        if slot is None or slot[0] is None:
            self.waiting.setdefault(key, []).append((grad, deliver))
        else:
            self._deliver(key, grad, deliver)

    def flush(self) -> None:
        """Deliver the deltas whose inputs a recomputation has just captured."""
        while self.ready:
            key, grad, deliver = self.ready.pop()
            self._deliver(key, grad, deliver)

    def _deliver(self, key: Key, grad: torch.Tensor, deliver: Any) -> None:
        slot = self.recomputed[key]
        deliver(grad, saved=slot[0])
        slot[1] -= 1
        if slot[1] <= 0:  # every delta of this call is in: free its inputs
            del self.recomputed[key]

    def rerun_waiting(self) -> None:
        """Re-run the regions whose deltas are still waiting for their inputs, and deliver them.

        Autograd recomputes a region only when it unpacks one of its saved tensors. When every captured output
        of a region lies at its boundary (a single layer is the whole body, e.g. a GRUCell) and nothing behind
        it is asked for, backward takes the deltas at those outputs and never enters it: its inputs are then
        never captured. Those regions are re-run here, with the forward's RNG and autocast state, in the
        backward phase, so the forward hooks capture the inputs."""
        if not self.waiting:
            return
        for rid in sorted({key[0] for key in self.waiting}):
            region, args, kwargs, state = self.reruns[rid]
            with _replay_state(state), torch.enable_grad():
                region(*args, **kwargs)
            self.flush()
        if self.waiting:
            raise StepError(
                f"deltas of checkpointed calls {sorted(self.waiting)} (region, call) found no inputs: the step did "
                "not make the same calls when re-run; recompute=True needs a deterministic step"
            )

    def guard(self, output: Any) -> None:
        """Someone else's recomputation re-ran a captured layer inside backward: note it if its output gets
        gradient (reentrant checkpointing, whose steps cannot be told apart, is refused)."""
        outs = (
            [output]
            if isinstance(output, torch.Tensor)
            else [o for o in output if isinstance(o, torch.Tensor)]
            if isinstance(output, tuple | list)
            else []
        )
        for o in outs:
            if o.requires_grad:
                o.register_hook(self._fired)

    def _fired(self, grad: torch.Tensor) -> None:
        self.fired = True


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

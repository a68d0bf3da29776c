"""``looptrace.featurize``: per-example, per-loop-step gradient features of a looped model.

One batch is one forward pass with step-tagged capture hooks (:mod:`looptrace.capture.tracer`) and
one backward pass that asks autograd only for the deltas the layer rules need; the first batch is
checked against autograd (:mod:`looptrace.verify`). Batches that run out of accelerator memory are
halved and retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from looptrace import batching
from looptrace.capture.steps import step_sequence
from looptrace.capture.tracer import BodyParam, Reroute, Tracer, body_parameters, check_ties
from looptrace.errors import ConfigError, LoaderError, LossError, MemoryBudgetError
from looptrace.features import Features
from looptrace.sketch.plan import OuterPath, SketchPlan
from looptrace.sketch.spec import SketchSpec
from looptrace.verify import batch_checked, check_batch, probe_groups, rows_grad_alone, rows_grad_in_graph

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Verify = bool | Literal["first"]


def featurize(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    step_module: nn.Module | Sequence[nn.Module] | None = None,
    body: nn.Module | Sequence[nn.Module] | None = None,
    sketch: SketchSpec | None = None,
    tau: int | None = None,
    per_step: bool = True,
    verify: Verify = "first",
    fallback: bool = True,
    train_mode: bool = False,
    outer_path: OuterPath = "auto",
    recompute: bool = False,
    autocast: torch.dtype | None = None,
    precondition: Mapping[str, torch.Tensor] | None = None,
    max_memory: int | None = None,
    progress: bool = False,
    checkpoint: str | None = None,
    positions: bool = False,
) -> Features:
    """Per-example, per-loop-step features of the body gradient.

    Args:
        model: the looped model; ``loss_fn(model, batch)`` runs it.
        loader: batches in dataset order (a DataLoader with ``shuffle=False`` or any iterable).
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses (examples must not interact).
        step_module: the module whose every forward call is one loop iteration (its parameters are the
            body), or the modules one loop pass calls, in order (a list or an ``nn.ModuleList``, e.g. a
            range of decoder layers): a pass ends when the last of them returns, and a call of any body
            module belongs to the pass that the next return of the last one completes. Without step
            modules, mark iterations in the model with :func:`looptrace.loop_step` and pass ``body=``.
        body: the modules whose parameters are attributed (default: ``step_module``); may add modules
            called inside a pass besides the step modules (Inkling-2-Loop's ``message_input``).
        sketch: the projection; ``SketchSpec.exact()`` gives the full per-step gradients.
        tau: the declared number of loop steps; a batch that runs a different number raises.
            By default the largest observed, and shorter batches are zero-padded.
        per_step: keep ``[N, tau, D]``; ``False`` keeps only the ``[N, D]`` totals (train side of
            test-side SDI), tau times less memory.
        verify: check that the captured features add up to autograd's gradient (summed over the batch for
            every parameter but the wide matrices, whose batch gradient would cost a plain step's weight
            gradients, and all body parameters of the first and last examples run without the rest of the batch):
            ``"first"`` batch only, ``True`` every batch, ``False`` never. Catches weights used outside
            the body, examples that interact, features on the wrong example (for a wide matrix, on the first
            or last one) and broken layer rules.
        fallback: allow the exact torch.func fallback for body modules with no layer rule.
        train_mode: featurise in train mode (dropout on). Default: eval mode, restored afterwards.
        outer_path: how TensorSketch of outer products is computed: ``"auto"`` (cheaper by a cost
            model), ``"fft"`` or ``"materialize"``; all give the same numbers.
        recompute: keep only each loop step's inputs during the forward and re-run the step inside
            backward (non-reentrant activation checkpointing of every call of a step module, or of a
            body module called inside a pass), capturing exactly as without it: the memory of one call's
            activations instead of all of them, for about one more forward pass. Needs ``step_module``.
        autocast: run the forward (and so the captured activations and deltas) under
            ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``); features are accumulated in the
            parameters' dtype. Its error against float32 is measured in the benchmarks; the first-batch
            check then allows the autocast dtype's rounding.
        precondition: ``{body parameter name: P^(1/2)}`` (shapes of the parameters): every per-step
            gradient is scaled elementwise before sketching, so inner products of features are
            ``g^T P g'`` and conservation still holds (e.g. Adam's ``1 / sqrt(sqrt(v_hat) + eps)``, see
            :func:`adam_preconditioner`). Parameters not named are left unscaled.
        max_memory: refuse (with the estimate) if the features would need more bytes than this
            (default: half of physical memory).
        progress: show a progress bar.
        checkpoint: an identifier stored with the features (see :func:`looptrace.attribute`).
        positions: per-position features instead of per-step ones: ``Features.positions`` ``[N, L, D]``, row
            ``[i, p]`` the part of example i's body gradient that comes through its sequence position p (for a
            linear map, the term delta_p a_p^T of every loop step, summed over steps; likewise norms, biases and
            embeddings), L the longest sequence (zeros past an example's end and where a position gets no
            gradient). Summed over positions it is ``total`` (sketches are linear). The token axis of every body
            layer must be the sequence; a layer with no per-position form (the exact per-example fallback, the
            step route, routed rows) raises :class:`UnsupportedLayerError`. A position's term still carries the
            whole sequence's information (through attention), as in Grosse et al. (2023), section 3.3.

    Returns:
        :class:`Features` with rows in loader order; ``settings`` records the options that change
        the numbers (horizon, train mode, TensorSketch route).
    """
    spec = sketch if sketch is not None else SketchSpec()
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int) or tau < 1):
        raise ConfigError(f"tau must be a positive int, got {tau!r}")
    roots = resolve_body(model, step_module, body)
    params = body_parameters(model, roots)
    if not params:
        raise ConfigError("the loop body has no parameters to attribute")
    check_ties(model, roots, params)
    check_loader_order(loader)
    plan = SketchPlan.build(spec, [(bp.name, tuple(bp.param.shape)) for bp in params])
    n_total = len(loader.dataset) if hasattr(loader, "dataset") else None  # type: ignore[attr-defined]
    budget = _MemoryBudget(n_total, plan.dim, params[0].param.dtype, per_step, max_memory)
    budget.check(tau)
    scale = _check_precondition(precondition, params)
    tracer = Tracer(
        model, roots, plan, params, step_sequence(step_module), fallback=fallback, outer_path=outer_path,
        recompute=recompute, scale=scale, positions=positions,
    )  # fmt: skip
    if autocast is not None and (not isinstance(autocast, torch.dtype) or autocast.is_complex):
        raise ConfigError(f"autocast must be a floating dtype such as torch.bfloat16, got {autocast!r}")
    run = _BatchRunner(model, loss_fn, tracer, plan, params, tau, budget, autocast, scale)
    rows = _Rows(per_step or positions)
    with _featurizing(model, tracer, params, train_mode), _progress_bar(progress, n_total) as bar:
        for index, batch in enumerate(_checked_batches(loader, params[0].param.device)):
            check = verify is True or (verify == "first" and index == 0)
            for feats, losses in run.with_retries(batch, index, check, rows.count):
                if positions and index == 0:
                    budget.check(int(feats.shape[1]))  # [B, L, D]: the positions take the place of the steps
                rows.add(feats, losses)
                bar(int(losses.shape[0]))
    if progress:
        _report_routes(tracer.routes)
    settings = {
        "tau": tau, "train_mode": train_mode, "outer_path": outer_path, "autocast": _dtype_name(autocast),
        "precondition": None if scale is None else "diagonal",
    }  # fmt: skip
    features = rows.features(spec, plan.describe(), checkpoint, settings)
    features.routes = dict(tracer.routes)
    if positions:  # the assembled [N, L, D] rows are positions, not steps
        features.positions, features.per_step = features.per_step, None
        settings["positions"] = True
    return features


def _check_precondition(
    precondition: Mapping[str, torch.Tensor] | None, params: list[BodyParam]
) -> dict[str, torch.Tensor] | None:
    if precondition is None:
        return None
    shapes = {bp.name: tuple(bp.param.shape) for bp in params}
    unknown = sorted(set(precondition) - set(shapes))
    if unknown:
        raise ConfigError(
            f"precondition names {unknown[:5]}, which are not body parameters (body: {sorted(shapes)[:5]} ...)"
        )
    bad = [n for n, t in precondition.items() if tuple(t.shape) != shapes[n]]
    if bad:
        raise ConfigError(f"preconditioner tensors must have their parameter's shape; wrong for {bad[:5]}")
    return dict(precondition)


def adam_preconditioner(
    second_moments: Mapping[str, Any], names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """P^(1/2) = (sqrt(v_hat) + eps)^(-1/2) per element, with v_hat = v / (1 - beta2^step) from Adam's
    recorded second moments (:class:`looptrace.CheckpointRecorder`'s ``optimizer_second_moments``): the
    diagonal of Adam's update geometry, so that features' inner products are g^T P g'."""
    moments = second_moments["exp_avg_sq"]
    step = int(second_moments.get("step") or 1)
    beta2 = float(second_moments.get("beta2") or 0.999)
    eps = float(second_moments.get("eps") or 1e-8)
    correction = 1 - beta2**step
    keep = moments if names is None else {n: moments[n] for n in names if n in moments}
    return {n: (v.double() / correction).sqrt().add(eps).rsqrt() for n, v in keep.items()}


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _report_routes(routes: dict[str, str]) -> None:
    """Which route each body layer took (printed with the progress bar)."""
    import sys

    from tqdm.auto import tqdm

    width = max(len(n) for n in routes)
    tqdm.write("featurize: body layers and their routes", file=sys.stderr)
    for name, route in routes.items():
        tqdm.write(f"  {name:<{width}}  {route}", file=sys.stderr)


@dataclasses.dataclass
class _BatchRunner:
    """Featurises one batch: forward with capture, backward, optional verification."""

    model: nn.Module
    loss_fn: LossFn
    tracer: Tracer
    plan: SketchPlan
    params: list[BodyParam]
    tau: int | None
    budget: _MemoryBudget
    autocast: torch.dtype | None = None
    scale: dict[str, torch.Tensor] | None = None

    def _forward_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        device = self.params[0].param.device.type
        return torch.autocast(device_type=device, dtype=self.autocast)

    def __call__(self, batch: Any, index: int, check: bool, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.tracer.start_batch(batching.leading_size(batch))
        try:
            losses = self.forward(batch)
            steps = self.tracer.steps_observed(self.tau, index)
            if index == 0:
                self.budget.check(steps)
            named: dict[str, torch.Tensor] = {bp.name: bp.param for bp in self.params}
            also = list(named.values()) if check else []
            in_sum = batch_checked(self.plan)  # the wide matrices' batch sums are left to the probe rows
            summed = [p for n, p in named.items() if n in in_sum] if check else []
            in_graph = check and self.model.training  # dropout: a second forward would draw other masks
            feats, grads = self.tracer.backward(losses, self.params[0].param.dtype, summed, keep_graph=in_graph)
            if check:
                self.tracer.end_batch()
                rows_grad = (
                    rows_grad_in_graph(losses, also)  # one weighted backward through the batch's own graph
                    if in_graph
                    else rows_grad_alone(self._losses_of, batch, also)
                )
                groups = probe_groups(int(losses.shape[0]), alone=not in_graph)
                check_batch(self.plan, feats, named, grads, rows_grad, first_row, self.autocast, self.scale, groups)
            return feats, losses.detach()
        finally:
            self.tracer.end_batch()

    def _losses_of(self, batch: Any) -> torch.Tensor:
        with self._forward_context():
            return validate_losses(self.loss_fn(self.model, batch), batch)

    def forward(self, batch: Any) -> torch.Tensor:
        """The batch's per-example losses, switching a layer to the route it needs and rerunning the
        forward when a capture hook asks for it (on the first batch, or when a later one differs)."""
        for _ in range(len(self.params) + 2):
            try:
                with torch.enable_grad(), self.tracer.forward_pass(), self._forward_context():
                    return validate_losses(self.loss_fn(self.model, batch), batch)
            except Reroute as signal:
                self.tracer.reroute(signal)
                self.tracer.start_batch(batching.leading_size(batch))
        raise AssertionError("a layer asked for a new route on every forward pass")

    def with_retries(
        self, batch: Any, index: int, check: bool, first_row: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch's features, halving it and retrying (with a warning) on accelerator out-of-memory."""
        try:
            return [self(batch, index, check, first_row)]
        except torch.OutOfMemoryError:
            n = batching.leading_size(batch)
            if n is None or n < 2:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = n // 2
            warnings.warn(
                f"out of memory on batch {index} ({n} examples); retrying it in chunks of {half} and {n - half}",
                RuntimeWarning,
                stacklevel=3,
            )
            first = self.with_retries(batching.slice_rows(batch, 0, half), index, check, first_row)
            return first + self.with_retries(batching.slice_rows(batch, half, n), index, False, first_row + half)


class _Rows:
    """Feature rows in loader order; assembled once at the end without holding two full copies."""

    def __init__(self, per_step: bool) -> None:
        self.per_step = per_step
        self.chunks: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.count = 0

    def add(self, feats: torch.Tensor, losses: torch.Tensor) -> None:
        self.chunks.append(feats if self.per_step else feats.sum(1))
        self.losses.append(losses)
        self.count += int(losses.shape[0])

    def features(
        self, spec: SketchSpec, layout: list[dict[str, Any]], checkpoint: str | None, settings: dict[str, Any]
    ) -> Features:
        if not self.chunks:
            raise LoaderError("the loader yielded no batches")
        losses = torch.cat(self.losses)
        if not self.per_step:
            return Features(None, spec, layout, losses, checkpoint, settings, _total=torch.cat(self.chunks))
        if len(self.chunks) == 1:  # no copy: exact features can be most of the memory
            return Features(self.chunks.pop(), spec, layout, losses, checkpoint, settings)
        first = self.chunks[0]
        steps = max(c.shape[1] for c in self.chunks)
        out = first.new_empty(self.count, steps, first.shape[2])  # every entry is written below
        row = 0
        self.chunks.reverse()
        while self.chunks:  # free each chunk once copied: the peak is the output plus one chunk
            chunk = self.chunks.pop()
            n, ran = chunk.shape[0], chunk.shape[1]
            out[row : row + n, :ran] = chunk
            if ran < steps:  # a batch that ran fewer loop steps: zero for the steps it did not run
                out[row : row + n, ran:] = 0
            row += n
            del chunk
        return Features(out, spec, layout, losses, checkpoint, settings)


@contextlib.contextmanager
def _featurizing(model: nn.Module, tracer: Tracer, params: list[BodyParam], train_mode: bool) -> Iterator[None]:
    """Hooks installed, body parameters requiring grad, the requested mode and no Hugging Face key/value cache
    (``config.use_cache``); all restored afterwards."""
    was_training = model.training
    flags = [(bp.param, bp.param.requires_grad) for bp in params]
    # a Hugging Face key/value cache is state: the per-example re-runs of the capture would write into it
    configs: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", False) is True:
            configs[id(config)] = config
    try:
        model.train(train_mode)
        for p, _ in flags:
            p.requires_grad_(True)
        for c in configs.values():
            c.use_cache = False
        tracer.install()
        yield
    finally:
        tracer.remove()
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
        for c in configs.values():
            c.use_cache = True


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[int], Any]]:
    if not enabled:
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total or None, desc="featurize", unit="ex")
    try:
        yield bar.update
    finally:
        bar.close()


def _checked_batches(loader: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """The loader's batches on ``device``, refusing a batch whose structure differs from the first's."""
    first: Any = None
    for index, batch in enumerate(loader):
        shape = batching.structure(batch)
        if first is None:
            first = shape
        elif shape != first:
            raise LoaderError(
                f"batch {index} has a different structure from batch 0 ({shape} vs {first}); "
                "yield batches of one consistent type"
            )
        yield batching.to_device(batch, device)


def check_loader_order(loader: Iterable[Any]) -> None:
    """Refuse loaders whose rows would not follow dataset order."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if sampler is not None and not isinstance(sampler, torch.utils.data.SequentialSampler):
        raise LoaderError(
            f"the loader samples with {type(sampler).__name__}, so feature rows would not follow dataset "
            "order; build it with shuffle=False (a SequentialSampler)"
        )
    if batch_sampler is not None and not isinstance(batch_sampler, torch.utils.data.BatchSampler):
        raise LoaderError(
            f"the loader uses a custom batch sampler ({type(batch_sampler).__name__}); looptrace needs "
            "dataset order: use batch_size= with shuffle=False"
        )


def validate_losses(losses: Any, batch: Any) -> torch.Tensor:
    """``losses`` if it is a finite, differentiable per-example float vector for ``batch``; else :class:`LossError`."""
    if not isinstance(losses, torch.Tensor):
        raise LossError(f"loss_fn must return a Tensor[B] of per-example losses, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise LossError(
            f"loss_fn must return per-example losses of shape [B], got shape {tuple(losses.shape)}; "
            "use reduction='none' and average over tokens per example"
        )
    if not losses.is_floating_point():
        raise LossError(f"loss_fn returned dtype {losses.dtype}; per-example losses must be floating point")
    n = batching.leading_size(batch)
    if n is not None and n != losses.shape[0]:
        raise LossError(
            f"loss_fn returned {losses.shape[0]} losses for a batch of {n} examples; return one loss per example"
        )
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
    if bad:
        raise LossError(f"loss_fn returned NaN/Inf for batch example(s) {bad[:20]}; fix the model or data there")
    if not losses.requires_grad:
        raise LossError("loss_fn returned losses that do not require grad; do not compute them under no_grad")
    return losses


def resolve_body(
    model: nn.Module,
    step_module: nn.Module | Sequence[nn.Module] | None,
    body: nn.Module | Sequence[nn.Module] | None,
) -> list[nn.Module]:
    """The modules whose parameters are the body: ``body`` if given, else the step module(s)."""
    steps = step_sequence(step_module)
    if body is None:
        if not steps:
            raise ConfigError(
                "say what the loop body is: step_module= (one call, or one pass over a sequence of modules, "
                "= one loop step), or body= with looptrace.loop_step() marking each iteration in the model"
            )
        return steps
    roots = [body] if isinstance(body, nn.Module) else list(body)
    bad = [type(m).__name__ for m in roots if not isinstance(m, nn.Module)]
    if bad or not roots:
        raise ConfigError(f"body must be a module or a non-empty sequence of modules, got {bad or 'nothing'}")
    return roots


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def estimate_bytes(n: int, tau: int, dim: int, dtype: torch.dtype, per_step: bool) -> int:
    """Bytes of the feature tensor ``[n, tau, dim]`` (or ``[n, dim]`` without per-step rows)."""
    return n * (tau if per_step else 1) * dim * torch.empty((), dtype=dtype).element_size()


def format_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


@dataclasses.dataclass
class _MemoryBudget:
    """Refuses, up front and with the estimate, features that would not fit in memory."""

    n_total: int | None
    dim: int
    dtype: torch.dtype
    per_step: bool
    limit: int | None

    def check(self, steps: int | None) -> None:
        if not self.n_total or steps is None:
            return
        limit = self.limit if self.limit is not None else _physical_memory() // 2
        need = estimate_bytes(self.n_total, steps, self.dim, self.dtype, self.per_step)
        if need > limit:
            raise MemoryBudgetError(
                f"features for {self.n_total} examples x {steps} steps x D={self.dim} would take "
                f"{format_bytes(need)} (limit {format_bytes(limit)}); lower SketchSpec.dim, pass per_step=False, "
                "featurise in shards into a feature store, or raise max_memory"
            )

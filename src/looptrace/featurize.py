"""``looptrace.featurize``: per-example, per-loop-step gradient features of a looped model."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from looptrace.capture.tracer import BodyParam, Tracer, body_parameters, check_ties
from looptrace.errors import (
    ConfigError,
    LoaderError,
    LossError,
    MemoryBudgetError,
    StepError,
    VerificationError,
)
from looptrace.features import Features
from looptrace.sketch.plan import OuterPath, SketchPlan
from looptrace.sketch.spec import SketchSpec

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Verify = bool | Literal["first"]


def _is_dataclass_batch(batch: Any) -> bool:
    return dataclasses.is_dataclass(batch) and not isinstance(batch, type)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if _is_dataclass_batch(batch):
        return dataclasses.replace(
            batch, **{f.name: _to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch)}
        )
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_structure(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return "tensor"
    if isinstance(batch, dict):
        return ("dict", tuple(sorted((k, _batch_structure(v)) for k, v in batch.items())))
    if _is_dataclass_batch(batch):
        return (
            type(batch).__name__,
            tuple((f.name, _batch_structure(getattr(batch, f.name))) for f in dataclasses.fields(batch)),
        )
    if isinstance(batch, tuple | list):
        return (type(batch).__name__, tuple(_batch_structure(v) for v in batch))
    return type(batch).__name__


def _leading_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if _is_dataclass_batch(batch):
        items: Any = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    elif isinstance(batch, dict):
        items = batch.values()
    else:
        items = batch if isinstance(batch, tuple | list) else ()
    for v in items:
        n = _leading_size(v)
        if n is not None:
            return n
    return None


def _slice_batch(batch: Any, lo: int, hi: int) -> Any:
    """Rows lo:hi of every tensor whose leading axis is the batch (other leaves are kept)."""
    return _slice_tree(batch, lo, hi, _leading_size(batch))


def _slice_tree(x: Any, lo: int, hi: int, n: int | None) -> Any:
    if isinstance(x, torch.Tensor):
        return x[lo:hi] if x.dim() > 0 and x.shape[0] == n else x
    if _is_dataclass_batch(x):
        return dataclasses.replace(
            x, **{f.name: _slice_tree(getattr(x, f.name), lo, hi, n) for f in dataclasses.fields(x)}
        )
    if isinstance(x, dict):
        return {k: _slice_tree(v, lo, hi, n) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_slice_tree(v, lo, hi, n) for v in x)
    return x


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
    if not isinstance(losses, torch.Tensor):
        raise LossError(f"loss_fn must return a Tensor[B] of per-example losses, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise LossError(
            f"loss_fn must return per-example losses of shape [B], got shape {tuple(losses.shape)}; "
            "use reduction='none' and average over tokens per example"
        )
    if not losses.is_floating_point():
        raise LossError(f"loss_fn returned dtype {losses.dtype}; per-example losses must be floating point")
    n = _leading_size(batch)
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
    model: nn.Module, step_module: nn.Module | None, body: nn.Module | Sequence[nn.Module] | None
) -> list[nn.Module]:
    if body is None:
        if step_module is None:
            raise ConfigError(
                "say what the loop body is: step_module= (one call = one loop step), or body= with "
                "looptrace.loop_step() marking each iteration in the model"
            )
        return [step_module]
    return [body] if isinstance(body, nn.Module) else list(body)


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def estimate_bytes(n: int, tau: int, dim: int, dtype: torch.dtype, per_step: bool) -> int:
    el = torch.empty((), dtype=dtype).element_size()
    return n * (tau if per_step else 1) * dim * el


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 2e-3}.get(dtype, 5e-2)


def _sketch_grads(
    plan: SketchPlan, grads: dict[str, torch.Tensor | None], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    out = torch.zeros(1, plan.dim, dtype=dtype, device=device)
    for slot in plan.slots:
        g = grads.get(slot.name)
        if g is not None:
            slot.add_dense(out[:, slot.offset : slot.offset + slot.m], g.reshape(1, -1).to(dtype))
    return out[0]


def _compare(plan: SketchPlan, want: torch.Tensor, got: torch.Tensor, what: str) -> None:
    tol = _tolerance(got.dtype)
    bad: list[str] = []
    groups = [(s.name, s.offset, s.m) for s in plan.slots]
    if plan.spec.budget == "shared" and not plan.spec.is_exact:
        groups = [("all body parameters", 0, plan.dim)]
    for name, off, m in groups:
        a, b = want[off : off + m], got[off : off + m]
        err = float((a - b).norm())
        scale = float(a.norm() + b.norm())
        if err > tol * scale + 1e-30 and err > 1e-6 * tol:
            bad.append(f"{name}: |diff|={err:.3g}, |autograd|={float(a.norm()):.3g}, |captured|={float(b.norm()):.3g}")
    if bad:
        raise VerificationError(
            f"{what} does not match autograd for: " + "; ".join(bad[:8]) + ". Probable causes: a body "
            "weight is used outside the step module (e.g. F.linear(x, core.fc.weight) elsewhere), examples "
            "interact inside the body (batch norm, batch-first assumption broken), or a custom layer rule "
            "is wrong. Pass verify=False only if you know why."
        )


def featurize(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    step_module: nn.Module | None = None,
    body: nn.Module | Sequence[nn.Module] | None = None,
    sketch: SketchSpec | None = None,
    tau: int | None = None,
    per_step: bool = True,
    verify: Verify = "first",
    fallback: bool = True,
    train_mode: bool = False,
    outer_path: OuterPath = "auto",
    max_memory: int | None = None,
    progress: bool = False,
    checkpoint: str | None = None,
) -> Features:
    """Per-example, per-loop-step features of the body gradient.

    Args:
        model: the looped model; ``loss_fn(model, batch)`` runs it.
        loader: batches in dataset order (a DataLoader with ``shuffle=False`` or any iterable).
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses (examples must not interact).
        step_module: the module whose every forward call is one loop iteration (its parameters are the
            body). For iterations spanning several modules, pass ``body=`` and mark iterations in the
            model with :func:`looptrace.loop_step`.
        body: the modules whose parameters are attributed (default: ``step_module``).
        sketch: the projection; ``SketchSpec.exact()`` gives the full per-step gradients.
        tau: the declared number of loop steps; a batch that runs a different number raises.
            By default the largest observed, and shorter batches are zero-padded.
        per_step: keep ``[N, tau, D]``; ``False`` keeps only the ``[N, D]`` totals (train side of
            test-side SDI), tau times less memory.
        verify: check that the captured features add up to autograd's gradient (all body parameters,
            summed over the batch, and two single examples): ``"first"`` batch only, ``True`` every
            batch, ``False`` never. Catches weights used outside the body and broken layer rules.
        fallback: allow the exact torch.func fallback for body modules with no layer rule.
        train_mode: featurise in train mode (dropout on). Default: eval mode, restored afterwards.
        outer_path: how TensorSketch of outer products is computed: ``"auto"`` (cheaper by a cost
            model), ``"fft"`` or ``"materialize"``; all give the same numbers.
        max_memory: refuse (with the estimate) if the features would need more bytes than this
            (default: half of physical memory).
        progress: show a progress bar.
        checkpoint: an identifier stored with the features (see :func:`looptrace.attribute`).

    Returns:
        :class:`Features` with rows in loader order.
    """
    spec = sketch if sketch is not None else SketchSpec()
    roots = resolve_body(model, step_module, body)
    params: list[BodyParam] = body_parameters(model, roots)
    if not params:
        raise ConfigError("the loop body has no parameters to attribute")
    check_ties(model, roots, params)
    check_loader_order(loader)
    plan = SketchPlan.build(spec, [(bp.name, tuple(bp.param.shape)) for bp in params])
    dtype = params[0].param.dtype
    device = params[0].param.device
    if tau is not None and (not isinstance(tau, int) or tau < 1):
        raise ConfigError(f"tau must be a positive int, got {tau!r}")
    limit = max_memory if max_memory is not None else _physical_memory() // 2
    n_total = len(getattr(loader, "dataset", ())) if hasattr(loader, "dataset") else None

    def check_memory(steps: int) -> None:
        """Refuse up front, with the estimate, features that would not fit in ``limit`` bytes."""
        assert n_total
        need = estimate_bytes(n_total, steps, plan.dim, dtype, per_step)
        if need > limit:
            raise MemoryBudgetError(
                f"features for {n_total} examples x {steps} steps x D={plan.dim} would take {_fmt_bytes(need)} "
                f"(limit {_fmt_bytes(limit)}); lower SketchSpec.dim, pass per_step=False, featurise in "
                "shards into a feature store, or raise max_memory"
            )

    if n_total and tau is not None:
        check_memory(tau)

    tracer = Tracer(model, roots, plan, params, step_module, fallback=fallback, outer_path=outer_path)
    was_training = model.training
    saved_flags = [(bp.param, bp.param.requires_grad) for bp in params]
    chunks: list[torch.Tensor] = []
    loss_chunks: list[torch.Tensor] = []
    structure: Any = None
    body_list = [bp.param for bp in params]
    names = [bp.name for bp in params]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_total or None, desc="featurize", unit="ex")

    def one_batch(batch: Any, bi: int, check: bool, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward with capture, and optional verification of one batch."""
        tracer.begin_batch()
        with torch.enable_grad():
            losses = validate_losses(loss_fn(model, batch), batch)
        b = int(losses.shape[0])
        if tracer.max_step == 0:
            raise StepError(
                "the step module never ran (no loop step was observed); pass the module that is "
                "called once per iteration as step_module=, or mark iterations with looptrace.loop_step()"
            )
        steps = tracer.max_step
        if tau is not None and steps != tau:
            raise StepError(
                f"batch {bi} ran {steps} loop steps but tau={tau} was declared; pass the true tau "
                "(or tau=None to use the observed count)"
            )
        if per_step and n_total and bi == 0:
            check_memory(steps)
        feats = torch.zeros(b, steps, plan.dim, dtype=dtype, device=device)
        tracer.feats = feats
        tracer.batch_size = b
        tracer.phase = "backward"
        anchors = list(tracer.anchors.values())
        inputs = anchors + (body_list if check else [])
        grads: tuple[torch.Tensor | None, ...] = ()
        if inputs:
            grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True, retain_graph=check)
        if tracer.recompute_fired:
            raise StepError(
                "reentrant activation checkpointing recomputes the body inside backward, where its "
                "steps cannot be told apart; use torch.utils.checkpoint(..., use_reentrant=False)"
            )
        if check and inputs:
            tracer.phase = "verify"
            total = dict(zip(names, grads[len(anchors) :], strict=True))
            _compare(plan, _sketch_grads(plan, total, dtype, device), feats.sum((0, 1)), "the batch's summed features")
            for i in sorted({0, b - 1}):
                gi = torch.autograd.grad(losses[i], body_list, allow_unused=True, retain_graph=i != b - 1)
                _compare(
                    plan,
                    _sketch_grads(plan, dict(zip(names, gi, strict=True)), dtype, device),
                    feats[i].sum(0),
                    f"example {used + i}'s features",
                )
        tracer.phase = "idle"
        return feats, losses.detach()

    def run_batch(batch: Any, bi: int, check: bool, used: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``one_batch``, halving the batch and retrying (with a warning) on accelerator out-of-memory."""
        try:
            return [one_batch(batch, bi, check, used)]
        except torch.OutOfMemoryError:
            tracer.phase = "idle"
            tracer.feats = None
            n = _leading_size(batch)
            if n is None or n < 2:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = n // 2
            warnings.warn(
                f"out of memory on batch {bi} ({n} examples); retrying it in chunks of {half} and {n - half}",
                RuntimeWarning,
                stacklevel=3,
            )
            first, second = _slice_batch(batch, 0, half), _slice_batch(batch, half, n)
            return run_batch(first, bi, check, used) + run_batch(second, bi, False, used + half)

    try:
        model.train(train_mode)
        for p, _ in saved_flags:
            p.requires_grad_(True)
        tracer.install()
        used = 0
        for bi, batch in enumerate(loader):
            s = _batch_structure(batch)
            if structure is None:
                structure = s
            elif s != structure:
                raise LoaderError(
                    f"batch {bi} has a different structure from batch 0 ({s} vs {structure}); "
                    "yield batches of one consistent type"
                )
            batch = _to_device(batch, device)
            check = verify is True or (verify == "first" and bi == 0)
            for feats, losses in run_batch(batch, bi, check, used):
                chunks.append(feats if per_step else feats.sum(1))
                loss_chunks.append(losses)
                used += int(losses.shape[0])
                if bar is not None:
                    bar.update(int(losses.shape[0]))
    finally:
        tracer.phase = "idle"
        tracer.remove()
        model.train(was_training)
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        if bar is not None:
            bar.close()
    if not chunks:
        raise LoaderError("the loader yielded no batches")
    losses_all = torch.cat(loss_chunks)
    if per_step:
        if len(chunks) == 1:  # no copy: exact features can be most of the memory
            return Features(chunks[0], spec, plan.describe(), losses_all, checkpoint)
        t_max = max(c.shape[1] for c in chunks)
        out = torch.zeros(sum(c.shape[0] for c in chunks), t_max, plan.dim, dtype=dtype, device=device)
        row = 0
        chunks.reverse()
        while chunks:  # free each chunk once copied: the peak is the output plus one chunk
            c = chunks.pop()
            out[row : row + c.shape[0], : c.shape[1]] = c
            row += c.shape[0]
            del c
        return Features(out, spec, plan.describe(), losses_all, checkpoint)
    return Features(None, spec, plan.describe(), losses_all, checkpoint, _total=torch.cat(chunks))

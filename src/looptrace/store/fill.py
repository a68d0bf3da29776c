"""Filling a feature store: every checkpoint's train and query features, shard by shard, resumable,
split across ``torch.distributed`` ranks."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from looptrace.capture.tracer import body_parameters
from looptrace.errors import ConfigError, StepError
from looptrace.featurize import LossFn, featurize, resolve_body
from looptrace.influence.checkpoints import Checkpoint, load_into
from looptrace.sketch.plan import SketchPlan
from looptrace.sketch.spec import SketchSpec
from looptrace.store.distributed import mine, rank_and_world
from looptrace.store.shards import dataset_fingerprint
from looptrace.store.store import OUTSIDE_DIR, ROLES, FeatureStore

#: featurize() options that change the numbers; the store records them and refuses a mix.
RECORDED_OPTIONS = ("tau", "train_mode", "outer_path", "autocast", "precondition")


def featurize_to_store(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    datasets: dict[str, Any],
    loss_fn: LossFn,
    store_dir: str | os.PathLike[str],
    *,
    step_module: nn.Module | Sequence[nn.Module] | None = None,
    body: nn.Module | Sequence[nn.Module] | None = None,
    sketch: SketchSpec | None = None,
    batch_size: int = 64,
    shard_size: int = 1024,
    dtype: str = "float32",
    collate_fn: Callable[[list[Any]], Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
    positions: int | None = None,
    outside: bool = False,
    **featurize_kwargs: Any,
) -> FeatureStore:
    """Featurise ``datasets`` (``{"train": ds, "query": ds}``) at every checkpoint into a store.

    Train rows keep only step totals ``[n, D]``; query rows keep ``[n, tau, D]``. Done shards are
    skipped (resume); with ``rank``/``world_size`` (default: torch.distributed's) this process does
    shards ``i`` with ``i % world_size == rank``. Each checkpoint is loaded once per process. The
    featurisation options that change the numbers (``tau``, ``train_mode``, ``outer_path``) are
    recorded in the manifest; reopening the store with other values raises.

    ``positions=k`` also keeps, for every training example, its per-position features (``featurize(positions=True)``)
    ragged: only its real positions (up to its last position with a nonzero term: padding gets none), summed over
    spans of ``k`` consecutive positions to bound the size (``1``: every position); read them with
    :meth:`FeatureStore.read_positions` or :func:`looptrace.store.position_scores`.

    ``outside=True`` also featurises the parameters outside the loop body (read-in, read-out, final norm:
    :func:`looptrace.outside_modules`) into a companion store under ``outside/`` (:meth:`FeatureStore.outside`), as
    ``attribute(outside=True)`` does: one pass per call of the model, their own feature space (the same spec), so
    ``score_to_disk(kind="total")`` gives the whole model's score and a preconditioner treats them as their own
    block. ``tau`` and ``recompute`` apply to the loop only; ``positions`` to the body's store only.
    """
    spec = sketch if sketch is not None else SketchSpec()
    precondition = featurize_kwargs.pop("precondition", None)
    if precondition not in (None, "adam"):
        raise ConfigError(f"precondition must be None or 'adam' for a store, got {precondition!r}")
    rank, world = rank_and_world(rank, world_size)
    bad = sorted(set(datasets) - set(ROLES))
    if bad:
        raise ConfigError(f"dataset roles must be among {ROLES}, got {bad}")
    full = [c.load_full() for c in checkpoints]
    params = body_parameters(model, resolve_body(model, step_module, body))
    from looptrace.influence.attribute import outside_run_modules

    mods = outside_run_modules(model, step_module, body) if outside else []
    wanted = [bp.name for bp in params] + [bp.name for bp in body_parameters(model, mods)]
    # Adam needs every checkpoint's moments of every featurised parameter: checked before a new store is started
    # (a reopened one is first checked against its manifest, which names a changed option)
    existed = (Path(store_dir) / "manifest.json").exists()
    if precondition == "adam" and not existed:
        for ck in full:
            ck.adam_geometry(wanted)
    loaded = [(f.state, f.lr, f.name) for f in full]
    meta = [{"index": i, "name": name, "eta": eta} for i, (_, eta, name) in enumerate(loaded)]
    # the feature layout comes from the plan alone: no featurisation is needed to create the store
    layout = SketchPlan.build(spec, [(bp.name, tuple(bp.param.shape)) for bp in params]).describe()
    options = {k: featurize_kwargs.get(k, _DEFAULTS[k]) for k in RECORDED_OPTIONS}
    options["precondition"] = precondition
    options["autocast"] = None if options["autocast"] is None else str(options["autocast"]).removeprefix("torch.")
    if positions is not None and (isinstance(positions, bool) or not isinstance(positions, int) or positions < 1):
        raise ConfigError(f"positions must be a span of k >= 1 positions, got {positions!r}")
    if positions is not None:
        options["positions"] = positions
    dmeta = {role: {"n": len(ds), "fingerprint": dataset_fingerprint(ds)} for role, ds in datasets.items()}
    store = FeatureStore.open(
        store_dir, spec=spec, layout=layout, checkpoints=meta, datasets=dmeta, shard_size=shard_size, dtype=dtype,
        options=options,
    )  # fmt: skip
    if precondition == "adam" and existed:
        for ck in full:
            ck.adam_geometry(wanted)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        for k, (state, _eta, name) in enumerate(loaded):
            todo = [
                (role, start, stop)
                for role in datasets
                for i, (start, stop) in enumerate(store.shard_ranges(role))
                if mine(i, rank, world) and not store.is_done(k, role, start, stop)
            ]
            if not todo:
                continue
            load_into(model, state, name)
            kw = dict(featurize_kwargs)
            if precondition == "adam":
                kw["precondition"] = full[k].adam_geometry([bp.name for bp in params])
            for role, start, stop in todo:
                subset = torch.utils.data.Subset(datasets[role], range(start, stop))
                loader = torch.utils.data.DataLoader(
                    subset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn
                )
                by_position = positions is not None and role == "train"
                f = featurize(
                    model, loader, loss_fn, step_module=step_module, body=body, sketch=spec, per_step=role == "query",
                    checkpoint=name, progress=progress, positions=by_position, **kw,
                )  # fmt: skip
                rows = f.require_steps("query features") if role == "query" else f.total
                ragged = ragged_positions(f.require_positions("the store"), positions) if by_position else None
                store.write_shard(k, role, start, stop, rows, f.losses, ragged)
    finally:
        model.load_state_dict(original)
    if outside:  # the companion store: the model as one "step" per forward, the modules outside the body its "body"
        from looptrace.influence.attribute import LOOP_ONLY_OPTIONS, outside_refused

        kw = {k: v for k, v in featurize_kwargs.items() if k not in LOOP_ONLY_OPTIONS}
        try:
            featurize_to_store(
                model, checkpoints, datasets, loss_fn, store.root / OUTSIDE_DIR, step_module=model, body=mods,
                sketch=spec, batch_size=batch_size, shard_size=shard_size, dtype=dtype, collate_fn=collate_fn,
                rank=rank, world_size=world, progress=progress, precondition=precondition, **kw,
            )  # fmt: skip
        except StepError as exc:
            raise outside_refused(exc) from exc
    return store


_DEFAULTS: dict[str, Any] = {
    "tau": None,
    "train_mode": False,
    "outer_path": "auto",
    "autocast": None,
    "precondition": None,
}


def ragged_positions(positions: torch.Tensor, span: int | None = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, L, D]`` per-position features -> ``(rows [R, D], offsets [n + 1])``: each example's real positions
    (up to its last position with a nonzero term), summed over spans of ``span`` consecutive positions."""
    span = span or 1
    n, length, dim = positions.shape
    nonzero = (positions != 0).any(-1)  # [n, L]
    last = torch.where(nonzero, torch.arange(length, device=positions.device), -1).amax(1)  # [n]
    counts = (last + 1 + span - 1) // span  # spans per example (0 when no position has a term)
    pad = (-length) % span
    spans = torch.nn.functional.pad(positions, (0, 0, 0, pad)).reshape(n, -1, span, dim).sum(2)  # [n, ceil(L/k), D]
    keep = torch.arange(spans.shape[1], device=positions.device)[None, :] < counts[:, None]
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0).cpu()
    return spans[keep], offsets

"""Curvature beside a feature store, and the preconditioned query side of its scores.

Layout (next to the shards)::

    store/curvature/ck000.safetensors        K-FAC / EK-FAC factors of checkpoint 0 (float64)
    store/curvature/ck000.safetensors.json   sidecar: blocks, Fisher, sha256, the store's model and train set

Training shards are never rewritten: a preconditioned score needs only new query features. K-FAC /
EK-FAC recompute the queries' exact per-step gradients from the model (few queries, one batch at a time),
precondition them with the stored factors and sketch them with the store's spec; Gauss-Newton needs no
model (its matrix comes from the stored training totals).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from looptrace.curvature.factors import Curvature, sidecar_path
from looptrace.curvature.fit import Fisher, check_max_examples, fit_curvature, resolve_fisher
from looptrace.curvature.query import gauss_newton, preconditioned_features
from looptrace.errors import ConfigError, SpecMismatchError
from looptrace.featurize import LossFn
from looptrace.influence.attribute import outside_modules
from looptrace.influence.checkpoints import Checkpoint, load_into
from looptrace.store.retrieval import _query_steps
from looptrace.store.shards import dataset_fingerprint
from looptrace.store.store import OUTSIDE_DIR, FeatureStore

#: Preconditioners a store can score with (``None``: plain TracIn / SDI).
STORE_PRECONDITIONERS = ("kfac", "ekfac", "gauss-newton")


def curvature_path(store: FeatureStore, ck: int) -> Path:
    return store.root / "curvature" / f"ck{ck:03d}.safetensors"


def _check_checkpoints(store: FeatureStore, checkpoints: Sequence[Checkpoint]) -> list[Any]:
    full = [c.load_full() for c in checkpoints]
    have = [c["name"] for c in store.checkpoints]
    if [f.name for f in full] != have:
        raise SpecMismatchError(
            f"the checkpoints {[f.name for f in full][:3]}... are not the store's {have[:3]}...; "
            "pass the checkpoints the store was featurised with"
        )
    return full


def fit_curvature_to_store(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    dataset: Any,
    loss_fn: LossFn,
    store_dir: str | os.PathLike[str],
    *,
    step_module: nn.Module | None = None,
    body: nn.Module | Sequence[nn.Module] | None = None,
    batch_size: int = 64,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    fisher: Fisher | None = None,
    fisher_loss: LossFn | None = None,
    seed: int = 0,
    max_examples: int | None = None,
) -> list[Path]:
    """Fit K-FAC and EK-FAC factors of every checkpoint of the store on its training set, beside it (and beside
    its companion store of the parameters outside the loop, when it has one: their own block).

    A checkpoint whose factor file and sidecar exist, fitted with the same Fisher, seed and ``max_examples``, is
    skipped (resume); one fitted otherwise is fitted again. The training set must be the one
    the store was featurised with (its fingerprint is checked). ``max_examples``: fit on its first this many
    examples only (:func:`looptrace.curvature.fit_curvature`), recorded in each factor file's sidecar."""
    store = FeatureStore.open(store_dir)
    want = store.manifest["datasets"].get("train", {}).get("fingerprint")
    if want is None:
        raise ConfigError(f"{store.root} has no training features; featurise the train set first")
    if dataset_fingerprint(dataset) != want:
        raise SpecMismatchError(f"this training set is not the one {store.root} was featurised with")
    full = _check_checkpoints(store, checkpoints)
    options = store.options
    which = resolve_fisher(fisher, fisher_loss, loss_fn)[0]
    check_max_examples(max_examples)
    size = len(dataset) if hasattr(dataset, "__len__") else None
    if max_examples is not None and size is not None and max_examples >= size:
        max_examples = None  # every example: the same fit as without a limit
    settings = _settings(which, seed, max_examples)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = []
    try:
        for k, ck in enumerate(full):
            path = curvature_path(store, k)
            paths.append(path)
            side = sidecar_path(path)
            if path.exists() and side.exists() and _sidecar_settings(side) == settings:
                continue
            load_into(model, ck.state, ck.name)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
            curv = fit_curvature(model, loader, loss_fn, step_module=step_module, body=body, fisher=fisher,
                                 fisher_loss=fisher_loss, seed=seed, checkpoint=ck.name, max_examples=max_examples,
                                 train_mode=bool(options.get("train_mode", False)), tau=options.get("tau"))  # fmt: skip
            curv.save(path, extra={"model_fingerprint": store.manifest["model_fingerprint"], "dataset": want,
                                   "checkpoint_index": k, "seed": seed, "max_examples": max_examples})  # fmt: skip
    finally:
        model.load_state_dict(original)
    if (store.root / OUTSIDE_DIR / "manifest.json").exists():  # the parameters outside the body: their own block
        mods = outside_modules(model, step_module, body)
        paths += fit_curvature_to_store(
            model, checkpoints, dataset, loss_fn, store.root / OUTSIDE_DIR, step_module=model, body=mods,
            batch_size=batch_size, collate_fn=collate_fn, fisher=fisher, fisher_loss=fisher_loss, seed=seed,
            max_examples=max_examples,
        )  # fmt: skip
    return paths


def _settings(fisher: str | None, seed: Any, max_examples: Any) -> tuple[Any, ...]:
    """What makes two fits of one checkpoint differ: the Fisher, the seed (which draws a true Fisher's targets
    only) and ``max_examples``."""
    return (fisher, seed if fisher == "true" else None, max_examples)


def _sidecar_settings(side: Path) -> tuple[Any, ...] | None:
    """The fit settings a factor file's sidecar records (``None``: unreadable; a sidecar from before
    ``max_examples`` was recorded fitted every example)."""
    try:
        got = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    return _settings(got.get("fisher"), got.get("seed"), got.get("max_examples"))


def check_one_fit(store: FeatureStore) -> None:
    """Refuse factor files of one store, or of a store and its companion of the parameters outside the loop, that
    were fitted with different settings (a rerun of ``looptrace fit-curvature`` with other flags, interrupted):
    scores would mix two preconditioners without a word."""
    stores = [store]
    if store.root.name == OUTSIDE_DIR and (store.root.parent / "manifest.json").exists():
        stores.append(FeatureStore.open(store.root.parent))
    elif (store.root / OUTSIDE_DIR / "manifest.json").exists():
        stores.append(store.outside())
    sides = [sidecar_path(curvature_path(s, k)) for s in stores for k in range(len(s.checkpoints))]
    seen = {_sidecar_settings(side) for side in sides if side.exists()}
    if len(seen) > 1:
        raise ConfigError(
            f"the curvature factors under {store.root} were fitted with different settings (Fisher, seed, "
            f"max_examples: {sorted(map(str, seen))}); rerun `looptrace fit-curvature` with one set of flags"
        )


def load_store_curvature(store: FeatureStore, ck: int) -> Curvature:
    """Checkpoint ``ck``'s factors, refusing factors of another model body or training set."""
    curv, side = Curvature.load(curvature_path(store, ck))
    if side.get("model_fingerprint") != store.manifest["model_fingerprint"]:
        raise SpecMismatchError(f"the curvature of checkpoint {ck} was fitted on another model body than the store's")
    if side.get("dataset") != store.manifest["datasets"].get("train", {}).get("fingerprint"):
        raise SpecMismatchError(f"the curvature of checkpoint {ck} was fitted on another training set")
    return curv


def preconditioned_queries(
    store: FeatureStore,
    precondition: str,
    damping: float | None = None,
    *,
    model: nn.Module | None = None,
    checkpoints: Sequence[Checkpoint] | None = None,
    dataset: Any = None,
    loss_fn: LossFn | None = None,
    step_module: nn.Module | None = None,
    body: nn.Module | Sequence[nn.Module] | None = None,
    batch_size: int = 64,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> list[np.ndarray]:
    """Per checkpoint, the queries' preconditioned per-step features ``[M, tau, D]`` (float64) in the store's
    feature space, for :func:`looptrace.store.score_to_disk` (``queries=``). ``"gauss-newton"`` reads the
    store only; ``"kfac"`` / ``"ekfac"`` need the model, checkpoints, query dataset and loss."""
    if precondition not in STORE_PRECONDITIONERS:
        raise ConfigError(f"precondition must be one of {STORE_PRECONDITIONERS}, got {precondition!r}")
    n_ck = len(store.checkpoints)
    if precondition == "gauss-newton":
        out = []
        for k in range(n_ck):
            phi = torch.from_numpy(store.read(k, "train").astype(np.float64))
            out.append(gauss_newton(phi, torch.from_numpy(_query_steps(store, k)), damping).numpy())
        return out
    if model is None or checkpoints is None or dataset is None or loss_fn is None:
        raise ConfigError(f"precondition={precondition!r} recomputes the queries' gradients: pass the model, "
                          "checkpoints, query dataset and loss")  # fmt: skip
    if dataset_fingerprint(dataset) != store.manifest["datasets"].get("query", {}).get("fingerprint"):
        raise SpecMismatchError(f"this query set is not the one {store.root} was featurised with")
    full = _check_checkpoints(store, checkpoints)
    check_one_fit(store)
    options = store.options
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    try:
        for k, ck in enumerate(full):
            curv = load_store_curvature(store, k)
            load_into(model, ck.state, ck.name)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
            f = preconditioned_features(
                model, loader, loss_fn, lambda g, c=curv: c.precondition(g, precondition, damping),  # type: ignore[misc]
                step_module=step_module, body=body, sketch=store.spec, checkpoint=ck.name, verify=k == 0 and "first",
                tau=options.get("tau"), train_mode=bool(options.get("train_mode", False)),
            )  # fmt: skip
            out.append(f.require_steps("preconditioned queries").double().cpu().numpy())
    finally:
        model.load_state_dict(original)
    return out

"""Fitting K-FAC / EK-FAC factors of a looped body on a training set: two passes.

Pass 1 (forward + backward of the fitting loss, no per-example work): a forward hook on every body
``nn.Linear`` keeps each call's input rows ``a`` and hooks the call's output, whose gradient is the rows'
backprop signals ``g``; every call is one loop step (or one of several uses within a step), so the rows
of every step and every token are pooled into ``A`` and ``S`` (:mod:`looptrace.curvature.blocks`). A row
whose signal is exactly zero (a step cut by truncated BPTT, a step after an example's read-out) adds
nothing to the tied gradient and is left out of ``A``.

Pass 2 (EK-FAC, and the diagonal blocks): the exact per-example *tied* gradients (summed over steps,
:func:`looptrace.featurize` with the exact spec, batch by batch), rotated into each Linear's Kronecker
eigenbasis and squared; the other body parameters' squared gradients.

The Fisher: ``"empirical"`` uses the loss on the data's own targets; ``"true"`` uses ``fisher_loss``, the
user's loss with targets *sampled from the model* (for a softmax output, :func:`sampled_cross_entropy`).
Sampling draws from torch's default generator, which the fit seeds per batch from ``(seed, batch index)``
(forked, so the caller's random state is untouched): both passes see the same targets, and a fit is
reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from looptrace.capture.tracer import BodyParam, body_parameters, check_ties
from looptrace.curvature.blocks import KINDS, DiagonalBlock, KroneckerBlock
from looptrace.curvature.factors import Curvature
from looptrace.errors import ConfigError
from looptrace.featurize import LossFn, check_loader_order, featurize, resolve_body, validate_losses
from looptrace.sketch.spec import SketchSpec

Fisher = Literal["true", "empirical"]


def sampled_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits [..., C]`` against targets drawn from ``softmax(logits)`` (no gradient
    through the draw), one loss per position ``[...]``: the building block of a true-Fisher ``fisher_loss``.
    Average the positions of each example as your loss does."""
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        target = torch.multinomial(torch.softmax(flat.float(), dim=-1), 1)[:, 0]
    return nn.functional.cross_entropy(flat, target, reduction="none").reshape(logits.shape[:-1])


def resolve_fisher(fisher: str | None, fisher_loss: LossFn | None, loss_fn: LossFn) -> tuple[Fisher, LossFn]:
    """Which Fisher, and the loss that fits it. ``fisher=None``: ``"true"`` when ``fisher_loss`` (targets
    sampled from the model) is given, else ``"empirical"`` (a general per-example loss gives no way to sample
    targets)."""
    if fisher is None:
        fisher = "true" if fisher_loss is not None else "empirical"
    if fisher == "true":
        if fisher_loss is None:
            raise ConfigError(
                "fisher='true' samples targets from the model: pass fisher_loss=(model, batch) -> per-example loss "
                "on sampled targets (e.g. built on looptrace.curvature.sampled_cross_entropy), or fisher='empirical'"
            )
        return "true", fisher_loss
    if fisher == "empirical":
        if fisher_loss is not None:
            raise ConfigError("fisher='empirical' uses loss_fn on the data's targets; drop fisher_loss or use 'true'")
        return "empirical", loss_fn
    raise ConfigError(f"fisher must be 'true', 'empirical' or None, got {fisher!r}")


@dataclasses.dataclass
class _Seeded:
    """The fitting loss with torch's generator seeded from (seed, batch index) around every call."""

    loss_fn: LossFn
    seed: int
    device: torch.device
    index: int = 0

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + self.index)
            return self.loss_fn(model, batch)


@dataclasses.dataclass
class _RowStats:
    """Running sums of ``a a^T`` and ``g g^T`` over one Linear's rows (float64)."""

    a: torch.Tensor
    s: torch.Tensor
    bias: bool
    rows: int = 0

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()
        g2 = g.reshape(-1, g.shape[-1]).double()
        live = g2.ne(0).any(1)  # rows with no backprop signal contribute nothing to the tied gradient
        x2, g2 = x2[live], g2[live]
        if self.bias:
            x2 = torch.cat([x2, x2.new_ones(x2.shape[0], 1)], dim=1)
        self.a += x2.T @ x2
        self.s += g2.T @ g2
        self.rows += int(x2.shape[0])


def body_linears(model: nn.Module, roots: list[nn.Module], params: list[BodyParam]) -> list[tuple[str, nn.Linear]]:
    """The body's ``nn.Linear`` modules that own their weight (and bias) alone: each gets a Kronecker block.
    A Linear whose weight another body module also owns (two modules, one tensor) gets diagonal blocks."""
    body_ids = {id(bp.param) for bp in params}
    mod_names = {id(m): n for n, m in model.named_modules()}
    owners: dict[int, set[int]] = {}
    for root in roots:
        for mod in root.modules():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(id(mod))
    out: list[tuple[str, nn.Linear]] = []
    seen: set[int] = set()
    for root in roots:
        for mod in root.modules():
            if id(mod) in seen or type(mod) is not nn.Linear:
                continue
            seen.add(id(mod))
            own = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
            if all(id(p) in body_ids and owners[id(p)] == {id(mod)} for p in own):
                out.append((mod_names.get(id(mod), type(mod).__name__), mod))
    return out


@contextlib.contextmanager
def _fitting(model: nn.Module, params: list[BodyParam], train_mode: bool) -> Iterator[None]:
    was_training = model.training
    flags = [(bp.param, bp.param.requires_grad) for bp in params]
    try:
        model.train(train_mode)
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def _kronecker_pass(
    model: nn.Module,
    loader: Iterable[Any],
    loss: _Seeded,
    linears: list[tuple[str, nn.Linear]],
    params: list[BodyParam],
    device: torch.device,
) -> tuple[list[_RowStats], int]:
    """Pass 1: ``sum a a^T`` and ``sum g g^T`` over every row of every call of every body Linear."""
    stats = []
    for _, mod in linears:
        d_in = mod.in_features + (1 if mod.bias is not None else 0)
        z = torch.zeros
        stats.append(_RowStats(z(d_in, d_in, dtype=torch.float64, device=device),
                               z(mod.out_features, mod.out_features, dtype=torch.float64, device=device),
                               mod.bias is not None))  # fmt: skip

    def hook(mod: nn.Module, args: Any, kwargs: Any, output: Any, st: _RowStats) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        x = (args[0] if args else kwargs["input"]).detach()
        output.register_hook(lambda g: st.add(x, g.detach()))

    handles = [
        mod.register_forward_hook(lambda m, a, k, o, st=st: hook(m, a, k, o, st), with_kwargs=True)
        for (_, mod), st in zip(linears, stats, strict=True)
    ]
    n = 0
    try:
        for index, batch in enumerate(loader):
            loss.index = index
            with torch.enable_grad():
                losses = validate_losses(loss(model, batch), batch)
                torch.autograd.grad(losses.sum(), [bp.param for bp in params], allow_unused=True)
            n += int(losses.shape[0])
    finally:
        for h in handles:
            h.remove()
    return stats, n


def fit_curvature(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    step_module: nn.Module | None = None,
    body: nn.Module | Sequence[nn.Module] | None = None,
    kinds: Sequence[str] = KINDS,
    fisher: Fisher | None = None,
    fisher_loss: LossFn | None = None,
    seed: int = 0,
    train_mode: bool = False,
    checkpoint: str | None = None,
    **featurize_kwargs: Any,
) -> Curvature:
    """K-FAC / EK-FAC factors of the body at the model's current weights, fitted on ``loader``.

    Args:
        model, loader, loss_fn, step_module, body: as for :func:`looptrace.featurize` (``loss_fn`` gives the
            empirical Fisher).
        kinds: ``"kfac"`` and/or ``"ekfac"``; EK-FAC needs the second pass, K-FAC only when the body has
            parameters outside Linear layers (their diagonal blocks).
        fisher, fisher_loss: see :func:`resolve_fisher`.
        seed: seeds the target sampling of a true Fisher.
        train_mode: fit in train mode (dropout on); default eval mode, as featurisation.
        featurize_kwargs: passed to the pass-2 featurisation (``tau``, ``recompute``, ``fallback``, ...).

    Returns:
        :class:`Curvature` with every body parameter in exactly one block (eigendecomposed in float64).
    """
    bad = sorted(set(kinds) - set(KINDS))
    if bad or not kinds:
        raise ConfigError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    kind_set = tuple(k for k in KINDS if k in kinds)
    which, fit_loss = resolve_fisher(fisher, fisher_loss, loss_fn)
    roots = resolve_body(model, step_module, body)
    params = body_parameters(model, roots)
    if not params:
        raise ConfigError("the loop body has no parameters to fit curvature for")
    check_ties(model, roots, params)
    check_loader_order(loader)
    device = params[0].param.device
    linears = body_linears(model, roots, params)
    names = {id(bp.param): bp.name for bp in params}
    seeded = _Seeded(fit_loss, seed, device)
    with _fitting(model, params, train_mode):
        stats, n = _kronecker_pass(model, loader, seeded, linears, params, device)
    if n == 0:
        raise ConfigError("the fitting loader yielded no examples")
    kron = []
    for (mname, mod), st in zip(linears, stats, strict=True):
        if st.rows == 0:
            raise ConfigError(f"body layer {mname!r} got no gradient on the fitting set; it cannot get a K-FAC block")
        blk = KroneckerBlock(mname, names[id(mod.weight)], None if mod.bias is None else names[id(mod.bias)],
                             st.a / st.rows, st.s / n, st.rows)  # fmt: skip
        blk.eigendecompose()
        kron.append(blk)
    in_kron = {b.weight for b in kron} | {b.bias for b in kron if b.bias is not None}
    layout = sorted((bp.name, tuple(bp.param.shape)) for bp in params)
    diag = [DiagonalBlock(name, torch.zeros(shape, dtype=torch.float64, device=device))
            for name, shape in layout if name not in in_kron]  # fmt: skip
    curv = Curvature(layout, kron, diag, which, n, kind_set, checkpoint)
    if "ekfac" in kind_set or diag:
        _eigen_pass(model, loader, seeded, curv, step_module, body, train_mode, "ekfac" in kind_set, featurize_kwargs)
    return curv


def _eigen_pass(
    model: nn.Module,
    loader: Iterable[Any],
    loss: _Seeded,
    curv: Curvature,
    step_module: nn.Module | None,
    body: nn.Module | Sequence[nn.Module] | None,
    train_mode: bool,
    ekfac: bool,
    featurize_kwargs: dict[str, Any],
) -> None:
    """Pass 2: E_n[(Q_S^T G_n Q_A)^2] for every Kronecker block and E_n[g_n^2] for the diagonal ones, from
    the exact per-example tied gradients G_n (a one-batch exact featurisation at a time)."""
    off = curv.offsets
    if ekfac:
        for blk in curv.kronecker:
            blk.ekfac = torch.zeros(blk.shape, dtype=torch.float64, device=blk.a_cov.device)
    kw = {k: v for k, v in featurize_kwargs.items() if k not in ("sketch", "per_step", "verify", "checkpoint")}
    for index, batch in enumerate(loader):
        loss.index = index
        g = featurize(model, [batch], loss, step_module=step_module, body=body, sketch=SketchSpec.exact(),
                      per_step=False, verify=False, train_mode=train_mode, **kw).total.double()  # fmt: skip
        for blk in curv.kronecker if ekfac else []:
            assert blk.ekfac is not None
            d_out = blk.shape[0]
            w0, wn = off[blk.weight]
            parts = [g[:, w0 : w0 + wn].reshape(-1, d_out, wn // d_out)]
            if blk.bias is not None:
                b0, bn = off[blk.bias]
                parts.append(g[:, b0 : b0 + bn].reshape(-1, d_out, 1))
            blk.ekfac += blk.rotate(torch.cat(parts, dim=2).to(blk.ekfac.device)).square().sum(0)
        for dia in curv.diagonal:
            s0, sn = off[dia.name]
            dia.diag += g[:, s0 : s0 + sn].square().sum(0).reshape(dia.diag.shape).to(dia.diag.device)
    for blk in curv.kronecker if ekfac else []:
        assert blk.ekfac is not None
        blk.ekfac /= curv.n
    for dia in curv.diagonal:
        dia.diag /= curv.n

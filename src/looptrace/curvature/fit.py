"""Fitting K-FAC / EK-FAC factors of a looped body on a training set: two passes.

Pass 1 (forward + backward of the fitting loss, no per-example work): a forward hook on every body
``nn.Linear`` keeps each call's input rows ``a`` and its output; autograd is asked for the outputs'
gradients, the rows' backprop signals ``g`` (not for the weights'); every call is one loop step (or one of several uses within a step), so the rows
of every step and every token are pooled into ``A`` and ``S`` (:mod:`looptrace.curvature.blocks`). A row
whose signal is exactly zero (a step cut by truncated BPTT, a step after an example's read-out) adds
nothing to the tied gradient and is left out of ``A``.

The diagonal blocks (body parameters outside Linear layers: norms, embeddings) are fitted in the same pass:
forward hooks on the modules that own them save what their layer rule (:mod:`looptrace.capture.rules`)
needs, autograd returns their outputs' gradients with the Linear outputs', and the rule turns each call's
signal into per-example gradients, summed over the calls (the tied gradient) and squared. Where the modules
that read those parameters are found by one extra forward of the first batch (a parent may read a child's
weight), a module with no rule, a parameter read outside its own module's forward, outputs that are not
batch-first, or a failed grouping check send the diagonal blocks through one exact featurisation of just the
modules that read them instead.

The grouping check: EK-FAC and the diagonal blocks group rows by example (the rows' first axis). On the first
batch of pass 1 (every batch with ``verify=True``), autograd also returns the parameters' gradient of
``sum_n w_n loss_n`` for random weights ``w`` (one more backward of that batch), and the rows grouped by
example must give the same ``sum_n w_n G_n``; rows that are not batch-first (``[L, B, d]`` even with
``L == B``) or a rule that groups wrongly fail it and take the exact route.

Pass 2 (EK-FAC only): the per-example *tied* gradients (summed over steps) in each Linear's Kronecker
eigenbasis, squared and averaged. Per layer, whichever costs fewer flops (:func:`gradient_first`): each
example's tied gradient ``G = sum g a^T`` is formed (in pass 1) and rotated, ``Q_S^T G Q_A``, or its rows are
rotated first and ``(Q_S^T g)(Q_A^T a)^T`` summed over the calls. Pass 1 keeps those gradients or rows when
they fit ``keep_rows_bytes`` (1 GiB by default), so pass 2 rotates them without running the model again; past
the budget the same hooks run on a second forward. Where the grouping check failed,
pass 2 takes the exact per-example tied gradients (:func:`looptrace.featurize`, exact spec) of every batch.

Cost: K-FAC is one forward and backward over the fitting set (no per-example work for the Linear layers; where
the body has diagonal blocks, one more forward of the first batch to find their readers, their rules and
their grouping check); EK-FAC adds the grouping check, the per-example gradients and the rotations (and, over
the budget, a second forward and backward). The measured ratios to one featurisation
pass: ``looptrace bench curvature`` (``benchmarks/results/curvature-cost.md``).

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

from looptrace.capture.rules import Rule, find_rule
from looptrace.capture.tracer import BodyParam, body_parameters, check_ties
from looptrace.capture.uses import ParamUses, innermost_owner
from looptrace.curvature.blocks import KINDS, DiagonalBlock, KroneckerBlock
from looptrace.curvature.factors import Curvature
from looptrace.errors import ConfigError, LoaderError
from looptrace.features import Features
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

    def add(self, xs: Sequence[torch.Tensor], gs: Sequence[torch.Tensor]) -> None:
        """The rows of one batch's calls (every loop step's): summed in the model's dtype over the batch (into one
        product per side, no per-call copies), then accumulated in float64. A bias column of ones enters ``A`` as
        the rows' sums and count."""
        a: torch.Tensor | None = None
        s: torch.Tensor | None = None
        col: torch.Tensor | None = None
        count = 0
        for x, g in zip(xs, gs, strict=True):
            x2 = x.reshape(-1, x.shape[-1])
            g2 = g.reshape(-1, g.shape[-1])
            live = g2.abs().amax(1) > 0  # rows with no backprop signal contribute nothing to the tied gradient
            if not bool(live.all()):
                x2, g2 = x2[live], g2[live]
            if a is None or s is None:
                a, s = x2.T @ x2, g2.T @ g2
            else:
                a.addmm_(x2.T, x2)
                s.addmm_(g2.T, g2)
            if self.bias:
                col = x2.sum(0) if col is None else col.add_(x2.sum(0))
            count += int(x2.shape[0])
        if a is None or s is None:
            return
        self.rows += count
        d = a.shape[0]
        self.a[:d, :d] += a.double()
        self.s += s.double()
        if col is not None:
            c = col.double()
            self.a[:d, d] += c
            self.a[d, :d] += c
            self.a[d, d] += count


def _by_layer(
    rows: list[tuple[int, torch.Tensor, torch.Tensor]],
) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The calls' ``(index, x, g)`` grouped by layer index: ``{index: ([x of each call], [g of each call])}``."""
    out: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for i, x, g in rows:
        xs, gs = out.setdefault(i, ([], []))
        xs.append(x)
        gs.append(g)
    return out


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


#: How many bytes of pass 1's rows EK-FAC may keep for its second pass (:func:`fit_curvature`'s default).
KEEP_ROWS_BYTES = 1 << 30

#: A diagonal-block owner fitted in pass 1: the module and its layer rule.
DiagModule = tuple[nn.Module, Rule]


@dataclasses.dataclass
class _Rows:
    """One forward and backward of the fitting loss (:func:`_linear_rows`)."""

    losses: torch.Tensor
    #: per call of a body Linear that received gradient: its layer index, input rows ``x``, output gradient ``g``
    rows: list[tuple[int, torch.Tensor, torch.Tensor]]
    #: per call of a diagonal-block owner: the owner, what its rule saved, its output gradient
    dcalls: list[tuple[DiagModule, Any, torch.Tensor]]
    #: the grouping check's random per-example weights ``w`` and autograd's ``d(sum_n w_n loss_n)/dp`` of the
    #: parameters asked for (``None``: not asked, or a parameter the loss does not reach)
    weights: torch.Tensor | None = None
    weighted: list[torch.Tensor | None] | None = None


def _linear_rows(
    model: nn.Module,
    batch: Any,
    loss: _Seeded,
    linears: list[tuple[str, nn.Linear]],
    diag: Sequence[DiagModule] = (),
    check: Sequence[torch.Tensor] = (),
) -> _Rows:
    """One forward and backward of the fitting loss: per call of a body Linear that received gradient, its
    index, input rows ``x`` and output gradient ``g``; per call of a diagonal-block owner, what its rule saved
    and its output gradient. Autograd is asked for the calls' outputs only (not the weights: no
    weight-gradient products); calls cut off from the loss (truncated BPTT) are dropped. ``check``: parameters
    whose gradient of ``sum_n w_n loss_n`` (``w`` standard normal, seeded by the batch index) autograd also
    returns, from the same forward (:func:`_grouping_ok` compares it with the rows grouped by example)."""
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    dcalls: list[tuple[DiagModule, Any, torch.Tensor]] = []

    def hook(i: int, args: Any, kwargs: Any, output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            calls.append((i, (args[0] if args else kwargs["input"]).detach(), output))

    def dhook(owner: DiagModule, args: Any, kwargs: Any, output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            dcalls.append((owner, owner[1].capture(owner[0], args, kwargs, output), output))

    handles = [mod.register_forward_hook(lambda m, a, k, o, i=i: hook(i, a, k, o), with_kwargs=True)
               for i, (_, mod) in enumerate(linears)]  # fmt: skip
    handles += [owner[0].register_forward_hook(lambda m, a, k, o, w=owner: dhook(w, a, k, o), with_kwargs=True)
                for owner in diag]  # fmt: skip
    try:
        with torch.enable_grad():
            losses = validate_losses(loss(model, batch), batch)
    finally:
        for h in handles:
            h.remove()
    if not calls and not dcalls:
        return _Rows(losses.detach(), [], [])
    outs = [c[2] for c in calls] + [c[2] for c in dcalls]
    grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True, retain_graph=bool(check))
    out = _Rows(
        losses.detach(),
        [(i, x, g) for (i, x, _), g in zip(calls, grads[: len(calls)], strict=True) if g is not None],
        [(w, saved, g) for (w, saved, _), g in zip(dcalls, grads[len(calls) :], strict=True) if g is not None],
    )
    if check:
        gen = torch.Generator(device=losses.device).manual_seed(_CHECK_SEED + loss.index)
        out.weights = torch.randn(losses.shape, generator=gen, device=losses.device, dtype=losses.dtype)
        out.weighted = list(torch.autograd.grad((losses * out.weights).sum(), list(check), allow_unused=True))
    return out


#: Seeds the grouping check's per-example weights (plus the batch index).
_CHECK_SEED = 20_241_205


def _check_params(
    linears: list[tuple[str, nn.Linear]], diag: Sequence[DiagModule], names: dict[int, str]
) -> list[torch.Tensor]:
    """The parameters :func:`_grouping_ok` compares: every Kronecker layer's weight and bias, then the diagonal
    blocks' parameters of the pass-1 owners."""
    out: list[torch.Tensor] = []
    for _, mod in linears:
        out += [mod.weight] + ([mod.bias] if mod.bias is not None else [])
    for owner, _ in diag:
        out += [p for p in owner.parameters(recurse=False) if id(p) in names and all(p is not q for q in out)]
    return out


def _grouping_ok(
    got: _Rows,
    linears: list[tuple[str, nn.Linear]],
    check: list[torch.Tensor],
    per: dict[str, torch.Tensor] | None,
    names: dict[int, str],
) -> tuple[bool, bool]:
    """Whether the rows grouped by example (their first axis) give autograd's ``sum_n w_n G_n`` for random
    ``w``: ``(Kronecker layers, diagonal blocks)``, for the parameters ``check`` (:func:`_check_params`). EK-FAC
    squares each example's tied gradient ``G_n`` in the eigenbasis, and the diagonal blocks square the layer rules' per-example gradients (``per``), so rows that are
    not batch-first (``[L, B, d]`` with ``L == B`` passes every shape test) or a rule that groups wrongly would
    be silently wrong: a wrong grouping changes the weighted sum at O(1), which a cast or summation order does
    not. Costs one more backward of the batch (to the parameters) instead of its exact per-example gradients."""
    if got.weights is None or got.weighted is None:  # no call was hooked: no rows to group, no rule to trust
        return True, False
    w, auto = got.weights, got.weighted
    size = int(w.shape[0])
    tol = 1e-6 if check[0].dtype == torch.float64 else 1e-3  # the parameters' precision, not the loss's

    def close(h: torch.Tensor, a: torch.Tensor | None) -> bool:
        if a is not None and a.numel() != h.numel():  # a rule that grouped another axis as the batch
            return False
        a = torch.zeros_like(h) if a is None else a.to(h.dtype).reshape(h.shape)
        return bool(torch.allclose(h, a, rtol=tol, atol=tol * float(a.abs().max().clamp_min(1e-30))))

    rows_ok = all(x.dim() >= 2 and x.shape[0] == size and g.shape[0] == size for _, x, g in got.rows)
    by_layer = _by_layer(got.rows) if rows_ok else {}
    at = 0
    for i, (_, mod) in enumerate(linears):
        hw = mod.weight.new_zeros(mod.weight.shape)
        hb = None if mod.bias is None else mod.bias.new_zeros(mod.bias.shape)
        for x, g in zip(*by_layer.get(i, ([], [])), strict=True):
            gw = (g * w.to(g.dtype).view(-1, *[1] * (g.dim() - 1))).reshape(-1, g.shape[-1])
            hw.addmm_(gw.T, x.reshape(-1, x.shape[-1]))
            if hb is not None:
                hb += gw.sum(0)
        rows_ok = rows_ok and close(hw, auto[at]) and (hb is None or close(hb, auto[at + 1]))
        at += 1 + (mod.bias is not None)
    if per is None:
        return rows_ok, False
    diag_ok = True
    for p, a in zip(check[at:], auto[at:], strict=True):
        h = per.get(names[id(p)])
        diag_ok = diag_ok and h is not None and close((w.double()[:, None] * h).sum(0), a)
    return rows_ok, diag_ok


class _DenseSink:
    """A layer rule's sink that materialises per-example gradients ``[B, numel]`` (float64) of the parameters it
    is asked for, summed over every call of the batch (the tied gradient)."""

    def __init__(self, names: dict[int, str], batch_size: int) -> None:
        self.names, self.batch_size = names, batch_size
        self.grads: dict[str, torch.Tensor] = {}

    def _add(self, param: torch.Tensor, g: torch.Tensor) -> None:
        name = self.names.get(id(param))
        if name is not None:
            g = g.reshape(self.batch_size, -1).double()
            self.grads[name] = g if name not in self.grads else self.grads[name] + g

    def outer(self, param: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        self._add(param, torch.einsum("blr,blc->brc", left, right))

    def dense(self, param: torch.Tensor, g: torch.Tensor) -> None:
        self._add(param, g)

    def dense_tokens(self, param: torch.Tensor, g: torch.Tensor) -> None:
        self._add(param, g.sum(1))

    def rows(self, param: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
        out = values.new_zeros(self.batch_size, param.shape[0], values.shape[-1])
        self._add(param, out.scatter_add_(1, idx[..., None].expand_as(values), values))


def _diag_grads(
    dcalls: list[tuple[DiagModule, Any, torch.Tensor]], names: dict[int, str], batch_size: int
) -> dict[str, torch.Tensor]:
    """``{name: [B, numel]}``: the per-example tied gradients of the diagonal blocks' parameters."""
    sink = _DenseSink(names, batch_size)
    for (mod, rule), saved, g in dcalls:
        rule.contribute(mod, saved, g, 0, sink)
    return sink.grads


def _diag_modules(readers: _Readers, params: list[BodyParam], names: set[str]) -> list[DiagModule] | None:
    """The modules that own the diagonal blocks' parameters, each with a layer rule that accounts for every one
    of them and whose output rows are batch-first; ``None`` if some parameter has no such owner, or is read
    outside its owner's forward (a functional kernel taking ``conv1d.weight``: no hook on the owner sees it), so
    the diagonal blocks take the exact featurisation route."""
    if not readers.direct:
        return None
    wanted = {id(bp.param) for bp in params if bp.name in names}
    covered: set[int] = set()
    out: list[DiagModule] = []
    for mod in readers.modules:
        rule = find_rule(mod)
        if rule is None or rule.batch_dim(mod, 0) != 0:
            return None
        own = {id(p) for p in mod.parameters(recurse=False)} & wanted
        if not own <= {id(p) for p in rule.handles(mod).values()}:
            return None
        covered |= own
        out.append((mod, rule))
    return out if covered == wanted else None


@dataclasses.dataclass
class _PassOne:
    """What pass 1 gathered: the Linear layers' row sums, the diagonal blocks' sums of squared per-example
    gradients (``None``: they take the featurisation route) and whether the grouping check passed."""

    stats: list[_RowStats]
    n: int
    diag_sq: dict[str, torch.Tensor] | None
    #: per batch, the Linear layers' rows or per-example gradients ready to rotate (:func:`_gathered`; ``None``: not
    #: batch-first), kept for EK-FAC's second pass within a memory budget
    rows: list[list[Gathered] | None] | None = None
    #: how many batches the loader yielded
    batches: int = 0
    #: the Linear layers' rows grouped by their first axis are the examples' (:func:`_grouping_ok`)
    rows_ok: bool = True
    #: the diagonal blocks' per-example gradients from the layer rules are the examples'
    diag_ok: bool = True


def _kronecker_pass(
    model: nn.Module,
    loader: Iterable[Any],
    loss: _Seeded,
    linears: list[tuple[str, nn.Linear]],
    diag: list[DiagModule] | None,
    names: dict[int, str],
    keep_bytes: int = 0,
    check: bool | str = False,
    check_rows: bool = False,
) -> _PassOne:
    """Pass 1: ``sum a a^T`` and ``sum g g^T`` over every row of every call of every body Linear, and (``diag``)
    ``sum_n g_n^2`` of the diagonal blocks' per-example tied gradients. ``keep_bytes > 0``: the rows are also kept
    while they fit in that many bytes (all of them or none), so EK-FAC's second pass need not run the model again.
    ``check``: the grouping check (:func:`_grouping_ok`) on the first batch (``"first"``) or every one (``True``),
    of the diagonal blocks and (``check_rows``, EK-FAC's) of the Linear layers' rows."""
    stats = []
    for _, mod in linears:
        d_in = mod.in_features + (1 if mod.bias is not None else 0)
        z = torch.zeros
        dev = mod.weight.device
        stats.append(_RowStats(z(d_in, d_in, dtype=torch.float64, device=dev),
                               z(mod.out_features, mod.out_features, dtype=torch.float64, device=dev),
                               mod.bias is not None))  # fmt: skip
    out = _PassOne(stats, 0, None if diag is None else {}, [] if keep_bytes > 0 else None)
    used = 0
    seen: set[int] = set()
    checked_linears = linears if check_rows else []
    checked = _check_params(checked_linears, diag or (), names)
    for index, batch in enumerate(loader):
        loss.index = index
        ask = bool(checked) and (check is True or (check == "first" and index == 0))
        got = _linear_rows(model, batch, loss, linears, diag or (), checked if ask else ())
        size = int(got.losses.shape[0])
        for i, (xs, gs) in _by_layer(got.rows).items():
            stats[i].add(xs, gs)
        if out.rows is not None:
            gathered = _gathered(linears, size, got.rows)
            kept = [t for item in gathered or () if item is not None for t in (item[0], *item[1], *item[2])]
            used += _storage_bytes([t for t in kept if t is not None], seen)
            if used > keep_bytes:  # over the budget: the second pass runs the model again
                out.rows = None
            else:
                out.rows.append(gathered)
        if out.diag_sq is not None and any(g.dim() == 0 or g.shape[0] != size for _, _, g in got.dcalls):
            out.diag_sq, out.diag_ok = None, False  # outputs that are not batch-first: the exact route
        per = None if out.diag_sq is None else _diag_grads(got.dcalls, names, size)
        if per is not None and out.diag_sq is not None:
            for name, g in per.items():
                out.diag_sq[name] = g.square().sum(0) + out.diag_sq.get(name, 0.0)
        if ask:
            rows_ok, diag_ok = _grouping_ok(got, checked_linears, checked, per, names)
            out.rows_ok, out.diag_ok = out.rows_ok and rows_ok, out.diag_ok and diag_ok
        out.n += size
        out.batches += 1
    return out


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """The bytes that keeping ``tensors`` keeps alive: each underlying storage once (a row that is a view of a
    larger activation keeps all of it), not counting the storages in ``seen`` (updated)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


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
    verify: bool | str = "first",
    keep_rows_bytes: int = KEEP_ROWS_BYTES,
    max_examples: int | None = None,
    **featurize_kwargs: Any,
) -> Curvature:
    """K-FAC / EK-FAC factors of the body at the model's current weights, fitted on ``loader``.

    Args:
        model: the looped model, at the weights to fit the curvature of.
        loader: the fitting (training) set, in batches.
        loss_fn: ``(model, batch) -> Tensor[B]`` per-example losses on the data's targets (the empirical
            Fisher's).
        step_module: as for :func:`looptrace.featurize`.
        body: as for :func:`looptrace.featurize`.
        kinds: ``"kfac"`` and/or ``"ekfac"``; EK-FAC needs the second pass, K-FAC only when the body has
            parameters outside Linear layers (their diagonal blocks).
        fisher: ``"true"``, ``"empirical"`` or ``None`` (see :func:`resolve_fisher`).
        fisher_loss: the per-example loss on targets sampled from the model (true Fisher).
        seed: seeds the target sampling of a true Fisher.
        train_mode: fit in train mode (dropout on); default eval mode, as featurisation.
        verify: ``True`` runs the grouping check (the rows grouped by example give autograd's gradient of a
            randomly weighted sum of the losses) on every batch of pass 1, ``"first"`` and ``False`` on the first
            only: it decides the route, so it runs whenever a route depends on the grouping (EK-FAC, or diagonal
            blocks fitted by their rules; one more backward of that batch). Where it fails
            (rows that are not batch-first), the per-example gradients are exact featurisations, and ``verify``
            checks them against autograd as :func:`looptrace.featurize` does (``"first"`` batch, ``True`` every
            batch, ``False`` never).
        keep_rows_bytes: EK-FAC keeps pass 1's rows of the Linear layers when they fit in this many bytes, and
            rotates them in pass 2 instead of running the model again (the same rows: the same numbers); ``0``
            always runs it again.
        max_examples: fit on the loader's first this many examples only (the batch that crosses the limit is
            cut; every pass reads the same ones), so that the fit's cost stops growing with the training set (as
            kronfluence's ``covariance_max_examples`` and ``lambda_max_examples`` do, here one limit for both
            passes); ``None`` (the default): every example. The first
            examples must be a fair sample of the set: order a sorted loader by a fixed random permutation first.
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
    check_max_examples(max_examples)
    if iter(loader) is loader:  # a generator or iterator: read once, but the fit reads the loader more than once
        raise LoaderError(
            "fit_curvature reads the fitting loader more than once (its first batch, the passes): pass a list of "
            "batches or a DataLoader (shuffle=False), not a one-shot iterator or generator"
        )
    if max_examples is not None:
        loader = _FirstExamples(loader, max_examples)
    device = params[0].param.device
    if verify not in (True, False, "first"):
        raise ConfigError(f"verify must be True, False or 'first', got {verify!r}")
    linears = body_linears(model, roots, params)
    names = {id(bp.param): bp.name for bp in params}
    seeded = _Seeded(fit_loss, seed, device)
    in_linears = {id(mod.weight) for _, mod in linears} | {id(mod.bias) for _, mod in linears if mod.bias is not None}
    diag_names = {bp.name for bp in params if id(bp.param) not in in_linears}
    with _fitting(model, params, train_mode):
        readers = _diag_readers(model, loader, seeded, roots, params, diag_names) if diag_names else _Readers([], True)
        diag_mods = _diag_modules(readers, params, diag_names) if diag_names else []
        keep = keep_rows_bytes if "ekfac" in kind_set else 0
        grouped = "ekfac" in kind_set or bool(diag_mods)  # what uses the per-example grouping of pass 1's rows
        check: bool | str = (True if verify is True else "first") if grouped else False
        one = _kronecker_pass(model, loader, seeded, linears, diag_mods, names, keep, check, "ekfac" in kind_set)
    n = one.n
    if n == 0:
        raise ConfigError("the fitting loader yielded no examples")
    kron = []
    for (mname, mod), st in zip(linears, one.stats, strict=True):
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
    kw = {k: v for k, v in featurize_kwargs.items() if k not in ("sketch", "per_step", "verify", "checkpoint")}
    kw.update(step_module=step_module, train_mode=train_mode)
    hooked = one.diag_sq is not None and bool(diag) and one.diag_ok
    if hooked:
        assert one.diag_sq is not None
        _set_diagonal(curv, one.diag_sq)
    if "ekfac" in kind_set or (diag and not hooked):
        _eigen_pass(model, loader, seeded, curv, linears, roots, params, train_mode, "ekfac" in kind_set, verify,
                    loss_fn, kw, hooked, readers.modules, one)  # fmt: skip
    return curv


def check_max_examples(max_examples: Any, name: str = "max_examples") -> None:
    """Refuse a ``max_examples`` that is not a positive int or ``None``."""
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ConfigError(f"{name} must be a positive int or None, got {max_examples!r}")


class _FirstExamples:
    """A loader's first ``limit`` examples, the batch that crosses the limit cut to fit (re-iterable: every pass
    of the fit reads the same examples, and no batch past them)."""

    def __init__(self, loader: Iterable[Any], limit: int) -> None:
        self.loader, self.limit = loader, limit

    def __iter__(self) -> Iterator[Any]:
        from looptrace import batching

        left = self.limit
        for batch in self.loader:
            n = batching.leading_size(batch)
            if n is None:
                raise LoaderError(
                    "max_examples counts examples by the batches' leading tensor axis, and this batch has no tensor: "
                    "collate the examples into tensors, or pass a loader of the first N examples instead"
                )
            if n > left:
                batch = batching.slice_rows(batch, 0, left)
                if _uncut(batch, n):
                    raise LoaderError(
                        f"max_examples cuts a batch of {n} examples to {left}, but it holds a list of {n} items that "
                        "cannot be cut with its tensors: collate them into tensors, or pass a loader of the first N "
                        "examples (torch.utils.data.Subset(dataset, range(N))) instead of max_examples"
                    )
            left -= min(n, left)
            yield batch
            if left == 0:
                return


def _uncut(batch: Any, n: int) -> bool:
    """Whether ``batch`` holds a list or tuple of ``n`` non-tensor items (per-example data that a cut of its
    tensors leaves whole)."""
    if isinstance(batch, dict):
        return any(_uncut(v, n) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        if len(batch) == n and not any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in batch):
            return True
        return any(_uncut(v, n) for v in batch)
    return False


def _set_diagonal(curv: Curvature, sq: dict[str, torch.Tensor]) -> None:
    """The diagonal blocks from pass 1's sums of squared per-example gradients (a parameter no call reached: 0)."""
    for dia in curv.diagonal:
        dia.diag.zero_()
        if dia.name in sq:
            dia.diag += sq[dia.name].reshape(dia.diag.shape).to(dia.diag.device)
        dia.diag /= curv.n


def _exact_batch(
    model: nn.Module,
    batch: Any,
    loss: _Seeded,
    body: list[nn.Module],
    check: bool,
    check_loss: LossFn,
    kw: dict[str, Any],
) -> Features:
    """One batch's exact per-example tied gradients of ``body`` under the fitting loss (the same draws as pass 1:
    ``loss.index`` is the batch's), checked against autograd when ``check`` (with ``check_loss``: a sampled loss
    would draw other targets for the examples the check runs alone)."""
    if check and loss.loss_fn is not check_loss:
        featurize(model, [batch], check_loss, body=body, sketch=SketchSpec.exact(), per_step=False, verify=True, **kw)
        check = False
    return featurize(model, [batch], loss, body=body, sketch=SketchSpec.exact(), per_step=False, verify=check, **kw)


def _columns(f: Features) -> dict[str, tuple[int, int]]:
    return {slot["name"]: (int(slot["offset"]), int(slot["m"])) for slot in f.layout}


def _eigen_pass(
    model: nn.Module,
    loader: Iterable[Any],
    loss: _Seeded,
    curv: Curvature,
    linears: list[tuple[str, nn.Linear]],
    roots: list[nn.Module],
    params: list[BodyParam],
    train_mode: bool,
    ekfac: bool,
    verify: bool | str,
    check_loss: LossFn,
    kw: dict[str, Any],
    diag_done: bool,
    owners: list[nn.Module],
    one: _PassOne,
) -> None:
    """Pass 2: E_n[(Q_S^T G_n Q_A)^2] for every Kronecker block from the per-example tied gradients G_n, and the
    diagonal blocks' E_n[g_n^2] where pass 1 could not fit them (``diag_done`` false).

    Kronecker blocks: each call's rows, grouped by example (the batch is the rows' first axis), are rotated into
    the eigenbasis and ``(Q_S^T g)(Q_A^T a)^T`` summed over the calls, so the tied gradient is never formed in
    the parameter basis; pass 1's rows when it kept them (``one.rows``), else the hooks of a second forward. Where
    pass 1's grouping check failed (``one.rows_ok``), or a batch's rows are not batch-first, every (remaining)
    batch takes the exact per-example tied gradients instead (:func:`looptrace.featurize`, exact spec, checked
    against autograd as ``verify`` asks). Diagonal blocks that pass 1 could not fit: the exact per-example
    gradients of just the modules that read them, one featurisation over the loader."""
    if ekfac:
        for blk in curv.kronecker:
            blk.ekfac = torch.zeros(blk.shape, dtype=torch.float64, device=blk.a_cov.device)
    hooks_ok = one.rows_ok
    kept = one.rows
    seen = 0
    exact_checked = False
    for index, batch in enumerate(loader) if ekfac else ():
        seen += 1
        loss.index = index
        got = None
        if hooks_ok and kept is not None and index < len(kept):  # pass 1's rows of this batch: no second forward
            gathered = kept[index]
            got = None if gathered is None else _rotated_gathered(curv, gathered)
        elif hooks_ok:
            got = _rotated_by_hooks(model, batch, loss, curv, linears, params, train_mode)
        if got is None:
            hooks_ok = False
            check = verify is True or (verify == "first" and not exact_checked)  # the route's first batch
            exact_checked = True
            got = _rotated(curv, _exact_batch(model, batch, loss, roots, check, check_loss, kw))
        for blk, add in zip(curv.kronecker, got, strict=True):
            assert blk.ekfac is not None
            blk.ekfac += add
    if ekfac and seen != one.batches:
        raise LoaderError(
            f"the fitting loader yielded {one.batches} batches in the first pass and {seen} in the second: EK-FAC "
            "reads it twice, so pass one that yields the same batches every time it is iterated (a list, or a "
            "DataLoader with shuffle=False), not a one-shot iterator"
        )
    if curv.diagonal and not diag_done:  # one featurisation of the (few) diagonal parameters over the whole loader
        if not ekfac and (verify is True or verify == "first"):
            first = next(iter(loader))
            featurize(model, [first], check_loss, body=owners, sketch=SketchSpec.exact(), per_step=False,
                      verify=True, **kw)  # fmt: skip
        f = featurize(model, _indexed(loader, loss), loss, body=owners, sketch=SketchSpec.exact(), per_step=False,
                      verify=False, **kw)  # fmt: skip
        at = _columns(f)
        g = f.total.double()
        sq = {}
        for dia in curv.diagonal:
            s0, sn = at[dia.name]
            sq[dia.name] = g[:, s0 : s0 + sn].square().sum(0)
        _set_diagonal(curv, sq)
    for blk in curv.kronecker if ekfac else []:
        assert blk.ekfac is not None
        blk.ekfac /= curv.n
    if ekfac and curv.kronecker:
        curv.ekfac_route = "rows" if hooks_ok else "exact"


def _indexed(loader: Iterable[Any], loss: _Seeded) -> Iterator[Any]:
    """The loader's batches, telling the seeded loss which batch it is on (the same draws as pass 1)."""
    for index, batch in enumerate(loader):
        loss.index = index
        yield batch


@dataclasses.dataclass
class _Readers:
    """The modules whose forwards read the diagonal blocks' parameters (a smaller body for their exact
    gradients), and whether each parameter is read by its own module only (then a hook on it sees every read)."""

    modules: list[nn.Module]
    direct: bool


def _diag_readers(
    model: nn.Module, loader: Iterable[Any], loss: _Seeded, roots: list[nn.Module], params: list[BodyParam],
    names: set[str],
) -> _Readers:  # fmt: skip
    """Where the first batch's forward reads each diagonal-block parameter (:class:`looptrace.capture.uses.ParamUses`):
    per read, the innermost running body module that holds the parameter, which is its own module unless a
    parent reads it (Inkling-2-Loop's short convolutions pass ``conv1d.weight`` to a kernel and never call the
    ``nn.Conv1d``), with every module that registers it (a tied parameter: each of its modules); a module inside
    another one chosen is dropped (the outer one's exact gradients include it)."""
    wanted = {id(bp.param): bp.param for bp in params if bp.name in names}
    own: dict[int, list[nn.Module]] = {}  # every module that registers the parameter (a tied one: several)
    for root in roots:
        for mod in root.modules():
            for p in mod.parameters(recurse=False):
                if id(p) in wanted and all(mod is not o for o in own.get(id(p), [])):
                    own.setdefault(id(p), []).append(mod)
    first = next(iter(loader), None)
    if first is None:
        raise ConfigError("the fitting loader yielded no examples")
    uses = ParamUses(wanted.values(), [m for r in roots for m in r.modules()])
    loss.index = 0
    with torch.enable_grad(), uses.recording():
        loss(model, first)
    chosen: list[nn.Module] = []
    direct = True
    for pid in wanted:
        found = [innermost_owner(stack, pid) for _, stack in uses.reads.get(pid, {}).values()]
        readers = [f[0] for f in found if f is not None]
        direct = direct and all(any(r is o for o in own[pid]) for r in readers)
        for mod in [*readers, *own[pid]]:  # its registrants too: a body of readers alone would split a tie
            if all(mod is not c for c in chosen):
                chosen.append(mod)
    chosen = [m for m in chosen if not any(o is not m and any(x is m for x in o.modules()) for o in chosen)]
    return _Readers(chosen, direct)


def _rotated(curv: Curvature, f: Features) -> list[torch.Tensor]:
    """Per Kronecker block, sum_n (Q_S^T G_n Q_A)^2 over the batch, from its exact per-example tied gradients."""
    g = f.total.double()
    off = _columns(f)
    out = []
    for blk in curv.kronecker:
        d_out = blk.shape[0]
        w0, wn = off[blk.weight]
        parts = [g[:, w0 : w0 + wn].reshape(-1, d_out, wn // d_out)]
        if blk.bias is not None:
            b0, bn = off[blk.bias]
            parts.append(g[:, b0 : b0 + bn].reshape(-1, d_out, 1))
        out.append(blk.rotate(torch.cat(parts, dim=2).to(blk.a_cov.device)).square().sum(0))
    return out


def gradient_first(rows: int, d_out: int, d_in: int) -> bool:
    """Whether an example's ``Q_S^T G Q_A`` costs fewer flops with ``G = sum_r g_r x_r^T`` formed first
    (``R d_out d_in + d_out d_in (d_out + d_in)``) than with its ``R`` rows rotated first
    (``R (d_out^2 + d_in^2 + d_out d_in)``); ``d_in`` counts a bias column."""
    return rows * (d_out**2 + d_in**2) > d_out * d_in * (d_out + d_in)


def gradient_sums(gs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], bias: bool = False) -> torch.Tensor:
    """``[B, d_out, d_in]``: per example, ``G = sum_r g_r x_r^T`` over its rows in every call (``gs[c]``
    ``[B, R_c, d_out]``, ``xs[c]`` ``[B, R_c, d_in]``); ``bias``: each ``x_r`` takes a last entry 1, without
    copying the rows."""
    d_in = xs[0].shape[-1] + (1 if bias else 0)
    grad = gs[0].new_zeros(gs[0].shape[0], gs[0].shape[-1], d_in)
    weight = grad[:, :, : d_in - 1] if bias else grad
    for g, x in zip(gs, xs, strict=True):
        weight.baddbmm_(g.transpose(1, 2), x)
        if bias:
            grad[:, :, -1] += g.sum(1)
    return grad


def rotated_sums(
    gs: Sequence[torch.Tensor],
    xs: Sequence[torch.Tensor],
    q_s: torch.Tensor,
    q_a: torch.Tensor,
    bias: bool = False,
    form: str | None = None,
) -> torch.Tensor:
    """``[B, d_out, d_in]``: per example, ``sum_r (Q_S^T g_r)(Q_A^T x_r)^T`` over its rows in every call
    (``gs[c]`` ``[B, R_c, d_out]``, ``xs[c]`` ``[B, R_c, d_in]``), i.e. ``Q_S^T G Q_A`` with ``G = sum_r g_r x_r^T``;
    ``bias``: each ``x_r`` takes a last entry 1 (``Q_A`` is then ``(d_in + 1)``-square), without copying the rows.
    ``form``: ``"rows"`` rotates the rows first, ``"gradient"`` forms ``G`` first (:func:`gradient_sums`);
    ``None`` takes the one with fewer flops (:func:`gradient_first`)."""
    if form is None:
        form = "gradient" if gradient_first(sum(int(g.shape[1]) for g in gs), q_s.shape[0], q_a.shape[0]) else "rows"
    if form == "gradient":
        return q_s.T @ gradient_sums(gs, xs, bias) @ q_a
    out: torch.Tensor | None = None
    for g, x in zip(gs, xs, strict=True):
        xr = x @ q_a[:-1] + q_a[-1] if bias else x @ q_a
        term = (g @ q_s).transpose(1, 2) @ xr
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


#: One Kronecker layer's share of a batch, ready to rotate: ``(G, [], [])`` with its per-example gradients ``G``
#: ``[B, d_out, d_in(+1)]`` where forming them first costs fewer flops (:func:`gradient_first`), else
#: ``(None, gs, xs)``, its calls' rows grouped by example (``[B, R_c, d]`` each); ``None``: no call got gradient.
Gathered = tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]] | None


def _gathered(
    linears: list[tuple[str, nn.Linear]], size: int, rows: list[tuple[int, torch.Tensor, torch.Tensor]]
) -> list[Gathered] | None:
    """Per Kronecker layer, one batch's rows of ``size`` examples made ready for the eigenbasis (:data:`Gathered`):
    the tied gradient sums example n's rows over the calls (the steps) and tokens. ``None`` if some call's rows
    are not batch-first."""
    if any(x.dim() < 2 or x.shape[0] != size or g.shape[0] != size for _, x, g in rows):
        return None
    out: list[Gathered] = [None] * len(linears)
    for i, (xs, gs) in _by_layer(rows).items():
        mod = linears[i][1]
        bias = mod.bias is not None
        x3 = [x.reshape(size, -1, x.shape[-1]) for x in xs]
        g3 = [g.reshape(size, -1, g.shape[-1]) for g in gs]
        if gradient_first(sum(int(x.shape[1]) for x in x3), mod.out_features, mod.in_features + bias):
            out[i] = (gradient_sums(g3, x3, bias), [], [])
        else:
            out[i] = (None, g3, x3)
    return out


def _rotated_gathered(curv: Curvature, gathered: list[Gathered]) -> list[torch.Tensor]:
    """Per Kronecker block, ``sum_n (Q_S^T G_n Q_A)^2`` over one batch (:func:`_gathered`), in float64."""
    out = []
    for blk, item in zip(curv.kronecker, gathered, strict=True):
        if item is None:
            out.append(torch.zeros(blk.shape, dtype=torch.float64, device=blk.a_cov.device))
            continue
        grad, gs, xs = item
        if grad is not None:
            rot = blk.rotate(grad)  # in the model's precision
        else:
            assert blk.q_a is not None and blk.q_s is not None
            dtype = gs[0].dtype
            rot = rotated_sums(gs, xs, blk.q_s.to(dtype), blk.q_a.to(dtype), blk.bias is not None, "rows")
        if rot.dtype not in (torch.float32, torch.float64):  # half precision: squares would underflow
            rot = rot.float()
        out.append(rot.square().sum(0).double())  # the batch's sum in float32 or better, accumulated in float64
    return out


def _rotated_by_hooks(
    model: nn.Module,
    batch: Any,
    loss: _Seeded,
    curv: Curvature,
    linears: list[tuple[str, nn.Linear]],
    params: list[BodyParam],
    train_mode: bool,
) -> list[torch.Tensor] | None:
    """:func:`_rotated_gathered` of the rows of one more forward and backward of ``batch`` (``None``: rows that are
    not batch-first)."""
    with _fitting(model, params, train_mode):
        got = _linear_rows(model, batch, loss, linears)
    gathered = _gathered(linears, int(got.losses.shape[0]), got.rows)
    return None if gathered is None else _rotated_gathered(curv, gathered)

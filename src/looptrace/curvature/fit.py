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
signal into per-example gradients, summed over the calls (the tied gradient) and squared. The first batch
is checked against the exact per-example gradients (:func:`looptrace.featurize`, exact spec); a module with
no rule, rows that are not batch-first, or a failed check send the diagonal blocks through one exact
featurisation of just the modules that own them instead.

Pass 2 (EK-FAC only): the per-example *tied* gradients (summed over steps) in each Linear's Kronecker
eigenbasis, squared and averaged. The same hooks rotate each call's rows into the eigenbasis and sum
``(Q_S^T g)(Q_A^T a)^T`` per example over the calls, so no per-example gradient is formed in the parameter
basis (of each example's rows, or of its gradient formed first, whichever costs fewer flops); the first batch
is checked against the exact per-example tied gradients, and rows that are not batch-first take that exact
route. Pass 1's rows are kept when they fit ``keep_rows_bytes`` (1 GiB by default), so pass 2 rotates them
without running the model again.

Cost: K-FAC is one forward and backward over the fitting set (no per-example work for the Linear layers)
plus an exact featurisation of the first batch; EK-FAC adds the rotations (and, over the row budget, a second
forward and backward). The measured ratios to one featurisation pass: ``looptrace bench curvature``
(``benchmarks/results/curvature-cost.md``).

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
        """The rows of one batch's calls (every loop step's): summed in the model's dtype over the batch, then
        accumulated in float64. A bias column of ones enters ``A`` as the rows' sums and count (no copy)."""
        a: torch.Tensor | None = None
        s: torch.Tensor | None = None
        for x, g in zip(xs, gs, strict=True):
            x2 = x.reshape(-1, x.shape[-1])
            g2 = g.reshape(-1, g.shape[-1])
            live = g2.abs().amax(1) > 0  # rows with no backprop signal contribute nothing to the tied gradient
            if not bool(live.all()):
                x2, g2 = x2[live], g2[live]
            pa = x2.T @ x2
            if self.bias:
                col = x2.sum(0)
                pa = torch.cat([torch.cat([pa, col[:, None]], 1),
                                torch.cat([col, col.new_full((1,), float(x2.shape[0]))])[None]], 0)  # fmt: skip
            ps = g2.T @ g2
            a, s = (pa, ps) if a is None or s is None else (a + pa, s + ps)
            self.rows += int(x2.shape[0])
        if a is not None and s is not None:
            self.a += a.double()
            self.s += s.double()


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


def _linear_rows(
    model: nn.Module,
    batch: Any,
    loss: _Seeded,
    linears: list[tuple[str, nn.Linear]],
    diag: Sequence[DiagModule] = (),
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]], list[tuple[DiagModule, Any, torch.Tensor]]]:
    """One forward and backward of the fitting loss: per call of a body Linear that received gradient, its
    index, input rows ``x`` and output gradient ``g``; per call of a diagonal-block owner, what its rule saved
    and its output gradient. Autograd is asked for the calls' outputs only (not the weights: no
    weight-gradient products); calls cut off from the loss (truncated BPTT) are dropped."""
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
        return losses.detach(), [], []
    outs = [c[2] for c in calls] + [c[2] for c in dcalls]
    grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
    rows = [(i, x, g) for (i, x, _), g in zip(calls, grads[: len(calls)], strict=True) if g is not None]
    dgrads = [(w, saved, g) for (w, saved, _), g in zip(dcalls, grads[len(calls) :], strict=True) if g is not None]
    return losses.detach(), rows, dgrads


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
    gradients (``None``: they take the featurisation route) and the first batch's per-example gradients."""

    stats: list[_RowStats]
    n: int
    diag_sq: dict[str, torch.Tensor] | None
    diag_first: dict[str, torch.Tensor] | None
    #: per batch, its size and the Linear layers' rows (kept for EK-FAC's second pass within a memory budget)
    rows: list[tuple[int | None, list[tuple[int, torch.Tensor, torch.Tensor]]]] | None = None
    #: how many batches the loader yielded
    batches: int = 0


def _kronecker_pass(
    model: nn.Module,
    loader: Iterable[Any],
    loss: _Seeded,
    linears: list[tuple[str, nn.Linear]],
    device: torch.device,
    diag: list[DiagModule] | None,
    names: dict[int, str],
    keep_bytes: int = 0,
) -> _PassOne:
    """Pass 1: ``sum a a^T`` and ``sum g g^T`` over every row of every call of every body Linear, and (``diag``)
    ``sum_n g_n^2`` of the diagonal blocks' per-example tied gradients. ``keep_bytes > 0``: the rows are also kept
    while they fit in that many bytes (all of them or none), so EK-FAC's second pass need not run the model again."""
    from looptrace import batching

    stats = []
    for _, mod in linears:
        d_in = mod.in_features + (1 if mod.bias is not None else 0)
        z = torch.zeros
        stats.append(_RowStats(z(d_in, d_in, dtype=torch.float64, device=device),
                               z(mod.out_features, mod.out_features, dtype=torch.float64, device=device),
                               mod.bias is not None))  # fmt: skip
    n = 0
    sq: dict[str, torch.Tensor] | None = None if diag is None else {}
    first: dict[str, torch.Tensor] | None = None
    kept: list[tuple[int | None, list[tuple[int, torch.Tensor, torch.Tensor]]]] | None = [] if keep_bytes > 0 else None
    used = 0
    seen: set[int] = set()
    batches = 0
    for index, batch in enumerate(loader):
        loss.index = index
        losses, rows, dcalls = _linear_rows(model, batch, loss, linears, diag or ())
        for i, (xs, gs) in _by_layer(rows).items():
            stats[i].add(xs, gs)
        if kept is not None:
            used += _storage_bytes([t for _, x, g in rows for t in (x, g)], seen)
            if used > keep_bytes:  # over the budget: the second pass runs the model again
                kept = None
            else:
                kept.append((batching.leading_size(batch), rows))
        if sq is not None:
            per = _diag_grads(dcalls, names, int(losses.shape[0]))
            if index == 0:
                first = per
            for name, g in per.items():
                sq[name] = g.square().sum(0) + sq.get(name, 0.0)
        n += int(losses.shape[0])
        batches += 1
    return _PassOne(stats, n, sq, first, kept, batches)


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
        verify: check the exact per-example gradients of pass 2 against autograd (as :func:`looptrace.featurize`):
            ``"first"`` batch, ``True`` every batch, ``False`` never. Catches rows that are not batch-first.
        keep_rows_bytes: EK-FAC keeps pass 1's rows of the Linear layers when they fit in this many bytes, and
            rotates them in pass 2 instead of running the model again (the same rows: the same numbers); ``0``
            always runs it again.
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
    if iter(loader) is loader:  # a generator or iterator: read once, but the fit reads the loader more than once
        raise LoaderError(
            "fit_curvature reads the fitting loader more than once (its first batch, the passes): pass a list of "
            "batches or a DataLoader (shuffle=False), not a one-shot iterator or generator"
        )
    device = params[0].param.device
    linears = body_linears(model, roots, params)
    names = {id(bp.param): bp.name for bp in params}
    seeded = _Seeded(fit_loss, seed, device)
    in_linears = {id(mod.weight) for _, mod in linears} | {id(mod.bias) for _, mod in linears if mod.bias is not None}
    diag_names = {bp.name for bp in params if id(bp.param) not in in_linears}
    with _fitting(model, params, train_mode):
        readers = _diag_readers(model, loader, seeded, roots, params, diag_names) if diag_names else _Readers([], True)
        diag_mods = _diag_modules(readers, params, diag_names) if diag_names else []
        keep = keep_rows_bytes if "ekfac" in kind_set else 0
        one = _kronecker_pass(model, loader, seeded, linears, device, diag_mods, names, keep)
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
    hooked = one.diag_sq is not None and bool(diag)
    if hooked and "ekfac" not in kind_set:  # the first batch's exact per-example gradients of the owners
        assert one.diag_first is not None
        exact = _exact_first(model, loader, seeded, readers.modules, verify, loss_fn, kw)
        hooked = _agrees(one.diag_first, exact, params[0].param.dtype, [d.name for d in diag])
    hooked_diag = (one.diag_sq, one.diag_first) if hooked else None
    if "ekfac" in kind_set or (diag and not hooked):
        _eigen_pass(model, loader, seeded, curv, linears, roots, params, train_mode, "ekfac" in kind_set, verify,
                    loss_fn, kw, hooked_diag, readers.modules, one.rows, one.batches)  # type: ignore[arg-type]  # fmt: skip
    elif diag:
        assert one.diag_sq is not None
        _set_diagonal(curv, one.diag_sq)
    return curv


def _set_diagonal(curv: Curvature, sq: dict[str, torch.Tensor]) -> None:
    """The diagonal blocks from pass 1's sums of squared per-example gradients (a parameter no call reached: 0)."""
    for dia in curv.diagonal:
        dia.diag.zero_()
        if dia.name in sq:
            dia.diag += sq[dia.name].reshape(dia.diag.shape).to(dia.diag.device)
        dia.diag /= curv.n


def _exact_first(
    model: nn.Module,
    loader: Iterable[Any],
    loss: _Seeded,
    body: list[nn.Module],
    verify: bool | str,
    check_loss: LossFn,
    kw: dict[str, Any],
) -> Features:
    """The first batch's exact per-example tied gradients of ``body`` under the fitting loss (the same draws as
    pass 1), checked against autograd when ``verify`` asks (with ``check_loss``: a sampled loss would draw other
    targets for the examples the check runs alone)."""
    batch = next(iter(loader))
    check = verify is True or verify == "first"
    loss.index = 0
    if check and loss.loss_fn is not check_loss:
        featurize(model, [batch], check_loss, body=body, sketch=SketchSpec.exact(), per_step=False, verify=True, **kw)
        check = False
    return featurize(model, [batch], loss, body=body, sketch=SketchSpec.exact(), per_step=False, verify=check, **kw)


def _columns(f: Features) -> dict[str, tuple[int, int]]:
    return {slot["name"]: (int(slot["offset"]), int(slot["m"])) for slot in f.layout}


def _agrees(hooked: dict[str, torch.Tensor], exact: Features, dtype: torch.dtype, names: Iterable[str]) -> bool:
    """Whether the diagonal blocks' per-example gradients from the layer rules match the exact ones, for every one
    of ``names`` (one the rules never produced, a hook that saw no call, counts as a mismatch: not as zero)."""
    at = _columns(exact)
    g = exact.total.double()
    tol = 1e-6 if dtype == torch.float64 else 1e-3  # a wrong grouping of rows is off by O(1)
    if any(n not in hooked for n in names):
        return False
    for name, h in hooked.items():
        s0, sn = at[name]
        want = g[:, s0 : s0 + sn].to(h.device)
        if h.shape != want.shape or not torch.allclose(h, want, rtol=tol, atol=tol * float(want.abs().max())):
            return False
    return True


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
    hooked_diag: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None,
    owners: list[nn.Module],
    kept: list[tuple[int | None, list[tuple[int, torch.Tensor, torch.Tensor]]]] | None = None,
    batches: int | None = None,
) -> None:
    """Pass 2: E_n[(Q_S^T G_n Q_A)^2] for every Kronecker block from the per-example tied gradients G_n, and the
    diagonal blocks' E_n[g_n^2] where pass 1 could not fit them.

    Kronecker blocks: hooks on the Linear layers group each call's rows by example (the batch is the rows'
    first axis), rotate them into the eigenbasis and add ``(Q_S^T g)(Q_A^T a)^T`` over the calls, so the tied
    gradient is never formed in the parameter basis. The first batch is checked against the exact
    per-example tied gradients (:func:`looptrace.featurize`, exact spec, itself checked against autograd when
    ``verify`` asks), which also check pass 1's diagonal blocks (``hooked_diag``: their sums of squares and
    the first batch's per-example gradients); a body whose rows are not batch-first, or that fails the check,
    takes that exact route for every batch. Diagonal blocks that pass 1 could not fit: the exact per-example
    gradients of just the modules that read them, one featurisation over the loader."""
    if ekfac:
        for blk in curv.kronecker:
            blk.ekfac = torch.zeros(blk.shape, dtype=torch.float64, device=blk.a_cov.device)
    diag_done = False
    hooks_ok = True
    seen = 0
    for index, batch in enumerate(loader) if ekfac else ():
        seen += 1
        loss.index = index
        if not hooks_ok:
            got = None
        elif kept is not None and index < len(kept):  # pass 1's rows of this batch: no second forward
            got = _rotated_rows(curv, *kept[index])
        else:
            got = _rotated_by_hooks(model, batch, loss, curv, linears, params, train_mode)
        if got is None or index == 0:
            if index == 0:
                f = _exact_first(model, [batch], loss, roots, verify, check_loss, kw)
            else:
                loss.index = index
                f = featurize(model, [batch], loss, body=roots, sketch=SketchSpec.exact(), per_step=False,
                              verify=False, **kw)  # fmt: skip
            exact = _rotated(curv, f)
            if (
                index == 0
                and hooked_diag is not None
                and _agrees(hooked_diag[1], f, params[0].param.dtype, [d.name for d in curv.diagonal])
            ):
                _set_diagonal(curv, hooked_diag[0])
                diag_done = True
            tol = 1e-6 if params[0].param.dtype == torch.float64 else 1e-3  # a wrong grouping is off by O(1)
            if got is not None and not all(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max()))
                                           for a, b in zip(got, exact, strict=True)):  # fmt: skip
                got = None
            if got is None:
                hooks_ok = False
                got = exact
        for blk, add in zip(curv.kronecker, got, strict=True):
            assert blk.ekfac is not None
            blk.ekfac += add
    if ekfac and batches is not None and seen != batches:
        raise LoaderError(
            f"the fitting loader yielded {batches} batches in the first pass and {seen} in the second: EK-FAC reads it "
            "twice, so pass one that yields the same batches every time it is iterated (a list, or a DataLoader "
            "with shuffle=False), not a one-shot iterator"
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


def rotated_sums(
    g: torch.Tensor, x: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, form: str | None = None
) -> torch.Tensor:
    """``[B, d_out, d_in]``: per example, ``sum_r (Q_S^T g_r)(Q_A^T x_r)^T`` over its rows ``g [B, R, d_out]``,
    ``x [B, R, d_in]``, i.e. ``Q_S^T G Q_A`` with ``G = sum_r g_r x_r^T``. ``form``: ``"rows"`` rotates the rows
    first (``R (d_out^2 + d_in^2 + d_out d_in)`` per example), ``"gradient"`` forms ``G`` first
    (``R d_out d_in + d_out d_in (d_out + d_in)``); ``None`` takes the one with fewer flops."""
    rows, d_out, d_in = x.shape[1], g.shape[2], x.shape[2]
    if form is None:
        form = "gradient" if rows * (d_out**2 + d_in**2) > d_out * d_in * (d_out + d_in) else "rows"
    if form == "gradient":
        return q_s.T @ (g.transpose(1, 2) @ x) @ q_a
    return (g @ q_s).transpose(1, 2) @ (x @ q_a)


def _rotated_by_hooks(
    model: nn.Module,
    batch: Any,
    loss: _Seeded,
    curv: Curvature,
    linears: list[tuple[str, nn.Linear]],
    params: list[BodyParam],
    train_mode: bool,
) -> list[torch.Tensor] | None:
    """As :func:`_rotated_exact`, from rows rotated before the outer product: ``Q_S^T G_n Q_A =
    sum_r (Q_S^T g_r)(Q_A^T a_r)^T`` over example n's rows in every call. ``None`` if some call's rows are not
    batch-first."""
    from looptrace import batching

    with _fitting(model, params, train_mode):
        _, rows, _ = _linear_rows(model, batch, loss, linears)
    return _rotated_rows(curv, batching.leading_size(batch), rows)


def _rotated_rows(
    curv: Curvature, size: int | None, rows: list[tuple[int, torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor] | None:
    """Per Kronecker block, ``sum_n (Q_S^T G_n Q_A)^2`` over a batch of ``size`` examples from its Linear layers'
    rows (``(layer index, x, g)`` per call); ``None`` if some call's rows are not batch-first."""
    acc: list[torch.Tensor | None] = [None] * len(curv.kronecker)
    if size is None or any(x.dim() < 2 or x.shape[0] != size or g.shape[0] != size for _, x, g in rows):
        return None
    for i, (xs, gs) in _by_layer(rows).items():
        blk = curv.kronecker[i]
        assert blk.q_a is not None and blk.q_s is not None
        # every call's rows of an example side by side: the sum over calls (steps) and tokens is one product
        xa = torch.cat([x.reshape(size, -1, x.shape[-1]) for x in xs], dim=1)
        ga = torch.cat([g.reshape(size, -1, g.shape[-1]) for g in gs], dim=1)
        if blk.bias is not None:
            xa = torch.cat([xa, xa.new_ones(*xa.shape[:2], 1)], dim=2)
        acc[i] = rotated_sums(ga, xa, blk.q_s.to(xa.dtype), blk.q_a.to(xa.dtype))  # model's precision
    return [
        torch.zeros(blk.shape, dtype=torch.float64, device=blk.a_cov.device)
        if a is None
        else a.double().square().sum(0)
        for blk, a in zip(curv.kronecker, acc, strict=True)
    ]

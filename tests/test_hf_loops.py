"""The looped language models that ship with ``transformers``, attributed per loop pass (all offline: tiny
random configurations, no downloads).

* Inkling-2-Loop (float32: its router runs in float32 by design): one step is a pass over the looped decoder
  layers ``model.model.layers[2:4]`` plus the ``message_input`` calls made inside it; passes restart from the
  pre-loop states and are linked only through the messages; its short convolutions read ``conv1d.weight``
  in their parent's forward.
* HRM-Text (float64): the L stack runs H_cycles x L_cycles times (early cycles under no_grad), the H stack
  H_cycles times; each stack is featurized with its own step module (docs/guide/hrm-text.md says why).

Each is compared with the untied per-pass oracle of ``tests/loop_oracle.py``, which checks itself against
autograd (the sum over passes is the gradient of the tied model)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import looptrace as lt
from looptrace.sketch.plan import SketchPlan
from tests.conftest import assert_close
from tests.hf_fixtures import INKLING_LOOP, INKLING_TYPES, TextData, make_hrm, make_inkling
from tests.loop_oracle import body_names, oracle_per_pass, tied_gradients

transformers = pytest.importorskip("transformers")
from looptrace.integrations import hf  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models: one thread is faster than two fighting over them (and than a loaded machine's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(n: int, bs: int, seed: int = 0) -> list[Any]:
    return list(torch.utils.data.DataLoader(TextData(n, seed), batch_size=bs))


def _checked_oracle(
    model: torch.nn.Module, sequence: list[Any], extras: list[Any], batches: list[Any], loss: Any = None
) -> Any:
    """The per-pass oracle, after checking that its passes add up to autograd's gradient of the tied model."""
    loss = loss or hf.causal_lm_loss
    want = oracle_per_pass(model, sequence, extras, batches, loss)
    tied = tied_gradients(model, body_names(model, [*sequence, *extras]), batches, loss)
    scale = float(tied.abs().max())
    assert_close(want.sum(1), tied, "oracle: sum over passes vs autograd of the tied model", 0, 1e-5 * scale)
    return want


def _inkling_loop(model: Any) -> tuple[list[Any], list[Any]]:
    s, e = INKLING_LOOP
    layers = list(model.model.layers[s:e])
    return layers, [*layers, model.model.message_input]


def _batched_gradients(model: torch.nn.Module, names: list[str], batches: list[Any]) -> torch.Tensor:
    """Autograd's per-example gradients ``[N, D]`` of the tied model, each read from its batch's forward."""
    params = dict(model.named_parameters())
    rows = []
    for batch in batches:
        losses = hf.causal_lm_loss(model, batch)
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[i], [params[n] for n in names], retain_graph=True, allow_unused=True)
            flat = [
                (g if g is not None else torch.zeros_like(params[n])).reshape(-1)
                for g, n in zip(grads, names, strict=True)
            ]
            rows.append(torch.cat(flat))
    return torch.stack(rows)


def _float32_noise(model: torch.nn.Module, names: list[str], batches: list[Any]) -> tuple[torch.Tensor, float]:
    """Autograd's per-example gradients from the batched forward, and how far they are from the one-example
    ones: the float32 rounding of this model's batched kernels, the floor any batched capture sits on (measured
    5e-5 of the largest entry here; looptrace's totals are 2e-7 from the batched gradients)."""
    batched = _batched_gradients(model, names, batches)
    single = tied_gradients(model, names, batches, hf.causal_lm_loss)
    return batched, float((batched - single).abs().max())


def test_inkling_exact_per_pass_equals_the_untied_oracle() -> None:
    """step_module= the looped layer range, body= the range plus message_input: every parameter's per-pass
    gradient equals the oracle's, to the float32 rounding that batching costs autograd itself, and the sum over
    passes equals autograd's gradient from the same batched forward to float32 rounding. Catches: message calls
    assigned to the wrong pass (break StepClock.tag to tag them `completed` instead of `completed + 1`), the
    short convolutions' weights missing (drop the covers in Tracer.forward_pass), a router's logits counted
    twice (hook multi-output layers directly), the key/value cache left on (drop the switch in featurize)."""
    model = make_inkling()
    batches = _batches(5, 3)
    layers, body = _inkling_loop(model)
    feats = lt.featurize(model, batches, hf.causal_lm_loss, step_module=layers, body=body, sketch=lt.SketchSpec.exact())
    want = _checked_oracle(model, layers, [model.model.message_input], batches)
    batched, noise = _float32_noise(model, body_names(model, body), batches)
    scale = float(want.abs().max())
    assert feats.per_step is not None and feats.per_step.shape == want.shape == (5, 3, want.shape[2])
    assert float(want.norm(dim=-1).min()) > 0, "every pass must carry gradient, or the comparison proves less"
    assert noise < 1e-3 * scale, f"float32 batching noise {noise:.2e} is too large for a sharp test"
    assert_close(feats.per_step, want, "Inkling exact per-pass features vs the oracle", 0, 3 * noise + 1e-6 * scale)
    assert_close(feats.total, batched, "Inkling: sum over passes vs autograd, same batches", 0, 1e-5 * scale)
    conv = [k for k in feats.routes if k.endswith("[conv1d.weight]")]
    assert len(conv) == 6 and all("read in this module's forward" in feats.routes[k] for k in conv), feats.routes
    assert "model.message_input" in feats.routes


def test_find_step_module_returns_inkling_s_looped_layer_range() -> None:
    """The repeated range is found (not one decoder layer), and message_input is named as tied to the passes."""
    model = make_inkling()
    batch = _batches(2, 2)[0]
    with pytest.warns(RuntimeWarning, match=r"message_input.*body="):
        step = lt.find_step_module(model, batch)
    s, e = INKLING_LOOP
    assert isinstance(step, list) and step == list(model.model.layers[s:e])
    loop = lt.find_loop(model, batch)
    assert loop.passes == 3 and loop.body == [*step, model.model.message_input] and not loop.others


def test_find_step_module_returns_a_one_layer_inkling_range_as_a_list() -> None:
    """A loop range of one decoder layer is still the range (``layers[2:3]``, a list), not the bare layer: the
    other layers of the stack run once. Catches the one-layer case collapsing to a module (the contract is the
    layer range)."""
    model = make_inkling(loop_layer_index_start=2, loop_layer_index_end=3, layer_types=INKLING_TYPES)
    batch = _batches(2, 2)[0]
    with pytest.warns(RuntimeWarning, match=r"message_input"):
        step = lt.find_step_module(model, batch)
    assert isinstance(step, list) and step == list(model.model.layers[2:3]), step


@pytest.mark.slow
def test_inkling_exact_per_pass_one_example_at_a_time_to_float32_rounding() -> None:
    """Batches of one: nothing is batched differently from the oracle, so the features agree to a few float32
    ulps (measured 1.2e-7 of the largest entry), far tighter than the batched test can ask."""
    model = make_inkling(loop_num_passes=2)
    batches = _batches(3, 1)
    layers, body = _inkling_loop(model)
    feats = lt.featurize(model, batches, hf.causal_lm_loss, step_module=layers, body=body, sketch=lt.SketchSpec.exact())
    want = _checked_oracle(model, layers, [model.model.message_input], batches)
    assert_close(feats.per_step, want, "Inkling per-pass, batches of one", 0, 2e-6 * float(want.abs().max()))


def _sketch_of(exact: torch.Tensor, spec: lt.SketchSpec, model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    """The sketch of exact per-step features ``[N, tau, P]`` (parameters in ``names`` order), in float64."""
    params = dict(model.named_parameters())
    plan = SketchPlan.build(spec, [(n, tuple(params[n].shape)) for n in names])
    n, tau, _ = exact.shape
    want = torch.zeros(n * tau, plan.dim, dtype=torch.float64)
    flat, offset = exact.reshape(n * tau, -1).double(), 0
    for name in names:
        slot = plan.slot(name)
        slot.add_dense(want[:, slot.offset : slot.offset + slot.m], flat[:, offset : offset + params[name].numel()])
        offset += params[name].numel()
    return want.view(n, tau, -1)


@pytest.mark.slow
def test_inkling_sketched_features_are_the_sketch_of_the_exact_ones() -> None:
    """The default sketch is a fixed linear map of the per-pass gradient: sketched features equal it applied to
    the oracle's exact ones (to the float32 batching noise, measured as in the exact test)."""
    model = make_inkling()
    batches = _batches(4, 2)
    layers, body = _inkling_loop(model)
    spec = lt.SketchSpec(dim=512, seed=3)
    feats = lt.featurize(model, batches, hf.causal_lm_loss, step_module=layers, body=body, sketch=spec)
    names = body_names(model, body)
    want = _sketch_of(_checked_oracle(model, layers, [model.model.message_input], batches), spec, model, names)
    _, noise = _float32_noise(model, names, batches)
    # a sketch coordinate adds up to a few hundred gradient entries with random signs
    tol = 3 * noise * float(torch.tensor(len(names) * 64.0).sqrt()) + 1e-6 * float(want.abs().max())
    assert_close(feats.per_step.double(), want, "Inkling sketched vs sketch of exact", 0, tol)


@pytest.mark.parametrize("which", ["hrm-text", "albert"])
def test_sketched_features_are_the_sketch_of_the_exact_ones(which: str) -> None:
    """float64: the default sketch of each step equals the sketch of the oracle's exact step."""
    from tests.hf_fixtures import MLMData, albert_config

    spec = lt.SketchSpec(dim=256, seed=1)
    if which == "hrm-text":
        model, loss, batches = make_hrm(), hf.causal_lm_loss, _batches(4, 2)
        step = model.model.L_module
    else:
        torch.manual_seed(0)
        model = transformers.AlbertForMaskedLM(albert_config()).double()
        loss, batches = hf.masked_lm_loss, list(torch.utils.data.DataLoader(MLMData(4, 3), batch_size=2))
        step = model.albert.encoder.albert_layer_groups[0]
    feats = lt.featurize(model, batches, loss, step_module=step, sketch=spec)
    want = _sketch_of(oracle_per_pass(model, [step], [], batches, loss), spec, model, body_names(model, [step]))
    assert_close(feats.per_step, want, f"{which}: sketched vs sketch of exact")


def test_hrm_text_l_stack_per_cycle_equals_the_oracle_and_no_grad_cycles_are_zero() -> None:
    """step_module=model.model.L_module: one step per L cycle (H_cycles x L_cycles = 6), in float64 equal to the
    per-cycle oracle; the cycles run under no_grad (L_bp_cycles) are exactly zero. Catches a step counted at the
    wrong call (no-grad calls must still advance the index)."""
    model = make_hrm()
    batches = _batches(5, 3)
    stack = model.model.L_module
    feats = lt.featurize(model, batches, hf.causal_lm_loss, step_module=stack, sketch=lt.SketchSpec.exact())
    want = _checked_oracle(model, [stack], [], batches)
    assert feats.per_step is not None and feats.per_step.shape[1] == 6
    assert_close(feats.per_step, want, "HRM-Text L stack per cycle vs the oracle")
    grad_cycles = [2, 4, 5]  # (h, l) = (1, 3), (2, 2), (2, 3), 0-based flat index h * L_cycles + l
    zero = [t for t in range(6) if t not in grad_cycles]
    assert torch.count_nonzero(feats.per_step[:, zero]) == 0 and bool((want[:, grad_cycles].norm(dim=-1) > 0).all())


def test_hrm_text_two_stacks_two_calls_add_up_to_the_whole_influence() -> None:
    """L and H share no parameter, so each per-example gradient splits into an L block and an H block: TracIn
    over both stacks is TracIn of the L call plus TracIn of the H call, each with its own step index (L: 6
    cycles, H: 2). The H call equals its own per-cycle oracle. Putting H in the L call's body is refused (its
    last call comes after the last L pass)."""
    model = make_hrm()
    batches = _batches(4, 2)
    L, H = model.model.L_module, model.model.H_module
    exact = lt.SketchSpec.exact()
    fl = lt.featurize(model, batches, hf.causal_lm_loss, step_module=L, sketch=exact)
    fh = lt.featurize(model, batches, hf.causal_lm_loss, step_module=H, sketch=exact)
    assert fh.per_step is not None and fh.per_step.shape[1] == 2
    assert_close(fh.per_step, _checked_oracle(model, [H], [], batches), "HRM-Text H stack per cycle vs the oracle")
    g = tied_gradients(model, body_names(model, [L, H]), batches, hf.causal_lm_loss)
    assert_close(lt.tracin(fl, fl) + lt.tracin(fh, fh), g @ g.T, "TracIn(L) + TracIn(H) vs the whole gradient")
    with pytest.raises(lt.StepError, match=r"H_module.*after the last loop pass"):
        lt.featurize(model, batches, hf.causal_lm_loss, step_module=L, body=[L, H], sketch=exact)
    with pytest.raises(lt.StepError, match="was called where"):
        lt.featurize(model, batches, hf.causal_lm_loss, step_module=[L, H], sketch=exact)


def test_albert_layer_groups_each_loop_on_their_own() -> None:
    """ALBERT with two layer groups over six layers runs group 0 three times, then group 1 three times: each group
    is its own loop (tau = 3) and equals the per-application oracle."""
    from tests.hf_fixtures import MLMData, albert_config

    torch.manual_seed(0)
    model = transformers.AlbertForMaskedLM(albert_config(num_hidden_layers=6, num_hidden_groups=2)).double()
    batches = list(torch.utils.data.DataLoader(MLMData(5, 3), batch_size=3))
    for g in range(2):
        group = model.albert.encoder.albert_layer_groups[g]
        feats = lt.featurize(model, batches, hf.masked_lm_loss, step_module=group, sketch=lt.SketchSpec.exact())
        want = _checked_oracle(model, [group], [], batches, hf.masked_lm_loss)
        assert feats.per_step is not None and feats.per_step.shape[1] == 3
        assert_close(feats.per_step, want, f"ALBERT layer group {g} per application vs the oracle")


@pytest.mark.parametrize("body", ["blocks.0:2,messenger", ["blocks.0:2", "messenger"], "mixed"])
def test_tracin_callback_takes_the_step_module_forms(tmp_path, body: Any) -> None:
    """body= as a range with a path, a list of paths, or paths and modules mixed: the recorded second moments
    are exactly those modules' parameters. Catches a form resolved to the wrong modules (or not at all)."""
    from types import SimpleNamespace

    from tests.loop_fixtures import RangeLoop, range_batches, range_loss

    model = RangeLoop()
    if body == "mixed":
        body = ["blocks.0:2", model.messenger]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    callback = hf.TracInCallback(tmp_path, every=1, body=body)
    opt.zero_grad()
    range_loss(model, range_batches(1)[0]).mean().backward()
    opt.step()
    state = SimpleNamespace(global_step=1)
    callback.on_optimizer_step(None, state, None, optimizer=opt, model=model)
    callback.on_step_end(None, state, None, model=model, optimizer=opt)
    saved = lt.load_checkpoints(tmp_path)[0].load_full()
    want = {n for n, _ in model.named_parameters() if n.startswith(("blocks.", "messenger."))}
    assert saved.lr == 1e-2 and set(saved.second_moments["exp_avg_sq"]) == want


def _per_example_gradients(model: torch.nn.Module, names: list[str], batches: list[Any], loss: Any) -> torch.Tensor:
    """``[N, P]``: each example's gradient w.r.t. the named parameters (float64 rows), one example at a time."""
    params = dict(model.named_parameters())
    rows = []
    for batch in batches:
        n = len(next(iter(batch.values())))
        for i in range(n):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            grads = torch.autograd.grad(loss(model, one).sum(), [params[k] for k in names], allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(params[k]) if g is None else g).reshape(-1).double()
                                   for k, g in zip(names, grads, strict=True)]))  # fmt: skip
    return torch.stack(rows)


@pytest.mark.parametrize("which", ["inkling", "albert"])
def test_outside_scores_of_the_transformers_loops_equal_autograd(which: str) -> None:
    """``attribute(outside=True)`` on the looped LMs that ship with ``transformers``: the part outside the loop equals
    the per-example gradients of every parameter outside the body, one example at a time, dotted (exact spec). Two
    things made this fail: Inkling's short convolutions read ``conv1d.weight`` in their parent's forward (scoring
    the ``nn.Conv1d`` alone captured nothing), and ALBERT's MLM head registers the bias its decoder Linear adds (it
    was counted twice)."""
    from tests.hf_fixtures import make_albert, make_mlm_dataset

    if which == "inkling":
        model, loss = make_inkling(), hf.causal_lm_loss
        train, query = _batches(4, 2), _batches(2, 2, seed=1)
    else:
        model, loss = make_albert(), hf.masked_lm_loss

        def loader(role: str, n: int) -> list[Any]:
            data = torch.utils.data.Subset(make_mlm_dataset(role), range(n))
            return list(torch.utils.data.DataLoader(data, batch_size=2))

        train, query = loader("train", 4), loader("query", 2)
    step = lt.find_step_module(model, train[0], loss)
    ck = [lt.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, lr=0.5, name="w")]
    res = lt.attribute(model, ck, train, query, loss, step_module=step, sketch=lt.SketchSpec.exact(), outside=True)
    inside = {id(p) for m in (step if isinstance(step, list) else [step]) for p in m.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) not in inside and p.requires_grad]
    want = 0.5 * _per_example_gradients(model, names, train, loss) @ _per_example_gradients(model, names, query, loss).T
    assert res.outside is not None
    scale = float(want.abs().max())
    assert_close(res.outside.double(), want, f"{which}: outside scores vs autograd", rtol=1e-4, atol=1e-5 * scale)


def test_kfac_diagonal_of_inkling_s_parent_read_convolutions_is_their_fisher() -> None:
    """K-FAC's diagonal blocks of Inkling's short-convolution weights (read in the parent's forward, the
    ``nn.Conv1d`` never called) are the mean squared per-example tied gradient. They were fitted from the
    ``nn.Conv1d`` modules alone, which saw nothing: zero blocks, refused for want of damping."""
    from looptrace.curvature import fit_curvature

    model = make_inkling()
    batches = _batches(4, 2)
    layers, _ = _inkling_loop(model)
    curv = fit_curvature(model, batches, hf.causal_lm_loss, step_module=layers, kinds=("kfac",))
    conv = [d for d in curv.diagonal if "conv1d" in d.name]
    assert conv, "no convolution in the diagonal blocks"
    grads = _per_example_gradients(model, [d.name for d in conv], batches, hf.causal_lm_loss)
    off = 0
    for d in conv:
        n = d.diag.numel()
        want = grads[:, off : off + n].square().mean(0)
        off += n
        assert float(want.abs().max()) > 0, f"{d.name}: no gradient in the reference"
        assert_close(
            d.diag.reshape(-1),
            want,
            f"K-FAC diagonal of {d.name} (float32 model)",
            rtol=1e-3,
            atol=1e-4 * float(want.max()),
        )

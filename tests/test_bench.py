"""The benchmarks measure what they claim: a model with an inactive loop step is refused, the whole
benchmark runs end to end at tiny sizes (labels from the data), and the GPU script's dry run works."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest
import torch

import looptrace as lt
from looptrace.apps.bench import run_all
from looptrace.apps.bench.common import (
    BenchConfig,
    InactiveSteps,
    bracketed_rounds,
    require_active,
    step_shares,
    synthetic_workload,
)
from looptrace.apps.bench.fidelity import fidelity

TINY = BenchConfig(d_model=16, n_heads=2, loops=4, seq=8, vocab=32, batch=3, n_batches=2, dims=(64, 2048),
                   total_dims=(4096,), seeds=2, reps=1, memory_cap_mib=512, peer=False)  # fmt: skip


def test_a_model_with_one_active_step_is_refused() -> None:
    """At initialisation the concat adapter is [I | 0]: the core ignores its state and only the last step
    has gradient. The benchmark must refuse to report on it, and accept the perturbed model."""
    frozen = synthetic_workload(dataclasses.replace(TINY, active=False))
    shares = step_shares(frozen.featurize(lt.SketchSpec.exact()))
    assert shares[-1] > 0.99, f"the unperturbed model should have one active step, shares {shares}"
    with pytest.raises(InactiveSteps, match=r"loop step\(s\) \[1, 2, 3\]"):
        fidelity(frozen, TINY, frozen.featurize(lt.SketchSpec.exact()))
    active = synthetic_workload(TINY)
    shares = step_shares(active.featurize(lt.SketchSpec.exact()))
    require_active(shares, TINY.share_floor, "active")
    assert min(shares) > 0.05, f"perturbed weights should spread the gradient over the steps, shares {shares}"


@pytest.mark.slow  # several minutes: fresh processes for the memory points, the recorder, the routes
def test_the_whole_benchmark_runs_at_tiny_sizes(tmp_path) -> None:
    r = run_all(TINY, tmp_path, trained="")
    for key in ("sdi_rel_error_m2048", "tracin_rel_error_m2048", "slope", "per_step_error", "overhead_ratio",
                "conservation_rel", "max_batch_ratio"):  # fmt: skip
        assert key in r and r[key] is not None, key
    assert r["sdi_rel_error_m2048"] != r["tracin_rel_error_m2048"], "SDI and TracIn errors are separate figures"
    assert len(r["per_step_error"]) == TINY.loops
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["overhead_ratio"] == r["overhead_ratio"]
    page = (tmp_path / "README.md").read_text()
    assert f"{r['sdi_rel_error_m2048']:.4f}" in page and "m=2048" in page, (
        "the page's labels and numbers come from the data"
    )


def test_gpu_script_dry_run_on_the_cpu(tmp_path) -> None:
    from looptrace.apps.bench import gpu

    r = gpu.run("cpu", dry_run=True, out_dir=tmp_path)
    assert r["dry_run"] and set(r["largest_batch"]) == {"plain", "sketched", "sketched-recompute", "exact"}
    assert (tmp_path / "gpu-dry-run.json").exists() and "dry run" in (tmp_path / "gpu-dry-run.md").read_text()


def test_the_overhead_split_measures_what_it_names() -> None:
    """The floor asks autograd for no weight gradient yet reaches every loop step; the replay covers every
    Linear call of the body (layers x steps) and sketches into the plan's coordinates."""
    from looptrace.apps.bench.speed import floor_step, linear_products

    work = synthetic_workload(TINY)
    steps: list[int] = []
    handle = work.step_module.register_forward_hook(lambda m, a, o: steps.append(1))
    work.model.zero_grad(set_to_none=True)
    try:
        floor_step(work)()
    finally:
        handle.remove()
    assert len(steps) == TINY.loops * TINY.n_batches, f"the floor ran {len(steps)} step calls"
    assert all(p.grad is None for p in work.model.parameters()), "the floor must not compute weight gradients"

    replay = linear_products(work, lt.SketchSpec())
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in work.step_module.modules())
    assert len(replay.factors) == n_linear * TINY.loops, (
        f"{len(replay.factors)} replayed calls for {n_linear} Linear layers x {TINY.loops} steps"
    )
    replay.products()
    replay.weight_grads()
    assert replay.out.abs().sum() > 0, "the replay sketched nothing"


def test_bracketed_rounds_put_every_group_between_two_plain_runs() -> None:
    """The timing rounds behind the overhead and the head-to-head figures: each group runs between two plain
    runs and is divided by their mean; with ``alternate`` every other round runs a group in reverse."""
    order: list[str] = []

    def call(name: str) -> Callable[[], None]:
        return lambda: order.append(name)

    groups = [{"a": call("a"), "b": call("b")}, {"c": call("c")}]
    timed = bracketed_rounds(call("plain"), groups, reps=2, alternate=True)
    assert order == ["plain", "a", "b", "plain", "c", "plain", "plain", "b", "a", "plain", "c", "plain"], order
    assert [len(p) for p in timed.plain] == [3, 3], "one plain run before the groups and one after each"
    for i, runs in enumerate(timed.plain):
        assert timed.base["a"][i] == timed.base["b"][i] == (runs[0] + runs[1]) / 2
        assert timed.base["c"][i] == (runs[1] + runs[2]) / 2, "the second group shares the plain run between them"
    assert timed.ratios("c") == [t / b for t, b in zip(timed.times["c"], timed.base["c"], strict=True)]

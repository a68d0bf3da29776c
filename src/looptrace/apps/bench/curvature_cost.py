"""What fitting K-FAC / EK-FAC costs next to one featurisation pass of the training set (issue #24, item 4).

Times (medians over ``--repeats`` rounds; ratios are medians of per-round ratios) on two looped models,
one CPU thread:

* ``featurize``: one default featurisation pass of the training set (``SketchSpec()``, totals only), what
  every store and ``lt.attribute`` pay per checkpoint anyway;
* ``fit_kfac`` / ``fit_ekfac``: :func:`looptrace.curvature.fit_curvature` (pass 1: Kronecker factors, the
  diagonal blocks of LayerNorm parameters, the grouping check and, for EK-FAC, each example's tied gradient or
  its rows kept, whichever is cheaper to rotate; then EK-FAC's rotations into the eigenbasis);
* ``query_plain`` / ``query_ekfac``: the query side, plain per-step features vs EK-FAC-preconditioned ones
  (exact per-step gradients, preconditioned, sketched), per query example.

Run: ``looptrace bench curvature`` (writes ``benchmarks/results/curvature-cost.json`` and ``curvature-cost.md``).
Preconditioning adds nothing to the training side: :func:`looptrace.attribute` featurises the training set with
the same call whatever ``precondition=`` is (the query side is where it acts), so that side is not timed twice.
The machine's load average is recorded: on a shared machine the ratios, which time both sides under the same
load, are more meaningful than the seconds.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import looptrace as lt
from looptrace.apps.evaluation.task import MajorityTask, loss_fn
from looptrace.curvature import fit_curvature, preconditioned_features
from looptrace.io import atomic_write_bytes, atomic_write_json
from looptrace.models.looped import LoopedConfig, LoopedTransformer


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _lm_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


def _models() -> dict[str, tuple[torch.nn.Module, torch.nn.Module, Any, list[Any], list[Any]]]:
    task = MajorityTask()
    mlp = task.model()
    data = task.data()
    tr = [(data["train"][0][i : i + 64], data["train"][1][i : i + 64]) for i in range(0, task.n_train, 64)]
    qu = [(data["query"][0][:16], data["query"][1][:16])]
    out: dict[str, tuple[torch.nn.Module, torch.nn.Module, Any, list[Any], list[Any]]] = {
        f"evaluation task (looped residual MLP, d={task.d_model}, tau={task.loops}, N={task.n_train})": (
            mlp,
            mlp.core,
            loss_fn,
            tr,
            qu,
        ),
    }
    for d, n, b in WIDTHS:
        torch.manual_seed(0)
        cfg = LoopedConfig(vocab_size=32, d_model=d, n_heads=4, n_core=1, n_loops=8, max_len=32, injection="additive")
        gpt = LoopedTransformer(cfg)
        g = torch.Generator().manual_seed(0)
        xs, ys = torch.randint(0, 32, (n, 32), generator=g), torch.randint(0, 32, (n, 32), generator=g)
        tr2 = [(xs[i : i + b], ys[i : i + b]) for i in range(0, n, b)]
        out[f"looped transformer (d={d}, 1 block, tau=8, L=32, N={n})"] = (
            gpt,
            gpt.core,
            _lm_loss,
            tr2,
            [(xs[:16], ys[:16])],
        )
    return out


#: The looped transformer's widths, with the training set's size and batch size at each (smaller where wider,
#: so that a round stays short): the fit's ratio to a featurisation pass grows with the width (see the
#: table's notes in :func:`markdown`).
WIDTHS = ((64, 256, 32), (128, 128, 16), (256, 64, 16))


def _row(model: torch.nn.Module, core: torch.nn.Module, lfn: Any, tr: list[Any], qu: list[Any], repeats: int) -> dict:
    """Medians over rounds; each round times every operation once, in turn, so that a change of load on a
    shared machine hits all of them alike."""
    kw: dict[str, Any] = dict(step_module=core, verify=False)
    n_query = sum(len(b[0]) for b in qu)
    curv = fit_curvature(model, tr, lfn, **kw)
    ops: dict[str, Callable[[], Any]] = {
        "featurize": lambda: lt.featurize(model, tr, lfn, per_step=False, **kw),
        "fit_kfac": lambda: fit_curvature(model, tr, lfn, kinds=("kfac",), **kw),
        "fit_ekfac": lambda: fit_curvature(model, tr, lfn, kinds=("ekfac",), **kw),
        "query_plain": lambda: lt.featurize(model, qu, lfn, **kw),
        "query_ekfac": lambda: preconditioned_features(model, qu, lfn, lambda g: curv.precondition(g, "ekfac"), **kw),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            times[name].append(_timed(fn, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "featurize": med["featurize"],
        "fit_kfac": med["fit_kfac"],
        "fit_ekfac": med["fit_ekfac"],
        "query_plain_per_example": med["query_plain"] / n_query,
        "query_ekfac_per_example": med["query_ekfac"] / n_query,
        "body_parameters": curv.dim,
        "fit_kfac_over_featurize": statistics.median(
            a / b for a, b in zip(times["fit_kfac"], times["featurize"], strict=True)
        ),
        "fit_ekfac_over_featurize": statistics.median(
            a / b for a, b in zip(times["fit_ekfac"], times["featurize"], strict=True)
        ),
        "query_ekfac_over_plain": statistics.median(
            a / b for a, b in zip(times["query_ekfac"], times["query_plain"], strict=True)
        ),
    }


def measure(repeats: int) -> dict[str, Any]:
    return {name: _row(*setup, repeats) for name, setup in _models().items()}


def run(out: Path, repeats: int = 3) -> dict[str, Any]:
    """Measure, and write ``out/curvature-cost.json`` and ``out/curvature-cost.md``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())  # fmt: skip
        load_before = os.getloadavg()
        rows = measure(repeats)
        load_after = os.getloadavg()
    finally:
        torch.set_num_threads(threads)
    res = {
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "threads": 1,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_average_before_after": [load_before[0], load_after[0]],
        },
        "repeats": repeats,
        "seconds": rows,
        "worst_kfac_fit_over_featurize": max(r["fit_kfac_over_featurize"] for r in rows.values()),
        "worst_ekfac_fit_over_featurize": max(r["fit_ekfac_over_featurize"] for r in rows.values()),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, out / "curvature-cost.json")
    atomic_write_bytes(out / "curvature-cost.md", markdown(res).encode())
    return res


def markdown(res: dict[str, Any]) -> str:
    """The table of ``curvature-cost.json``: every figure from it."""
    m = res["machine"]
    lines = [
        "# What fitting K-FAC / EK-FAC costs",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['threads']} thread, torch {m['torch']}; medians over {res['repeats']} "
        "rounds, ratios the medians of per-round ratios (`looptrace bench curvature`). Both sides run with "
        "verify=False (no first-batch check against autograd), so the passes themselves are compared; the fit's "
        "grouping check, which picks its route, runs all the same (one more backward of the first batch).",
        "",
        "| model | featurisation pass (s) | K-FAC fit / featurisation | EK-FAC fit / featurisation | "
        "EK-FAC query / plain query |",
        "|---|---|---|---|---|",
    ]
    # the JSON keeps its keys sorted: rows by the body's size, whatever order the file lists them in
    for name, r in sorted(res["seconds"].items(), key=lambda kv: kv[1]["body_parameters"]):
        lines.append(f"| {name} | {r['featurize']:.3f} | {r['fit_kfac_over_featurize']:.2f}x | "
                     f"{r['fit_ekfac_over_featurize']:.2f}x | {r['query_ekfac_over_plain']:.2f}x |")  # fmt: skip
    lines += [
        "",
        "The training side is featurised once whatever the preconditioner (the same call), so preconditioning adds "
        "nothing there.",
        "",
        "How the fit grows with width: K-FAC's factors cost `d_in^2 + d_out^2` multiply-adds per row (every token "
        "of every loop step), more than the row's own forward and backward (`3 d_in d_out`) for a 4x MLP "
        "(`17 d^2` against `12 d^2`): 46 `d^2` per row for this block's four Linear layers, against "
        "at most 12 `d^2` for the featurisation's per-example products (the layers' own `d_in d_out`). EK-FAC adds each example's "
        "rotation into the eigenbasis (`d_out d_in (d_out + d_in)`, or `R (d_out^2 + d_in^2 + d_out d_in)` for "
        "its `R` rows when fewer). The costs that do not grow with `d^2` (attention over the sequence, "
        "elementwise work, Python) weigh less as the width grows, so the fit's ratio to a featurisation pass "
        "grows with it (the looped transformer's rows above; N is smaller at the larger widths, to keep a round "
        "short, which gives the per-fit eigendecompositions a little more weight there), to "
        f"{res['worst_kfac_fit_over_featurize']:.2f}x (K-FAC) and {res['worst_ekfac_fit_over_featurize']:.2f}x "
        "(EK-FAC) at the widest. Gauss-Newton needs no fit (its Gram matrix is of the training features "
        "themselves). The factors are fitted once per checkpoint and serve every query and every damping. The "
        "query side's EK-FAC preconditioning rotates each query's gradient at every loop step, so it grows the "
        "same way; queries are few.",
        "",
    ]
    return "\n".join(lines)

"""Speed and fidelity across widths: ``looptrace bench widths [--quick]``.

Every other speed figure is taken at width 128 on a model whose untied prelude and coda dilute the loop's share
of the work. Here the model is a *body-dominated* looped block (no prelude or coda: one shared block of concat
adapter + attention + 4x MLP, tau = 8, sequence 64, 6 batches of 8, a 64-token vocabulary so that embedding and
read-out are negligible) at widths 128 / 256 / 512 / 768 (768 is the paper's), and the looped GPT 1/2/1 of the
main benchmark as a second row. At each width:

* every loop step carries gradient (checked on the exact per-step gradients, else the width is refused);
* the default sketch at the reference's total dimension D = 2048 x (body tensors), its layout, and its SDI
  error against the exact features over seeds, beside the reference implementation's (TensorSketch m = 2048
  per tensor) on the same batch;
* time over a plain forward+backward of the same loader, in alternating rounds between plain runs: the default
  with the first-batch check, without it, and with each TensorSketch route forced (the route ``auto`` picks must
  be within 10 % of the faster); when the reference runs, all of it in the reference's process, head to head
  with it round by round;
* peak memory per example of each route (fresh processes, peak RSS).

Writes ``benchmarks/results/widths.json`` and ``widths.md``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import looptrace as lt
from looptrace.apps.bench.common import (
    RESULTS,
    BenchConfig,
    Workload,
    bracketed_rounds,
    machine,
    rel,
    require_active,
    step_shares,
    synthetic_workload,
)
from looptrace.io import atomic_write_bytes, atomic_write_json
from looptrace.sketch.plan import SketchPlan

PEER_M = 2048  # the reference's m per tensor (the paper's)
PAPER_WIDTH = 768
OVERHEAD_TARGET = 1.2  # default featurisation with the first-batch check, over a plain forward+backward
SPEEDUP_TARGET = 1.1  # head to head with the reference at equal total dimension
TARGET_FROM = 512  # the overhead bound applies from this width (the paper's widths)
ROUTE_SLACK = 1.10  # the route "auto" picks may cost at most this much more than the faster one


@dataclasses.dataclass(frozen=True)
class WidthsConfig:
    widths: tuple[int, ...] = (128, 256, 512, 768)
    gpt_widths: tuple[int, ...] = (128, 512)  # the looped GPT 1/2/1 (prelude/core/coda) as a second row
    loops: int = 8
    seq: int = 64
    batch: int = 8
    n_batches: int = 6
    reps: int = 5  # timing rounds
    seeds: int = 3  # sketch seeds for the errors
    memory: bool = True
    peer: bool = True
    share_floor: float = 0.1

    @classmethod
    def quick(cls) -> WidthsConfig:
        return cls(gpt_widths=(128,), reps=3, seeds=2)


def block(cfg: WidthsConfig, d: int, gpt: bool = False) -> BenchConfig:
    """The benchmark model at width ``d``: the body-dominated block, or the looped GPT 1/2/1."""
    shape = dict(n_prelude=1, n_core=2, n_coda=1, vocab=512) if gpt else dict(n_prelude=0, n_core=1, n_coda=0, vocab=64)
    return BenchConfig(
        d_model=d, n_heads=max(4, d // 64), loops=cfg.loops, seq=cfg.seq, batch=cfg.batch, n_batches=cfg.n_batches,
        reps=cfg.reps, seeds=cfg.seeds, share_floor=cfg.share_floor, **shape,  # type: ignore[arg-type]
    )  # fmt: skip


#: The sketches the default was chosen among, at the reference's total dimension D (label -> (D, seed) -> spec).
CANDIDATES = {
    "default (auto)": lambda d, seed: lt.SketchSpec(dim=d, seed=seed),
    "CountSketch, shared budget (the default before: materialised)": lambda d, seed: lt.SketchSpec(
        dim=d, seed=seed, method="countsketch", budget="shared"
    ),
    "TensorSketch, proportional budget": lambda d, seed: lt.SketchSpec(
        dim=d, seed=seed, method="tensorsketch", budget="proportional"
    ),
    "TensorSketch m=2048 per tensor (the reference's estimator)": lambda d, seed: lt.SketchSpec(
        dim=PEER_M, seed=seed, method="tensorsketch", budget="per_tensor"
    ),
}


def _ours(d_ref: int) -> dict[str, list[Any]]:
    """Our rows, timed head to head: label -> [SketchSpec dict, featurize keywords]."""
    spec = lt.SketchSpec(dim=d_ref).to_dict()
    return {
        "default, first-batch check": [spec, {"verify": "first"}],
        "default, no check": [spec, {"verify": False}],
        "default, FFT forced": [spec, {"verify": False, "outer_path": "fft"}],
        "default, materialised forced": [spec, {"verify": False, "outer_path": "materialize"}],
        "default at dim=4096 (SketchSpec()), first-batch check": [lt.SketchSpec().to_dict(), {"verify": "first"}],
    }


def _in_process(work: Workload, reps: int, ours: dict[str, list[Any]]) -> dict[str, Any]:
    """Our rows timed without the reference (it is not installed): the same rounds in this process."""
    batches = work.batches

    def plain() -> None:
        work.plain_step(batches)

    calls = {
        label: (lambda d=d, kw=kw: work.featurize(lt.SketchSpec.from_dict(d), batches, **kw))
        for label, (d, kw) in ours.items()
    }
    plain()
    for fn in calls.values():
        fn()
    r = bracketed_rounds(plain, [calls], reps, alternate=True)
    out: dict[str, Any] = {"plain_s": statistics.median(r.base[next(iter(calls))]), "head_to_head": {}}
    for label in calls:
        over = r.ratios(label)
        out["head_to_head"][label] = {"overhead": statistics.median(over), "overhead_rounds": over,
                                      "featurize_s": statistics.median(r.times[label])}  # fmt: skip
    return out


def measure(cfg: WidthsConfig, d: int, gpt: bool, venv: Path | None) -> dict[str, Any]:
    """One row: layout, errors, timings and memory of one model at one width."""
    from looptrace.apps.bench.reference import reference

    bc = block(cfg, d, gpt)
    work = synthetic_workload(bc)
    params = [(n, tuple(p.shape)) for n, p in work.step_module.named_parameters()]
    d_ref = PEER_M * len(params)
    first = work.batches[:1]
    exact = work.featurize(lt.SketchSpec.exact(), first)
    shares = step_shares(exact)
    require_active(shares, cfg.share_floor, f"width {d}")
    plan = SketchPlan.build(lt.SketchSpec(dim=d_ref), [(f"core.{n}", s) for n, s in params])
    row: dict[str, Any] = {
        "width": d, "model": "looped GPT 1/2/1" if gpt else "body-dominated block", "description": work.description,
        "body_parameters": sum(int(p.numel()) for _, p in work.step_module.named_parameters()), "body_tensors": len(params),
        "D": d_ref, "step_shares": shares,
        "layout": [{"name": s.name, "kind": s.kind, "m": s.m} for s in plan.slots if s.kind == "ts"],
        "shared_space": next((g[2] for g in plan.groups() if g[0].startswith("the space")), 0),
    }  # fmt: skip
    s_ex = lt.sdi(exact, exact)
    row["choice"] = {}  # the default's choice re-done at this width: SDI error of each candidate at the same D
    for label, make in CANDIDATES.items():
        errs, used = [], 0
        for seed in range(cfg.seeds):
            f = work.featurize(make(d_ref, seed), first)
            errs.append(rel(lt.sdi(f, f), s_ex))
            used = int(f.total.shape[-1])
        row["choice"][label] = {
            "mean": statistics.mean(errs),
            "sd": statistics.pstdev(errs),
            "seeds": errs,
            "dim": used,
        }
    row["sdi_rel_error_default"] = row["choice"]["default (auto)"]
    ours = _ours(d_ref)
    ref = reference(bc, exact, venv, dims=[PEER_M], ours=ours) if venv is not None else None
    del exact, s_ex
    if ref is not None:
        err = next(e for e in ref["errors"] if e["m"] == PEER_M)
        row["reference"] = {
            "overhead": ref["overhead_m2048"], "overhead_rounds": ref["overhead_m2048_rounds"], "D": err["D"],
            "sdi_rel_error": {"mean": err["sdi_rel_error"], "sd": err["sdi_sd"]},
        }  # fmt: skip
        timing = {"plain_s": ref["plain_s"], "head_to_head": ref["head_to_head"], "in": "the reference's process"}
    else:
        timing = {**_in_process(work, cfg.reps, ours), "in": "this process (the reference did not run)"}
    row["timing"] = timing
    h2h = timing["head_to_head"]
    fft, mat = h2h["default, FFT forced"]["overhead"], h2h["default, materialised forced"]["overhead"]
    auto = h2h["default, no check"]["overhead"]
    row["route_check"] = {"auto": auto, "fft": fft, "materialize": mat, "auto_over_best": auto / min(fft, mat),
                          "within": auto / min(fft, mat) <= ROUTE_SLACK}  # fmt: skip
    probe = work.featurize(lt.SketchSpec(dim=d_ref), first)
    row["routes"] = {k: v for k, v in probe.routes.items() if k.endswith("(sketch)")}
    if cfg.memory:
        from looptrace.apps.bench.memory import memory

        mem_cfg = dataclasses.replace(bc, memory_cap_mib=16 * 1024)
        modes = ("plain", "sketched-fft", "sketched-materialize")
        row["memory"] = memory(mem_cfg, batches={m: (2, 4) for m in modes})
    return row


def run(cfg: WidthsConfig, out_dir: Path = RESULTS, venv: Path | None = Path(".bench-venv")) -> dict[str, Any]:
    from looptrace.apps.bench.reference import peer_venv

    t0 = time.perf_counter()
    py = peer_venv(venv) if (cfg.peer and venv is not None) else None
    res: dict[str, Any] = {"machine": machine(), "config": dataclasses.asdict(cfg), "paper_width": PAPER_WIDTH,
                           "rows": []}  # fmt: skip
    jobs = [(d, False) for d in cfg.widths] + [(d, True) for d in cfg.gpt_widths]
    for d, gpt in jobs:
        print(f"width {d} ({'looped GPT 1/2/1' if gpt else 'block'}) ...", flush=True)
        res["rows"].append(measure(cfg, d, gpt, venv if py is not None else None))
    res["seconds"] = time.perf_counter() - t0
    res["headline"] = headline(res)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, out_dir / "widths.json")
    atomic_write_bytes(out_dir / "widths.md", markdown(json.loads((out_dir / "widths.json").read_text())).encode())
    return res


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """Per width of the block: the figures the README quotes."""
    out: dict[str, Any] = {}
    for row in res["rows"]:
        if row["model"] != "body-dominated block":
            continue
        h2h = row["timing"]["head_to_head"]
        ours = h2h["default, first-batch check"]
        fig: dict[str, Any] = {
            "width": row["width"],
            "overhead_with_check": ours["overhead"],
            "overhead_with_check_rounds": ours["overhead_rounds"],
            "overhead_no_check": h2h["default, no check"]["overhead"],
            "sdi_rel_error": row["sdi_rel_error_default"]["mean"],
            "route_within_10pct": row["route_check"]["within"],
            "rounds": len(ours["overhead_rounds"]),
        }
        if "reference" in row:
            fig["reference_overhead"] = row["reference"]["overhead"]
            fig["speedup_vs_reference"] = ours["speedup"]
            fig["speedup_vs_reference_rounds"] = ours["speedup_rounds"]
            fig["reference_sdi_rel_error"] = row["reference"]["sdi_rel_error"]["mean"]
        # the targets of issue #31 at this width, as fields (a page quotes these, never its own reading)
        fig["targets"] = {
            "overhead_at_most": OVERHEAD_TARGET,
            # at the narrow widths the issue asks for "no slower than before", not for this bound
            "overhead_met": fig["overhead_with_check"] <= OVERHEAD_TARGET if row["width"] >= TARGET_FROM else None,
            "speedup_at_least": SPEEDUP_TARGET,
            "speedup_met": fig.get("speedup_vs_reference", 0.0) >= SPEEDUP_TARGET
            if "reference_overhead" in fig
            else None,
            "error_no_worse_than_reference": fig["sdi_rel_error"] <= fig["reference_sdi_rel_error"]
            if "reference_overhead" in fig
            else None,
        }
        out[str(row["width"])] = fig
    return out


def _rng(v: list[float]) -> str:
    return f"{min(v):.2f}-{max(v):.2f}"


def markdown(res: dict[str, Any]) -> str:
    m, c = res["machine"], res["config"]
    lines = [
        "# Speed and fidelity across widths",
        "",
        f"Regenerated by `looptrace bench widths{' --quick' if c['reps'] < WidthsConfig().reps else ''}` on {m['date']}: {m['cpu']}, {m['threads']} torch threads of "
        f"{m['cores']} cores, torch {m['torch']}, in {res['seconds'] / 60:.1f} minutes. The paper's width is "
        f"{res['paper_width']}. Time is featurisation over a plain forward+backward of the same {c['n_batches']} "
        f"batches of {c['batch']} (tau = {c['loops']}, sequence {c['seq']}), the "
        "median over alternating rounds between plain runs (range in brackets); speed-ups are head to head with the "
        "reference implementation (TensorSketch m = 2048 per tensor) in its process, round by round. Errors are "
        "||SDI~ - SDI|| / ||SDI|| on the first batch against the exact features, at the reference's total "
        "dimension D = 2048 x (body tensors).",
        "",
        "| model | width | D | default / plain, with check | without check | reference / plain | speed-up vs reference | "
        "SDI error: default | SDI error: reference | auto route / faster route |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        h2h = row["timing"]["head_to_head"]
        ours = h2h["default, first-batch check"]
        ref = row.get("reference")
        width = f"**{row['width']}** (the paper's)" if row["width"] == res["paper_width"] else str(row["width"])
        err = row["sdi_rel_error_default"]
        lines.append(
            f"| {row['model']} | {width} | {row['D']} | {ours['overhead']:.2f}x ({_rng(ours['overhead_rounds'])}) | "
            f"{h2h['default, no check']['overhead']:.2f}x | "
            + (f"{ref['overhead']:.2f}x | {ours['speedup']:.2f}x ({_rng(ours['speedup_rounds'])}) | " if ref else
               "not run | not run | ")
            + f"{err['mean']:.4f} ± {err['sd']:.4f} | "
            + (f"{ref['sdi_rel_error']['mean']:.4f} ± {ref['sdi_rel_error']['sd']:.4f} | " if ref else "not run | ")
            + (f"{row['route_check']['auto_over_best']:.2f} |" if row["layout"] else "- (no TensorSketch block) |")
        )  # fmt: skip
    word = {True: "met", False: "**not met**", None: "not measured (no reference)"}
    narrow = f"- (a bound from width {TARGET_FROM})"
    lines += [
        "",
        f"Targets on the body-dominated block (issue #31): from width {TARGET_FROM}, the default with the check at most "
        f"{OVERHEAD_TARGET:.1f}x a plain step; at least {SPEEDUP_TARGET:.1f}x the reference's speed; SDI error no "
        "worse than the reference's.",
        "",
        "| width | overhead | speed-up | error |",
        "|---|---|---|---|",
    ]
    for w, fig in res["headline"].items():
        t = fig["targets"]
        lines.append(
            f"| {w} | {narrow if t['overhead_met'] is None else word[t['overhead_met']]} | {word[t['speedup_met']]} | "
            f"{word[t['error_no_worse_than_reference']]} |"
        )
    lines += ["", "## Choosing the default at each width: SDI error at the reference's D (dimensions used)", ""]
    labels = list(res["rows"][0]["choice"])
    lines += ["| model | width | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for row in res["rows"]:
        cells = [
            f"{row['choice'][k]['mean']:.4f} ± {row['choice'][k]['sd']:.4f} ({row['choice'][k]['dim']})" for k in labels
        ]
        lines.append(f"| {row['model']} | {row['width']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Layout of the default sketch at D (TensorSketch blocks; the rest share one CountSketch space)",
        "",
    ]
    lines += ["| model | width | wide matrices (m each) | shared space | routes taken |", "|---|---|---|---|---|"]
    for row in res["rows"]:
        ms = sorted({e["m"] for e in row["layout"]})
        taken = sorted({v.split(" by ")[1].split(" ")[0] for v in row["routes"].values()})
        lines.append(
            f"| {row['model']} | {row['width']} | {len(row['layout'])} ({', '.join(map(str, ms)) or '-'}) | "
            f"{row['shared_space']} | {', '.join(taken) or 'none (no TensorSketch block)'} |"
        )
    if any("memory" in r for r in res["rows"]):
        lines += ["", "## Peak memory per example (MiB, fresh processes, peak RSS: slope over batches 2 and 4)", ""]
        lines += [
            "| model | width | plain | default, FFT route | default, materialised route |",
            "|---|---|---|---|---|",
        ]
        for row in res["rows"]:
            mem = row.get("memory")
            if mem:
                lines.append(
                    f"| {row['model']} | {row['width']} | {mem['plain']['mib_per_example']:.1f} | "
                    f"{mem['sketched-fft']['mib_per_example']:.1f} | {mem['sketched-materialize']['mib_per_example']:.1f} |"
                )
    lines += ["", "Every loop step carries gradient at every width (shares of the body-gradient norm in widths.json)."]
    return "\n".join(lines) + "\n"

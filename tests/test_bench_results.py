"""The committed benchmark page is the rendering of the committed JSON, and a benchmark run reports what it
measured (the slow test recomputes its headline figures independently)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = "Time by section: "


def _rendering() -> tuple[str, str]:
    from looptrace.apps.bench.report import markdown

    latest = json.loads((RESULTS / "latest.json").read_text())
    return markdown(latest, RESULTS), (RESULTS / "README.md").read_text()


def test_the_benchmark_page_is_the_rendering_of_latest_json() -> None:
    """Catches a number edited by hand in benchmarks/results/README.md, or a latest.json committed without the page
    regenerated from it."""
    want, have = _rendering()
    assert have == want, "benchmarks/results/README.md is not markdown(latest.json)"


def test_the_benchmark_page_matches_latest_json_but_for_the_order_of_its_section_times() -> None:
    """Every line of the page is the rendering of latest.json, the 'Time by section' line up to the order of its
    entries (a page rendered before the JSON's keys were sorted may list them in run order). Catches a hand-edited
    number or a stale page, and says which line."""
    want, have = _rendering()
    want_lines, have_lines = want.splitlines(), have.splitlines()
    assert len(want_lines) == len(have_lines), "the page and the rendering of latest.json differ in length"
    for i, (w, h) in enumerate(zip(want_lines, have_lines, strict=True)):
        if w.startswith(SECTIONS) and h.startswith(SECTIONS):
            parts = lambda s: sorted(s.removeprefix(SECTIONS).rstrip(".").split(", "))  # noqa: E731
            assert parts(h) == parts(w), f"line {i + 1}: section times differ: {h!r} vs {w!r}"
        else:
            assert h == w, f"benchmarks/results/README.md line {i + 1} is not the rendering of latest.json:\n{h}\n{w}"


def test_run_slow_runs_the_slow_tests(request: pytest.FixtureRequest) -> None:
    """RUN_SLOW=1 does what pyproject.toml's marker text says: the slow tests are collected with the others (this
    session, without it, deselects them). Catches the environment variable being ignored."""
    if os.environ.get("RUN_SLOW", "") in ("", "0"):
        assert request.config.option.markexpr == "not slow", "without RUN_SLOW the default deselects slow tests"
    env = {**os.environ, "RUN_SLOW": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", __file__]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    assert "test_the_benchmark_reports_what_it_measured" in out and "deselected" not in out, (
        f"RUN_SLOW=1 did not collect the slow test:\n{out}"
    )


@pytest.mark.slow  # several minutes: the whole benchmark at tiny sizes, then its figures again by hand
def test_the_benchmark_reports_what_it_measured(tmp_path) -> None:
    """The headline figures of a tiny benchmark run are what an independent computation gives: the SDI and
    TracIn relative errors at m = 2048 from sketched and exact features of the same workload (same seeds, so
    the same features), the step shares from the exact per-step norms, the slope from the per-m errors, the
    overhead ratio as the median of its rounds; and the page quotes them. Catches a headline taken from the
    wrong row, seed or step, a mean that is not a mean, and a page that drifts from its JSON."""
    import looptrace as lt
    from looptrace.apps.bench import run_all
    from looptrace.apps.bench.common import synthetic_workload
    from tests.test_bench import TINY

    r = run_all(TINY, tmp_path, trained="")
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["sdi_rel_error_m2048"] == r["sdi_rel_error_m2048"]

    work = synthetic_workload(TINY)
    exact = work.featurize(lt.SketchSpec.exact())
    s_ex, t_ex = lt.sdi(exact, exact).double(), lt.tracin(exact, exact).double()
    sdi_err, tracin_err, per_step = [], [], []
    for seed in range(TINY.seeds):
        f = work.featurize(lt.SketchSpec(dim=2048, seed=seed, method="tensorsketch", budget="per_tensor"))
        s, t = lt.sdi(f, f).double(), lt.tracin(f, f).double()
        sdi_err.append(float((s - s_ex).norm() / s_ex.norm()))
        tracin_err.append(float((t - t_ex).norm() / t_ex.norm()))
        per_step.append([float((s[..., k] - s_ex[..., k]).norm() / s_ex[..., k].norm()) for k in range(TINY.loops)])
    assert r["sdi_rel_error_m2048"] == pytest.approx(float(np.mean(sdi_err)), rel=1e-9)
    assert r["tracin_rel_error_m2048"] == pytest.approx(float(np.mean(tracin_err)), rel=1e-9)
    assert r["per_step_error"] == pytest.approx(np.mean(per_step, axis=0).tolist(), rel=1e-9)
    norms = exact.per_step.double().norm(dim=-1)
    assert r["step_shares"] == pytest.approx((norms / norms.sum(1, keepdim=True)).mean(0).tolist(), rel=1e-9)

    rows = r["fidelity"]["looped-gpt"]["per_tensor_tensorsketch"]
    assert [row["m"] for row in rows] == list(TINY.dims)
    slope = np.polyfit(np.log([row["m"] for row in rows]), np.log([row["sdi_rel_error"]["mean"] for row in rows]), 1)
    assert r["slope"] == pytest.approx(float(slope[0]), rel=1e-9)
    ov = r["overhead"]["default_verify_first"]
    assert ov["rounds"] and r["overhead_ratio"] == statistics.median(ov["rounds"]) == ov["ratio"]
    assert all(x > 0 for x in ov["rounds"])
    assert r["conservation_rel"] < 1e-5, "sketched sum over steps vs sketched TracIn must agree to rounding"
    assert torch.isfinite(torch.tensor(r["per_step_error"])).all()

    page = (tmp_path / "README.md").read_text()
    for value in (f"{r['sdi_rel_error_m2048']:.4f}", f"{r['overhead_ratio']:.2f}"):
        assert value in page, f"the page does not quote {value}"


def test_the_curvature_cost_bench_runs_on_the_current_api_and_its_table_quotes_the_json() -> None:
    """``looptrace bench curvature`` (it was a script outside the package that once stopped running when the
    evaluation task's API changed, and nothing noticed): its models build, one fit runs, and its Markdown table
    quotes the committed JSON's ratios."""
    import json
    from pathlib import Path

    from looptrace.apps.bench import curvature_cost
    from looptrace.curvature import fit_curvature

    models = curvature_cost._models()
    assert len(models) == 1 + len(curvature_cost.WIDTHS)
    model, core, loss, train, _ = next(iter(models.values()))
    curv = fit_curvature(model, train[:1], loss, step_module=core, kinds=("kfac",))
    assert curv is not None
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "curvature-cost.json"
    res = json.loads(committed.read_text())
    page = curvature_cost.markdown(res)
    for r in res["seconds"].values():
        for key in ("fit_kfac_over_featurize", "fit_ekfac_over_featurize"):
            assert f"{r[key]:.2f}x" in page, f"the table does not quote {key} = {r[key]:.2f}"
    assert committed.with_suffix(".md").read_text() == page, (
        "benchmarks/results/curvature-cost.md is not the table of curvature-cost.json: rerun `looptrace bench "
        "curvature`"
    )

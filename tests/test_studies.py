"""Each case study runs end to end from the CLI on a tiny run (smoke)."""

from __future__ import annotations

import json

import pytest

from looptrace.cli import main


@pytest.mark.parametrize("task", ["sudoku", "recursive-gpt"])
def test_train_then_analyze_then_report(tmp_path, monkeypatch, task: str) -> None:
    monkeypatch.chdir(tmp_path)  # data caches go under ./runs
    run = tmp_path / "run"
    assert main(["train", task, "--preset", "tiny", "--out", str(run), "--quiet"]) == 0
    assert main(["analyze", task, "--run", str(run), "--quick"]) == 0
    out = run / "analysis"
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.html").exists() and (out / "config.json").exists()
    if task == "sudoku":
        assert results["conservation_max_abs"] < 1e-3
        assert set(results["board_accuracy_by_bin"])
    else:
        assert all(r["conservation_max_abs"] < 1e-3 for r in results["full_bptt"])
        trunc = results["truncated_bptt"]
        assert all(r["nonzero_steps"] <= r["bptt_k"] for r in trunc), "truncated BPTT must leave only k steps with SDI"
        # signed values come from the exact run; the sketch is only measured against it (a sketch as the
        # primary run, or the comparison dropped, fails here)
        assert results["sketch"]["method"] == "exact" and results["comparison"]["exact"] is True
        by_r = {r["r"]: r for r in results["full_bptt"]}
        for row in results["exact_vs_sketch"]:
            assert row["exact_tracin_sum"] == pytest.approx(by_r[row["r"]]["tracin_sum"], rel=1e-12, abs=1e-15)
            assert row["sdi_rel_error_of_sketch"] > 0, "the sketched run must differ from the exact one"
    assert main(["report", "--run", str(run)]) == 0


def test_analyze_several_seeds_writes_their_spread(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        assert main(["train", "sudoku", "--preset", "tiny", "--seed", str(seed), "--out", str(run), "--quiet"]) == 0
        runs += ["--run", str(run)]
    assert main(["analyze", "sudoku", *runs, "--quick", "--out", str(tmp_path / "both")]) == 0
    seeds = json.loads((tmp_path / "both" / "seeds.json").read_text())
    assert seeds["runs"] == 2 and len(seeds["correlations"]["self_vs_blanks"]["values"]) == 2
    assert (tmp_path / "both" / "run0" / "report.html").exists() and (
        tmp_path / "both" / "run1" / "results.json"
    ).exists()

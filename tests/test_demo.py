"""The main job's report is produced end to end by a fast smoke run."""

from __future__ import annotations

import json
import re

from looptrace.cli import main


def test_demo_quick_writes_report(tmp_path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "Provenance" in html and "data:image/png;base64," in html
    results = json.loads((out / "results.json").read_text())
    assert results["conservation_max_abs"] < 1e-3
    assert results["sdi_after_readout_max_abs"] == 0.0, "steps after the read-out must carry exactly zero SDI"
    for name in (
        "fig_probe_sdi_margin.png",
        "fig_period.png",
        "fig_states.png",
        "fig_energy.png",
        "depth_ranking.csv",
        "config.json",
    ):
        assert (out / name).exists(), name
    assert not list(out.rglob("*.partial"))
    page = (out / "explorer.html").read_text()
    assert "<script" in page and not re.search(r"(src|href)\s*=\s*[\"']?https?://", page), "not self-contained"
    assert '"positions":true' in page.replace(" ", ""), (
        "the demo's explorer has no token heatmaps (per-position values)"
    )


def test_train_cli_tiny_and_resume(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["train", "parity", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "accuracy_in_distribution" in metrics
    cks = sorted((out / "checkpoints").glob("*.pt"))
    assert len(cks) == 2
    # rerunning resumes from state.pt (nothing left to do) and gives the same final weights
    import torch

    before = torch.load(out / "model.pt", weights_only=True)
    assert main(["train", "parity", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    after = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_shipped_parity_run_is_the_small_preset_and_meets_its_targets() -> None:
    """`make demo` uses the run shipped with the package: it must be a replayable record of the small preset
    whose final evaluation meets the preset's targets (99 % in distribution, 95 % at length 40)."""
    from looptrace.apps.catalog import open_run, study
    from looptrace.apps.demo import shipped_run
    from looptrace.config import config_to_dict

    path = shipped_run("parity", "small")
    assert path is not None, "the trained parity run is missing from src/looptrace/apps/data/runs/parity-small"
    run = open_run(path)
    preset = study("parity").preset("small")
    assert run.preset == "small" and run.model_config == preset.model
    assert config_to_dict(run.task) == config_to_dict(preset.task), "the shipped run was trained with another task"
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["accuracy_in_distribution"] >= 0.99 and metrics["accuracy_length_40"] >= 0.95
    cks = run.checkpoints()
    assert len(cks) >= 2 and cks[-1].load_full().step == metrics["steps"], "the last step must leave a checkpoint"

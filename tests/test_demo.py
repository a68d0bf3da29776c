"""The main job's report is produced end to end by a fast smoke run."""

from __future__ import annotations

import json

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

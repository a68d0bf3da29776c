"""Checkpoint directories: every layout load_checkpoints reads, in training order with each eta_k, and recorded
files that hold nothing but tensors and plain values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import looptrace as lt
from tests.conftest import tiny_model


def _states(k: int) -> list[dict[str, torch.Tensor]]:
    model = tiny_model()
    out = []
    for i in range(k):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1))
        out.append({n: t.clone() for n, t in model.state_dict().items()})
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bare_ckpt_files_load_in_step_order(tmp_path) -> None:
    """A directory of ckpt_<step>.pt files without an index (written by hand or by an older recorder) loads in
    training order, numerically (step 9 before step 10 even when the names are not zero-padded), each with the
    learning rate saved in it. Catches a lexicographic order (10 before 9) and a fallback that is never reached."""
    states = _states(3)
    for step, sd, lr in zip((9, 10, 100), states, (0.3, 0.2, 0.1), strict=True):
        torch.save({"model": sd, "lr": lr, "step": step}, tmp_path / f"ckpt_{step}.pt")
    loaded = [c.load_full() for c in lt.load_checkpoints(tmp_path)]
    assert [f.step for f in loaded] == [9, 10, 100], "bare ckpt files must load in step order"
    assert [f.lr for f in loaded] == [0.3, 0.2, 0.1]
    assert all(_equal(f.state, sd) for f, sd in zip(loaded, states, strict=True))


def test_hugging_face_checkpoint_dirs_load_in_step_order(tmp_path) -> None:
    """An HF Trainer output directory: checkpoint-<step>/ folders (model.safetensors + trainer_state.json) load in
    step order (checkpoint-9 before checkpoint-10), with eta from each trainer_state.json; other folders are
    ignored. Catches a lexicographic order and eta read from the wrong log entry."""
    states = _states(2)
    for step, sd in zip((9, 10), states, strict=True):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        log = [{"step": s, "learning_rate": 1e-3 / s} for s in range(1, step + 1)]
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log}))
    (tmp_path / "checkpoint-best").mkdir()  # not a step: ignored
    cks = lt.load_checkpoints(tmp_path)
    assert [Path(str(c.source)).name for c in cks] == ["checkpoint-9", "checkpoint-10"]
    loaded = [c.load_full() for c in cks]
    assert [f.lr for f in loaded] == pytest.approx([1e-3 / 9, 1e-3 / 10])
    assert all(_equal(f.state, sd) for f, sd in zip(loaded, states, strict=True))


def _plain(obj: Any, where: str = "checkpoint") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), f"{where}: key {k!r} is not a string"
            _plain(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _plain(v, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, torch.Tensor | str | int | float | bool), f"{where}: {type(obj)}"


def test_recorded_checkpoints_hold_only_tensors_and_plain_values(tmp_path) -> None:
    """What CheckpointRecorder writes loads with torch.load(weights_only=True) and holds only tensors, strings,
    numbers and containers of them (so nothing is executed on load). Catches a recorder that pickles an object
    (an optimizer, a config class)."""
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rec = lt.CheckpointRecorder(tmp_path, every=1, body=model.core, meta={"run": "x"})
    batch = torch.randint(0, 7, (2, 5))
    model(batch).sum().backward()
    opt.step()
    path = rec.step(model, opt, depth=3)
    assert path is not None
    record = torch.load(path, weights_only=True)
    _plain(record)
    assert record["depth"] == 3 and record["optimizer_second_moments"]["exp_avg_sq"]


@pytest.mark.parametrize("name", ["../outside.pt", "sub/ckpt.pt", "..\\\\x.pt"])
def test_a_recorder_index_naming_a_file_outside_its_directory_is_refused(tmp_path, name: str) -> None:
    """checkpoints.json is data read from disk: an entry naming a file outside the directory is refused before any
    file is opened. Catches an index that can make looptrace load an arbitrary path."""
    rec_dir = tmp_path / "ck"
    rec_dir.mkdir()
    torch.save({"model": tiny_model().state_dict(), "lr": 0.1}, tmp_path / "outside.pt")
    index = {"format": "looptrace-checkpoints", "version": 1, "checkpoints": [{"file": name, "step": 1, "lr": 0.1}]}
    (rec_dir / "checkpoints.json").write_text(json.dumps(index))
    with pytest.raises(lt.CheckpointError, match="not a file in"):
        lt.load_checkpoints(rec_dir)

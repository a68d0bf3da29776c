"""Feature store: resume after kill -9, 2-process torchrun equals 1 process, FAISS top-k, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import looptrace as lt
from looptrace.store import FeatureStore, featurize_to_store, score_to_disk, topk
from tests.conftest import assert_close
from tests.store_fixtures import loss_fn, make_dataset, make_model, save_checkpoints

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}


def _store(tmp_path: Path, spec: lt.SketchSpec, name: str = "store", **kw) -> FeatureStore:
    model = make_model()
    cks = [lt.Checkpoint(p) for p in save_checkpoints(str(tmp_path))]
    ds = {"train": make_dataset("train"), "query": make_dataset("query")}
    return featurize_to_store(
        model, cks, ds, loss_fn, tmp_path / name, step_module=model.core, sketch=spec, batch_size=5, shard_size=8, **kw
    )


def test_store_scores_equal_attribute(tmp_path) -> None:
    spec = lt.SketchSpec(dim=64)
    store = _store(tmp_path, spec)
    model = make_model()
    cks = [lt.Checkpoint(p) for p in sorted(map(str, tmp_path.glob("ck*.pt")))]
    loader = lambda role: torch.utils.data.DataLoader(make_dataset(role), batch_size=7)  # noqa: E731
    res = lt.attribute(model, cks, loader("train"), loader("query"), loss_fn, step_module=model.core, sketch=spec)
    out = score_to_disk(store, tmp_path / "sdi.npy")
    assert_close(
        torch.from_numpy(np.load(out)).double(), res.sdi.double(), "store SDI vs attribute", rtol=1e-4, atol=1e-6
    )
    tr = score_to_disk(store, tmp_path / "tracin.npy", kind="tracin")
    assert_close(
        torch.from_numpy(np.load(tr)).double(), res.tracin.double(), "store TracIn vs attribute", rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("step", [None, 2])
def test_faiss_topk_equals_brute_force_in_exact_mode(tmp_path, step) -> None:
    store = _store(tmp_path, lt.SketchSpec.exact())
    fa = topk(store, k=5, step=step, index="flat")
    bf = topk(store, k=5, step=step, index="brute")
    assert np.array_equal(fa.proponents, bf.proponents) and np.array_equal(fa.opponents, bf.opponents)
    # and brute force is the truth: the scores are the exact eta-weighted SDI/TracIn
    s = np.load(score_to_disk(store, tmp_path / "s.npy", kind="sdi")).astype(np.float64)
    truth = s.sum(-1) if step is None else s[..., step - 1]
    want = np.argsort(-truth.T, axis=1, kind="stable")[:, :5]
    assert np.array_equal(fa.proponents, want)
    assert np.allclose(fa.proponent_scores, np.take_along_axis(truth.T, want, 1), rtol=1e-4, atol=1e-7)
    approx = topk(store, k=5, step=step, index="ivf")
    assert approx.proponents.shape == (12, 5)


def test_reopen_with_other_spec_or_corruption_raises(tmp_path) -> None:
    _store(tmp_path, lt.SketchSpec(dim=64))
    with pytest.raises(lt.SpecMismatchError, match="different spec"):
        _store(tmp_path, lt.SketchSpec(dim=32))
    store = FeatureStore.open(tmp_path / "store")
    shard = store.shard_path(0, "train", 0, 8)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(lt.CorruptFileError, match="checksum"):
        FeatureStore.open(tmp_path / "store").read(0, "train")
    side = shard.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["file"] = "../../../etc/passwd"
    side.write_text(json.dumps(meta))
    with pytest.raises(lt.CorruptFileError, match="outside the store"):
        FeatureStore.open(tmp_path / "store").read(0, "train")
    (tmp_path / "store" / "manifest.json").write_text("{not json")
    with pytest.raises(lt.CorruptFileError):
        FeatureStore.open(tmp_path / "store")


def test_store_records_the_featurisation_options_and_refuses_a_mix(tmp_path) -> None:
    model = make_model()
    cks = [lt.Checkpoint(p) for p in save_checkpoints(str(tmp_path))]
    ds = {"train": make_dataset("train", 16), "query": make_dataset("query", 4)}
    common = dict(step_module=model.core, sketch=lt.SketchSpec(dim=32), batch_size=8, shard_size=8)
    store = featurize_to_store(model, cks, ds, loss_fn, tmp_path / "store", tau=3, **common)
    assert store.options == {
        "tau": 3,
        "train_mode": False,
        "outer_path": "auto",
        "autocast": None,
        "precondition": None,
    }
    assert FeatureStore.open(tmp_path / "store").summary()["options"]["tau"] == 3
    with pytest.raises(lt.SpecMismatchError, match="options"):
        featurize_to_store(model, cks, ds, loss_fn, tmp_path / "store", tau=None, **common)
    with pytest.raises(lt.SpecMismatchError, match="options"):
        featurize_to_store(model, cks, ds, loss_fn, tmp_path / "store", tau=3, train_mode=True, **common)


_FEAT = """
import sys, torch
import looptrace as lt
from looptrace.store import featurize_to_store
from tests.store_fixtures import loss_fn, make_dataset, make_model
model = make_model()
cks = [lt.Checkpoint(p) for p in sys.argv[2:]]
ds = {"train": make_dataset("train", 400), "query": make_dataset("query")}
featurize_to_store(model, cks, ds, loss_fn, sys.argv[1], step_module=model.core, sketch=lt.SketchSpec(dim=64), batch_size=4, shard_size=8)
"""


def test_kill_during_featurisation_then_resume_is_byte_identical(tmp_path) -> None:
    cks = save_checkpoints(str(tmp_path))
    subprocess.run([sys.executable, "-c", _FEAT, str(tmp_path / "ref"), *cks], check=True, env=ENV, cwd=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", _FEAT, str(tmp_path / "run"), *cks], env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "run").rglob("shard_*.json"))) < 5:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list((tmp_path / "run").rglob("shard_*.json")))
    assert n_done < len(list((tmp_path / "ref").rglob("shard_*.json"))), "the kill came too late to test a resume"
    subprocess.run([sys.executable, "-c", _FEAT, str(tmp_path / "run"), *cks], check=True, env=ENV, cwd=ROOT)
    ref = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("shard_*"))
    run = sorted(
        p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("shard_*") if not p.name.endswith(".partial")
    )
    assert ref == run
    for rel in ref:
        if rel.suffix == ".safetensors":
            assert (tmp_path / "ref" / rel).read_bytes() == (tmp_path / "run" / rel).read_bytes(), (
                f"{rel} differs after resume"
            )


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun missing",
)
def test_two_process_torchrun_equals_one_process(tmp_path) -> None:
    cks = save_checkpoints(str(tmp_path))
    common = [
        "featurize", "--model", "tests.store_fixtures:make_model", "--loss", "tests.store_fixtures:loss_fn",
        "--dataset", "tests.store_fixtures:make_dataset", "--step-module", "core", "--dim", "64", "--shard-size", "8",
        "--batch-size", "4", "--quiet",
    ]  # fmt: skip
    for c in cks:
        common += ["--checkpoint", c]
    subprocess.run(
        [sys.executable, "-m", "looptrace.cli", *common, "--store", str(tmp_path / "one")],
        check=True,
        env=ENV,
        cwd=ROOT,
    )
    torchrun = str(Path(sys.executable).parent / "torchrun")
    subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "looptrace.cli", *common, "--store", str(tmp_path / "two")],
        check=True, env=ENV, cwd=ROOT, timeout=300,
    )  # fmt: skip
    one, two = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "two")
    for k in range(2):
        for role in ("train", "query"):
            a, b = one.read(k, role), two.read(k, role)
            assert a.shape == b.shape
            assert np.allclose(a, b, rtol=1e-5, atol=1e-7), f"checkpoint {k} {role}: 2 processes differ from 1"

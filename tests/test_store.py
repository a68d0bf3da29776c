"""Feature store: resume after kill -9, 2-process torchrun equals 1 process, FAISS top-k, refusals."""

from __future__ import annotations

import hashlib
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
from looptrace.store import FeatureStore, featurize_to_store, retrieval, score_to_disk, topk
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
ds = {"train": make_dataset("train", 200), "query": make_dataset("query")}
featurize_to_store(model, cks, ds, loss_fn, sys.argv[1], step_module=model.core, sketch=lt.SketchSpec(dim=64), batch_size=4, shard_size=8)
"""


def test_kill_during_featurisation_then_resume_is_byte_identical(tmp_path) -> None:
    """SIGKILL in the middle of filling a store, then the same command again: the shards finished before the kill
    are not recomputed (the same files: inode and modification time unchanged, sidecars too), the rest are
    written, and every shard is byte-identical to an uninterrupted run. Catches a resume that redoes everything
    (same bytes, new files) or keeps a half-written shard."""
    cks = save_checkpoints(str(tmp_path))
    subprocess.run([sys.executable, "-c", _FEAT, str(tmp_path / "ref"), *cks], check=True, env=ENV, cwd=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", _FEAT, str(tmp_path / "run"), *cks], env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "run").rglob("shard_*.json"))) < 5:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sidecars = list((tmp_path / "run").rglob("shard_*.json"))
    n_done = len(sidecars)
    assert n_done < len(list((tmp_path / "ref").rglob("shard_*.json"))), "the kill came too late to test a resume"
    finished = [p for side in sidecars for p in (side, side.with_suffix(".safetensors"))]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
    subprocess.run([sys.executable, "-c", _FEAT, str(tmp_path / "run"), *cks], check=True, env=ENV, cwd=ROOT)
    for p, stamp in stamps.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{p.name} was finished before the kill but rewritten"
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
    """Two torchrun processes fill one store as one process does, and really split the work: each rank writes the
    shards i with i mod 2 == rank (logged by tests/torchrun_probe.py), none twice. Catches every rank doing all
    shards (the same store, twice the work) or a shard left to nobody."""
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
    log = tmp_path / "written"
    subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "tests.torchrun_probe", *common, "--store",
         str(tmp_path / "two")],
        check=True, env={**ENV, "PROBE_LOG": str(log)}, cwd=ROOT, timeout=300,
    )  # fmt: skip
    one, two = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "two")
    written = {r: [tuple(json.loads(line)) for line in Path(f"{log}.{r}").read_text().splitlines()] for r in (0, 1)}
    everything = {(k, role, a, b) for k in range(2) for role in ("train", "query") for a, b in two.shard_ranges(role)}
    assert set(written[0]) | set(written[1]) == everything and not set(written[0]) & set(written[1])
    for rank, shards in written.items():
        assert len(shards) == len(set(shards)) and shards, f"rank {rank} wrote {shards}"
        for k, role, start, _ in shards:
            index = [a for a, _ in two.shard_ranges(role)].index(start)
            assert index % 2 == rank, f"rank {rank} wrote shard {index} of {role} (checkpoint {k})"
    for k in range(2):
        for role in ("train", "query"):
            a, b = one.read(k, role), two.read(k, role)
            assert a.shape == b.shape
            assert np.allclose(a, b, rtol=1e-5, atol=1e-7), f"checkpoint {k} {role}: 2 processes differ from 1"


def _random_store(root: Path, n: int, m: int, d: int = 32, seed: int = 0) -> FeatureStore:
    """A store holding random features (no model): for retrieval tests at sizes featurisation would make slow."""
    g = torch.Generator().manual_seed(seed)
    store = FeatureStore.open(
        root, spec=lt.SketchSpec(dim=d), checkpoints=[{"index": 0, "name": "ck", "eta": 0.5}],
        datasets={"train": {"n": n, "fingerprint": "random"}, "query": {"n": m, "fingerprint": "random"}},
        shard_size=max(n, m),
    )  # fmt: skip
    store.write_shard(0, "train", 0, n, torch.randn(n, d, generator=g), torch.zeros(n))
    store.write_shard(0, "query", 0, m, torch.randn(m, 3, d, generator=g), torch.zeros(m))
    return store


@pytest.mark.parametrize(("index", "floor"), [("ivf", 0.6), ("hnsw", 0.95)])
def test_approximate_indices_recall_the_exact_top_k(tmp_path, index: str, floor: float) -> None:
    """IVF and HNSW candidates, re-scored exactly, recover most of the exact top-k of 2000 random vectors (and every
    score they return is the exact score of the example named). Unclustered random vectors are IVF's worst case
    (it probes a quarter of its lists; recall about 0.75 here), HNSW's graph finds nearly all. Catches a search with
    the wrong sign (recall about 0), on the wrong rows, or scores that are not re-scored."""
    pytest.importorskip("faiss")
    store = _random_store(tmp_path / "s", n=2000, m=30)
    exact = topk(store, k=10, index="brute")
    got = topk(store, k=10, index=index)  # type: ignore[arg-type]
    for name in ("proponents", "opponents"):
        a, b = getattr(got, name), getattr(exact, name)
        recall = np.mean([len(set(r) & set(s)) / 10 for r, s in zip(a, b, strict=True)])
        assert recall >= floor, f"{index} {name}: recall {recall:.2f} of the exact top-10, expected >= {floor}"
    x, q = retrieval.stacked(store, "train"), retrieval.stacked(store, "query")
    want = np.take_along_axis(q @ x.T, got.proponents, 1)
    assert np.allclose(got.proponent_scores, want), "returned scores must be the exact scores of the returned rows"
    assert (np.diff(got.proponent_scores, axis=1) <= 0).all() and (np.diff(got.opponent_scores, axis=1) >= 0).all()


def test_an_index_that_returns_fewer_than_k_is_completed_exactly(tmp_path) -> None:
    """FAISS pads with -1 when the IVF lists it probed hold fewer vectors than asked for. Those queries are searched
    exactly: no row names example 0 for a padded slot (the old code did, so 0 appeared twice or out of place)."""
    pytest.importorskip("faiss")
    store = _random_store(tmp_path / "s", n=40, m=12)
    x, q = retrieval.stacked(store, "train"), retrieval.stacked(store, "query")
    raw = retrieval._faiss_index(x, "ivf")
    _, found = raw.search(np.ascontiguousarray(q, dtype=np.float32), 20)
    assert (found < 0).any(), "the setting must make FAISS pad with -1, or this test checks nothing"
    got = topk(store, k=5, index="ivf")
    exact = topk(store, k=5, index="brute")
    short = (found < 0).any(axis=1)
    for rows in (got.proponents, got.opponents):
        assert all(len(set(r)) == len(r) for r in rows), f"duplicated examples in a top-k row: {rows}"
        assert ((rows >= 0) & (rows < 40)).all()
    assert np.array_equal(got.proponents[short], exact.proponents[short]), "padded queries must get the exact top-k"


@pytest.fixture(scope="module")
def exact_store(tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    return _store(tmp_path_factory.mktemp("exact"), lt.SketchSpec.exact())


def test_cli_score_topk_and_inspect_read_the_store(exact_store: FeatureStore, tmp_path, capsys) -> None:
    """`looptrace score --kind sdi` writes sum_k eta_k SDI (equal to the in-memory attribution), `looptrace topk`
    the exact proponents of each query (per step too), `looptrace inspect` what the store holds. Catches a command
    that scores another kind, drops --step, or misreports the store."""
    from looptrace.cli import main

    root = str(exact_store.root)
    assert main(["score", "--store", root, "--out", str(tmp_path / "sdi.npy"), "--kind", "sdi"]) == 0
    sdi = np.load(tmp_path / "sdi.npy").astype(np.float64)
    model = make_model()
    cks = [lt.Checkpoint(c["name"]) for c in exact_store.checkpoints]
    loader = lambda role: torch.utils.data.DataLoader(make_dataset(role), batch_size=7)  # noqa: E731
    res = lt.attribute(model, cks, loader("train"), loader("query"), loss_fn, step_module=model.core,
                       sketch=lt.SketchSpec.exact())  # fmt: skip
    assert sdi.shape == tuple(res.sdi.shape)
    assert np.allclose(sdi, res.sdi.double().numpy(), rtol=1e-4, atol=1e-6), "score --kind sdi vs lt.attribute"
    assert json.loads((tmp_path / "sdi.npy.json").read_text())["kind"] == "sdi", "the command's arguments are saved"
    for step in (None, 2):
        args = ["topk", "--store", root, "--k", "3", "--index", "brute", "--out", str(tmp_path / f"top{step}.json")]
        assert main([*args, "--step", str(step)] if step else args) == 0
        top = json.loads((tmp_path / f"top{step}.json").read_text())
        truth = sdi.sum(-1) if step is None else sdi[..., step - 1]
        want = np.argsort(-truth.T, axis=1, kind="stable")[:, :3]
        assert np.array_equal(np.array(top["proponents"]), want), f"topk --step {step}: not the exact proponents"
        assert top["step"] == step and top["config"]["k"] == 3
    capsys.readouterr()
    assert main(["inspect", "--store", root]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["datasets"]["train"]["n"] == 40 and summary["datasets"]["query"]["n"] == 12
    assert summary["progress"] == {f"ck00{k}/{r}": f"{s}/{s} shards" for k in range(2)
                                   for r, s in (("train", 5), ("query", 2))}  # fmt: skip
    assert summary["spec"] == lt.SketchSpec.exact().to_dict() and summary["bytes"] > 0


def test_store_shards_are_plain_tensors_read_through_a_read_only_map(exact_store: FeatureStore) -> None:
    """Each shard holds only named tensors (safetensors: no pickle), is checked against its sha256 before it is
    read, and is read through a read-only memory map. Catches a shard format that could carry code, or reads that
    copy or can write the file."""
    from safetensors import safe_open

    path = exact_store.shard_path(0, "train", 0, 8)
    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == {"features", "losses"}
    arr = exact_store.read_shard(0, "train", 0, 8)
    assert isinstance(arr, np.memmap) and not arr.flags.writeable and arr.shape[0] == 8
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_reopening_a_store_with_another_model_dataset_shard_size_or_options_is_refused(tmp_path) -> None:
    """Each of the things a store records is checked on reopening, and the error names it: the model body, each
    dataset, the shard size, and every featurisation option (horizon, train mode, TensorSketch route, autocast,
    preconditioner); a truncated shard is refused by its checksum. Catches a field the reopening check forgot."""
    from looptrace.models.looped import LoopedConfig, LoopedTransformer

    spec = lt.SketchSpec(dim=16)
    cks = [lt.Checkpoint(p) for p in save_checkpoints(str(tmp_path), k=1)]
    ds = {"train": make_dataset("train", 8), "query": make_dataset("query", 4)}
    root = tmp_path / "store"

    def fill(model: torch.nn.Module | None = None, datasets: dict | None = None, **kw) -> FeatureStore:
        m = model or make_model()
        kw = {"batch_size": 4, "shard_size": 4, **kw}
        return featurize_to_store(m, cks, datasets or ds, loss_fn, root, step_module=m.core, sketch=spec, **kw)

    store = fill()
    torch.manual_seed(0)
    other = LoopedTransformer(LoopedConfig(vocab_size=11, d_model=16, n_heads=2, d_mlp=32, n_loops=3, max_len=8,
                                           injection="concat"))  # fmt: skip
    for what, call in [
        ("model_fingerprint", lambda: fill(model=other)),
        ("datasets.train", lambda: fill(datasets={**ds, "train": make_dataset("train", 9)})),
        ("datasets.query", lambda: fill(datasets={**ds, "query": make_dataset("train", 4)})),
        ("shard_size", lambda: fill(shard_size=2)),
        ("options", lambda: fill(tau=3)),
        ("options", lambda: fill(train_mode=True)),
        ("options", lambda: fill(outer_path="fft")),
        ("options", lambda: fill(autocast=torch.bfloat16)),
        ("options", lambda: fill(precondition="adam")),
    ]:
        with pytest.raises(lt.SpecMismatchError, match=what):
            call()
    shard = store.shard_path(0, "train", 0, 4)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(lt.CorruptFileError, match="checksum"):
        FeatureStore.open(root).read(0, "train")

"""Faults: out-of-memory retry, kill -9 during training, determinism; and a fuzz test."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import looptrace as lt
from tests.conftest import assert_close, oracle_per_step
from tests.test_capture import Net, loss_fn, make_batches


def test_out_of_memory_retries_in_smaller_chunks() -> None:
    model = Net("mha")
    spec = lt.SketchSpec(dim=32)
    want = lt.featurize(model, make_batches(b=5), loss_fn, step_module=model.core, sketch=spec)

    def tight(m: Any, batch: Any) -> torch.Tensor:
        if batch[0].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return loss_fn(m, batch)

    with pytest.warns(RuntimeWarning, match="retrying it in chunks"):
        got = lt.featurize(model, make_batches(b=5), tight, step_module=model.core, sketch=spec)
    assert_close(got.per_step, want.per_step, "features after out-of-memory retries", rtol=1e-12)


_TRAIN = """
import sys
from pathlib import Path
from looptrace.apps.zoo import train_preset
train_preset("parity", "tiny", Path(sys.argv[1]), {"train.steps": 60, "train.ckpt_every": 10}, progress=False)
"""


def test_training_killed_at_random_point_resumes_identically(tmp_path) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    subprocess.run([sys.executable, "-c", _TRAIN, str(ref)], check=True, env=env)
    proc = subprocess.Popen([sys.executable, "-c", _TRAIN, str(run)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run / "checkpoints").glob("*.pt"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists(), "the kill came too late to test anything"
    subprocess.run([sys.executable, "-c", _TRAIN, str(run)], check=True, env=env)
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must end with bitwise the same weights"
    names = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert names == sorted(p.name for p in (ref / "checkpoints").glob("*.pt"))
    assert not list(run.rglob("*.partial"))


@dataclasses.dataclass
class DCBatch:
    tokens: torch.Tensor
    target: torch.Tensor


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["plain", "tied", "twice", "mha", "embedding", "fallback"]),
    b=st.integers(1, 4),
    length=st.integers(1, 5),
    loops=st.integers(1, 4),
    structure=st.sampled_from(["tuple", "dict", "dataclass", "list"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_fuzz_exact_matches_oracle_or_raises(
    kind: str, b: int, length: int, loops: int, structure: str, dtype: torch.dtype
) -> None:
    """Over shapes, dtypes and batch structures: the exact result matches the oracle. Every input drawn here is
    valid (one example, one token, one loop step, float32, any batch container), so none may be refused: a
    looptrace error fails the test with its message. Catches a capture that goes wrong on an edge shape, and one
    that refuses it instead of computing it (the old version of this test accepted any looptrace error)."""
    model = Net(kind, loops=loops).to(dtype)
    g = torch.Generator().manual_seed(b * 100 + length)
    x, y = torch.randint(0, 5, (b, length), generator=g), torch.randint(0, 3, (b,), generator=g)
    wrap = {
        "tuple": lambda: (x, y),
        "list": lambda: [x, y],
        "dict": lambda: {"tokens": x, "target": y},
        "dataclass": lambda: DCBatch(x, y),
    }[structure]

    def fn(m: Any, batch: Any) -> torch.Tensor:
        if isinstance(batch, dict):
            return loss_fn(m, (batch["tokens"], batch["target"]))
        if isinstance(batch, DCBatch):
            return loss_fn(m, (batch.tokens, batch.target))
        return loss_fn(m, tuple(batch))

    try:
        feats = lt.featurize(model, [wrap()], fn, step_module=model.core, sketch=lt.SketchSpec.exact(), verify=True)
    except lt.LooptraceError as exc:
        pytest.fail(f"a valid input was refused ({kind} b={b} L={length} loops={loops} {structure} {dtype}): {exc!r}")
    want = oracle_per_step(model, model.core, [(x, y)], loss_fn)
    assert feats.per_step is not None and feats.per_step.dtype == dtype
    tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-5)
    assert_close(
        feats.per_step, want.to(dtype), f"fuzz {kind} b={b} L={length} loops={loops} {structure} {dtype}", **tol
    )

"""Which route computes a TensorSketch of outer products fastest on this machine: measured, then cached.

A TensorSketch slot can sketch ``sum_j u_j (x) v_j`` two ways that give the same numbers (up to rounding):

* ``"materialize"``: the per-example gradient ``[rows, cols]`` by one batched matmul, then a scatter of its
  entries into the m buckets: O(L rows cols + rows cols) per example;
* ``"fft"``: the CountSketches of the factors, their spectra multiplied and summed over tokens, one inverse FFT
  per example: O(L (rows + cols + m log m)) per example.

Which is faster depends on the shapes, the sequence length, the device and the BLAS/FFT libraries, so no fixed
formula is right everywhere (a formula picked materialisation at width 512 where FFT was 1.7x faster). The
first time a shape is met, both routes are timed on random inputs of that shape (each warmed up, then a few
runs interleaved between the routes, each route judged by its fastest run: interference from other work on the
machine only ever adds time) and the faster is kept: in memory for the process, and on disk
(``$LOOPTRACE_CACHE_DIR`` or ``~/.cache/looptrace``, ``routes-v2.json``, keyed by the machine, torch version and
thread count) for the next process. Shapes are bucketed (batch and tokens to powers of two), so a new sequence
length does not time again. A route a first estimate puts more than :data:`SKIP_RATIO` times slower is not
timed. ``LOOPTRACE_ROUTE_CACHE=0`` keeps decisions in memory only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import Literal, Protocol

import torch

Route = Literal["fft", "materialize"]
OuterPath = Literal["auto", "fft", "materialize"]


class Slot(Protocol):
    """What the chooser needs of a TensorSketch slot (:class:`looptrace.sketch.plan.Slot`)."""

    m: int

    @property
    def rows(self) -> int: ...

    @property
    def cols(self) -> int: ...

    def add_outer(
        self, out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, path: OuterPath = "auto"
    ) -> None: ...


#: A route whose first estimate is this many times the other's is chosen against without being timed.
SKIP_RATIO = 8.0
#: Timed runs per route (after one warm-up), interleaved between the routes; each route's fastest run decides.
REPS = 5
FILE = "routes-v2.json"  # v2: decided by the fastest of interleaved runs (v1 decisions are timed again)


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def estimate(rows: int, cols: int, m: int, b: int, n_tok: int) -> dict[Route, float]:
    """A rough relative cost of each route (multiply-adds; FFT work weighted by a constant measured on CPUs):
    only used to skip timing a route that is hopeless."""
    mat = b * (n_tok * rows * cols + 8 * rows * cols)
    fft = b * n_tok * (2 * 40 * m * math.log2(max(m, 2)) + 4 * (rows + cols))
    return {"materialize": float(mat), "fft": float(fft)}


class RouteChooser:
    """Decisions by measurement, cached per (device, dtype, shape bucket) in memory and on disk."""

    def __init__(self) -> None:
        self._mem: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._loaded = False
        self.timings: dict[str, dict[str, float]] = {}  # this process's measurements (for reports and tests)

    # ------------------------------------------------------------------ persistence
    @staticmethod
    def cache_path() -> Path | None:
        if os.environ.get("LOOPTRACE_ROUTE_CACHE", "1") == "0":
            return None
        root = os.environ.get("LOOPTRACE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "looptrace")
        return Path(root) / FILE

    @staticmethod
    def machine_key() -> str:
        return f"{platform.machine()}|{platform.processor() or platform.node()}|torch {torch.__version__}|threads {torch.get_num_threads()}"

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = self.cache_path()
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            entries = data.get(self.machine_key(), {})
            self._mem.update({k: v for k, v in entries.items() if v in ("fft", "materialize")})
        except (OSError, ValueError, AttributeError):
            pass  # a damaged cache only costs a new measurement

    def _save(self, key: str, route: Route) -> None:
        path = self.cache_path()
        if path is None:
            return
        with contextlib.suppress(OSError, ValueError):  # a read-only home only costs measuring again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(path.read_text()) if path.exists() else {}
            data.setdefault(self.machine_key(), {})[key] = route
            tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)

    def clear(self) -> None:
        """Forget this process's decisions (the disk cache stays)."""
        with self._lock:
            self._mem.clear()
            self.timings.clear()
            self._loaded = False

    # ------------------------------------------------------------------ decisions
    def key(self, slot: Slot, b: int, n_tok: int, device: torch.device, dtype: torch.dtype) -> str:
        return f"{device.type}|{dtype}|{slot.rows}x{slot.cols}|m{slot.m}|b{_bucket(b)}|L{_bucket(n_tok)}"

    def choose(self, slot: Slot, b: int, n_tok: int, device: torch.device, dtype: torch.dtype) -> Route:
        key = self.key(slot, b, n_tok, device, dtype)
        with self._lock:
            self._load()
            route = self._mem.get(key)
            if route is not None:
                return route
            route = self._measure(slot, _bucket(b), _bucket(n_tok), device, dtype, key)
            self._mem[key] = route
            self._save(key, route)
            return route

    def _measure(self, slot: Slot, b: int, n_tok: int, device: torch.device, dtype: torch.dtype, key: str) -> Route:
        est = estimate(slot.rows, slot.cols, slot.m, b, n_tok)
        if est["fft"] * SKIP_RATIO < est["materialize"]:
            return "fft"
        if est["materialize"] * SKIP_RATIO < est["fft"]:
            return "materialize"
        g = torch.Generator(device="cpu").manual_seed(0)
        left = torch.randn(b, n_tok, slot.rows, generator=g).to(device=device, dtype=dtype)
        right = torch.randn(b, n_tok, slot.cols, generator=g).to(device=device, dtype=dtype)
        out = torch.zeros(b, slot.m, device=device, dtype=dtype)
        routes: tuple[Route, Route] = ("fft", "materialize")
        runs: dict[Route, list[float]] = {r: [] for r in routes}
        for i in range(REPS + 1):  # round 0 warms both up (allocations, tables, FFT plans) and is not counted
            for route in routes if i % 2 == 0 else routes[::-1]:  # alternate which goes first
                _sync(device)
                t0 = time.perf_counter()
                slot.add_outer(out, left, right, route)
                _sync(device)
                if i:
                    runs[route].append(time.perf_counter() - t0)
        seconds: dict[Route, float] = {r: min(runs[r]) for r in routes}
        self.timings[key] = {str(k): v for k, v in seconds.items()}
        return "fft" if seconds["fft"] < seconds["materialize"] else "materialize"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The process-wide chooser (``ROUTES.clear()`` forgets its in-memory decisions).
ROUTES = RouteChooser()

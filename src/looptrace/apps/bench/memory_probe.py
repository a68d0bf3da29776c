"""One memory measurement in a fresh process: ``python -m looptrace.apps.bench.memory_probe CONFIG MODE``.

Prints ``{"base_kib", "peak_kib"}``: this process's peak RSS (VmHWM, per address space, unlike
``ru_maxrss`` which survives exec) before and after one plain training step or one featurisation
(sketched, sketched with recomputation, exact) of the benchmark model at the configured batch."""

from __future__ import annotations

import json
import sys

from looptrace.apps.bench.common import BenchConfig, build
from looptrace.apps.bench.memory import run_mode


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main(argv: list[str]) -> None:
    cfg = BenchConfig(**json.loads(argv[0]))
    mode = argv[1]
    model, batches = build(cfg)
    base = peak_rss_kib()
    run_mode(model, batches[0], mode)
    print(json.dumps({"base_kib": base, "peak_kib": peak_rss_kib()}))


if __name__ == "__main__":
    main(sys.argv[1:])

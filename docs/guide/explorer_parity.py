"""The parity demo's explorer in the docs (docs/guide/explorer-parity.png): what `make demo` writes.

Runs the demo's explorer step alone (``looptrace.apps.demo.write_parity_explorer``: token x step attribution
of 64 training examples on the two alternating probes and held-out length-40 inputs, over every TracIn
checkpoint of the parity run shipped with looptrace) and photographs the page with headless Chromium at the
first probe's busiest loop step.

    PYTHONPATH=src python docs/guide/explorer_parity.py     # about a minute on 2 cores

writes build/explorer-parity/explorer.html and docs/guide/explorer-parity.png.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from looptrace.apps.demo import shipped_run, write_parity_explorer

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "guide" / "explorer-parity.png")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--query", type=int, default=0, help="which query the screenshot opens (0: the 0101... probe)")
    args = p.parse_args()
    run_dir = shipped_run("parity", "small")
    if run_dir is None:
        raise SystemExit("the shipped parity run is missing (a source checkout has it under src/looptrace/data)")
    html = write_parity_explorer(run_dir, ROOT / "build" / "explorer-parity")
    blob = re.search(r'<script type="application/json" id="lt-data">(.*?)</script>', html.read_text(), re.S)
    step = 1
    if blob is not None:
        q = json.loads(blob.group(1))["queries"][args.query]
        step = int(np.argmax(q["energy"])) + 1  # the query's busiest loop step
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--window-size=1360,1500", f"--screenshot={args.out}",
             html.resolve().as_uri() + f"#query={args.query}&step={step}"],
            check=True, capture_output=True,
        )  # fmt: skip
    print(f"wrote {args.out} (query {args.query} at loop step {step})")


if __name__ == "__main__":
    main()

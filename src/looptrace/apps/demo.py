"""The main job: the parity case study end to end (``make demo`` / ``looptrace demo``).

1. use the small parity run shipped with the package (its TracIn checkpoints, trained with
   ``looptrace train parity --preset small``), or with ``--retrain`` train it here into
   ``runs/parity-small`` (its time over seeds is in docs/results/parity);
2. compute SDI over all its TracIn checkpoints from a train sample to length-40 test examples and
   the two alternating probes;
3. run the mechanistic analysis and the applications;
4. write figures (PNG), numbers (JSON) and a self-contained HTML report into the output directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from looptrace.apps.catalog import open_run
from looptrace.apps.catalog import study as get_study
from looptrace.apps.zoo import train_preset

#: trained runs shipped with the package (looptrace/apps/data/runs/<study>-<size>)
DATA = Path(__file__).resolve().parent / "data" / "runs"


def shipped_run(study: str, size: str) -> Path | None:
    """The trained run of ``study``'s ``size`` preset shipped with the package, if there is one."""
    path = DATA / f"{study}-{size}"
    return path if (path / "config.json").exists() and (path / "model.pt").exists() else None


def run_demo(out: Path, quick: bool = False, retrain: bool = False, device: str = "cpu") -> Path:
    """Run the parity study on the shipped run (or a fresh training with ``retrain``); report into ``out``."""
    study = get_study("parity")
    size = "tiny" if quick else "small"
    shipped = None if (quick or retrain) else shipped_run("parity", size)
    if shipped is not None:
        run_dir = shipped
        print(
            f"using the trained parity model shipped with looptrace ({run_dir}); --retrain trains it here", flush=True
        )
    else:
        run_dir = out / "train" if quick else Path("runs") / f"parity-{size}"
        if retrain and run_dir.exists():
            shutil.rmtree(run_dir)
        if not (run_dir / "metrics.json").exists():
            print(f"training parity ({size}) into {run_dir} ...", flush=True)
            train_preset("parity", size, run_dir, progress=True, device=device)
        else:
            print(f"reusing the trained model in {run_dir}", flush=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print({k: v for k, v in metrics.items() if k.startswith("accuracy")}, flush=True)
    config = study.quick_config() if quick else study.study_config()
    if device != "cpu":
        import dataclasses

        config = dataclasses.replace(config, device=device)
    study.run_study(open_run(run_dir), out, config)
    return out

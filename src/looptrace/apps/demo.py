"""The main job: the parity case study end to end (``make demo`` / ``looptrace demo``).

1. use the small parity run shipped with the package (its TracIn checkpoints, trained with
   ``looptrace train parity --preset small``), or with ``--retrain`` train it here into
   ``runs/parity-small`` (its time over seeds is in docs/results/parity);
2. compute SDI over all its TracIn checkpoints from a train sample to length-40 test examples and
   the two alternating probes;
3. run the mechanistic analysis and the applications;
4. write figures (PNG), numbers (JSON) and a self-contained HTML report into the output directory;
5. write the explorer (``explorer.html``): token x step attribution of a train sample on the probes and a few
   length-40 test inputs, to browse in a browser.
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
    page = write_parity_explorer(run_dir, out, n_train=16 if quick else 64, n_query=2 if quick else 8)
    print(f"explorer: {page}", flush=True)
    return out


#: How the parity tokens read in the explorer (0 and 1 are bits, then the answer marker and padding).
PARITY_TOKENS = {0: "0", 1: "1", 2: "=", 3: "·"}


def write_parity_explorer(run_dir: Path, out: Path, n_train: int = 64, n_query: int = 8) -> Path:
    """``out/explorer.html``: token x step attribution (sketched) (``lt.attribute(...,
    train_positions=True)`` over every TracIn checkpoint) of ``n_train`` training examples on the two alternating
    probes and ``n_query`` held-out length-40 inputs, each read out at its own step."""
    import torch

    import looptrace as lt
    from looptrace.explore import explorer_data, write_explorer

    run = open_run(run_dir)
    sets = get_study("parity").influence_sets(run, n_train, n_query, None)
    train, query = sets.datasets["train"], sets.datasets["query"]
    model = run.load_model()

    def loader(ds: torch.utils.data.Dataset) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)

    res = lt.attribute(model, run.checkpoints(), loader(train), loader(query), sets.loss_fn, step_module=model.core,
                       sketch=lt.SketchSpec(dim=4096), train_positions=True)  # fmt: skip
    assert res.sdi_positions is not None
    q_n = [int(n) for n in query.tensors[2]]
    labels = ["probe 0101...", "probe 1010...", *[f"held-out input {j - 1}" for j in range(2, len(q_n))]]
    data = explorer_data(
        res.sdi.numpy(), positions=res.sdi_positions.numpy(), train_tokens=list(train.tensors[0]),
        query_tokens=list(query.tensors[0]), decode=lambda ids: [PARITY_TOKENS[int(t)] for t in ids], k=10,
        readout_step=q_n, query_labels=labels[: len(q_n)],
        source={"run": str(run_dir), "checkpoints": len(res.etas), "sketch": str(res.spec)},
    )  # fmt: skip
    return write_explorer(data, out / "explorer.html", title="parity: token x step attribution")

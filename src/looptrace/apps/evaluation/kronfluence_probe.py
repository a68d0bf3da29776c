"""kronfluence's pairwise scores on the evaluation task, run in kronfluence's own environment (a peer).

Run with a Python that has kronfluence installed and ``PYTHONPATH`` pointing at looptrace's ``src``::

    PYTHONPATH=src /work/peers/kronfluence-venv/bin/python -m looptrace.apps.evaluation.kronfluence_probe \\
        --checkpoints CKPT_DIR --out OUT

It loads the final checkpoint of the full-data run into the task's model and writes, through kronfluence's
public API only (``Analyzer``, ``Task``, ``FactorArguments``, ``ScoreArguments``; nothing of its code is
copied), ``[N train, M query]`` score files for EK-FAC, K-FAC, diagonal and identity (every Linear module,
``has_shared_parameters=True`` since the body is called tau times; true Fisher, its own default), plus
``scores.json`` naming them, and the **tied-body finding**: with the identity strategy on the body's Linear
layers and the full-BPTT loss in float64, kronfluence's pairwise score is compared with looptrace's exact
inner products of (a) the tied training gradient, (b) only the last loop step's training gradient, (c) only
the last step's query gradient, with the tied query gradient. Sign: positive = the training example helped
(lowered the query loss), as looptrace's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BODY_LINEARS = ["core.fc", "core.out"]


def _task_class(full_bptt: bool, modules: list[str] | None) -> Any:
    from kronfluence.task import Task  # type: ignore[import-not-found]

    from looptrace.apps.evaluation.task import logits

    k = None if full_bptt else -1

    class EvalTaskKF(Task):  # type: ignore[misc]
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            x, y = batch
            out = logits(model, x, bptt_k=k)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(out.detach().double(), -1), 1)[:, 0]
            return F.cross_entropy(out, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(logits(model, x, bptt_k=k), y, reduction="sum")

        def get_influence_tracked_modules(self) -> list[str] | None:
            return modules

    return EvalTaskKF()


def pairwise(
    model: nn.Module,
    train: Any,
    query: Any,
    strategy: str,
    work: Path,
    *,
    full_bptt: bool = False,
    modules: list[str] | None = None,
    damping: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """kronfluence's pairwise scores ``[N train, M query]`` of ``strategy`` on a fresh copy of ``model``."""
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model  # type: ignore[import-not-found]
    from kronfluence.arguments import FactorArguments, ScoreArguments  # type: ignore[import-not-found]

    task = _task_class(full_bptt, modules)
    m = prepare_model(copy.deepcopy(model).eval(), task)
    name = f"{strategy}-{'full' if full_bptt else 'trained'}-{'body' if modules else 'all'}-{dtype}"
    an = Analyzer(name, m, task, cpu=True, disable_tqdm=True, output_dir=str(work), log_level=logging.ERROR)
    fargs = FactorArguments(strategy=strategy, has_shared_parameters=True)
    sargs = ScoreArguments(damping_factor=damping)
    if dtype == torch.float64:
        for f in ("activation_covariance_dtype", "gradient_covariance_dtype", "per_sample_gradient_dtype",
                  "lambda_dtype"):  # fmt: skip
            setattr(fargs, f, dtype)
        for f in ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype"):
            setattr(sargs, f, dtype)
    an.fit_all_factors(name, train, per_device_batch_size=64, factor_args=fargs, overwrite_output_dir=True)
    an.compute_pairwise_scores(name, name, query, train, per_device_query_batch_size=64,
                               per_device_train_batch_size=64, score_args=sargs, overwrite_output_dir=True)  # fmt: skip
    scores = an.load_pairwise_scores(name)["all_modules"]  # [M, N]
    return scores.T.double().numpy()


def tied_body_finding(model: nn.Module, train: Any, query: Any, work: Path) -> dict[str, Any]:
    """kronfluence identity scores on the body's Linear layers vs looptrace's exact per-step inner products."""
    import looptrace as lt
    from looptrace.apps.evaluation.task import full_bptt_loss

    m64 = model.double()
    kf = pairwise(m64, train, query, "identity", work, full_bptt=True, modules=BODY_LINEARS, dtype=torch.float64)
    xs = [train.tensors, query.tensors]
    feats = [
        lt.featurize(m64, [t], full_bptt_loss, step_module=m64.get_submodule("core"), sketch=lt.SketchSpec.exact())
        for t in xs
    ]
    keep = [i for i, slot in enumerate(feats[0].layout) if slot["name"].startswith(tuple(BODY_LINEARS))]
    cols = torch.cat([torch.arange(feats[0].layout[i]["offset"], feats[0].layout[i]["offset"] + feats[0].layout[i]["m"])
                      for i in keep])  # fmt: skip
    tr, qu = (f.per_step[..., cols] for f in feats)  # type: ignore[index]
    cand = {
        "tied train gradient . tied query gradient (the TracIn / influence inner product)": tr.sum(1) @ qu.sum(1).T,
        "last loop step's train gradient only . tied query gradient": tr[:, -1] @ qu.sum(1).T,
        "tied train gradient . last loop step's query gradient only": tr.sum(1) @ qu[:, -1].T,
        "last step . last step": tr[:, -1] @ qu[:, -1].T,
    }
    kft = torch.from_numpy(kf)
    names = list(cand)
    rel = {k: float((kft - v).norm() / v.norm()) for k, v in cand.items()}
    closest = min(rel, key=lambda k: rel[k])
    return {
        "what": "kronfluence 1.0.1 pairwise scores, identity strategy, has_shared_parameters=True, body Linear layers "
        "(core.fc, core.out), full-BPTT loss, float64, final checkpoint; relative difference |kf - x| / |x| to each "
        "exact looptrace inner product x",
        "relative_difference": rel,
        "closest": closest,
        "equals_last_step_train_gradient": bool(rel[names[1]] < 1e-5),
        "tied_relative_difference": rel[names[0]],
    }


def main(argv: list[str] | None = None) -> int:
    import looptrace as lt
    from looptrace.apps.evaluation.task import EvalTask
    from looptrace.influence.checkpoints import load_into

    p = argparse.ArgumentParser(description="kronfluence pairwise scores on the evaluation task")
    p.add_argument("--checkpoints", required=True, help="the full-data run's checkpoint directory")
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="{}", help="EvalTask fields as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = EvalTask(**json.loads(args.task))
    model = task.model()
    last = lt.load_checkpoints(args.checkpoints)[-1].load_full()
    load_into(model, last.state, last.name)
    data = task.data()
    train = torch.utils.data.TensorDataset(*data["train"])
    query = torch.utils.data.TensorDataset(*data["query"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = [
            ("kronfluence EK-FAC (all Linear modules, final weights)", "ekfac", None),
            ("kronfluence K-FAC (all Linear modules, final weights)", "kfac", None),
            ("kronfluence diagonal (all Linear modules, final weights)", "diagonal", None),
            ("kronfluence identity (all Linear modules, final weights)", "identity", None),
            ("kronfluence EK-FAC (body Linear modules, final weights)", "ekfac", BODY_LINEARS),
        ]
        for i, (name, strategy, modules) in enumerate(runs):
            s = pairwise(model, train, query, strategy, work, modules=modules)
            np.save(out / f"kf{i}.npy", s)
            files[name] = f"kf{i}.npy"
        finding = tied_body_finding(model, train, query, work)
    meta = {"files": files, "damping": "kronfluence heuristic (damping_factor=None: 0.1 x mean eigenvalue)",
            "fisher": "true (kronfluence default: sampled labels)", "tied_body_finding": finding}  # fmt: skip
    (out / "scores.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(finding, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

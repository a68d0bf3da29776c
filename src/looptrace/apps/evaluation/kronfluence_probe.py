"""kronfluence's pairwise scores on an evaluation task, run in kronfluence's own environment (a peer).

Run with a Python that has kronfluence installed and ``PYTHONPATH`` pointing at looptrace's ``src``
(:func:`looptrace.apps.evaluation.peers.run_kronfluence` does)::

    PYTHONPATH=src /work/peers/kronfluence-venv/bin/python -m looptrace.apps.evaluation.kronfluence_probe \\
        --checkpoints CKPT_DIR --out OUT --task-name majority --task '{"seed": 0}'

It loads the final checkpoint of the full-data run into the task's model and writes, through kronfluence's
public API only (``Analyzer``, ``Task``, ``FactorArguments``, ``ScoreArguments``; nothing of its code is
copied), ``[N train, M query]`` score files for EK-FAC (the loss as trained, and with every loop step
backpropagated), K-FAC and identity, every Linear module tracked (kronfluence's default),
``has_shared_parameters=True`` since the body is called tau times, true Fisher and damping heuristic (its
defaults), plus ``scores.json`` naming them, and the **tied-body finding**: with the identity strategy on the
body's Linear layers and the full-BPTT loss in float64, kronfluence's pairwise score is compared with
looptrace's exact inner products of (a) the tied training gradient, (b) only the last loop step's training
gradient, (c) only the last step's query gradient, with the tied query gradient. Sign: positive = the
training example helped (lowered the query loss), as looptrace's.
"""

from __future__ import annotations

import argparse
import copy
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

from looptrace.apps.evaluation.task import TASKS, EvalTask

#: (method key, kronfluence strategy, full BPTT): the peer methods of :mod:`looptrace.apps.evaluation.methods`.
RUNS = (
    ("kronfluence_ekfac", "ekfac", False),
    ("kronfluence_ekfac_full", "ekfac", True),
    ("kronfluence_kfac", "kfac", False),
    ("kronfluence_identity", "identity", False),
)


def body_linears(task: EvalTask, model: nn.Module) -> list[str]:
    """The names of the loop body's Linear modules (what the tied-body check tracks)."""
    core = task.step_module(model)
    prefix = next(n for n, m in model.named_modules() if m is core)
    return [f"{prefix}.{n}" for n, m in core.named_modules() if isinstance(m, nn.Linear)]


def _kf_task(task: EvalTask, full_bptt: bool, modules: list[str] | None) -> Any:
    from kronfluence.task import Task  # type: ignore[import-not-found]

    k = None if full_bptt else -1

    class EvalTaskKF(Task):  # type: ignore[misc]
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            x, y = batch
            out = task.logits(model, x, bptt_k=k)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(out.detach().double(), -1), 1)[:, 0]
            return F.cross_entropy(out, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(task.logits(model, x, bptt_k=k), y, reduction="sum")

        def get_influence_tracked_modules(self) -> list[str] | None:
            return modules

    return EvalTaskKF()


def pairwise(
    task: EvalTask,
    model: nn.Module,
    train: Any,
    query: Any,
    strategy: str,
    work: Path,
    *,
    full_bptt: bool = False,
    modules: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """kronfluence's pairwise scores ``[N train, M query]`` of ``strategy`` on a fresh copy of ``model``."""
    from kronfluence.analyzer import Analyzer, prepare_model  # type: ignore[import-not-found]
    from kronfluence.arguments import FactorArguments, ScoreArguments  # type: ignore[import-not-found]

    kf_task = _kf_task(task, full_bptt, modules)
    m = prepare_model(copy.deepcopy(model).eval(), kf_task)
    name = f"{strategy}-{'full' if full_bptt else 'trained'}-{'body' if modules else 'all'}-{dtype}"
    an = Analyzer(name, m, kf_task, cpu=True, disable_tqdm=True, output_dir=str(work), log_level=logging.ERROR)
    fargs = FactorArguments(strategy=strategy, has_shared_parameters=True)
    sargs = ScoreArguments(damping_factor=None)
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


def tied_body_finding(task: EvalTask, model: nn.Module, train: Any, query: Any, work: Path) -> dict[str, Any]:
    """kronfluence identity scores on the body's Linear layers vs looptrace's exact per-step inner products."""
    import looptrace as lt

    m64 = copy.deepcopy(model).double()
    linears = body_linears(task, m64)
    kf = pairwise(task, m64, train, query, "identity", work, full_bptt=True, modules=linears, dtype=torch.float64)
    feats = [
        lt.featurize(
            m64, [t.tensors], task.full_bptt_loss, step_module=task.step_module(m64), sketch=lt.SketchSpec.exact()
        )
        for t in (train, query)
    ]
    slots = [s for s in feats[0].layout if s["name"].rsplit(".", 1)[0] in linears]
    cols = torch.cat([torch.arange(int(s["offset"]), int(s["offset"]) + int(s["m"])) for s in slots])
    tr, qu = (f.require_steps("the tied-body check")[..., cols] for f in feats)
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
        "what": "kronfluence 1.0.1 pairwise scores, identity strategy, has_shared_parameters=True, the body's "
        f"Linear layers ({', '.join(linears)}), full-BPTT loss, float64, final checkpoint; relative difference "
        "|kf - x| / |x| to each exact looptrace inner product x",
        "body_linears": linears,
        "relative_difference": rel,
        "closest": closest,
        "equals_last_step_train_gradient": bool(rel[names[1]] < 1e-5),
        "tied_relative_difference": rel[names[0]],
        "last_step_relative_difference": rel[names[1]],
    }


def main(argv: list[str] | None = None) -> int:
    import looptrace as lt
    from looptrace.influence.checkpoints import load_into

    p = argparse.ArgumentParser(description="kronfluence pairwise scores on an evaluation task")
    p.add_argument("--checkpoints", required=True, help="the full-data run's checkpoint directory")
    p.add_argument("--out", required=True)
    p.add_argument("--task-name", default="majority", help=f"the evaluation task: {sorted(TASKS)}")
    p.add_argument("--task", default="{}", help="the task's fields as JSON")
    p.add_argument("--no-finding", action="store_true", help="skip the tied-body check")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.task).items()}
    task = TASKS[args.task_name](**fields)
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
        for key, strategy, full in RUNS:
            np.save(out / f"{key}.npy", pairwise(task, model, train, query, strategy, work, full_bptt=full))
            files[key] = f"{key}.npy"
        finding = None if args.no_finding else tied_body_finding(task, model, train, query, work)
    import kronfluence  # type: ignore[import-not-found]

    meta = {"files": files, "library": f"kronfluence {kronfluence.__version__}", "checkpoint": Path(str(last.name)).name,
            "damping": "kronfluence heuristic (damping_factor=None: 0.1 x mean eigenvalue)",
            "fisher": "true (kronfluence default: sampled labels)", "tracked": "every Linear module (its default)",
            "tied_body_finding": finding}  # fmt: skip
    (out / "scores.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(finding, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

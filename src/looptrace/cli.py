"""The ``looptrace`` command: train, demo, analyze, report, bench, featurize, score, topk, inspect."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from looptrace.errors import ConfigError, LooptraceError


def _cmd_train(args: argparse.Namespace) -> int:
    from looptrace.zoo import train_preset

    overrides = {
        k: v for k, v in {"steps": args.steps, "seed": args.seed, "threads": args.threads}.items() if v is not None
    }
    out = Path(args.out or f"runs/{args.task}-{args.preset}")
    metrics = train_preset(args.task, args.preset, out, progress=not args.quiet, **overrides)
    summary = {k: v for k, v in metrics.items() if k != "history"}
    print(json.dumps(summary, indent=2, default=str))
    print(f"run directory: {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from looptrace.demo import run_demo

    out = run_demo(Path(args.out), quick=args.quick, retrain=args.retrain)
    print(f"report: {out / 'report.html'}")
    return 0


def _study(task: str, run: Path, out: Path, quick: bool) -> Path:
    if task == "parity":
        from looptrace.demo import ParityStudyConfig, run_parity_study

        pcfg = (
            ParityStudyConfig(n_train=16, n_test=8, sketch_dim=256, n_calibration=32, n_eval=64)
            if quick
            else ParityStudyConfig()
        )
        run_parity_study(run, out, pcfg)
    elif task == "sudoku":
        from looptrace.studies import SudokuStudyConfig, run_sudoku_study

        scfg = (
            SudokuStudyConfig(n_train=16, n_test=8, sketch_dim=256, budgets=(1, 2, 4), max_checkpoints=2)
            if quick
            else SudokuStudyConfig()
        )
        run_sudoku_study(run, out, scfg)
    else:
        from looptrace.studies import RecursiveStudyConfig, run_recursive_study

        rcfg = (
            RecursiveStudyConfig(recurrences=(2, 3, 4), n_train=6, n_test=4, sketch_dim=256, max_checkpoints=1)
            if quick
            else RecursiveStudyConfig()
        )
        run_recursive_study(run, out, rcfg)
    return out / "report.html"


def _cmd_analyze(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.run) / "analysis"
    print(f"report: {_study(args.task, Path(args.run), out, args.quick)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import json as _json

    run = Path(args.run)
    out = Path(args.out) if args.out else run / "analysis"
    if (out / "report.html").exists() and not args.force:
        print(f"report: {out / 'report.html'}")
        return 0
    cfg_path = (
        (run / "finetune" / "config.json") if (run / "finetune" / "config.json").exists() else run / "config.json"
    )
    if not cfg_path.exists():
        raise ConfigError(f"{run} is not a looptrace run directory (no config.json)")
    task = _json.loads(cfg_path.read_text())["task"]
    print(f"report: {_study(task, run, out, args.quick)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from looptrace import bench

    return bench.run_args(args)


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The command's arguments, saved beside its outputs."""
    return {k: v for k, v in vars(args).items() if k != "func"}


_ATTR = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def load_attr(spec: str, what: str) -> Any:
    """Import ``module:attribute`` named by the user (only that module; nothing is evaluated)."""
    if not _ATTR.match(spec):
        raise ConfigError(f"{what} must look like 'package.module:function', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {mod_name!r} for {what}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{mod_name!r} has no attribute {attr!r} (for {what})")
        obj = getattr(obj, part)
    return obj


def _setup_from_args(args: argparse.Namespace) -> Any:
    """(model, step_module, loss_fn, datasets, checkpoints) from a zoo run or user factories."""
    from looptrace.influence.checkpoints import Checkpoint
    from looptrace.zoo import influence_setup

    roles = [r for r in args.roles.split(",") if r]
    if args.run:
        st = influence_setup(args.run, n_train=args.n_train, n_query=args.n_query, loops=args.loops)
        cks = [Checkpoint(p) for p in st.checkpoints]
        return st.model, st.step_module, st.loss_fn, {r: st.datasets[r] for r in roles}, cks
    if not (args.model and args.loss and args.dataset and args.checkpoint):
        raise ConfigError("pass --run DIR, or all of --model, --loss, --dataset and --checkpoint")
    model = load_attr(args.model, "--model")()
    loss_fn = load_attr(args.loss, "--loss")
    make_ds = load_attr(args.dataset, "--dataset")
    step_module = model.get_submodule(args.step_module) if args.step_module else None
    if step_module is None:
        raise ConfigError("--step-module is required with --model (the attribute path of the loop body, e.g. core)")
    cks = []
    for c in args.checkpoint:
        path, _, lr = c.partition("@")
        cks.append(Checkpoint(path, lr=float(lr) if lr else None))
    return model, step_module, loss_fn, {r: make_ds(r) for r in roles}, cks


def _cmd_featurize(args: argparse.Namespace) -> int:
    import torch

    from looptrace.sketch.spec import SketchSpec
    from looptrace.store import featurize_to_store

    dist = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if dist and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        model, step_module, loss_fn, datasets, cks = _setup_from_args(args)
        spec = (
            SketchSpec.exact()
            if args.method == "exact"
            else SketchSpec(dim=args.dim, seed=args.seed, method=args.method, budget=args.budget)
        )
        store = featurize_to_store(
            model, cks, datasets, loss_fn, args.store, step_module=step_module, sketch=spec, batch_size=args.batch_size,
            shard_size=args.shard_size, dtype=args.dtype, progress=not args.quiet, verify=args.verify,
        )  # fmt: skip
        if dist:
            torch.distributed.barrier()
        if not dist or torch.distributed.get_rank() == 0:
            Path(args.store, "featurize_args.json").write_text(json.dumps(_args_dict(args), indent=2, default=str))
            print(json.dumps(store.summary()["progress"], indent=2))
    finally:
        if dist and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from looptrace.store import FeatureStore, score_to_disk

    out = score_to_disk(FeatureStore.open(args.store), args.out, kind=args.kind)
    Path(str(out) + ".json").write_text(json.dumps(_args_dict(args), indent=2, default=str))
    print(f"wrote {out}")
    return 0


def _cmd_topk(args: argparse.Namespace) -> int:
    from looptrace.store import FeatureStore, topk

    res = topk(FeatureStore.open(args.store), k=args.k, step=args.step, index=args.index)
    payload = {"config": _args_dict(args), **res.to_dict()}
    text = json.dumps(payload, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from looptrace.store import FeatureStore

    print(json.dumps(FeatureStore.open(args.store).summary(), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="looptrace", description="Step-resolved training-data attribution for looped transformers."
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a zoo preset, recording TracIn checkpoints")
    t.add_argument("task", choices=["parity", "sudoku", "recursive-gpt"], help="which case study")
    t.add_argument(
        "--preset", default="small", choices=["small", "paper", "tiny"], help="model/training size (default: small)"
    )
    t.add_argument("--out", default=None, help="run directory (default: runs/TASK-PRESET); resumed if it exists")
    t.add_argument("--steps", type=int, default=None, help="override the number of optimizer steps")
    t.add_argument("--seed", type=int, default=None, help="override the seed of data, depth and init")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("demo", help="the main job: train parity (or reuse), compute SDI, analyse, write a report")
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds)")
    d.add_argument("--retrain", action="store_true", help="ignore a cached trained model")
    d.set_defaults(func=_cmd_demo)

    an = sub.add_parser("analyze", help="run a case study's analysis on a trained run (figures, JSON, HTML report)")
    an.add_argument("task", choices=["parity", "sudoku", "recursive-gpt"])
    an.add_argument("--run", required=True, help="run directory from `looptrace train`")
    an.add_argument("--out", default=None, help="output directory (default: RUN/analysis)")
    an.add_argument("--quick", action="store_true", help="tiny sample sizes (smoke test)")
    an.set_defaults(func=_cmd_analyze)

    rp = sub.add_parser("report", help="the HTML report of a run (computing its analysis if needed)")
    rp.add_argument("--run", required=True)
    rp.add_argument("--out", default=None, help="analysis directory (default: RUN/analysis)")
    rp.add_argument("--force", action="store_true", help="recompute even if a report exists")
    rp.add_argument("--quick", action="store_true")
    rp.set_defaults(func=_cmd_report)

    b = sub.add_parser("bench", help="benchmarks vs the exact baseline and the peers (JSON + Markdown)")
    from looptrace.bench import add_arguments as bench_arguments

    bench_arguments(b)
    b.set_defaults(func=_cmd_bench)

    f = sub.add_parser(
        "featurize", help="featurise train/query sets at every checkpoint into a feature store (torchrun-ready)"
    )
    f.add_argument("--store", required=True, help="feature store directory (created, or resumed)")
    f.add_argument("--run", help="a run directory from `looptrace train` (model, checkpoints and the paper's sets)")
    f.add_argument("--model", help="package.module:factory returning the model (instead of --run)")
    f.add_argument("--loss", help="package.module:loss_fn, (model, batch) -> Tensor[B]")
    f.add_argument("--dataset", help="package.module:fn, role ('train'|'query') -> torch Dataset")
    f.add_argument("--step-module", help="attribute path of the loop body module, e.g. core")
    f.add_argument("--checkpoint", action="append", help="PATH or PATH@LR, repeatable (with --model)")
    f.add_argument("--roles", default="train,query", help="which sets (default: train,query)")
    f.add_argument("--n-train", type=int, default=512, help="train examples (with --run)")
    f.add_argument("--n-query", type=int, default=256, help="query examples (with --run)")
    f.add_argument("--loops", type=int, default=None, help="fixed analysis horizon (with --run)")
    f.add_argument("--dim", type=int, default=4096, help="sketch dimension")
    f.add_argument("--seed", type=int, default=0, help="sketch seed")
    f.add_argument(
        "--method", default="countsketch", choices=["countsketch", "tensorsketch", "exact"], help="sketch method"
    )
    f.add_argument(
        "--budget", default="shared", choices=["shared", "per_tensor", "proportional"], help="dimension budget"
    )
    f.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="on-disk dtype")
    f.add_argument("--shard-size", type=int, default=1024, help="examples per shard")
    f.add_argument("--batch-size", type=int, default=64, help="featurisation batch size")
    f.add_argument(
        "--verify",
        default="first",
        type=lambda v: {"true": True, "false": False}.get(v.lower(), v),
        help="first|true|false",
    )
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_cmd_featurize)

    sc = sub.add_parser("score", help="stream sum_k eta_k SDI (or TracIn) from a store to a .npy file")
    sc.add_argument("--store", required=True)
    sc.add_argument("--out", required=True, help="output .npy")
    sc.add_argument("--kind", default="sdi", choices=["sdi", "tracin"])
    sc.set_defaults(func=_cmd_score)

    tk = sub.add_parser("topk", help="top-k proponents and opponents per query (FAISS, exactly re-scored)")
    tk.add_argument("--store", required=True)
    tk.add_argument("--k", type=int, default=10)
    tk.add_argument("--step", type=int, default=None, help="rank by SDI at this query step (default: TracIn)")
    tk.add_argument(
        "--index", default="flat", choices=["flat", "ivf", "hnsw", "brute"], help="flat = exact inner product"
    )
    tk.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    tk.set_defaults(func=_cmd_topk)

    ins = sub.add_parser("inspect", help="what a feature store holds")
    ins.add_argument("--store", required=True)
    ins.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LooptraceError as exc:
        print(f"looptrace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

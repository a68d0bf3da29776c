"""The ``looptrace`` command: train, demo, analyze, report, bench, featurize, score, topk, inspect."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from looptrace.errors import LooptraceError


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


def _cmd_bench(args: argparse.Namespace) -> int:
    from looptrace import bench

    argv = (
        [args.what, "--out", args.out] + (["--quick"] if args.quick else []) + (["--no-peer"] if args.no_peer else [])
    )
    return bench.main(argv)


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

    b = sub.add_parser("bench", help="benchmarks vs the exact baseline and the peers (JSON + Markdown)")
    b.add_argument("what", choices=["all"], help="which benchmark")
    b.add_argument("--quick", action="store_true", help="fewer dimensions and seeds (<= 10 minutes on 2 cores)")
    b.add_argument("--no-peer", action="store_true", help="skip the reference implementation")
    b.add_argument("--out", default="benchmarks/results", help="results directory")
    b.set_defaults(func=_cmd_bench)
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

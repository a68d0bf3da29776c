"""The ``looptrace`` command: train, demo, analyze, report, bench, featurize, fit-curvature, score, topk, inspect."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from looptrace.config import parse_override
from looptrace.errors import ConfigError, LooptraceError, StorageError
from looptrace.extras import require
from looptrace.io import REFUSALS, atomic_write_bytes, machine_error

#: Subcommands that run the applications (case studies, training, benchmarks, the evaluation): they need
#: the ``studies`` extra (matplotlib, scipy). The rest (featurize, score, topk, inspect) need the library only.
STUDY_COMMANDS = ("train", "demo", "analyze", "report", "upgrade-run", "bench", "eval")

#: Set to 1 to see the traceback behind a one-line error.
DEBUG_ENV = "LOOPTRACE_DEBUG"


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set section.field=value`` plus the shortcuts ``--steps``, ``--seed``, ``--threads``."""
    out: dict[str, Any] = {}
    for text in args.set or []:
        keys, value = parse_override(text)
        out[".".join(keys)] = value
    for name in ("steps", "seed", "threads"):
        if getattr(args, name) is not None:
            out[f"train.{name}"] = getattr(args, name)
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from looptrace.apps.zoo import train_preset

    out = Path(args.out or f"runs/{args.task}-{args.preset}")
    metrics = train_preset(args.task, args.preset, out, _overrides(args), progress=not args.quiet, device=args.device)
    summary = {k: v for k, v in metrics.items() if k != "history"}
    print(json.dumps(summary, indent=2, default=str))
    print(f"run directory: {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from looptrace.apps.demo import run_demo

    out = run_demo(Path(args.out), quick=args.quick, retrain=args.retrain, device=args.device)
    print(f"report: {out / 'report.html'}")
    return 0


def _study(run_dir: Path, out: Path, quick: bool, task: str | None = None, device: str = "cpu") -> Path:
    from looptrace.apps.catalog import open_run
    from looptrace.apps.catalog import study as get_study

    run = open_run(run_dir)
    if task is not None and task != run.study:
        raise ConfigError(f"{run_dir} is a {run.study!r} run, not {task!r}; run `looptrace analyze {run.study}`")
    study = get_study(run.study)
    config = study.quick_config() if quick else study.study_config()
    if device != "cpu" and hasattr(config, "device"):
        import dataclasses

        config = dataclasses.replace(config, device=device)
    study.run_study(run, out, config)
    return out / "report.html"


def _cmd_analyze(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.run]
    if len(runs) == 1:
        out = Path(args.out) if args.out else runs[0] / "analysis"
        print(f"report: {_study(runs[0], out, args.quick, args.task, args.device)}")
        return 0
    from looptrace.apps.catalog import study as get_study

    if not args.out:
        raise ConfigError(
            "several --run need --out (each run's analysis goes to OUT/<run name>, the spread to OUT/seeds.json)"
        )
    out = Path(args.out)
    results = []
    for run in runs:
        _study(run, out / run.name, args.quick, args.task, args.device)
        results.append(json.loads((out / run.name / "results.json").read_text()))
    aggregate = get_study(args.task).aggregate
    if aggregate is not None:
        atomic_write_bytes(out / "seeds.json", json.dumps(aggregate(results), indent=2, default=str).encode())
        print(f"spread over {len(runs)} runs: {out / 'seeds.json'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "analysis"
    if (out / "report.html").exists() and not args.force:
        print(f"report: {out / 'report.html'}")
        return 0
    print(f"report: {_study(run, out, args.quick)}")
    return 0


def _cmd_upgrade_run(args: argparse.Namespace) -> int:
    from looptrace.apps.upgrade import upgrade_run

    path = upgrade_run(Path(args.run), args.preset)
    print(f"upgraded {path} (the old record is kept as config.v1.json)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.what == "applications":
        return _cmd_eval_applications(args)
    import dataclasses

    from looptrace.apps.evaluation.harness import TASKS, EvalConfig, evaluate

    if args.task not in TASKS:
        raise ConfigError(f"unknown evaluation task {args.task!r}: choose one of {sorted(TASKS)}")
    task = TASKS[args.task]
    out = Path(args.out or "docs/results/eval")
    default = EvalConfig.curvature() if args.what == "curvature" else EvalConfig().sized_for(task)
    cfg = EvalConfig.smoke() if args.smoke else EvalConfig.quick() if args.quick else default
    python = args.kronfluence_python or os.environ.get("LOOPTRACE_KRONFLUENCE_PYTHON") or None
    cfg = dataclasses.replace(cfg, kronfluence_python=python)
    if args.subsets is not None:
        cfg = dataclasses.replace(cfg, subsets=args.subsets)
    res = evaluate(cfg, out, task=dataclasses.replace(task(), seed=args.task_seed), what=args.what)
    print(json.dumps({k: res[k] for k in ("verdicts", "seconds") if k in res}, indent=2, default=str))
    print(f"report: {out / 'report.html'}")
    return 0


def _cmd_eval_applications(args: argparse.Namespace) -> int:
    import dataclasses

    from looptrace.apps.evaluation.applications import ApplicationsConfig, run_applications

    out = Path(args.out or "docs/results/applications")
    cfg = ApplicationsConfig.smoke() if args.smoke else ApplicationsConfig()
    if args.quick:
        cfg = dataclasses.replace(
            cfg, seeds=cfg.seeds[:3], add_back_seeds=3, task_choice_seeds=cfg.task_choice_seeds[:1]
        )
    if args.sudoku_seed:
        cfg = dataclasses.replace(cfg, sudoku_seeds=tuple(args.sudoku_seed))
    if args.eval_results:
        cfg = dataclasses.replace(cfg, eval_results=args.eval_results)
    res = run_applications(cfg, out)
    print(json.dumps({k: res[k] for k in ("verdicts", "seconds") if k in res}, indent=2, default=str))
    print(f"report: {out / 'report.html'}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from looptrace.apps import bench

    return bench.run_args(args)


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The command's arguments, saved beside its outputs."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "debug")}


_ATTR = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def load_attr(spec: str, what: str) -> Any:
    """Import ``module:attribute`` named by the user (only that module; nothing is evaluated)."""
    if not _ATTR.match(spec):
        raise ConfigError(f"{what} must look like 'package.module:function', got {spec!r}")
    mod_name, attr = spec.split(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # a console script does not look in the working directory
        sys.path.insert(0, os.getcwd())  # (as `python -m` and uvicorn do, a module beside you is found)
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
    """(model, (step_module, body), loss_fn, datasets, checkpoints) from a recorded run or user factories."""
    from looptrace.influence.checkpoints import Checkpoint, load_checkpoints

    roles = [r for r in args.roles.split(",") if r]
    if args.run:
        from looptrace.apps.catalog import open_run
        from looptrace.apps.catalog import study as get_study

        run = open_run(args.run)
        sets = get_study(run.study).influence_sets(run, args.n_train, args.n_query, args.loops)
        model = run.load_model()
        return model, (model.core, None), sets.loss_fn, {r: sets.datasets[r] for r in roles}, run.checkpoints()
    if not (args.model and args.loss and args.dataset and (args.checkpoint or args.checkpoint_dir)):
        raise ConfigError("pass --run DIR, or all of --model, --loss, --dataset and --checkpoint (or --checkpoint-dir)")
    model = load_attr(args.model, "--model")()
    loss_fn = load_attr(args.loss, "--loss")
    make_ds = load_attr(args.dataset, "--dataset")
    if not args.step_module:
        raise ConfigError("--step-module is required with --model (the attribute path of the loop body, e.g. core)")
    from looptrace.capture.discover import modules_at

    step_module = modules_at(model, args.step_module)
    body = modules_at(model, args.body) if args.body else None
    cks = load_checkpoints(args.checkpoint_dir) if args.checkpoint_dir else []
    for c in args.checkpoint or []:
        path, _, lr = c.partition("@")
        cks.append(Checkpoint(path, lr=float(lr) if lr else None))
    return model, (step_module, body), loss_fn, {r: make_ds(r) for r in roles}, cks


def _cmd_featurize(args: argparse.Namespace) -> int:
    import torch

    from looptrace.sketch.spec import SketchSpec
    from looptrace.store import featurize_to_store

    dist = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if dist and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        model, (step_module, body), loss_fn, datasets, cks = _setup_from_args(args)
        model.to(args.device)
        options: dict[str, Any] = {}
        if args.adam:
            options["precondition"] = "adam"
        if args.autocast:
            options["autocast"] = getattr(torch, args.autocast)
        if args.positions is not None:
            options["positions"] = args.positions
        if args.outside:
            options["outside"] = True
        spec = (
            SketchSpec.exact()
            if args.method == "exact"
            else SketchSpec(dim=args.dim, seed=args.seed, method=args.method, budget=args.budget)
        )
        store = featurize_to_store(
            model, cks, datasets, loss_fn, args.store, step_module=step_module, body=body, sketch=spec,
            batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype, progress=not args.quiet,
            verify=args.verify, recompute=args.recompute, tau=args.tau, **options,
        )  # fmt: skip
        if dist:
            torch.distributed.barrier()
        if not dist or torch.distributed.get_rank() == 0:
            atomic_write_bytes(
                Path(args.store, "featurize_args.json"), json.dumps(_args_dict(args), indent=2, default=str).encode()
            )
            print(json.dumps(store.summary()["progress"], indent=2))
    finally:
        if dist and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _store_setup(store: str, roles: str) -> Any:
    """(model, (step_module, body), loss_fn, datasets, checkpoints) rebuilt from the store's ``featurize_args.json``."""
    path = Path(store, "featurize_args.json")
    if not path.exists():
        raise ConfigError(f"{store} has no featurize_args.json; fill it with `looptrace featurize` first")
    saved = json.loads(path.read_text())
    saved.setdefault("body", None)  # recorded before --body existed
    return _setup_from_args(argparse.Namespace(**{**saved, "roles": roles}))


def _cmd_fit_curvature(args: argparse.Namespace) -> int:
    from looptrace.store.curvature import fit_curvature_to_store

    model, (step_module, body), loss_fn, datasets, cks = _store_setup(args.store, "train")
    model.to(args.device)
    fisher_loss = load_attr(args.fisher_loss, "--fisher-loss") if args.fisher_loss else None
    paths = fit_curvature_to_store(
        model, cks, datasets["train"], loss_fn, args.store, step_module=step_module, body=body,
        batch_size=args.batch_size, fisher=args.fisher, fisher_loss=fisher_loss, seed=args.seed,
        max_examples=args.max_examples,
    )  # fmt: skip
    atomic_write_bytes(
        Path(args.store, "curvature", "fit_curvature_args.json"), json.dumps(_args_dict(args), indent=2).encode()
    )
    where = sorted({str(p.parent) for p in paths})
    print(f"wrote {len(paths)} factor file(s) under {', '.join(where)}")
    return 0


def _score_preconditioned(args: argparse.Namespace) -> Path:
    from looptrace.influence.attribute import outside_modules
    from looptrace.store import FeatureStore, score_to_disk
    from looptrace.store.curvature import preconditioned_queries

    store = FeatureStore.open(args.store)
    total = args.kind == "total"
    outside = store.outside() if total else None  # refused before any work when the store has none
    if args.precondition == "gauss-newton":
        queries = preconditioned_queries(store, "gauss-newton", args.damping)
        rest = None if outside is None else preconditioned_queries(outside, "gauss-newton", args.damping)
        return score_to_disk(store, args.out, kind=args.kind, queries=queries, outside_queries=rest)
    model, (step_module, body), loss_fn, datasets, cks = _store_setup(args.store, "query")
    model.to(args.device)
    kw = dict(model=model, checkpoints=cks, dataset=datasets["query"], loss_fn=loss_fn, batch_size=args.batch_size)
    queries = preconditioned_queries(store, args.precondition, args.damping, step_module=step_module, body=body, **kw)
    rest = None
    if outside is not None:  # the parameters outside the loop, on their own block
        mods = outside_modules(model, step_module, body)
        rest = preconditioned_queries(outside, args.precondition, args.damping, step_module=model, body=mods, **kw)
    return score_to_disk(store, args.out, kind=args.kind, queries=queries, outside_queries=rest)


def _cmd_score(args: argparse.Namespace) -> int:
    from looptrace.store import FeatureStore, score_to_disk

    if args.damping is not None and args.precondition is None:
        raise ConfigError("--damping needs --precondition kfac, ekfac or gauss-newton")
    if args.precondition is not None:
        out = _score_preconditioned(args)
    else:
        out = score_to_disk(FeatureStore.open(args.store), args.out, kind=args.kind)
    atomic_write_bytes(Path(str(out) + ".json"), json.dumps(_args_dict(args), indent=2, default=str).encode())
    print(f"wrote {out}")
    return 0


def _cmd_topk(args: argparse.Namespace) -> int:
    from looptrace.store import FeatureStore, topk

    res = topk(FeatureStore.open(args.store), k=args.k, step=args.step, index=args.index, positions=args.positions)
    payload = {"config": _args_dict(args), **res.to_dict()}
    text = json.dumps(payload, indent=1, default=str)
    if args.out:
        atomic_write_bytes(Path(args.out), text.encode())
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from looptrace.store import FeatureStore

    print(json.dumps(FeatureStore.open(args.store).summary(), indent=2, default=str))
    return 0


def _explore_datasets(store: Any, notes: list[str]) -> dict[str, Any]:
    """The datasets a store was filled with, rebuilt from its ``featurize_args.json`` (``--dataset`` factory or
    ``--run``), for their token ids; ``{}`` (and a note saying why) when they cannot be rebuilt."""
    path = Path(store.root, "featurize_args.json")
    if not path.exists():
        notes.append("no token ids: the store has no featurize_args.json (it was not filled by `looptrace featurize`)")
        return {}
    recorded = json.loads(path.read_text())
    roles = [r for r in ("train", "query") if store.n(r)]
    try:
        if recorded.get("dataset"):
            make = load_attr(str(recorded["dataset"]), "the store's --dataset")
            return {r: make(r) for r in roles}
        if recorded.get("run"):
            from looptrace.apps.catalog import open_run
            from looptrace.apps.catalog import study as get_study

            run = open_run(recorded["run"])
            sets = get_study(run.study).influence_sets(
                run, recorded.get("n_train", 512), recorded.get("n_query", 256), recorded.get("loops")
            )
            return {r: sets.datasets[r] for r in roles}
    except (LooptraceError, ImportError, OSError) as exc:
        notes.append(f"no token ids: the store's datasets cannot be rebuilt here ({exc})")
        return {}
    notes.append("no token ids: featurize_args.json names no --dataset or --run")
    return {}


def _cmd_explore(args: argparse.Namespace) -> int:
    import warnings

    from looptrace.explore import write_explorer
    from looptrace.explore.stores import explorer_from_store, parse_queries
    from looptrace.store import FeatureStore

    store = FeatureStore.open(args.store)
    decode = load_attr(args.decode, "--decode") if args.decode else None
    notes: list[str] = []
    datasets = _explore_datasets(store, notes)
    out = Path(args.out)
    data = explorer_from_store(
        store, datasets=datasets, decode=decode, k=args.k, readout_step=args.readout_step,
        queries=parse_queries(args.queries, store.n("query")), max_numbers=args.max_numbers,
        scratch=out.parent, notes=notes, source={"decoder": args.decode},
    )  # fmt: skip
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=1)
    write_explorer(data, out, title=args.title or f"looptrace explorer · {store.root.resolve().name}")
    atomic_write_bytes(Path(str(out) + ".json"), json.dumps(_args_dict(args), indent=2, default=str).encode())
    b = data["bound"]
    heat = (
        "with token heatmaps" if data["positions"] else "without token heatmaps: the store has no per-position features"
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; {b['queries_embedded']} of {b['n_query']} queries, {heat})")
    return 0


def _add_explore_parser(sub: Any) -> None:
    from looptrace.explore.data import DEFAULT_MAX_NUMBERS

    ex = sub.add_parser(
        "explore", help="write a self-contained HTML explorer of a store's attributions (top-k per query and step)"
    )
    ex.add_argument("--store", required=True, help="a filled feature store")
    ex.add_argument("--out", default="explorer.html", help="the HTML file to write (opens from disk, no network)")
    ex.add_argument(
        "--decode",
        default=None,
        help="package.module:function mapping one example's token ids (a 1-D tensor) to a list of token strings "
        "(default: token ids as numbers)",
    )
    ex.add_argument("--k", type=int, default=10, help="proponents and opponents kept per query, overall and per step")
    ex.add_argument("--readout-step", type=int, default=None, help="the model's read-out step (default: the last)")
    ex.add_argument(
        "--queries", default=None, help="which queries to embed, e.g. 0:50,60 (default: all, within --max-numbers)"
    )
    ex.add_argument(
        "--max-numbers",
        type=int,
        default=DEFAULT_MAX_NUMBERS,
        help="cap on the numbers embedded (about 8-12 bytes each in the file); queries past it are left out",
    )
    ex.add_argument("--title", default=None, help="the page's title (default: from the store's name)")
    ex.set_defaults(func=_cmd_explore)


def build_parser() -> argparse.ArgumentParser:
    from looptrace.apps.catalog import studies

    registry = studies()
    names = list(registry)
    sizes = list(dict.fromkeys(size for st in registry.values() for size in st.sizes))
    study_help = "; ".join(f"{n}: {st.summary}" for n, st in registry.items())
    p = argparse.ArgumentParser(
        prog="looptrace",
        description="Step-resolved training-data attribution for looped transformers.",
        epilog="featurize, score, topk and inspect need only the library; train, demo, analyze, report, "
        'upgrade-run, bench and eval need the case-study extra: pip install "looptrace[studies]". '
        f"Errors are one line; --debug (or {DEBUG_ENV}=1) shows the traceback.",
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a case study's preset, recording TracIn checkpoints")
    t.add_argument("task", choices=names, help=f"which case study ({study_help})")
    t.add_argument("--preset", default="small", choices=sizes, help="model/training size (default: small)")
    t.add_argument("--out", default=None, help="run directory (default: runs/TASK-PRESET); resumed if it exists")
    t.add_argument("--steps", type=int, default=None, help="override the number of optimizer steps (train.steps)")
    t.add_argument("--seed", type=int, default=None, help="override the seed of data, depth and init (train.seed)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (train.threads)")
    t.add_argument(
        "--set",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="override any recorded setting, e.g. --set task.n_puzzles=200 --set model.d_model=32 (repeatable; "
        "values are JSON where they parse as JSON)",
    )
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (checkpoints are saved on the CPU)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("demo", help="the main job: train parity (or reuse), compute SDI, analyse, write a report")
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds)")
    d.add_argument("--retrain", action="store_true", help="ignore a cached trained model")
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    d.set_defaults(func=_cmd_demo)

    an = sub.add_parser("analyze", help="run a case study's analysis on a trained run (figures, JSON, HTML report)")
    an.add_argument("task", choices=names, help="the case study the run belongs to")
    an.add_argument(
        "--run", required=True, action="append", help="run directory from `looptrace train` (repeat for several seeds)"
    )
    an.add_argument("--out", default=None, help="output directory (default: RUN/analysis)")
    an.add_argument("--quick", action="store_true", help="tiny sample sizes (smoke test)")
    an.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N")
    an.set_defaults(func=_cmd_analyze)

    rp = sub.add_parser("report", help="the HTML report of a run (computing its analysis if needed)")
    rp.add_argument("--run", required=True, help="run directory from `looptrace train`")
    rp.add_argument("--out", default=None, help="analysis directory (default: RUN/analysis)")
    rp.add_argument("--force", action="store_true", help="recompute even if a report exists")
    rp.add_argument("--quick", action="store_true", help="tiny sample sizes (smoke test)")
    rp.set_defaults(func=_cmd_report)

    up = sub.add_parser(
        "upgrade-run", help="record the full task settings of a run written by looptrace 0.1 (checked against a preset)"
    )
    up.add_argument("--run", required=True, help="run directory written by looptrace 0.1")
    up.add_argument("--preset", required=True, choices=sizes, help="the preset it was trained with")
    up.set_defaults(func=_cmd_upgrade_run)

    b = sub.add_parser("bench", help="benchmarks vs the exact baseline and the peers (JSON + Markdown)")
    from looptrace.apps.bench import add_arguments as bench_arguments

    bench_arguments(b)
    b.set_defaults(func=_cmd_bench)

    ev = sub.add_parser(
        "eval",
        help="counterfactual evaluation: LDS, removal, per-step counterfactuals, depth curation (retrains a small model)",
    )
    ev.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "counterfactual", "lds", "removal", "depth", "curvature", "applications"],
        help="which evaluation (curvature: 100 subsets, the curvature-aware estimators and the peers in the LDS, "
        "removal and step counterfactuals for the best of them; applications: the paper's three applications "
        "checked against looping and retraining, issue #27; neither is part of all)",
    )
    ev.add_argument("--quick", action="store_true", help="50 subsets, fewer queries (under 10 minutes on 2 cores)")
    ev.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness runs (seconds)")
    ev.add_argument(
        "--out", default=None, help="output directory (default: docs/results/eval, or docs/results/applications)"
    )
    ev.add_argument("--task", default="majority", help="the evaluation task (majority, count-attention, ...)")
    ev.add_argument("--task-seed", type=int, default=0, help="the task's seed (its data and initialisation)")
    ev.add_argument("--subsets", type=int, default=None, help="retrained subsets for the LDS (default: the sizes')")
    ev.add_argument(
        "--kronfluence-python",
        default=None,
        help="a Python with kronfluence installed: its EK-FAC, K-FAC and identity join the tables as peers "
        "(default: $LOOPTRACE_KRONFLUENCE_PYTHON; unset: no peers)",
    )
    ev.add_argument(
        "--sudoku-seed",
        type=int,
        action="append",
        metavar="S",
        help="applications: also read the Sudoku small-preset run runs/sudoku-small-sS, trained first if it is "
        "missing (about half an hour each on one thread; repeatable)",
    )
    ev.add_argument(
        "--eval-results",
        default=None,
        help="applications: the committed depth curation to extend (default: docs/results/eval/results.json)",
    )
    ev.set_defaults(func=_cmd_eval)

    f = sub.add_parser(
        "featurize", help="featurise train/query sets at every checkpoint into a feature store (torchrun-ready)"
    )
    f.add_argument("--store", required=True, help="feature store directory (created, or resumed)")
    f.add_argument("--run", help="a run directory from `looptrace train` (model, checkpoints and the paper's sets)")
    f.add_argument("--model", help="package.module:factory returning the model (instead of --run)")
    f.add_argument("--loss", help="package.module:loss_fn, (model, batch) -> Tensor[B]")
    f.add_argument("--dataset", help="package.module:fn, role ('train'|'query') -> torch Dataset")
    f.add_argument(
        "--step-module",
        help="attribute path of the module one loop pass calls, e.g. core; or of the modules one pass calls in "
        "order: a range of a ModuleList (model.layers.2:4) or paths separated by commas",
    )
    f.add_argument(
        "--body",
        help="the modules whose parameters are attributed (default: the step modules), in the same forms, e.g. "
        "model.layers.2:4,model.message_input",
    )
    f.add_argument(
        "--checkpoint",
        action="append",
        help="PATH or PATH@LR, repeatable (with --model): a file or an HF checkpoint dir",
    )
    f.add_argument(
        "--checkpoint-dir",
        help="a directory of recorded checkpoints (looptrace.CheckpointRecorder, the HF / Lightning callbacks, or HF "
        "checkpoint-<step>/ folders), in training order (with --model)",
    )
    f.add_argument("--roles", default="train,query", help="which sets (default: train,query)")
    f.add_argument("--n-train", type=int, default=512, help="train examples (with --run)")
    f.add_argument("--n-query", type=int, default=256, help="query examples (with --run)")
    f.add_argument("--loops", type=int, default=None, help="fixed analysis horizon (with --run)")
    f.add_argument("--dim", type=int, default=4096, help="sketch dimension")
    f.add_argument("--seed", type=int, default=0, help="sketch seed")
    f.add_argument(
        "--method",
        default="auto",
        choices=["auto", "countsketch", "tensorsketch", "exact"],
        help="sketch method (default auto: TensorSketch for wide matrices, computed by FFT where that is faster, "
        "CountSketch for the rest)",
    )
    f.add_argument(
        "--budget",
        default="auto",
        choices=["auto", "shared", "per_tensor", "proportional"],
        help="how --dim is spent across tensors (default auto: one shared space plus a block per wide matrix)",
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
    f.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (features are stored on disk either way)")
    f.add_argument(
        "--tau", type=int, default=None, help="declared loop steps (a batch that runs another number raises)"
    )
    f.add_argument(
        "--recompute", action="store_true", help="re-run each loop step in backward: one step's activations in memory"
    )
    f.add_argument("--autocast", default=None, choices=["bfloat16", "float16"], help="mixed-precision forward")
    f.add_argument(
        "--adam", action="store_true", help="Adam-preconditioned inner product (needs recorded second moments)"
    )
    f.add_argument(
        "--positions",
        nargs="?",
        type=int,
        const=1,
        default=None,
        metavar="K",
        help="also store every training example's per-position features (token x step attribution), ragged: its "
        "real positions only, summed over spans of K positions (default 1: every position)",
    )
    f.add_argument(
        "--outside",
        action="store_true",
        help="also featurise the parameters outside the loop body (read-in, read-out, final norm) into STORE/outside, "
        "one pass per forward, for `looptrace score --kind total` (the whole model's score)",
    )
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_cmd_featurize)

    sc = sub.add_parser("score", help="stream sum_k eta_k SDI (or TracIn) from a store to a .npy file")
    sc.add_argument("--store", required=True)
    sc.add_argument("--out", required=True, help="output .npy")
    sc.add_argument(
        "--kind", default="sdi", choices=["sdi", "tracin", "total"],
        help="sdi: [N, M, tau]; tracin: [N, M], the body's; total: [N, M], the whole model's, the body's TracIn plus "
        "the parameters outside the loop (a store featurised with --outside)",
    )  # fmt: skip
    _add_curvature_arguments(sub, sc)
    sc.set_defaults(func=_cmd_score)

    top = sub.add_parser("topk", help="top-k proponents and opponents per query (FAISS, exactly re-scored)")
    top.add_argument("--store", required=True)
    top.add_argument("--k", type=int, default=10)
    top.add_argument("--step", type=int, default=None, help="rank by SDI at this query step (default: TracIn)")
    top.add_argument(
        "--index", default="flat", choices=["flat", "ivf", "hnsw", "brute"], help="flat = exact inner product"
    )
    top.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    top.add_argument(
        "--positions",
        action="store_true",
        help="also each example's per-position scores (a store featurised with --positions)",
    )
    top.set_defaults(func=_cmd_topk)

    ins = sub.add_parser("inspect", help="what a feature store holds")
    ins.add_argument("--store", required=True)
    ins.set_defaults(func=_cmd_inspect)
    _add_explore_parser(sub)
    for sp in sub.choices.values():  # `looptrace featurize ... --debug` works as well as `looptrace --debug featurize`
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    return p


def _add_curvature_arguments(sub: Any, score: argparse.ArgumentParser) -> None:
    """``looptrace fit-curvature`` and the preconditioning options of ``looptrace score``."""
    score.add_argument(
        "--precondition", default=None, choices=["kfac", "ekfac", "gauss-newton"],
        help="precondition the query side: kfac / ekfac need `looptrace fit-curvature` first (and recompute the "
        "queries' gradients with the store's model); gauss-newton uses the stored training features",
    )  # fmt: skip
    score.add_argument(
        "--damping",
        type=float,
        default=None,
        help="lambda for every block (default: 0.1 x each block's mean eigenvalue)",
    )
    score.add_argument("--batch-size", type=int, default=64, help="query batch size (with --precondition)")
    score.add_argument("--device", default="cpu", help="where the model runs (with --precondition kfac/ekfac)")
    fc = sub.add_parser(
        "fit-curvature",
        help="fit K-FAC / EK-FAC factors of every checkpoint of a store on its training set (written beside it)",
    )
    fc.add_argument("--store", required=True, help="a store filled by `looptrace featurize` (its setup is reused)")
    fc.add_argument(
        "--fisher", default=None, choices=["true", "empirical"],
        help="true: targets sampled by --fisher-loss (the default when it is given); empirical: the data's targets",
    )  # fmt: skip
    fc.add_argument(
        "--fisher-loss", default=None,
        help="package.module:fn, (model, batch) -> per-example loss on targets sampled from the model",
    )  # fmt: skip
    fc.add_argument("--seed", type=int, default=0, help="seed of the target sampling (true Fisher)")
    fc.add_argument(
        "--max-examples", type=_positive_int, default=None, metavar="N",
        help="fit on the training set's first N examples only (the fit's cost stops growing with the set; they must "
        "be a fair sample of it: the store reads the set in order; default: all)",
    )  # fmt: skip
    fc.add_argument("--batch-size", type=int, default=64)
    fc.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    fc.set_defaults(func=_cmd_fit_curvature)


def _positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _note(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
          line: str | None = None) -> None:  # fmt: skip
    """Warnings as one line each (the command line's users do not need our source line)."""
    print(f"looptrace: note: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit status: 0 done; 2 a usage, input or installation error (one line); 1 the
    machine refused a write (one line naming the path and how to resume). ``--debug`` or ``LOOPTRACE_DEBUG=1``
    re-raises instead, with the traceback."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    import warnings

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _note
        try:
            if args.command in STUDY_COMMANDS:
                require("studies", f"looptrace {args.command}")
            return int(args.func(args))
        except StorageError as exc:
            if debug:
                raise
            print(f"looptrace: error: {exc}", file=sys.stderr)
            return 1
        except LooptraceError as exc:
            if debug:
                raise
            print(f"looptrace: error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            if debug:
                raise
            where = getattr(exc, "filename", None)
            prefix = f"{where}: " if where else ""
            if isinstance(exc, OSError) and exc.errno not in REFUSALS:  # e.g. a file given that does not exist
                print(f"looptrace: error: {prefix}{exc.strerror or exc}", file=sys.stderr)
                return 2
            reason = machine_error(exc)
            if reason is None:  # not the machine: a bug, which keeps its traceback
                raise
            print(
                f"looptrace: error: {prefix}{reason}; fix that and rerun the same command (stores and runs "
                "resume where they stopped)",
                file=sys.stderr,
            )
            return 1


if __name__ == "__main__":
    sys.exit(main())

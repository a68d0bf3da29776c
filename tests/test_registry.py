"""The case-study registry and the run records: a new study is one module, every reader of a run
rebuilds it from its record, and records that cannot be replayed are refused with the way out."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import looptrace as lt
from looptrace.apps.catalog import open_run, studies
from looptrace.apps.runs import make_record, write_record
from looptrace.apps.tasks import sudoku
from looptrace.cli import main
from looptrace.config import config_to_dict
from looptrace.store import FeatureStore
from looptrace.store.shards import dataset_fingerprint

TOY = '''
"""A toy case study: the parity of the first two bits, registered through the registry alone."""

import dataclasses
import json
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import looptrace as lt
from looptrace.apps.registry import CaseStudy, InfluenceSets, Preset, register_study
from looptrace.apps.train_config import TrainConfig
from looptrace.models.looped import LoopedConfig


@dataclasses.dataclass
class ToyTask:
    name: str = "toy"
    length: int = 4

    def data(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 2, (n, self.length), generator=g)
        return x, (x[:, 0] ^ x[:, 1])

    def batch(self, step, cfg):
        return self.data(cfg.batch_size, step)

    def loss(self, model, batch, loops):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x)[:, -1], y, reduction="none")

    def evaluate(self, model, cfg):
        x, y = self.data(64, 10_000)
        with torch.no_grad():
            return {"accuracy": float((model(x)[:, -1].argmax(-1) == y).float().mean())}


def tiny():
    return Preset(
        LoopedConfig(vocab_size=2, d_model=8, n_heads=2, d_mlp=16, n_loops=3, max_len=8),
        TrainConfig(steps=6, batch_size=8, warmup=1, ckpt_every=3, eval_every=100, log_every=3),
        ToyTask(),
    )


def influence_sets(run, n_train, n_query, loops):
    def loss(model, batch):
        return run.task.loss(model, batch, None)

    return InfluenceSets({"train": TensorDataset(*run.task.data(n_train, 1)), "query": TensorDataset(*run.task.data(n_query, 2))}, loss)


@dataclasses.dataclass(frozen=True)
class ToyStudyConfig:
    n: int = 8

    @classmethod
    def quick(cls):
        return cls(n=4)


def run_study(run, out, cfg):
    sets = influence_sets(run, cfg.n, cfg.n, None)
    model = run.load_model()
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=4)
    res = lt.attribute(model, run.checkpoints(), loader(sets.datasets["train"]), loader(sets.datasets["query"]),
                       sets.loss_fn, step_module=model.core, sketch=lt.SketchSpec(dim=32))
    out.mkdir(parents=True, exist_ok=True)
    results = {"tracin_sum": float(res.tracin.sum()), "length": run.task.length}
    (out / "results.json").write_text(json.dumps(results))
    (out / "report.html").write_text("<html>toy</html>")
    return results


register_study(CaseStudy(name="toy", summary="a toy", task_type=ToyTask, presets={"tiny": tiny},
                         influence_sets=influence_sets, study_config=ToyStudyConfig,
                         quick_config=ToyStudyConfig.quick, run_study=run_study))
'''


def test_a_new_case_study_is_one_module_and_one_registration(tmp_path, monkeypatch) -> None:
    (tmp_path / "toy_study_plugin.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("toy_study_plugin")
    try:
        run = tmp_path / "run"
        cmd = ["train", "toy", "--preset", "tiny", "--out", str(run), "--quiet", "--set", "task.length=5"]
        assert main(cmd) == 0
        record = json.loads((run / "config.json").read_text())
        assert record["study"] == "toy" and record["task"] == {"name": "toy", "length": 5}
        assert main(["analyze", "toy", "--run", str(run)]) == 0
        assert json.loads((run / "analysis" / "results.json").read_text())["length"] == 5, (
            "the study must see the record"
        )
        store = tmp_path / "store"
        assert main(["featurize", "--store", str(store), "--run", str(run), "--n-train", "8", "--n-query", "4",
                     "--dim", "32", "--quiet"]) == 0  # fmt: skip
        assert FeatureStore.open(store).n("train") == 8
    finally:
        sys.modules.pop("toy_study_plugin", None)


def test_every_preset_round_trips_through_its_run_record(tmp_path) -> None:
    for name, study in studies().items():
        for size in study.sizes:
            preset = study.preset(size)
            out = tmp_path / f"{name}-{size}"
            write_record(out, make_record(name, size, preset.task, preset.model, preset.train, {}))
            run = open_run(out)
            assert run.study == name and run.preset == size
            assert config_to_dict(run.task) == config_to_dict(preset.task), f"{name}/{size}: task not replayed"
            assert run.model_config == preset.model and run.train_config == preset.train, f"{name}/{size}"


def test_parity_influence_sets_follow_the_recorded_curriculum(tmp_path) -> None:
    for size in ("tiny", "small"):
        preset = studies()["parity"].preset(size)
        out = tmp_path / size
        write_record(out, make_record("parity", size, preset.task, preset.model, preset.train, {}))
        run = open_run(out)
        sets = studies()["parity"].influence_sets(run, 32, 8, None)
        n_train = sets.datasets["train"].tensors[2]
        n_query = sets.datasets["query"].tensors[2]
        assert int(n_train.max()) <= preset.task.final_max and int(n_train.min()) >= 1, size
        assert set(n_query.tolist()) == {preset.task.test_length}, size


def test_sudoku_featurize_uses_the_training_distribution(tmp_path, monkeypatch) -> None:
    """`looptrace train sudoku --preset small` trains on 10-40 blanks; attribution must use those puzzles
    (looptrace 0.1 rebuilt the task with its 30-50 defaults)."""
    monkeypatch.chdir(tmp_path)
    run, store = tmp_path / "R", tmp_path / "S"
    args = ["train", "sudoku", "--preset", "small", "--steps", "20", "--out", str(run), "--quiet",
            "--set", "task.n_puzzles=150", "--set", "task.eval_n=16", "--set", "task.budgets=[2]"]  # fmt: skip
    assert main(args) == 0
    assert main(["featurize", "--run", str(run), "--store", str(store), "--n-train", "24", "--n-query", "8",
                 "--dim", "64", "--quiet"]) == 0  # fmt: skip
    rec = open_run(run)
    assert (rec.task.min_blanks, rec.task.max_blanks, rec.task.n_puzzles) == (10, 40, 150)
    sets = studies()["sudoku"].influence_sets(rec, 24, 8, None)
    boards = sets.datasets["train"].tensors[0]
    blanks = (boards == 0).sum(1)
    assert int(blanks.min()) >= 10 and int(blanks.max()) <= 40, f"blanks {blanks.tolist()} outside the training 10-40"
    train_x = rec.task.split()["train"][0]
    assert torch.equal(boards, train_x[:24]), "the attributed puzzles must be the run's own training puzzles"
    manifest = FeatureStore.open(store).manifest
    assert manifest["datasets"]["train"]["fingerprint"] == dataset_fingerprint(sets.datasets["train"])
    assert int((sudoku.boards(sudoku.generate(2, 30, 50, seed=0)[0]) == 0).sum(1).min()) >= 30  # the old defaults


def test_a_run_written_by_looptrace_0_1_is_refused_then_upgraded(tmp_path, capsys) -> None:
    preset = studies()["parity"].preset("tiny")
    run = tmp_path / "old"
    run.mkdir()
    old_train = {**config_to_dict(preset.train), "steps": 13}
    (run / "config.json").write_text(
        json.dumps({"task": "parity", "model": config_to_dict(preset.model), "train": old_train})
    )
    with pytest.raises(lt.ConfigError, match=r"looptrace upgrade-run --run .* --preset SIZE"):
        open_run(run)
    assert main(["featurize", "--run", str(run), "--store", str(tmp_path / "s")]) == 2
    assert "upgrade-run" in capsys.readouterr().err
    assert main(["upgrade-run", "--run", str(run), "--preset", "tiny"]) == 0
    upgraded = open_run(run)
    assert upgraded.train_config.steps == 13 and upgraded.record.raw["overrides"] == {"train.steps": 13}
    assert (run / "config.v1.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    model = {**config_to_dict(preset.model), "d_model": 32}
    (other / "config.json").write_text(json.dumps({"task": "parity", "model": model, "train": old_train}))
    with pytest.raises(lt.ConfigError, match="not the 'tiny' preset's"):
        main_raises(["upgrade-run", "--run", str(other), "--preset", "tiny"])


def main_raises(argv: list[str]) -> None:
    from looptrace.apps.upgrade import upgrade_run

    upgrade_run(Path(argv[2]), argv[4])


def test_a_run_directory_with_another_record_is_refused(tmp_path) -> None:
    preset = studies()["parity"].preset("tiny")
    out = tmp_path / "run"
    write_record(out, make_record("parity", "tiny", preset.task, preset.model, preset.train, {}))
    other = dataclasses.replace(preset.task, final_max=5)
    with pytest.raises(lt.ConfigError, match=r"task.final_max: 6 != 5"):
        write_record(out, make_record("parity", "tiny", other, preset.model, preset.train, {}))


def test_overrides_are_validated(tmp_path) -> None:
    assert main(["train", "parity", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "task.nope=1"]) == 2
    assert main(["train", "parity", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "bad"]) == 2

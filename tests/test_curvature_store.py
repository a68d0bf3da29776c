"""Curvature beside a feature store: `looptrace fit-curvature`, `looptrace score --precondition`, equal to
``lt.attribute(..., precondition=...)``; factors of another body or train set are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import looptrace as lt
from looptrace.cli import main
from looptrace.curvature import Curvature
from looptrace.store import FeatureStore, score_to_disk
from looptrace.store.curvature import curvature_path, fit_curvature_to_store, preconditioned_queries
from tests.conftest import assert_close
from tests.store_fixtures import loss_fn, make_dataset, make_model, save_checkpoints

FACTORIES = ["--model", "tests.store_fixtures:make_model", "--loss", "tests.store_fixtures:loss_fn",
             "--dataset", "tests.store_fixtures:make_dataset", "--step-module", "core"]  # fmt: skip


def _cli_store(tmp_path: Path, outside: bool = False) -> tuple[Path, list[str]]:
    """A store filled by ``looptrace featurize`` over two checkpoints (``outside``: with its companion store of the
    parameters outside the loop)."""
    cks = save_checkpoints(str(tmp_path))
    store = tmp_path / "store"
    args = ["featurize", *FACTORIES, "--dim", "64", "--shard-size", "16", "--batch-size", "8", "--quiet",
            *(["--outside"] if outside else []), "--store", str(store)]  # fmt: skip
    for c in cks:
        args += ["--checkpoint", c]
    assert main(args) == 0
    return store, cks


def _attribute(cks: list[str], precondition: str, damping: float | None = None) -> lt.Attribution:
    model = make_model()
    loader = lambda role: torch.utils.data.DataLoader(make_dataset(role), batch_size=7)  # noqa: E731
    return lt.attribute(model, [lt.Checkpoint(c) for c in cks], loader("train"), loader("query"), loss_fn,
                        step_module=model.core, sketch=lt.SketchSpec(dim=64), precondition=precondition,
                        damping=damping)  # fmt: skip


@pytest.mark.parametrize("precondition, damping", [("ekfac", None), ("kfac", 1e-3), ("gauss-newton", None)])
def test_cli_preconditioned_scores_equal_attribute(tmp_path, precondition: str, damping: float | None) -> None:
    """featurize -> fit-curvature -> score --precondition gives attribute's preconditioned SDI (float32 store,
    so 1e-4 relative). Catches factors of the wrong checkpoint, the store's query features used unpreconditioned,
    or a damping flag that does not reach the blocks."""
    store, cks = _cli_store(tmp_path)
    train_shards = sorted((store / "ck000" / "train").glob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in train_shards}
    if precondition != "gauss-newton":
        assert main(["fit-curvature", "--store", str(store), "--batch-size", "5"]) == 0
        assert curvature_path(FeatureStore.open(store), 1).exists()
    out = tmp_path / "sdi.npy"
    extra = [] if damping is None else ["--damping", str(damping)]
    assert main(["score", "--store", str(store), "--out", str(out), "--precondition", precondition, *extra]) == 0
    res = _attribute(cks, precondition, damping)
    got = torch.from_numpy(np.load(out)).double()
    scale = float(res.sdi.abs().max())
    assert_close(got, res.sdi.double(), f"store {precondition} SDI vs attribute", rtol=1e-4, atol=1e-5 * scale)
    assert before == {p: p.stat().st_mtime_ns for p in train_shards}, "the training shards were rewritten"
    plain = torch.from_numpy(np.load(score_to_disk(FeatureStore.open(store), tmp_path / "plain.npy"))).double()
    assert float((plain - got).abs().max()) > 1e-3 * scale, "preconditioned scores equal the plain ones"


def test_curvature_of_another_train_set_or_body_is_refused(tmp_path) -> None:
    store, cks = _cli_store(tmp_path)
    model = make_model()
    checkpoints = [lt.Checkpoint(c) for c in cks]
    with pytest.raises(lt.SpecMismatchError, match="training set"):
        fit_curvature_to_store(model, checkpoints, make_dataset("train", n=30), loss_fn, store, step_module=model.core)
    with pytest.raises(lt.SpecMismatchError, match="checkpoints"):
        fit_curvature_to_store(model, checkpoints[:1], make_dataset("train"), loss_fn, store, step_module=model.core)
    fit_curvature_to_store(model, checkpoints, make_dataset("train"), loss_fn, store, step_module=model.core)
    st = FeatureStore.open(store)
    side = curvature_path(st, 0).with_name("ck000.safetensors.json")
    side.write_text(side.read_text().replace(st.manifest["model_fingerprint"], "0" * 16))
    with pytest.raises(lt.SpecMismatchError, match="another model body"):
        preconditioned_queries(st, "ekfac", model=model, checkpoints=checkpoints, dataset=make_dataset("query"),
                               loss_fn=loss_fn, step_module=model.core)  # fmt: skip


def test_score_flags_are_checked(tmp_path, capsys) -> None:
    store, _ = _cli_store(tmp_path)
    assert main(["score", "--store", str(store), "--out", str(tmp_path / "x.npy"), "--damping", "0.1"]) == 2
    assert "--damping needs --precondition" in capsys.readouterr().err
    assert main(["score", "--store", str(store), "--out", str(tmp_path / "x.npy"), "--precondition", "ekfac"]) == 2
    assert "fit them first" in capsys.readouterr().err


def test_fit_curvature_has_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["fit-curvature", "--help"])
    assert e.value.code == 0 and "--fisher-loss" in capsys.readouterr().out


@pytest.mark.parametrize("precondition", [None, "gauss-newton", "ekfac"])
def test_cli_whole_model_scores_equal_attribute_total(tmp_path, precondition: str | None) -> None:
    """featurize --outside -> (fit-curvature) -> score --kind total gives ``attribute(outside=True).total``: the
    body's TracIn plus the parameters outside the loop on their own block. Catches the companion store left out of
    the total (it would equal the body's TracIn), its factors not fitted or taken from the body's, or a
    preconditioner applied to one part only."""
    store, cks = _cli_store(tmp_path, outside=True)
    assert FeatureStore.open(store).outside().n("train") == 40
    if precondition == "ekfac":
        assert main(["fit-curvature", "--store", str(store), "--batch-size", "5"]) == 0
        assert curvature_path(FeatureStore.open(store).outside(), 1).exists()
    out = tmp_path / "total.npy"
    extra = [] if precondition is None else ["--precondition", precondition]
    assert main(["score", "--store", str(store), "--out", str(out), "--kind", "total", *extra]) == 0
    model = make_model()
    loader = lambda role: torch.utils.data.DataLoader(make_dataset(role), batch_size=7)  # noqa: E731
    res = lt.attribute(model, [lt.Checkpoint(c) for c in cks], loader("train"), loader("query"), loss_fn,
                       step_module=model.core, sketch=lt.SketchSpec(dim=64), precondition=precondition,
                       outside=True)  # type: ignore[arg-type]  # fmt: skip
    assert res.outside is not None
    got = torch.from_numpy(np.load(out)).double()
    scale = float(res.total.abs().max())
    assert_close(got, res.total.double(), f"store total ({precondition}) vs attribute", rtol=1e-4, atol=1e-5 * scale)
    assert float((got - res.tracin.double()).abs().max()) > 1e-2 * scale, "the total is the body's TracIn alone"


def test_whole_model_scores_need_the_outside_features(tmp_path, capsys) -> None:
    store, _ = _cli_store(tmp_path)
    assert main(["score", "--store", str(store), "--out", str(tmp_path / "x.npy"), "--kind", "total"]) == 2
    assert "--outside" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
    with pytest.raises(lt.ConfigError, match="kind='total'"):
        score_to_disk(FeatureStore.open(store), tmp_path / "y.npy", kind="tracin", outside_queries=[])


def test_store_refuses_adam_without_every_moment_before_writing(tmp_path) -> None:
    """``featurize_to_store(precondition="adam", outside=True)`` with a recorder that kept the body's moments only:
    refused before any shard or manifest is written (a parameter left unscaled would silently mix two
    geometries, and a half-filled companion store would be scored as if whole); the body alone is accepted. A model
    with nothing outside the body is refused with outside=True."""
    from looptrace.store import featurize_to_store

    model = make_model()
    ds = {"train": make_dataset("train"), "query": make_dataset("query")}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = lt.CheckpointRecorder(tmp_path / "ck", every=1, body=model.core)
    x, y = ds["train"].tensors
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model, (x, y)).mean().backward()
        opt.step()
        rec.step(model, opt)
    cks = lt.load_checkpoints(tmp_path / "ck")
    kw: dict[str, Any] = dict(step_module=model.core, sketch=lt.SketchSpec(dim=32), precondition="adam")
    with pytest.raises(lt.CheckpointError, match="no optimizer second moments for"):
        featurize_to_store(model, cks, ds, loss_fn, tmp_path / "whole", outside=True, **kw)
    assert not (tmp_path / "whole").exists(), "a store was started before the refusal"
    featurize_to_store(model, cks, ds, loss_fn, tmp_path / "body", **kw)
    assert FeatureStore.open(tmp_path / "body").n("train") == 40
    with pytest.raises(lt.ConfigError, match="no trainable parameter outside"):
        featurize_to_store(model, cks, ds, loss_fn, tmp_path / "none", step_module=model, body=[model],
                           sketch=lt.SketchSpec(dim=32), outside=True)  # fmt: skip


def test_store_refuses_what_it_cannot_score_whole_before_writing(tmp_path) -> None:
    """``outside=True`` on a model that marks its loop steps with ``lt.loop_step()`` (no step module) cannot run the
    model as one pass per forward: refused before any shard is written (it used to fail after the body's store was
    filled and leave a companion store that could never be finished). ``kind="total"`` with preconditioned body
    queries but plain outside ones (or the reverse) would mix two geometries: refused."""
    from looptrace.store import featurize_to_store
    from tests.test_capture import MarkedNet
    from tests.test_capture import loss_fn as marked_loss

    marked = MarkedNet()
    x = torch.randint(0, 5, (6, 4), generator=torch.Generator().manual_seed(0))
    ds = {"train": torch.utils.data.TensorDataset(x, torch.zeros(6, dtype=torch.long)),
          "query": torch.utils.data.TensorDataset(x[:2], torch.zeros(2, dtype=torch.long))}  # fmt: skip
    ck = [lt.Checkpoint({k: v.clone() for k, v in marked.state_dict().items()}, lr=0.5, name="a")]
    with pytest.raises(lt.ConfigError, match="loop_step"):
        featurize_to_store(marked, ck, ds, marked_loss, tmp_path / "m", body=[marked.adapter, marked.blocks],
                           sketch=lt.SketchSpec(dim=16), outside=True)  # fmt: skip
    assert not (tmp_path / "m").exists(), "a store was started before the refusal"
    store, _ = _cli_store(tmp_path)
    st = FeatureStore.open(store)
    queries = preconditioned_queries(st, "gauss-newton")
    with pytest.raises(lt.ConfigError, match="mix two geometries"):
        score_to_disk(st, tmp_path / "t.npy", kind="total", queries=queries)
    assert not (tmp_path / "t.npy").exists()


def test_fit_curvature_max_examples_is_recorded_and_refits_when_it_changes(tmp_path) -> None:
    """``looptrace fit-curvature --max-examples N`` fits each checkpoint on the training set's first N examples, the
    body's factors and those of the parameters outside the loop alike (n = N, the sidecars say N). A rerun with the
    same settings keeps the files (resume), as does one with another seed of an empirical Fisher (the seed draws a
    true Fisher's targets only) or a limit past the set (every example); another limit fits them again. Factors
    left fitted with two settings (a rerun interrupted) are refused by ``score``. Catches a flag that reaches one of
    the two stores only, a resume that keeps factors fitted otherwise, or scores that mix two fits."""
    store, _ = _cli_store(tmp_path, outside=True)
    fit = ["fit-curvature", "--store", str(store), "--batch-size", "5"]
    assert main([*fit, "--max-examples", "12"]) == 0
    st = FeatureStore.open(store)
    paths = [curvature_path(s, k) for s in (st, st.outside()) for k in range(2)]
    for path in paths:
        curv, side = Curvature.load(path)
        assert curv.n == 12 and side["max_examples"] == 12, f"{path} was not fitted on the first 12 examples"
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert main([*fit, "--max-examples", "12", "--seed", "3"]) == 0
    assert [p.stat().st_mtime_ns for p in paths] == stamps, "a rerun with the same fit fitted again"
    assert main(fit) == 0
    for path in paths:
        curv, side = Curvature.load(path)
        assert curv.n == 40 and side["max_examples"] is None, "a rerun without the limit kept the limited factors"
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert main([*fit, "--max-examples", "1000"]) == 0
    assert [p.stat().st_mtime_ns for p in paths] == stamps, "a limit past the set is every example: nothing to refit"
    side = paths[1].with_name(paths[1].name + ".json")
    side.write_text(side.read_text().replace('"max_examples": null', '"max_examples": 12'))
    with pytest.raises(lt.ConfigError, match="different settings"):
        main(["score", "--store", str(store), "--out", str(tmp_path / "s.npy"), "--precondition", "ekfac", "--debug"])

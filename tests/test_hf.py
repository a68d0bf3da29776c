"""Looped models people already have: a stock Hugging Face ALBERT (one shared layer group), checkpoints
in every format it is saved in, and TracIn checkpoints recorded from HF Trainer and Lightning runs (their weights
the model's at that step).
All offline: tiny random configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import looptrace as lt
from looptrace.cli import main
from looptrace.store import FeatureStore
from tests.conftest import assert_close, oracle_per_step, per_example_grads
from tests.hf_fixtures import ALBERT_BODY, MLMData, albert_config, make_albert

transformers = pytest.importorskip("transformers")
from looptrace.integrations import hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _loader(ds: torch.utils.data.Dataset, bs: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=bs)


def test_find_step_module_finds_albert_s_shared_layer_group() -> None:
    model = make_albert()
    batch = next(iter(_loader(MLMData(4, 0))))
    step = lt.find_step_module(model, batch)
    assert step is model.get_submodule(ALBERT_BODY)
    with pytest.raises(lt.StepError, match="no module that owns parameters ran more than once"):
        lt.find_step_module(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()), torch.randn(2, 3))


@pytest.mark.parametrize("head", ["masked-lm", "classification"])
def test_albert_exact_per_step_sdi_equals_the_oracle(head: str) -> None:
    torch.manual_seed(0)
    if head == "masked-lm":
        model, loss = transformers.AlbertForMaskedLM(albert_config()).double(), hf.masked_lm_loss
        data = MLMData(6, 3)
    else:
        model = transformers.AlbertForSequenceClassification(albert_config(num_labels=3)).double()
        loss = hf.sequence_classification_loss
        base = MLMData(6, 3)
        data = [{**base[i], "labels": torch.tensor(i % 3)} for i in range(6)]
    batches = list(_loader(data, 3))
    step = lt.find_step_module(model, batches[0])
    feats = lt.featurize(model, batches, loss, step_module=step, sketch=lt.SketchSpec.exact(), verify="first")
    want = oracle_per_step(model, step, batches, loss)
    assert float(want[:, 0].norm()) > 0 and feats.per_step.shape[1] == 3
    assert_close(feats.per_step, want, f"ALBERT ({head}) exact per-step features vs the untied oracle")
    sdi, tracin = lt.sdi(feats, feats), lt.tracin(feats, feats)
    assert_close(sdi.sum(-1), tracin, "sum over steps vs TracIn on ALBERT (rounding: by construction)")
    g = per_example_grads(model, list(step.named_parameters(prefix=ALBERT_BODY)), batches, loss)
    assert_close(sdi.sum(-1), g @ g.T, "conservation on ALBERT against autograd's gradient of the shared layer group")


def test_loss_helpers_match_the_models_own_loss_one_example_at_a_time() -> None:
    torch.manual_seed(0)
    mlm = transformers.AlbertForMaskedLM(albert_config()).double().eval()
    data = MLMData(4, 5)
    batch = next(iter(_loader(data)))
    ours = hf.masked_lm_loss(mlm, batch)
    for i in range(4):
        theirs = mlm(**{k: v[i : i + 1] for k, v in batch.items()}).loss
        assert torch.allclose(ours[i].float(), theirs.float(), atol=1e-6), f"masked-LM loss of example {i}"
    gpt = (
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=30, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2
            )
        )
        .double()
        .eval()
    )
    causal = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ours = hf.causal_lm_loss(gpt, causal)
    for i in range(4):
        n = int(causal["attention_mask"][i].sum())  # right padding: the example is its first n tokens
        ids = causal["input_ids"][i : i + 1, :n]
        theirs = gpt(input_ids=ids, labels=ids).loss  # computed in float32 by transformers
        assert torch.allclose(ours[i].float(), theirs.float(), atol=1e-6), f"causal-LM loss of example {i}"
    with pytest.raises(lt.LossError, match="labels"):
        hf.masked_lm_loss(mlm, causal)


def test_checkpoints_from_anywhere(tmp_path) -> None:
    model = make_albert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # an HF directory with sharded safetensors (the tied decoder weight is stored once)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="4KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "sharded" / "trainer_state.json").write_text(
        json.dumps(
            {
                "global_step": 20,
                "log_history": [{"step": 10, "learning_rate": 3e-4}, {"step": 20, "learning_rate": 2e-4}],
            }
        )
    )
    loaded = lt.Checkpoint(tmp_path / "sharded").load_full()
    assert loaded.lr == 2e-4, "eta from trainer_state.json: the last learning rate logged at global_step"
    other = make_albert()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    lt.influence.checkpoints.load_into(other, loaded.state, loaded.name)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    # a single safetensors file with a sidecar, and a torch file
    save_file(
        {k: v.contiguous() for k, v in state.items() if "decoder.weight" not in k}, str(tmp_path / "w.safetensors")
    )
    (tmp_path / "w.safetensors.json").write_text(json.dumps({"lr": 5e-4}))
    assert lt.Checkpoint(tmp_path / "w.safetensors").load_full().lr == 5e-4
    torch.save(state, tmp_path / "w.pt")
    assert lt.Checkpoint(tmp_path / "w.pt", lr=1.0).load()[1] == 1.0
    # an index naming a file outside the directory is refused
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../w.safetensors" for k in index["weight_map"]}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(lt.CheckpointError, match="not a file in"):
        lt.Checkpoint(tmp_path / "sharded").load()


def _store_equals_attribute(
    tmp_path: Path, model_factory: str, loss: str, dataset: str, step_module: str, ckpt_dir: Path
) -> None:
    """`looptrace featurize --checkpoint-dir` + `looptrace score` equal lt.attribute on the same checkpoints."""
    from tests import hf_fixtures as fx

    store, out = tmp_path / "store", tmp_path / "tracin.npy"
    args = ["featurize", "--store", str(store), "--model", f"tests.hf_fixtures:{model_factory}", "--loss",
            f"tests.hf_fixtures:{loss}", "--dataset", f"tests.hf_fixtures:{dataset}", "--step-module", step_module,
            "--checkpoint-dir", str(ckpt_dir), "--dim", "128", "--batch-size", "4", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert main(["score", "--store", str(store), "--out", str(out), "--kind", "tracin"]) == 0
    model = getattr(fx, model_factory)()
    cks = lt.load_checkpoints(ckpt_dir)
    res = lt.attribute(model, cks, _loader(getattr(fx, dataset)("train")), _loader(getattr(fx, dataset)("query")),
                       getattr(fx, loss), step_module=model.get_submodule(step_module), sketch=lt.SketchSpec(dim=128))  # fmt: skip
    got = torch.from_numpy(np.load(out)).double()
    assert_close(got, res.tracin.double(), "store TracIn vs lt.attribute", rtol=1e-4, atol=1e-7)
    assert len(FeatureStore.open(store).checkpoints) == len(cks)


def test_hf_trainer_run_records_checkpoints_that_featurize_into_a_store(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = make_albert()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=30, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="linear", logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    ck_dir = tmp_path / "tracin"
    callback = hf.TracInCallback(ck_dir, every=10, body=ALBERT_BODY)

    class Snapshot(transformers.TrainerCallback):  # the model's weights at the end of every step
        states: dict[int, dict[str, torch.Tensor]] = {}  # noqa: RUF012

        def on_step_end(self, args, state, control, model=None, **kw) -> None:  # type: ignore[no-untyped-def]
            self.states[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    snap = Snapshot()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=MLMData(40, 7), callbacks=[callback, snap])
    trainer.train()
    cks = lt.load_checkpoints(ck_dir)
    full = [c.load_full() for c in cks]
    assert [f.step for f in full] == [10, 20, 30]
    for f in full:  # the saved weights are the model's after that step (not the step before or after)
        want = snap.states[f.step]
        assert f.state.keys() == want.keys() and all(torch.equal(f.state[k], want[k]) for k in want), f.step
        assert not all(torch.equal(f.state[k], snap.states[f.step - 1][k]) for k in want), "weights must change"
    # linear decay from 1e-3 to 0 over 30 steps: step s (1-based) used lr 1e-3 * (1 - (s - 1) / 30)
    for f in full:
        assert f.lr == pytest.approx(1e-3 * (1 - (f.step - 1) / 30)), f"eta of step {f.step}: the lr that step used"
        moments = f.second_moments["exp_avg_sq"]
        assert moments and all(k.startswith(ALBERT_BODY) for k in moments)
    _store_equals_attribute(tmp_path, "make_albert", "mlm_loss", "make_mlm_dataset", ALBERT_BODY, ck_dir)


def test_lightning_run_records_checkpoints_that_featurize_into_a_store(tmp_path, monkeypatch) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from looptrace.integrations.lightning import TracInCallback
    from tests.hf_fixtures import make_lightning_module, make_lm_dataset

    monkeypatch.chdir(tmp_path)
    module = make_lightning_module()
    ck_dir = tmp_path / "tracin"

    class Snapshot(pl.Callback):  # the module's weights after every optimizer step
        states: dict[int, dict[str, torch.Tensor]] = {}  # noqa: RUF012

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    snap = Snapshot()
    trainer = pl.Trainer(
        max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[TracInCallback(ck_dir, every=4, body="model.core"), snap],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(make_lm_dataset("train"), batch_size=4))
    full = [c.load_full() for c in lt.load_checkpoints(ck_dir)]
    assert [f.step for f in full] == [4, 8, 12]
    for f in full:  # the saved weights are the module's after that step
        want = snap.states[f.step]
        assert f.state.keys() == want.keys() and all(torch.equal(f.state[k], want[k]) for k in want), f.step
        assert not all(torch.equal(f.state[k], snap.states[f.step - 1][k]) for k in want), "weights must change"
    # StepLR(step_size=4, gamma=0.5) stepped after every batch: steps 1-4 use 3e-3, 5-8 1.5e-3, 9-12 7.5e-4
    assert [f.lr for f in full] == pytest.approx([3e-3, 1.5e-3, 7.5e-4]), "eta must be the lr the step used"
    _store_equals_attribute(
        tmp_path, "make_lightning_module", "lightning_loss", "make_lm_dataset", "model.core", ck_dir
    )


def test_recorder_in_a_plain_training_loop(tmp_path) -> None:
    from tests.hf_fixtures import lightning_loss, make_lm_dataset
    from tests.store_fixtures import make_model

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = lt.CheckpointRecorder(tmp_path / "ck", every=2, body=model.core)
    loader = torch.utils.data.DataLoader(make_lm_dataset("train"), batch_size=8)
    for batch in loader:
        opt.zero_grad()
        lightning_loss(model, batch).mean().backward()
        opt.step()
        rec.step(model, opt, depth=3)
    cks = lt.load_checkpoints(tmp_path / "ck")
    assert [c.load_full().step for c in cks] == [2, 4]
    f = cks[-1].load_full()
    assert f.lr == 1e-2 and f.depth == 3
    body = {n for n, _ in model.named_parameters() if n.startswith("core.")}
    assert set(f.second_moments["exp_avg_sq"]) == body
    assert torch.equal(
        f.second_moments["exp_avg_sq"]["core.adapter.weight"], opt.state[model.core.adapter.weight]["exp_avg_sq"]
    )

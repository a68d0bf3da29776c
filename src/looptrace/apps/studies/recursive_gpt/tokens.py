"""Which tokens of the strongest training examples act, at which loop step (the recursive-LM write-up's steps x
tokens figure; issue #25).

For the query whose summed |SDI| is largest, the training problems with the largest |TracIn| on it are taken
and their SDI split by token position, exactly (``lt.attribute(..., train_positions=True)`` with exact
features over the same checkpoints as the study, full BPTT at recurrence ``r``): entry ``[t, p]`` of an
example's matrix is the part of SDI_t that comes through position ``p`` of the training problem. The matrices
sum over positions to the example's SDI_t (checked here, float64) and over steps and positions to its TracIn.
A position's term carries what attention brought to it from the rest of the sequence: it is influence
*through* that position, not of that token alone.

    python -m looptrace.apps.studies.recursive_gpt.tokens --run runs/recursive-gpt-small/finetune \\
        --out docs/results/recursive-gpt

writes ``tokens.json`` (the matrices, the decoded tokens, summaries) and ``fig_steps_tokens.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import looptrace as lt
from looptrace.apps.catalog import open_run
from looptrace.apps.studies.common import batches
from looptrace.apps.studies.recursive_gpt.task import masked_lm_loss
from looptrace.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class TokensConfig:
    n_train: int = 256  # training problems searched for the strongest
    n_query: int = 16  # the study's test problems; the one with the largest summed |SDI| is shown
    top: int = 4  # strongest training problems drawn
    recurrence: int = 8
    checkpoints: int = 3  # the last fine-tuning checkpoints (as the study: max_checkpoints)
    batch_size: int = 16


def steps_tokens(run_dir: Path, cfg: TokensConfig = TokensConfig()) -> dict[str, Any]:
    """The steps x positions matrices of the strongest training problems on one query (see the module)."""
    t0 = time.perf_counter()
    run = open_run(run_dir)
    model = run.load_model()
    data = run.task.data()
    tok = data.tok
    tr = [t[: cfg.n_train] for t in data.train]
    te = [t[: cfg.n_query] for t in data.test]
    paths = run.checkpoint_paths()[-cfg.checkpoints :]
    ckpts = [lt.Checkpoint(p) for p in paths]
    r, exact = cfg.recurrence, lt.SketchSpec.exact()

    def loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return masked_lm_loss(model, batch, r, bptt_k=None)  # full BPTT: every step's term

    kw: dict[str, Any] = dict(step_module=model.core, sketch=exact, tau=r)
    first = lt.attribute(model, ckpts, batches(tr, cfg.batch_size), batches(te, cfg.batch_size), loss, **kw)
    sdi = first.sdi.double().numpy()  # [N, M, tau]
    q = int(np.abs(sdi).sum((0, 2)).argmax())
    order = np.argsort(-np.abs(sdi[:, q].sum(-1)))[: cfg.top]
    sub = [t[torch.from_numpy(order.copy())] for t in tr]
    query = [t[q : q + 1] for t in te]
    res = lt.attribute(model, ckpts, batches(sub, cfg.batch_size), [tuple(query)], loss, train_positions=True, **kw)
    assert res.sdi_positions is not None
    pos = res.sdi_positions.double().numpy()[:, 0]  # [top, tau, L]
    # the per-position split sums to the SDI of the first pass (same exact features, other batches)
    scale = float(np.abs(sdi[order, q]).max())
    conservation = float(np.abs(pos.sum(-1) - sdi[order, q]).max()) / scale

    def words(ids: torch.Tensor) -> list[str]:
        return [tok.decode([int(i)]) for i in ids.tolist()]

    examples = []
    for k, i in enumerate(order.tolist()):
        x, _, mask = (t[k] for t in sub)
        length = int(x.numel())
        mat = pos[k][:, :length]
        mass = np.abs(mat)
        answer = mask.numpy() > 0
        examples.append({
            "index": int(i),
            "tracin": float(sdi[i, q].sum()),
            "sdi": sdi[i, q].tolist(),
            "tokens": words(x),
            "answer_positions": np.flatnonzero(answer).tolist(),
            "matrix": mat.tolist(),
            "last_step_share": float(mass[-1].sum() / mass.sum()),
            "answer_share": float(mass[:, answer].sum() / mass.sum()),
            "answer_fraction_of_positions": float(answer.mean()),
            "top_position": int(mass.sum(0).argmax()),
            "top_position_share": float(mass.sum(0).max() / mass.sum()),
        })  # fmt: skip
        examples[-1]["top_token"] = examples[-1]["tokens"][examples[-1]["top_position"]]
    return {
        "config": dataclasses.asdict(cfg),
        "run": str(run_dir),
        "checkpoints": [p.name for p in paths],
        "query": {"index": q, "tokens": words(query[0][0]), "answer_positions": np.flatnonzero(query[2][0].numpy()).tolist()},
        "examples": examples,
        "conservation_rel": conservation,
        "mean_last_step_share": float(np.mean([e["last_step_share"] for e in examples])),
        "mean_answer_share": float(np.mean([e["answer_share"] for e in examples])),
        "mean_answer_fraction_of_positions": float(np.mean([e["answer_fraction_of_positions"] for e in examples])),
        "mean_top_position_share": float(np.mean([e["top_position_share"] for e in examples])),
        "top_tokens": sorted({e["top_token"] for e in examples}),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def figure(res: dict[str, Any], path: Path) -> Path:
    """One heatmap per training problem: loop steps (rows) x token positions (columns), one zero-centred
    diverging scale shared by all panels."""
    from looptrace.apps.report.figures import _pyplot

    plt = _pyplot()
    ex = res["examples"]
    vmax = max(float(np.abs(np.array(e["matrix"])).max()) for e in ex) or 1.0
    fig, axes = plt.subplots(len(ex), 1, figsize=(11, 1.9 * len(ex) + 0.8), squeeze=False, layout="constrained")
    for ax, e in zip(axes[:, 0], ex, strict=True):
        mat = np.array(e["matrix"])
        cols = np.flatnonzero(np.abs(mat).sum(0) > 0)
        mat = mat[:, : int(cols[-1]) + 1 if len(cols) else 1]  # the padding after the text carries nothing
        im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        labels = [t.replace("\n", "\\n") for t in e["tokens"][: mat.shape[1]]]
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        for p in e["answer_positions"]:
            if p < mat.shape[1]:
                ax.get_xticklabels()[p].set_color("tab:red")
        ax.set_yticks(range(mat.shape[0]), [str(t + 1) for t in range(mat.shape[0])], fontsize=6)
        ax.set_ylabel("loop step t", fontsize=7)
        ax.set_title(f"training problem {e['index']}: TracIn {e['tracin']:+.3g}", fontsize=8)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="SDI through the position", shrink=0.8)
    fig.suptitle(
        f"test problem {res['query']['index']}: steps x tokens of its strongest training problems "
        "(red: positions where the loss is read, i.e. whose next token is the answer)",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="the fine-tuned run (runs/recursive-gpt-small/finetune)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-train", type=int, default=TokensConfig.n_train)
    p.add_argument("--top", type=int, default=TokensConfig.top)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    res = steps_tokens(a.run, TokensConfig(n_train=a.n_train, top=a.top))
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, a.out / "tokens.json")
    print(f"wrote {a.out / 'tokens.json'} and {figure(res, a.out / 'fig_steps_tokens.png')} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()

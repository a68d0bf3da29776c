"""The explorer screenshot in the docs (docs/guide/explorer.png), made from a real model.

A small causal looped transformer (one block applied 6 times) is trained for a few hundred steps on the
arithmetic word problems of ``looptrace.apps.tasks.text`` (byte-level BPE); two checkpoints of that run
give TracIn/SDI from 160 training problems to 24 held-out problems (other templates). The per-position
decomposition is computed exactly, here, by hooks on the loop body's Linear and LayerNorm layers (every body
parameter of this model): position p's part of a training example's gradient is, per layer call,
delta_p a_p^T (+ delta_p for a bias; delta_p * xhat_p for a norm's weight), summed over all loop steps; the
query side is the per-step gradient phi_t. The sum over positions is checked against ``lt.attribute``'s exact
SDI in float64 before the page is written.

    PYTHONPATH=src python docs/guide/explorer_example.py          # about a minute on 2 cores

writes build/explorer-example/explorer.html and, with headless Chromium (apt-get install -y chromium),
docs/guide/explorer.png.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import looptrace as lt
from looptrace.apps.tasks.text import BPETokenizer, arithmetic_problems, render
from looptrace.explore import explorer_data, write_explorer
from looptrace.models.looped import LoopedConfig, LoopedTransformer

ROOT = Path(__file__).resolve().parents[2]
TAU = 6


def encode(
    tok: BPETokenizer, pairs: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """x [n, L], y [n, L] (next tokens), mask [n, L] (1 on the answer's tokens), lengths (unpadded)."""
    rows = []
    for q, a in pairs:
        prompt, completion = render(q, a)
        p, c = tok.encode(prompt), tok.encode(completion)
        rows.append((p + c, [0] * len(p) + [1] * len(c)))
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.zeros_like(x)
    m = torch.zeros(len(rows), width)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n], y[i, :n], m[i, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:]), torch.tensor(mask[1:]).float()
    return x, y, m, [len(ids) - 1 for ids, _ in rows]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-example loss: mean cross-entropy over the answer's tokens."""
    x, y, m = batch
    logits = model(x)
    ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    return (ce * m).sum(1) / m.sum(1)


class PositionGrads:
    """Per-example, per-position gradients of the loop body's parameters, tagged with the loop step.

    ``per_position(...)``: [B, L, P] summed over steps (the training side); ``per_step(...)``: [B, tau, P]
    summed over positions (the query side, phi_t). P orders the body's parameters as ``self.params``."""

    def __init__(self, model: LoopedTransformer) -> None:
        self.model = model
        self.layers = [m for m in model.core.modules() if isinstance(m, nn.Linear | nn.LayerNorm)]
        self.params = [p for m in self.layers for p in m.parameters()]
        assert {id(p) for p in self.params} == {id(p) for p in model.core.parameters()}, "a body parameter is missed"
        self.calls: list[tuple[int, nn.Module, torch.Tensor, list[torch.Tensor]]] = []
        self.step = 0
        model.core.register_forward_pre_hook(self._next_step)
        for m in self.layers:
            m.register_forward_hook(self._capture)

    def _next_step(self, module: nn.Module, args: object) -> None:
        self.step += 1

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        grad: list[torch.Tensor] = []
        output.register_hook(lambda g: grad.append(g.detach()))
        self.calls.append((self.step, module, inputs[0].detach(), grad))

    def _terms(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
        """Per-position parameter gradients [B, L, numel] of one call, in the module's parameter order."""
        if isinstance(module, nn.Linear):
            out = [torch.einsum("blo,bli->bloi", g, a).flatten(2)]
            return [*out, g] if module.bias is not None else out
        xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
        return [g * xhat, g] if module.bias is not None else [g * xhat]

    def run(self, batch: tuple[torch.Tensor, ...]) -> list[tuple[int, torch.Tensor]]:
        self.calls, self.step = [], 0
        self.model.zero_grad()
        loss_fn(self.model, batch).sum().backward()  # examples do not interact: each one's gradient is its own
        return [(step, torch.cat(self._terms(m, a, grad[0]), dim=-1)) for step, m, a, grad in self.calls]

    def per_position(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        calls = self.run(batch)
        order = {id(m): k for k, m in enumerate(self.layers)}
        per_layer: dict[int, torch.Tensor] = {}
        for (_, m, _, _), (_, t) in zip(self.calls, calls, strict=True):
            per_layer[order[id(m)]] = per_layer.get(order[id(m)], 0) + t  # every loop step of this position
        return torch.cat([per_layer[k] for k in range(len(self.layers))], dim=-1)  # [B, L, P]

    def per_step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        calls = self.run(batch)
        order = {id(m): k for k, m in enumerate(self.layers)}
        b = batch[0].shape[0]
        steps = max(s for s, _ in calls)
        blocks: list[list[torch.Tensor]] = [[torch.zeros(0)] * len(self.layers) for _ in range(steps)]
        for (s, m, _, _), (_, t) in zip(self.calls, calls, strict=True):
            blocks[s - 1][order[id(m)]] = t.sum(1)  # [B, numel]: summed over positions
        return torch.stack([torch.cat(row, dim=-1) for row in blocks], dim=1).reshape(b, steps, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "guide" / "explorer.png"))
    ap.add_argument("--html", default=str(ROOT / "build" / "explorer-example" / "explorer.html"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    train_pairs = arithmetic_problems(800, "train")
    tok = BPETokenizer.train("\n".join(q + " " + a for q, a in train_pairs), vocab_size=360)
    fits = [p for p in arithmetic_problems(80, "test") if encode(tok, [p])[0].shape[1] <= 64]  # max_len
    test_pairs = fits[:24]
    x, y, m, lengths = encode(tok, train_pairs)
    qx, qy, qm, qlengths = encode(tok, test_pairs)
    cfg = LoopedConfig(vocab_size=tok.vocab_size, d_model=64, n_heads=4, n_loops=TAU, max_len=64, positions="learned")
    model = LoopedTransformer(cfg)
    steps, lr = 600, 3e-3
    cache = Path(args.html).parent / "checkpoints.pt"  # the trained run, reused by a second call
    if cache.exists():
        states = torch.load(cache, weights_only=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        states = []
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x), (32,))
            loss = loss_fn(model, (x[idx], y[idx], m[idx])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in (steps // 2, steps):
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            if step % 100 == 0:
                print(f"step {step}: train loss {loss.item():.3f}")
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(states, cache)
    checkpoints = [lt.Checkpoint(state, lr=lr) for state in states]

    n = 160  # training examples attributed: the first n of the training set
    train = (x[:n], y[:n], m[:n])
    query = (qx, qy, qm)
    model = model.double()
    grads = PositionGrads(model)
    positions = np.zeros((n, len(qx), TAU, x.shape[1]))
    as64 = lambda batch: tuple(t.double() if t.is_floating_point() else t for t in batch)  # noqa: E731
    for c, state in enumerate(states):
        model.load_state_dict({k: v.double() for k, v in state.items()})
        phi = grads.per_step(as64(query))  # [M, tau, P]
        for b0 in range(0, n, 8):
            g = grads.per_position(as64(tuple(t[b0 : b0 + 8] for t in train)))  # [B, L, P]
            positions[b0 : b0 + 8] += lr * torch.einsum("blp,mtp->bmtl", g, phi).numpy()
        print(f"checkpoint {c + 1} of {len(states)}: per-position SDI done")
    sdi = positions.sum(-1)

    def loader(t: tuple[torch.Tensor, ...]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*t), batch_size=16)

    ref = lt.attribute(
        model, checkpoints, loader(as64(train)), loader(as64(query)), loss_fn, step_module=model.core,
        sketch=lt.SketchSpec.exact(),
    )  # fmt: skip
    err = np.abs(sdi - ref.sdi.double().numpy()).max() / np.abs(sdi).max()
    print(f"positions.sum(-1) vs lt.attribute exact SDI: max relative error {err:.2e}")
    assert err < 1e-8, "the per-position decomposition does not sum to the exact SDI"

    data = explorer_data(
        sdi, positions=positions, train_tokens=[x[i, : lengths[i]] for i in range(n)],
        query_tokens=[qx[j, : qlengths[j]] for j in range(len(qx))],
        decode=lambda ids: [tok.decode([int(t)]) for t in ids], k=5, query_labels=[q for q, _ in test_pairs],
        source={"model": f"looped transformer, d=64, one block x {TAU} steps, {steps} steps of AdamW on arithmetic "
                "word problems; 2 checkpoints; exact SDI (docs/guide/explorer_example.py)"},
    )  # fmt: skip
    html = Path(args.html)
    html.parent.mkdir(parents=True, exist_ok=True)
    write_explorer(data, html, title="looptrace explorer · looped LM on arithmetic word problems")
    print(f"wrote {html}")
    q = data["queries"][0]
    step = int(np.argmax(q["energy"])) + 1  # the query's busiest loop step
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--window-size=1360,1720", f"--screenshot={args.out}",
             html.resolve().as_uri() + f"#query=0&step={step}"],
            check=True, capture_output=True,
        )  # fmt: skip
    print(f"wrote {args.out} (query 0 at loop step {step})")


if __name__ == "__main__":
    main()

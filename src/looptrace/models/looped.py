"""A readable looped transformer: read-in E, a core applied r times with input injection, read-out R.

    e   = embed(x)                          # [B, L, d]   read-in (tokens or linear one-hot)
    h   = prelude(e); h_0 = init_state(e)   # zeros | embedding | random
    h_t = core(h_{t-1}, e)                  # t = 1..r, one call of ``core`` = one loop step
    y   = readout(coda(h_n))                # n = r, or a per-example read-out step

``core`` is the step module for attribution: its parameters (injection adapter, blocks and an
optional in-loop norm) are the body. Truncated BPTT detaches the state before the last k steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Injection = Literal["none", "additive", "concat"]
StateInit = Literal["zeros", "embedding", "random"]


@dataclasses.dataclass(frozen=True)
class LoopedConfig:
    """Architecture of a :class:`LoopedTransformer` (saved in every checkpoint)."""

    vocab_size: int = 16
    out_size: int | None = None  # read-out classes (default: vocab_size)
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int | None = None  # default 4 * d_model
    n_prelude: int = 0
    n_core: int = 1  # blocks in the recurrent core, applied n_loops times
    n_coda: int = 0
    n_loops: int = 4  # default recurrence r
    max_len: int = 128
    causal: bool = True
    injection: Injection = "additive"
    adapter_init: Literal["identity", "mixed"] = "identity"  # concat adapter at init: [I | 0], or [I/2 | I/2]
    state_init: StateInit = "zeros"
    read_in: Literal["embedding", "linear"] = "embedding"  # linear = Linear(vocab, d) on one-hot tokens
    positions: Literal["none", "learned", "rotary"] = "none"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "relu2"] = "gelu"
    bias: bool = True
    qk_norm: bool = False
    core_norm: bool = False  # a final norm inside the loop: h_t = norm(block(h_{t-1} + e)) (Fan et al.)
    head_norm: bool = True  # norm before the read-out head
    head_bias: bool = False
    softcap: float | None = None
    bptt_k: int | None = None  # truncated BPTT: only the last k steps get gradient
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.bptt_k is not None and self.bptt_k < 1:
            raise ValueError("bptt_k must be >= 1 or None")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _norm(cfg: LoopedConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, bias=cfg.bias)


def _rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on [B, H, L, hd] (no parameters)."""
    _, _, n, hd = x.shape
    half = hd // 2
    freq = 1.0 / (10000 ** (torch.arange(half, device=x.device, dtype=x.dtype) / half))
    ang = torch.arange(n, device=x.device, dtype=x.dtype)[:, None] * freq[None, :]  # [L, hd/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out, x[..., 2 * half :]], dim=-1) if hd % 2 else out


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.cfg.n_heads
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x [B, L, d]
        q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))  # [B, H, L, hd]
        if self.cfg.positions == "rotary":
            q, k = _rotary(q), _rotary(k)
        if self.cfg.qk_norm:
            q, k = F.rms_norm(q, (d // h,)), F.rms_norm(k, (d // h,))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.cfg.causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        hidden = cfg.d_mlp or 4 * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.out = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.act = cfg.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.fc(x)
        u = F.relu(u).square() if self.act == "relu2" else F.gelu(u)
        return self.out(u)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.ln1 = _norm(cfg, cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = _norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class Core(nn.Module):
    """One loop iteration: inject the embedding, apply the block stack (and the in-loop norm)."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.adapter: nn.Linear | None = None
        if cfg.injection == "concat":
            d = cfg.d_model
            self.adapter = nn.Linear(2 * d, d, bias=False)
            with torch.no_grad():  # [I | 0]: at init the adapter passes the embedding through ("mixed": and the state)
                self.adapter.weight.zero_()
                if cfg.adapter_init == "mixed":
                    self.adapter.weight[:, :d].copy_(0.5 * torch.eye(d))
                    self.adapter.weight[:, d:].copy_(0.5 * torch.eye(d))
                else:
                    self.adapter.weight[:, :d].copy_(torch.eye(d))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_core)])
        self.norm = _norm(cfg, cfg.d_model) if cfg.core_norm else None

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.cfg.injection == "additive":
            u = h + e
        elif self.cfg.injection == "concat":
            assert self.adapter is not None
            u = self.adapter(torch.cat([e, h], dim=-1))  # [B, L, 2d] -> [B, L, d]
        else:
            u = h
        for blk in self.blocks:
            u = blk(u)
        return self.norm(u) if self.norm is not None else u


class LearnedPositions(nn.Module):
    """A learned position table ``weight`` ``[max_len, d]`` added to a batch of embeddings: a module of its own (not
    a bare parameter on the model) so that every parameter outside the loop body belongs to a module
    (``lt.attribute(..., outside=True)`` scores them module by module)."""

    def __init__(self, max_len: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, d))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return e + self.weight[: e.shape[1]]


def _positions_key(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
    """Checkpoints written before :class:`LearnedPositions` keep the table under ``pos``: read it as ``pos.weight``
    (a ``load_state_dict`` pre-hook; :meth:`LoopedTransformer.upgrade_state_dict` for looptrace's own loaders)."""
    old = prefix + "pos"
    if isinstance(state_dict.get(old), torch.Tensor) and prefix + "pos.weight" not in state_dict:
        state_dict[prefix + "pos.weight"] = state_dict.pop(old)


class LoopedTransformer(nn.Module):
    """Prelude / recurrent core / coda transformer with an explicit per-iteration interface."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.read_in == "linear":
            self.read_in: nn.Module = nn.Linear(cfg.vocab_size, d)
        else:
            self.read_in = nn.Embedding(cfg.vocab_size, d)
        self.pos = LearnedPositions(cfg.max_len, d) if cfg.positions == "learned" else None
        self.register_load_state_dict_pre_hook(_positions_key)
        self.prelude = nn.ModuleList([Block(cfg) for _ in range(cfg.n_prelude)])
        self.core = Core(cfg)
        self.coda = nn.ModuleList([Block(cfg) for _ in range(cfg.n_coda)])
        self.ln_f = _norm(cfg, d) if cfg.head_norm else None
        self.head = nn.Linear(d, cfg.out_size or cfg.vocab_size, bias=cfg.head_bias)
        self.apply(self._init)

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with the keys of older looptrace versions renamed to this model's (``pos`` -> ``pos.weight``);
        :func:`looptrace.influence.checkpoints.load_into` calls it before it checks the keys."""
        out = dict(state)
        _positions_key(self, out, "")
        return out

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear) and not (m.in_features == 2 * m.out_features and m.bias is None):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ------------------------------------------------------------------ per-iteration interface
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L] -> injected embedding e [B, L, d] (after the prelude)."""
        if self.cfg.read_in == "linear":
            e = self.read_in(F.one_hot(x, self.cfg.vocab_size).to(self.head.weight.dtype))
        else:
            e = self.read_in(x)
        if self.pos is not None:
            e = self.pos(e)
        for blk in self.prelude:
            e = blk(e)
        return e

    def init_state(self, e: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.cfg.state_init == "embedding":
            return e
        if self.cfg.state_init == "random":
            noise = torch.randn(e.shape, generator=generator, device=e.device, dtype=e.dtype)
            return noise * math.sqrt(2.0 / 5.0)
        return torch.zeros_like(e)

    def step(self, h: torch.Tensor, e: torch.Tensor, t: int) -> torch.Tensor:
        """Loop iteration t (1-based): h_t = core(h_{t-1}, e)."""
        del t
        return self.core(h, e)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.coda:
            h = blk(h)
        if self.ln_f is not None:
            h = self.ln_f(h)
        logits = self.head(h)
        if self.cfg.softcap is not None:
            logits = self.cfg.softcap * torch.tanh(logits / self.cfg.softcap)
        return logits

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        n_loops: int | None = None,
        readout_steps: torch.Tensor | None = None,
        return_all: bool = False,
        bptt_k: int | None = -1,
    ) -> Any:
        """Run r = n_loops iterations (default cfg.n_loops).

        Args:
            x: tokens [B, L].
            readout_steps: optional [B] 1-based step at which each example's state is read out
                (later steps run but are unused, so they get no gradient).
            return_all: also return every iteration's hidden state [r, B, L, d] and logits.
            bptt_k: truncated BPTT override (-1: cfg.bptt_k; None: full BPTT).
        """
        r = n_loops if n_loops is not None else self.cfg.n_loops
        k = self.cfg.bptt_k if bptt_k == -1 else bptt_k
        e = self.embed(x)
        h = self.init_state(e)
        h_read = torch.zeros_like(h) if readout_steps is not None else None
        states: list[torch.Tensor] = []
        for t in range(1, r + 1):
            h = self.step(h, e, t)
            if readout_steps is not None:
                assert h_read is not None
                h_read = torch.where((readout_steps == t)[:, None, None], h, h_read)
            if return_all:
                states.append(h)
            if k is not None and t <= r - k:
                h = h.detach()  # truncated BPTT: steps 1..r-k get no gradient
        logits = self.readout(h_read if h_read is not None else h)
        if not return_all:
            return logits
        hs = torch.stack(states)  # [r, B, L, d]
        return {"logits": logits, "states": hs, "all_logits": self.readout(hs.flatten(0, 1)).unflatten(0, hs.shape[:2])}

"""The sketch plan: which linear map each parameter tensor's gradient goes through, and where its
features live in the feature vector.

Every map is linear, so per-token and per-step contributions can be sketched separately and summed:
sketch(sum_t phi_t) = sum_t sketch(phi_t), which is what makes conservation hold exactly.

Three kinds of per-slot maps:

* ``identity``: the flattened gradient itself (exact mode, or a tensor kept exact by the budget).
* ``cs``: CountSketch of the flattened gradient [rows, cols] with a 4-wise independent bucket hash
  h(i, j) on the flattened index and a separable sign s(i, j) = s1(i) s2(j) (s1, s2 4-wise
  independent). The separable sign folds into the factors of an outer product (left * s1, right * s2),
  so sketching a sum of outer products costs no pass over the materialised matrix beyond the scatter.
  Unbiased; variance <= (2/m + 2/m^2)|g|^2|p|^2: the pairs of entries of the usual CountSketch bound
  (2/m), plus "rectangles" (i, j), (i', j'), (i, j'), (i', j) whose signs no longer cancel, each
  needing two independent bucket collisions (1/m^2 under the 4-wise bucket hash) and summing to at most
  2 |g|^2 |p|^2.
* ``ts``: TensorSketch for a matrix parameter [rows, cols]: the CountSketch of the flattened
  matrix under the induced hash H(i, j) = h1(i) + h2(j) mod m and sign S(i, j) = s1(i) s2(j)
  (Lemma 3). For a sum of outer products it can be computed without the matrix via the FFT:
  TS(u, v) = irfft(rfft(CS1 u) * rfft(CS2 v)); the sum over tokens moves inside the inverse FFT
  because the inverse FFT is linear. Both routes give the same numbers (a test checks this).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from looptrace.errors import ConfigError
from looptrace.sketch.hashing import bucket_hash, sign_hash
from looptrace.sketch.routes import ROUTES, OuterPath
from looptrace.sketch.spec import SketchSpec

Kind = Literal["identity", "cs", "ts"]

#: Upper bound on the bytes of one transient per-example gradient block or FFT buffer.
CHUNK_BYTES = 64 * 2**20

#: A matrix is *wide* (``method="auto"`` gives it a TensorSketch block of its own, computable by FFT) when it
#: has at least this many entries and both sides are at least :data:`WIDE_SIDE`: from there on, materialising
#: its per-example gradient (rows x cols per example and step, then a scatter of as many entries) costs more
#: than two FFTs per token at the block sizes the budget gives (measured across widths:
#: benchmarks/results/widths.md). A fixed rule of the shapes, so that the layout never depends on the machine.
WIDE = 1 << 18
WIDE_SIDE = 256
#: The largest block ``budget="auto"`` gives one wide matrix: an FFT's cost grows faster than its length (m log m,
#: and the cache), so a larger block costs more than it buys in accuracy at the default route. Chosen on the widths
#: benchmark's block at width 512 (first-batch check on, over a plain step; benchmarks/results/widths.md): a
#: 5-smooth m whose cost is within the run-to-run spread of m = 2048's while its SDI error is clearly below the
#: reference's at m = 2048 per tensor (at 2048 the two are equal; 4096 costs well over the 1.2x bound). A user who
#: wants larger blocks names them (``budget="per_tensor"``, ``dim`` per tensor).
AUTO_BLOCK = 2560


def fft_size(n: int) -> int:
    """The largest even 5-smooth number (2^a 3^b 5^c, a >= 1) not above ``n`` (>= 2): FFT lengths with only small
    prime factors are several times faster than, say, 2 x 19 x 149."""
    best = 2
    p2 = 2
    while p2 <= n:
        p3 = p2
        while p3 <= n:
            p5 = p3
            while p5 <= n:
                best = max(best, p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return best


def is_wide(shape: tuple[int, ...]) -> bool:
    """Whether ``method="auto"`` gives this parameter a TensorSketch block of its own (see :data:`WIDE`)."""
    if len(shape) < 2:
        return False
    rows, cols = shape[0], math.prod(shape[1:])
    return rows * cols >= WIDE and min(rows, cols) >= WIDE_SIDE


class TableCache:
    """The most recently used hash tables, up to ``max_bytes`` in all (least recently used dropped first).

    Drawing the tables of a plan costs tens of milliseconds per call on a small model (a 4-wise polynomial
    hash per coordinate), as much as a few batches' capture: every featurisation of the same body under the
    same spec (one per checkpoint) would pay it again. Entries are keyed by everything the hash depends on,
    so a hit is the table a fresh draw would give (tests/test_sketch.py checks this)."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[object, ...], dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(tables: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tables.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._size(t) for t in self._entries.values())

    def get(self, key: tuple[object, ...]) -> dict[str, torch.Tensor] | None:
        with self._lock:
            if self.max_bytes <= 0:  # turned off
                return None
            tables = self._entries.get(key)
            if tables is not None:
                self._entries.move_to_end(key)
            return tables

    def put(self, key: tuple[object, ...], tables: dict[str, torch.Tensor]) -> None:
        size = self._size(tables)
        with self._lock:
            if size > self.max_bytes:
                return
            self._entries[key] = tables
            self._entries.move_to_end(key)
            total = sum(self._size(t) for t in self._entries.values())
            while total > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                total -= self._size(dropped)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


#: Hash tables shared between plans (see :class:`TableCache`); ``TABLE_CACHE.max_bytes = 0`` turns it off.
TABLE_CACHE = TableCache()


@dataclasses.dataclass
class Slot:
    """One parameter tensor's place in the feature vector."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    m: int
    offset: int
    seed: int
    _tables: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = dataclasses.field(
        default_factory=dict, repr=False
    )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) >= 1 else 1

    @property
    def cols(self) -> int:
        return self.numel // max(self.rows, 1)

    # ------------------------------------------------------------------ hash tables
    def tables(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Hash tables on ``device``: generated on the CPU, then copied (identical on any device). Kept in
        :data:`TABLE_CACHE` too, so that the next plan with this slot (the next checkpoint, the next call)
        does not draw them again."""
        key = (device, dtype)
        if key in self._tables:
            return self._tables[key]
        shared_key = (self.kind, self.name, self.shape, self.m, self.seed, str(device), dtype)
        cached = TABLE_CACHE.get(shared_key)
        if cached is not None:
            self._tables[key] = cached
            return cached
        t: dict[str, torch.Tensor] = {}
        if self.kind == "cs":
            t["idx"] = bucket_hash(self.numel, self.m, seed=self.seed, name=self.name, role="h", independence=4)
            s1 = sign_hash(self.rows, seed=self.seed, name=self.name, role="s1")
            s2 = sign_hash(self.cols, seed=self.seed, name=self.name, role="s2")
            t.update(s1=s1, s2=s2)
            t["sign"] = (s1[:, None] * s2[None, :]).reshape(-1)
        elif self.kind == "ts":
            h1 = bucket_hash(self.rows, self.m, seed=self.seed, name=self.name, role="h1")
            h2 = bucket_hash(self.cols, self.m, seed=self.seed, name=self.name, role="h2")
            s1 = sign_hash(self.rows, seed=self.seed, name=self.name, role="s1")
            s2 = sign_hash(self.cols, seed=self.seed, name=self.name, role="s2")
            t.update(h1=h1, h2=h2, s1=s1, s2=s2)
            t["idx"] = ((h1[:, None] + h2[None, :]) % self.m).reshape(-1)
            t["sign"] = (s1[:, None] * s2[None, :]).reshape(-1)
        out = {k: v.to(device=device, dtype=dtype if k.startswith("s") else torch.int64) for k, v in t.items()}
        self._tables[key] = out
        TABLE_CACHE.put(shared_key, out)
        return out

    # ------------------------------------------------------------------ sketch operators
    def add_dense(self, out: torch.Tensor, g: torch.Tensor) -> None:
        """out[B, m] += S(g) for per-example flattened gradients g[B, numel]."""
        if self.kind == "identity":
            out.add_(g)
            return
        t = self.tables(g.device, g.dtype)
        out.scatter_add_(1, t["idx"].expand(g.shape[0], -1), g * t["sign"])

    def add_rows(self, out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """out[B, m] += S(G) with G = sum_j e_{rows[:, j]} (x) values[:, j] (embedding-style).

        rows: int64 [B, L]; values: [B, L, cols]. Only the touched entries are visited.
        """
        b, n_tok = rows.shape
        cols = self.cols
        pos = (rows[:, :, None] * cols + torch.arange(cols, device=rows.device)).reshape(b, -1)
        vals = values.reshape(b, n_tok * cols)
        if self.kind == "identity":
            out.scatter_add_(1, pos, vals)
            return
        t = self.tables(values.device, values.dtype)
        out.scatter_add_(1, t["idx"][pos], vals * t["sign"][pos])

    def add_outer(
        self,
        out: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        path: OuterPath = "auto",
    ) -> None:
        """out[B, m] += S(sum_j left[:, j] (x) right[:, j]) for left [B, L, rows], right [B, L, cols]."""
        b, n_tok, rows = left.shape
        cols = right.shape[-1]
        if self.kind == "ts" and self.route(b, n_tok, left.device, left.dtype, path) == "fft":
            self._add_outer_fft(out, left, right)
            return
        t = self.tables(left.device, left.dtype) if self.kind != "identity" else {}
        if self.kind != "identity":  # fold the separable sign s1(i) s2(j) into the factors: O(L (rows + cols))
            left = left * t["s1"]
            right = right * t["s2"]
        per_example = rows * cols * left.element_size()
        step = max(1, CHUNK_BYTES // max(per_example, 1))
        for i in range(0, b, step):  # chunk examples to bound the transient [b, rows, cols] block
            g = torch.bmm(left[i : i + step].transpose(1, 2), right[i : i + step]).reshape(-1, rows * cols)
            o = out[i : i + step]
            if self.kind == "identity":
                o.add_(g)
            else:  # the signs are in the factors already
                o.scatter_add_(1, t["idx"].expand(g.shape[0], -1), g)

    def route(
        self, b: int, n_tok: int, device: torch.device, dtype: torch.dtype, path: OuterPath = "auto"
    ) -> Literal["fft", "materialize"]:
        """How this TensorSketch slot computes a batch of outer products: ``path`` when forced, else the
        route measured faster on this machine for these shapes (:mod:`looptrace.sketch.routes`)."""
        if path != "auto":
            return path
        return ROUTES.choose(self, b, n_tok, device, dtype)

    def _add_outer_fft(self, out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """TS(sum_j u_j (x) v_j) = irfft(sum_j rfft(CS1 u_j) * rfft(CS2 v_j)): the sum over tokens moves inside
        the inverse FFT (it is linear), so one irfft per example; O(L (rows + cols + m log m)) per example.

        Tokens are visited in chunks whose buffers stay within :data:`FFT_CHUNK_BYTES`, made of whole examples
        where one fits (the tokens of all examples as one axis, a view: no copy, and each chunk's spectra summed
        per example by a reshape), else of a slice of every example's tokens (at least one token of each, so a
        chunk exceeds the bound when even that does not fit). Each chunk's signs are applied where it is read."""
        b, n_tok, rows = left.shape
        cols = right.shape[-1]
        m = self.m
        t = self.tables(left.device, left.dtype)
        freq = m // 2 + 1
        # a chunk's buffers (two [c, m] count sketches and their spectra) stay within FFT_CHUNK_BYTES
        per_token = (2 * m + 4 * freq) * left.element_size()
        budget = max(1, FFT_CHUNK_BYTES // max(per_token, 1))
        acc = torch.zeros(b, freq, dtype=torch.promote_types(left.dtype, torch.complex64), device=left.device)
        h1, h2, s1, s2 = t["h1"], t["h2"], t["s1"], t["s2"]

        def spectra(lj: torch.Tensor, rj: torch.Tensor) -> torch.Tensor:
            # 2-D [k, rows] rows: index_add_ along the last axis of a 2-D tensor is about 3x faster than of a 3-D
            # view (measured on CPU)
            f1 = torch.fft.rfft(lj.new_zeros(lj.shape[0], m).index_add_(1, h1, lj * s1), dim=-1)
            return f1.mul_(torch.fft.rfft(rj.new_zeros(rj.shape[0], m).index_add_(1, h2, rj * s2), dim=-1))

        if budget >= n_tok:  # whole examples per chunk: a sum over each one's tokens by a reshape
            per = min(b, budget // n_tok)
            flat_l, flat_r = left.reshape(b * n_tok, rows), right.reshape(b * n_tok, cols)
            for e in range(0, b, per):
                k = min(per, b - e)
                f = spectra(flat_l[e * n_tok : (e + k) * n_tok], flat_r[e * n_tok : (e + k) * n_tok])
                acc[e : e + k] += f.view(k, n_tok, freq).sum(dim=1)
        else:  # a long sequence or a large m: a slice of every example's tokens per chunk
            tok = max(1, budget // b)
            for j in range(0, n_tok, tok):
                k = min(tok, n_tok - j)
                f = spectra(left[:, j : j + k].reshape(b * k, rows), right[:, j : j + k].reshape(b * k, cols))
                acc += f.view(b, k, freq).sum(dim=1)
        out.add_(torch.fft.irfft(acc, n=m, dim=-1).to(out.dtype))


#: Upper bound on one chunk of tokens' FFT buffers (count sketches and spectra): small enough to stay in cache.
FFT_CHUNK_BYTES = 8 * 2**20


def _kind_rule(spec: SketchSpec) -> Callable[[tuple[int, ...]], Kind]:
    """The map of a tensor's shape to its sketch: TensorSketch for matrices under ``"tensorsketch"`` and for
    wide matrices under ``"auto"``, CountSketch otherwise."""

    def kind(shape: tuple[int, ...]) -> Kind:
        if len(shape) >= 2 and (spec.method == "tensorsketch" or (spec.method == "auto" and is_wide(shape))):
            return "ts"
        return "cs"

    return kind


@dataclasses.dataclass
class SketchPlan:
    """The slots of all body parameter tensors and the total feature dimension."""

    spec: SketchSpec
    slots: list[Slot]
    dim: int

    @classmethod
    def build(cls, spec: SketchSpec, params: Sequence[tuple[str, tuple[int, ...]]]) -> SketchPlan:
        """Lay out ``params`` ((name, shape) in a canonical order) under ``spec``."""
        if not params:
            raise ConfigError("there are no body parameters to featurise")
        params = sorted(params)  # layout depends on names only, never on module order
        slots: list[Slot] = []
        if spec.is_exact:
            off = 0
            for name, shape in params:
                slots.append(Slot(name, shape, "identity", math.prod(shape), off, spec.seed))
                off += math.prod(shape)
            return cls(spec, slots, off)
        assert spec.dim is not None

        if spec.budget == "auto":
            return cls._auto(spec, params)
        sketch_kind = _kind_rule(spec)

        if spec.budget == "per_tensor":
            for i, (name, shape) in enumerate(params):
                slots.append(Slot(name, shape, sketch_kind(shape), spec.dim, i * spec.dim, spec.seed))
            return cls(spec, slots, spec.dim * len(params))
        if spec.budget == "shared":
            for name, shape in params:
                slots.append(Slot(name, shape, sketch_kind(shape), spec.dim, 0, spec.seed))
            return cls(spec, slots, spec.dim)
        # proportional: visit tensors from smallest to largest; one no larger than an equal share of
        # what is left is kept exactly (zero error for its numel coordinates); the rest split the
        # remaining dimension in proportion to their size, in even parts of at least 2.
        order = sorted(range(len(params)), key=lambda i: (math.prod(params[i][1]), params[i][0]))
        remaining_dim = spec.dim
        dims: dict[int, tuple[Kind, int]] = {}
        rest: list[int] = []
        for rank, i in enumerate(order):
            n = math.prod(params[i][1])
            if not rest and n <= remaining_dim / (len(order) - rank):
                dims[i] = ("identity", n)
                remaining_dim -= n
            else:
                rest.append(i)
        rest_numel = sum(math.prod(params[i][1]) for i in rest)
        if rest and remaining_dim < 2 * len(rest):
            raise ConfigError(
                f"SketchSpec(dim={spec.dim}, budget='proportional') leaves less than 2 dimensions for some of "
                f"{[params[i][0] for i in rest]}; raise dim or use budget='per_tensor'"
            )
        left = remaining_dim
        for k, i in enumerate(rest):
            name, shape = params[i]
            if k == len(rest) - 1:
                m = left
            else:
                m = max(2, int(remaining_dim * math.prod(shape) / rest_numel) // 2 * 2)
                m = min(m, left - 2 * (len(rest) - k - 1))
            dims[i] = (sketch_kind(shape), m)
            left -= m
        off = 0
        for i, (name, shape) in enumerate(params):
            kind, m = dims[i]
            slots.append(Slot(name, shape, kind, m, off, spec.seed))
            off += m
        return cls(spec, slots, off)

    @classmethod
    def _auto(cls, spec: SketchSpec, params: Sequence[tuple[str, tuple[int, ...]]]) -> SketchPlan:
        """``budget="auto"``: wide matrices (:func:`is_wide`) get a block each; every other tensor is hashed into one
        shared space (the *pool*). The pool gets a fair share of D: its tensors' share of all entries, at least
        D / (blocks + 1), never more than its tensors have (then they are kept exactly); the wide matrices split
        the rest equally, each block rounded down to :func:`fft_size` and at most :data:`AUTO_BLOCK`, and what
        that leaves goes back to the pool, up to its tensors' size. So D is an upper bound: when the pool is kept
        exactly and the blocks are at their cap, the features have fewer coordinates (``plan.dim``). With no wide
        matrix this is a shared budget."""
        assert spec.dim is not None
        kind_of = _kind_rule(spec)
        wide = [(n, s) for n, s in params if is_wide(s)]
        pool = [(n, s) for n, s in params if not is_wide(s)]
        if not wide:
            return cls(spec, [Slot(n, s, kind_of(s), spec.dim, 0, spec.seed) for n, s in pool], spec.dim)
        pool_numel = sum(math.prod(s) for _, s in pool)
        total = sum(math.prod(s) for _, s in params)
        share = max(spec.dim * pool_numel / total, spec.dim / (len(wide) + 1))
        d_pool = min(pool_numel, int(share))
        m_wide = (spec.dim - d_pool) // len(wide)
        if m_wide < 2:
            raise ConfigError(
                f"SketchSpec(dim={spec.dim}) leaves less than 2 dimensions for each of the {len(wide)} wide matrices "
                f"{[n for n, _ in wide][:4]}; raise dim"
            )
        m_wide = fft_size(min(m_wide, AUTO_BLOCK))
        d_pool = min(spec.dim - m_wide * len(wide), pool_numel) if pool else 0
        slots: list[Slot] = []
        if pool:
            kind: Kind = "identity" if d_pool >= pool_numel else "cs"
            if kind == "identity":  # the pool's tensors fit: kept exactly, each in its own coordinates
                off = 0
                for n, s in pool:
                    slots.append(Slot(n, s, "identity", math.prod(s), off, spec.seed))
                    off += math.prod(s)
                d_pool = off
            else:
                slots.extend(Slot(n, s, kind_of(s), d_pool, 0, spec.seed) for n, s in pool)
        off = d_pool
        for n, s in wide:
            slots.append(Slot(n, s, kind_of(s), m_wide, off, spec.seed))
            off += m_wide
        return cls(spec, sorted(slots, key=lambda sl: sl.name), off)

    def blocks(self) -> dict[tuple[int, int], list[Slot]]:
        """``{(offset, m): slots}``: every block of coordinates, a tensor's own or a space several tensors share."""
        by_block: dict[tuple[int, int], list[Slot]] = {}
        for s in self.slots:
            by_block.setdefault((s.offset, s.m), []).append(s)
        return by_block

    def groups(self) -> list[tuple[str, int, int]]:
        """``(label, offset, m)`` of every block of coordinates (:meth:`blocks`), named after its tensors. The
        first-batch check compares block by block."""
        out = []
        for (off, m), slots in sorted(self.blocks().items()):
            names = [s.name for s in slots]
            label = (
                names[0]
                if len(names) == 1
                else f"the space shared by {len(names)} tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            )
            out.append((label, off, m))
        return out

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    def describe(self) -> list[dict[str, object]]:
        return [
            {"name": s.name, "shape": list(s.shape), "kind": s.kind, "m": s.m, "offset": s.offset} for s in self.slots
        ]

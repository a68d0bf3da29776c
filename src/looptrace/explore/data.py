"""What the explorer shows, as plain JSON-able data built from SDI arrays.

For each query: its signed step profile sum_i SDI(z_i, z')_t, its influence horizon and cancellation
ratio (``looptrace.analysis.applications``), and its top-k proponents and opponents overall (ranked by
TracIn = sum_t SDI_t) and at every loop step t (ranked by SDI_t). With per-position values
(``positions[i, j, t, p]``: the part of ``sdi[i, j, t]`` that comes through training example i's
position p) each row carries the per-position values it is ranked by (overall: summed over steps; at step
t: that step's row), and each overall top-k example its whole steps x positions matrix for that query (the
matrices of every listed example would cost up to tau times more: 2k(tau+1) examples x tau x L numbers).

Only the top-k per query and step are kept, and the number of embedded values is capped
(``max_numbers``): the size of the page is bounded whatever N is, and the data says so (``bound``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from looptrace.analysis.applications import cancellation_scores, influence_horizon, query_cancellation, sdi_energy
from looptrace.errors import ConfigError

__all__ = ["DEFAULT_MAX_NUMBERS", "FORMAT", "VERSION", "explorer_data"]

FORMAT = "looptrace-explorer"
VERSION = 1
#: At most this many numbers (scores, step profiles, per-position values) are embedded, each about 8-12 bytes
#: of HTML. Queries past the budget are left out, and the page says how many.
DEFAULT_MAX_NUMBERS = 2_000_000
#: Query blocks read at once from ``sdi`` (a memory-mapped ``[N, M, tau]`` file is read block by block).
_BLOCK_BYTES = 64 << 20

Decoder = Callable[[Any], Sequence[str]]


def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    """A numpy view of a numpy array, a memory map or a (CPU or device) torch tensor, with ``ndim`` axes."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x) if not isinstance(x, np.ndarray) else x
    if a.ndim != ndim or a.dtype.kind not in "fiu":
        raise ConfigError(f"{name} must be a real array with {ndim} axes, got shape {a.shape} and dtype {a.dtype}")
    return a


class _Ids:
    """Token ids per example, read and checked on first use (a dataset-backed sequence is read lazily)."""

    def __init__(self, tokens: Sequence[Any] | None, n: int, name: str) -> None:
        if tokens is not None and len(tokens) != n:
            raise ConfigError(f"{name} has {len(tokens)} entries; the scores have {n} (one 1-D id array per example)")
        self.tokens, self.name = tokens, name
        self._cache: dict[int, np.ndarray] = {}

    def __bool__(self) -> bool:
        return self.tokens is not None

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self._cache:
            assert self.tokens is not None
            t = self.tokens[i]
            a = np.asarray(t.detach().cpu() if hasattr(t, "detach") else t)
            if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
                raise ConfigError(
                    f"{self.name}[{i}] must be a 1-D integer array of token ids, got shape {a.shape} ({a.dtype})"
                )
            self._cache[i] = a.astype(np.int64)
        return self._cache[i]


def _strings(ids: np.ndarray, decode: Decoder | None, what: str) -> list[str]:
    if decode is None:
        return [str(int(t)) for t in ids]
    import torch

    text = decode(torch.as_tensor(ids))
    if isinstance(text, str) or len(text) != len(ids) or not all(isinstance(s, str) for s in text):
        raise ConfigError(
            f"the decoder must map a 1-D tensor of {len(ids)} token ids to a list of {len(ids)} strings (one per "
            f"token) for {what}; got {type(text).__name__} of length {len(text)}"
        )
    return list(text)


def _label(tokens: list[str] | None, decoded: bool) -> str | None:
    if tokens is None:
        return None
    return "".join(tokens) if decoded else " ".join(tokens)


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the (at most) k largest strictly positive entries of ``x``, largest first, ties by index:
    the same as ``np.argsort(-x, kind="stable")`` cut to k and to positive values, without sorting all of x."""
    if len(x) > 4 * k:
        part = np.argpartition(-x, k - 1)[:k]
        threshold = max(float(x[part].min()), 0.0)
        cand = np.flatnonzero((x >= threshold) & (x > 0))  # every tie at the threshold, in index order
    else:
        cand = np.flatnonzero(x > 0)
    return cand[np.argsort(-x[cand], kind="stable")][:k]


def _readouts(readout_step: int | Sequence[int] | None, m: int, tau: int) -> list[int]:
    if readout_step is None:
        steps: list[Any] = [tau] * m
    elif isinstance(readout_step, int | np.integer):
        steps = [readout_step] * m
    else:
        steps = list(readout_step)
    if len(steps) != m:
        raise ConfigError(f"readout_step must be one step or one per query ({m}), got {len(steps)}")
    for st in steps:
        if int(st) != st or not 1 <= st <= tau:
            raise ConfigError(f"read-out steps are 1-based loop steps in 1..{tau}, got {st}")
    return [int(st) for st in steps]


def explorer_data(
    sdi: Any,
    *,
    positions: Any = None,
    train_tokens: Sequence[Any] | None = None,
    query_tokens: Sequence[Any] | None = None,
    decode: Decoder | None = None,
    k: int = 10,
    readout_step: int | Sequence[int] | None = None,
    query_labels: Sequence[str] | None = None,
    train_labels: Sequence[str] | None = None,
    queries: Sequence[int] | None = None,
    max_numbers: int = DEFAULT_MAX_NUMBERS,
    horizon_frac: float = 0.05,
    positions_note: str | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The explorer's data for ``sdi`` ``[N, M, tau]`` (numpy, a memory map, or torch), as a JSON-able dict.

    Args:
        sdi: step-decomposed influence, ``sdi[i, j, t]`` (1-based step t+1): positive means training on
            example i lowered query j's loss through loop step t+1.
        positions: optional ``[N, M, tau, L]`` per training position (zeros past each example's length);
            ``positions.sum(-1)`` must equal ``sdi`` (checked on every embedded example).
        train_tokens, query_tokens: optional token ids, one 1-D integer array per example (ragged).
        decode: maps one example's ids (a 1-D int tensor) to one string per token; without it the ids are shown.
        k: proponents and opponents kept per query, overall and at each step (only strictly positive scores
            are proponents and strictly negative ones opponents, so a list can be shorter).
        readout_step: the step the model reads out (1-based; one for all queries or one per query; default tau).
        query_labels, train_labels: optional text per example (shown and searched; default: the decoded tokens).
        queries: which queries to embed, in this order (default: all, until ``max_numbers``).
        max_numbers: the cap on embedded numbers; queries past it are left out (with a warning and a note).
        horizon_frac: the influence horizon's threshold (a fraction of the peak energy).
        positions_note: why there are no per-position values (shown in the page when ``positions`` is None).
        source: where the scores came from (shown in the page), e.g. the store and the command.

    Returns:
        ``{"format", "version", "n_train", "n_query", "tau", "k", "positions", "positions_note", "text",
        "train": {str(i): {"tokens", "label", "length"}}, "queries": [...], "bound": {...}, "source"}``; each
        query has ``index``, ``label``, ``tokens``, ``readout_step``, ``profile`` (signed sum over training
        examples, per step), ``energy``, ``tracin``, ``horizon``, ``cancellation``, ``examples``
        (``{str(i): {"steps": [tau], "matrix": [tau][L_i] (the overall top-k) or None, "tracin",
        "cancellation"}}``), ``overall`` and ``steps[t]``, each ``{"proponents": rows, "opponents": rows}``
        with rows ``{"train": i, "score": s, "positions": [L_i] or None}``.
    """
    s = _array(sdi, "sdi", 3)
    n, m, tau = s.shape
    if min(n, m, tau) < 1:
        raise ConfigError(f"sdi must have at least one training example, query and step, got shape {s.shape}")
    if not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    pos = None if positions is None else _array(positions, "positions", 4)
    if pos is not None and pos.shape[:3] != s.shape:
        raise ConfigError(f"positions has shape {pos.shape}; it must be [N, M, tau, L] with [N, M, tau] = {s.shape}")
    train_ids = _Ids(train_tokens, n, "train_tokens")
    query_ids = _Ids(query_tokens, m, "query_tokens")
    if decode is not None and not train_ids and not query_ids:
        raise ConfigError("a decoder needs token ids to decode: pass train_tokens and/or query_tokens")
    for labels, count, name in ((query_labels, m, "query_labels"), (train_labels, n, "train_labels")):
        if labels is not None and len(labels) != count:
            raise ConfigError(f"{name} has {len(labels)} entries, the scores have {count}")
    readouts = _readouts(readout_step, m, tau)
    order = list(range(m)) if queries is None else [int(j) for j in queries]
    if not order or any(not 0 <= j < m for j in order) or len(set(order)) != len(order):
        raise ConfigError(f"queries must be distinct query indices in 0..{m - 1}, got {list(queries or [])!r}")
    if max_numbers < 1:
        raise ConfigError(f"max_numbers must be positive, got {max_numbers}")

    train: dict[str, dict[str, Any]] = {}

    def train_entry(i: int) -> int:
        """Record training example i (once); returns how many numbers and strings it adds."""
        if str(i) in train:
            return 0
        toks = _strings(train_ids[i], decode, f"train example {i}") if train_ids else None
        length = len(toks) if toks is not None else (pos.shape[3] if pos is not None else 0)
        label = train_labels[i] if train_labels is not None else _label(toks, decode is not None)
        train[str(i)] = {"tokens": toks, "label": label, "length": length}
        return len(toks or [])

    out_queries: list[dict[str, Any]] = []
    numbers = 0
    truncated = False
    for j, x in _query_rows(s, order):
        lists = [(_top(x.sum(1), k), _top(-x.sum(1), k))] + [(_top(x[:, t], k), _top(-x[:, t], k)) for t in range(tau)]
        members = sorted({int(i) for pro, opp in lists for i in (*pro, *opp)})
        matrices = {} if pos is None else _matrices(pos, j, x, members, train_ids)
        full = {int(i) for i in (*lists[0][0], *lists[0][1])} if matrices else set()  # overall top-k: whole matrix
        # what the page embeds: profile, energy, each listed example's steps, the overall top-k's matrices, and
        # per row its index, score and (unless its example's matrix is embedded) its per-position values
        cost = 2 * tau + sum(tau + (matrices[i].size if i in full else 0) for i in members)
        cost += sum(
            2 + (0 if int(i) in full or not matrices else len(matrices[int(i)][0]))
            for lst in lists
            for i in (*lst[0], *lst[1])
        )
        if out_queries and numbers + cost > max_numbers:
            truncated = True
            break
        numbers += cost + sum(train_entry(i) for i in members)
        qtoks = _strings(query_ids[j], decode, f"query {j}") if query_ids else None
        numbers += len(qtoks or [])
        qlabel = query_labels[j] if query_labels is not None else _label(qtoks, decode is not None)
        entry = _query_entry(x, lists, members, matrices, full, horizon_frac)
        out_queries.append({
            "index": j, "label": qlabel if qlabel is not None else f"query {j}", "tokens": qtoks,
            "readout_step": readouts[j], **entry,
        })  # fmt: skip
    kept = len(out_queries)
    note = (
        f"the top {k} proponents and opponents of each query, overall and at each of the {tau} steps (at most "
        f"{2 * k * (tau + 1)} rows per query), for {kept} of {m} queries"
    )
    if truncated:
        note += f" (the rest would pass the cap of {max_numbers:,} embedded numbers: choose queries, or lower k)"
        warnings.warn(
            f"the explorer embeds {kept} of {len(order)} queries: the rest would pass max_numbers={max_numbers:,}; "
            "pass queries=[...] (CLI: --queries) to choose which, or a smaller k",
            RuntimeWarning,
            stacklevel=2,
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "n_train": int(n),
        "n_query": int(m),
        "tau": int(tau),
        "k": k,
        "horizon_frac": float(horizon_frac),
        "positions": pos is not None,
        "positions_note": None if pos is not None else (positions_note or "no per-position values were given"),
        "text": decode is not None,
        "train": train,
        "queries": out_queries,
        "bound": {
            "k": k,
            "rows_per_query_max": 2 * k * (tau + 1),
            "queries_embedded": kept,
            "n_query": int(m),
            "numbers": int(numbers),
            "max_numbers": int(max_numbers),
            "truncated": truncated,
            "note": note,
        },
        "source": dict(source or {}),
    }


def _query_rows(s: np.ndarray, order: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(j, sdi[:, j] as float64 [N, tau]) for the queries in ``order``, read in blocks of queries (one slice of
    a memory-mapped file per contiguous run), each checked to be finite."""
    n, _, tau = s.shape
    block = max(1, _BLOCK_BYTES // max(1, n * tau * 8))
    for b0 in range(0, len(order), block):
        sel = np.asarray(order[b0 : b0 + block])
        if (np.diff(sel) == 1).all():
            x_block = np.asarray(s[:, sel[0] : sel[-1] + 1], dtype=np.float64)
        else:
            x_block = np.asarray(s[:, sel], dtype=np.float64)
        finite = np.isfinite(x_block).all((0, 2))
        if not finite.all():
            bad = int(sel[np.flatnonzero(~finite)[0]])
            raise ConfigError(f"sdi has non-finite values for query {bad}; the scores are broken (recompute them)")
        for jj, j in enumerate(sel):
            yield int(j), x_block[:, jj]


def _matrices(pos: np.ndarray, j: int, x: np.ndarray, members: list[int], train_ids: _Ids) -> dict[int, np.ndarray]:
    """Each listed example's steps x positions matrix ``[tau, L_i]`` for query j (cut to its token count),
    checked to sum to its scores ``x[i]``."""
    if not members:
        return {}
    width = pos.shape[3]
    mats = np.asarray(pos[np.asarray(members), j], dtype=np.float64)  # [U, tau, L]
    out = {}
    for u, i in enumerate(members):
        length = len(train_ids[i]) if train_ids else width
        if length > width:
            raise ConfigError(
                f"train example {i} has {length} tokens but positions has only L = {width}; tokens and positions "
                "must come from the same examples"
            )
        out[i] = mats[u, :, :length]
        _check_sum(out[i], x[i], i, j, width, length)
    return out


def _rows(
    idx: np.ndarray, scores: np.ndarray, step: int | None, matrices: dict[int, np.ndarray]
) -> list[dict[str, Any]]:
    """Ranked rows: train index, score, and the per-position values it is ranked by (a matrix row, or at
    ``step`` None the column sums)."""
    out = []
    for i in idx:
        mat = matrices.get(int(i))
        values = None if mat is None else (mat.sum(0) if step is None else mat[step])
        out.append(
            {"train": int(i), "score": float(scores[i]), "positions": None if values is None else values.tolist()}
        )
    return out


def _query_entry(
    x: np.ndarray,
    lists: list[tuple[np.ndarray, np.ndarray]],
    members: list[int],
    matrices: dict[int, np.ndarray],
    full: set[int],
    horizon_frac: float,
) -> dict[str, Any]:
    """One query's profile, statistics, examples and ranked lists (``lists[0]`` overall, ``lists[t]`` step t).

    Computed for this query alone, so its numbers do not depend on which other queries are embedded."""
    energy = sdi_energy(x[:, None])[0]  # [tau]
    total, _, pair_cancel = (a[:, 0] for a in cancellation_scores(x[:, None]))  # [N] each
    return {
        "profile": x.sum(0).tolist(),
        "energy": energy.tolist(),
        "tracin": float(total.sum()),
        "horizon": influence_horizon(energy, horizon_frac),
        "cancellation": float(query_cancellation(x[:, None])[0]),
        "examples": {
            str(i): {
                "steps": x[i].tolist(),
                "tracin": float(total[i]),
                "cancellation": float(pair_cancel[i]),
                "matrix": matrices[i].tolist() if i in full else None,
            }
            for i in members
        },
        "overall": {
            "proponents": _rows(lists[0][0], total, None, matrices),
            "opponents": _rows(lists[0][1], total, None, matrices),
        },
        "steps": [
            {"proponents": _rows(pro, x[:, t], t, matrices), "opponents": _rows(opp, x[:, t], t, matrices)}
            for t, (pro, opp) in enumerate(lists[1:])
        ],
    }


def _check_sum(mat: np.ndarray, steps: np.ndarray, i: int, j: int, width: int, length: int) -> None:
    """positions.sum(-1) == sdi for one (train, query) pair, to float32 accuracy: a mismatch means the two
    arrays are not from the same run (or the per-position values are wrong)."""
    err = np.abs(mat.sum(-1) - steps)
    tol = 1e-4 * (np.abs(mat).sum(-1) + np.abs(steps)) + 1e-30
    if (err > tol).any():
        t = int(np.argmax(err / tol))
        cut = f" (the first {length} of L = {width} positions: is the token count right?)" if length < width else ""
        raise ConfigError(
            f"positions[{i}, {j}, {t}].sum() = {mat[t].sum():.6g}{cut} but sdi[{i}, {j}, {t}] = {steps[t]:.6g}: "
            "the per-position values must sum to the scores (are they from the same run?)"
        )

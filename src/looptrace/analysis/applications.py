"""The applications the paper names (its section 1), as tools on SDI arrays and per-step predictions.

* **influence horizon** (i): when does step-resolved influence die out, and can that set a test-time
  loop budget? :func:`influence_horizon` / :func:`influence_horizons` (a fraction of the peak),
  :func:`cumulative_horizons` (a share of the total); the budget a query actually needs,
  :func:`needed_budgets`; the standard stopping rules to compare with, :func:`stop_when_stable` and
  :func:`stop_when_confident`; :func:`outcome_at_stop` and :func:`saturation_budget`.
* **signal cancellation** (ii): pairs whose TracIn is small only because steps cancel
  (:func:`cancellation_pairs`), how much of a pair's per-step mass cancels (:func:`cancelled_mass`,
  :func:`step_cancellation`), and which training examples cancel most, with a control that has as
  little TracIn and no cancellation (:func:`cancelling_examples`).
* **depth-targeted curation** (iii): rank training examples by late- vs early-step influence
  (:func:`depth_ranking`, :func:`export_ranking`).

Arrays in, arrays out: nothing here trains, loops or loads a model. Shapes: ``sdi`` is ``[N train, M
query, tau]`` (test-side SDI, as :func:`looptrace.sdi` returns it), steps are 1-based in every result.
What each one assumes is stated in its docstring; ``docs/results/applications`` measures whether the
assumptions hold on looped models that are retrained and re-run (issue #27).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

from looptrace.errors import ConfigError


def sdi_energy(sdi: np.ndarray) -> np.ndarray:
    """Per-query energy e_j(t) = sum_i |SDI(z_i, z'_j)_t|: [N, M, tau] -> [M, tau]."""
    return np.abs(np.asarray(sdi)).sum(0)


def influence_horizon(energy: np.ndarray, frac: float = 0.05) -> int:
    """The first 1-based step after which energy stays below ``frac`` x its peak (len+1 if never).

    ``energy``: [tau] (e.g. the median energy curve over queries: the paper's population horizon).
    Assumes the energy is comparable across steps (one analysis horizon tau for every query) and that
    influence which dies out marks computation that is finished; a curve that never falls below
    ``frac`` of its peak gives tau.
    """
    e = np.asarray(energy, dtype=np.float64)
    if e.size == 0 or e.max() <= 0:
        return 0
    above = np.nonzero(e >= frac * e.max())[0]
    return int(above[-1] + 1) if above.size else 0


def influence_horizons(energy: np.ndarray, frac: float = 0.05) -> np.ndarray:
    """:func:`influence_horizon` of every query: ``[M, tau] -> [M]`` ints in ``1..tau`` (0 for a query
    with no energy). The per-instance version the paper proposes as a stopping criterion."""
    e = np.asarray(energy, dtype=np.float64)
    if e.ndim != 2:
        raise ConfigError(f"energy must be [M queries, tau steps], got shape {e.shape}")
    peak = e.max(1, keepdims=True)
    above = e >= frac * peak
    last = e.shape[1] - np.argmax(above[:, ::-1], axis=1)  # 1-based index of the last step above
    return np.where(peak[:, 0] > 0, last, 0)


def cumulative_horizons(energy: np.ndarray, share: float = 0.9) -> np.ndarray:
    """Per query, the first 1-based step by which the energy summed from step 1 reaches ``share`` of its
    total: ``[M, tau] -> [M]`` (0 for a query with no energy). Unlike :func:`influence_horizons` it
    does not depend on the peak alone, so a slow tail after an early peak moves it less."""
    if not 0 < share <= 1:
        raise ConfigError(f"share must lie in (0, 1], got {share}")
    e = np.asarray(energy, dtype=np.float64)
    if e.ndim != 2:
        raise ConfigError(f"energy must be [M queries, tau steps], got shape {e.shape}")
    total = e.sum(1, keepdims=True)
    reached = np.cumsum(e, 1) >= share * total * (1 - 1e-12)
    return np.where(total[:, 0] > 0, np.argmax(reached, axis=1) + 1, 0)


def needed_budgets(score: np.ndarray, budgets: Sequence[int]) -> np.ndarray:
    """The loop budget each query actually needs: the smallest budget from which its score is at least
    its score at the largest budget and stays so at every larger budget.

    Args:
        score: ``[B, M]``, each query's outcome at each budget: bool (prediction right) or a fraction
            (e.g. the share of a Sudoku board's blank cells that are right).
        budgets: the ``B`` budgets, increasing.

    Returns:
        ``[M]`` ints: with a bool score, the smallest budget from which the prediction is right and stays
        right; 0 where the score at the largest budget is 0 (never right: no budget is enough).
    """
    s = np.asarray(score, dtype=np.float64)
    b = np.asarray(budgets)
    if s.ndim != 2 or s.shape[0] != b.size:
        raise ConfigError(f"score must be [B budgets, M queries] with B = {b.size}, got shape {s.shape}")
    if np.any(np.diff(b) <= 0):
        raise ConfigError(f"budgets must increase, got {list(b)}")
    final = s[-1]
    ok = s >= final - 1e-12  # [B, M]
    stays = np.flip(np.cumprod(np.flip(ok, 0), 0), 0).astype(bool)  # at this budget and every larger one
    first = np.argmax(stays, axis=0)
    return np.where(final > 0, b[first], 0)


def stop_when_stable(predictions: np.ndarray, k: int) -> np.ndarray:
    """The baseline stopping rule: stop at the first step whose prediction equals that of each of the
    ``k`` steps before it. ``predictions``: ``[T, M, ...]`` at steps 1..T (trailing axes, e.g. a
    board's cells, must all agree); returns ``[M]`` 1-based steps (T where it never settles)."""
    p = np.asarray(predictions)
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    t_max, m = p.shape[0], p.shape[1]
    same = (p[1:] == p[:-1]).reshape(t_max - 1, m, -1).all(-1)  # [T-1, M]: step t+1 equals step t
    stop = np.full(m, t_max)
    run = np.zeros(m, dtype=np.int64)
    for t in range(t_max - 1):  # run[j]: how many consecutive steps up to t+2 repeated their predecessor
        run = np.where(same[t], run + 1, 0)
        hit = (run >= k) & (stop == t_max)
        stop[hit] = t + 2
    return stop


def stop_when_confident(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """The other baseline: stop at the first step whose confidence (e.g. the top softmax probability,
    or its minimum over a board's cells) reaches ``threshold``. ``confidence``: ``[T, M]``; returns
    ``[M]`` 1-based steps (T where it never does)."""
    c = np.asarray(confidence, dtype=np.float64)
    hit = c >= threshold
    return np.where(hit.any(0), np.argmax(hit, axis=0) + 1, c.shape[0])


def outcome_at_stop(score: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Each query's outcome at its stopping step: ``score`` ``[T, M]`` at steps 1..T, ``stop`` ``[M]``
    1-based (clipped to 1..T) -> ``[M]``."""
    s = np.asarray(score)
    idx = np.clip(np.asarray(stop, dtype=np.int64), 1, s.shape[0]) - 1
    return s[idx, np.arange(s.shape[1])]


def saturation_budget(budgets: Sequence[int], accuracy: Sequence[float], tol: float = 0.005) -> int:
    """The smallest budget whose accuracy is within ``tol`` of the best over ``budgets``: where a
    population's accuracy saturates, to compare with the horizon of its median energy curve."""
    a = np.asarray(accuracy, dtype=np.float64)
    if a.size != len(budgets) or a.size == 0:
        raise ConfigError(f"need one accuracy per budget, got {a.size} for {len(budgets)} budgets")
    return int(np.asarray(budgets)[np.argmax(a >= a.max() - tol)])


def cancelled_mass(sdi: np.ndarray) -> np.ndarray:
    """How much per-step influence cancels in TracIn: sum_t |SDI_t| - |sum_t SDI_t| >= 0, ``[N, M, tau]
    -> [N, M]`` (0 when every step has the same sign)."""
    s = np.asarray(sdi, dtype=np.float64)
    return np.abs(s).sum(-1) - np.abs(s.sum(-1))


def step_cancellation(values: np.ndarray, ratio: float = 0.1, floor: float = 0.1) -> dict[str, np.ndarray]:
    """Whether per-step effects cancel: ``values`` ``[..., tau]`` (predicted SDI_t, or measured per-step
    loss changes) -> arrays over the leading axes.

    ``score``: 1 - |sum_t v_t| / sum_t |v_t| (1: a perfect cancellation, 0: one sign); ``small_sum``:
    |sum| < ``ratio`` x sum |v_t| (the criterion of :func:`cancellation_pairs`); ``opposite``: some step is
    positive and another negative, each by at least ``floor`` x the largest |v_t| (so that rounding noise
    around zero does not count); ``cancels``: both.
    """
    v = np.asarray(values, dtype=np.float64)
    mass = np.abs(v).sum(-1)
    total = np.abs(v.sum(-1))
    big = np.abs(v).max(-1, keepdims=True) * floor
    opposite = ((v > big) & (big > 0)).any(-1) & ((v < -big) & (big > 0)).any(-1)
    small = (total < ratio * mass) & (mass > 0)
    score = np.where(mass > 0, 1 - total / np.where(mass > 0, mass, 1.0), 0.0)
    return {"score": score, "small_sum": small, "opposite": opposite, "cancels": small & opposite}


def cancellation_scores(sdi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: (TracIn, mass sum_t |SDI_t|, cancellation 1 - |TracIn| / mass), each ``[..., N, M]``.

    The cancellation is 0 when every step acts with one sign (or the mass is 0) and near 1 when the steps
    almost cancel (a small TracIn hiding large step-resolved influence)."""
    s = np.asarray(sdi, dtype=np.float64)
    tracin = s.sum(-1)
    mass = np.abs(s).sum(-1)
    score = np.where(mass > 0, 1 - np.abs(tracin) / np.maximum(mass, 1e-300), 0.0)
    return tracin, mass, score


def query_cancellation(sdi: np.ndarray) -> np.ndarray:
    """Per query, the share of its step-resolved influence that cancels across steps: ``[N, M, tau] -> [M]``,
    1 - sum_i |TracIn_ij| / sum_i sum_t |SDI_ijt| (the pairs' cancellations weighted by their mass; 0 where
    the query has no mass)."""
    tracin, mass, _ = cancellation_scores(sdi)
    total = mass.sum(0)
    return np.where(total > 0, 1 - np.abs(tracin).sum(0) / np.maximum(total, 1e-300), 0.0)


def cancellation_pairs(sdi: np.ndarray, ratio: float = 0.1, top: int = 20) -> list[dict[str, float]]:
    """Pairs (i, j) with |TracIn| < ratio * sum_t |SDI_t|, strongest cancellation first.

    Assumes that SDI_t is the effect of z_i's training at step t of z'_j's computation (first order,
    summed over checkpoints), so a small sum of large opposite terms is an effect that TracIn hides;
    ``docs/results/applications`` checks this against the per-step counterfactual.
    """
    tracin, mass, score = cancellation_scores(sdi)
    mask = (np.abs(tracin) < ratio * mass) & (mass > 0)
    idx = np.argwhere(mask)
    order = np.argsort(-(score[mask] * mass[mask]))[:top]
    return [
        {
            "train": int(idx[o][0]),
            "query": int(idx[o][1]),
            "tracin": float(tracin[tuple(idx[o])]),
            "abs_sdi_mass": float(mass[tuple(idx[o])]),
            "cancellation": float(score[tuple(idx[o])]),
        }
        for o in order
    ]


def cancelling_examples(sdi: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The ``k`` training examples whose per-step influence cancels most, and a control of ``k`` others
    with as much |TracIn| and little cancellation.

    Per example i, over the queries: ``cancelled`` = sum_j :func:`cancelled_mass` (the influence TracIn
    hides), ``abs_tracin`` = sum_j |TracIn_ij| (what TracIn shows), ``ratio`` = cancelled / sum_j sum_t
    |SDI_t|. ``cancelling``: the ``k`` largest ``cancelled``. ``control``: for each of them in turn, the
    unused example with ``ratio`` at most the median whose ``abs_tracin`` is closest (on a log scale): the same
    visible influence, nothing hidden. Needs ``k`` such examples outside the cancelling set.
    """
    s = np.asarray(sdi, dtype=np.float64)
    n = s.shape[0]
    if not 0 < k <= n // 2:
        raise ConfigError(f"k must lie in 1..{n // 2} (half the {n} training examples), got {k}")
    cancelled = cancelled_mass(s).sum(1)
    abs_tracin = np.abs(s.sum(-1)).sum(1)
    mass = np.abs(s).sum((1, 2))
    ratio = np.where(mass > 0, cancelled / np.where(mass > 0, mass, 1.0), 0.0)
    cancelling = np.argsort(-cancelled, kind="stable")[:k]
    pool = np.ones(n, dtype=bool)
    pool[cancelling] = False
    pool &= ratio <= np.median(ratio)
    if pool.sum() < k:
        raise ConfigError(f"only {int(pool.sum())} examples cancel no more than the median; need {k} for the control")
    log_t = np.log(np.maximum(abs_tracin, 1e-300))
    control = []
    for i in cancelling:
        cand = np.nonzero(pool)[0]
        j = int(cand[np.argmin(np.abs(log_t[cand] - log_t[i]))])
        control.append(j)
        pool[j] = False
    return {"cancelling": cancelling, "control": np.array(control), "cancelled": cancelled,
            "abs_tracin": abs_tracin, "ratio": ratio}  # fmt: skip


def depth_ranking(sdi: np.ndarray, split_step: int) -> np.ndarray:
    """Per train example: (late - early) signed influence summed over queries; late = steps > split_step.

    Returns ``[N, 3]`` columns (early, late, late - early). Assumes that the sign of a step's influence
    says whether the example helps (positive) or hurts at that step; measured against retraining in
    ``docs/results/eval`` and ``docs/results/applications``, where the late end of the ranking turned
    out to collect mislabelled examples rather than refinement.
    """
    s = np.asarray(sdi, dtype=np.float64)
    early = s[..., :split_step].sum((1, 2))
    late = s[..., split_step:].sum((1, 2))
    return np.stack([early, late, late - early], axis=1)


def export_ranking(scores: np.ndarray, path: str | os.PathLike[str], ids: list[str] | None = None) -> None:
    """Write the depth-targeted ranking (most late-step-influential first) as CSV."""
    order = np.argsort(-scores[:, 2])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "example", "early", "late", "late_minus_early"])
        for r, i in enumerate(order):
            w.writerow([r + 1, ids[i] if ids else int(i), *(f"{v:.6g}" for v in scores[i])])

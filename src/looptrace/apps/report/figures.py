"""Matplotlib figures with labelled axes and units. Each function takes arrays and writes one PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from looptrace.extras import require


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported when the first figure is drawn (the command line and
    the case studies' registrations import this module without the ``studies`` extra)."""
    require("studies", "drawing figures")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subplots(*args: Any, **kwargs: Any) -> Any:
    return _pyplot().subplots(*args, **kwargs)


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def sdi_and_margin(
    profile: np.ndarray, margin: np.ndarray, readout: int, path: str | os.PathLike[str], title: str
) -> Path:
    """Summed SDI profile and logit margin per loop iteration, sharing the step axis."""
    steps = np.arange(1, len(profile) + 1)
    fig, ax = _subplots(figsize=(8, 3.6))
    ax.plot(steps, profile, "o-", color="C0", ms=3, label="summed SDI over train set")
    ax.set_xlabel("loop iteration t")
    ax.set_ylabel("summed SDI (eta x loss^2 units)", color="C0")
    ax.axvline(readout, color="gray", ls="--", lw=1)
    ax.text(readout, ax.get_ylim()[1], f" read-out n={readout}", va="top", fontsize=8, color="gray")
    ax2 = ax.twinx()
    ax2.plot(np.arange(1, len(margin) + 1), margin, "s-", color="C3", ms=3, label="logit margin")
    ax2.set_ylabel("logit margin (true - other, nats)", color="C3")
    ax.set_title(title)
    return _save(fig, path)


def autocorr_and_cosine(ac: np.ndarray, cos: np.ndarray, period: int, path: str | os.PathLike[str]) -> Path:
    fig, axes = _subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(np.arange(len(ac)), ac, color="C0")
    axes[0].set_xlabel("lag (iterations)")
    axes[0].set_ylabel("autocorrelation of margin")
    axes[0].set_title(f"detected period p = {period}")
    axes[1].plot(np.arange(1, len(cos) + 1), cos, "o-", ms=3)
    axes[1].set_xlabel("loop iteration t")
    axes[1].set_ylabel(f"cos(h_t, h_(t+{period}))")
    axes[1].set_ylim(-1.05, 1.05)
    axes[1].set_title("answer-token state recurrence")
    return _save(fig, path)


def phase_portrait(z: np.ndarray, labels: np.ndarray, trans: np.ndarray, path: str | os.PathLike[str]) -> Path:
    fig, axes = _subplots(1, 2, figsize=(9.5, 3.8))
    ax = axes[0]
    ax.plot(z[:, 0], z[:, 1], "-", color="lightgray", lw=1, zorder=1)
    sc = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=22, zorder=2)
    for t in (0, len(z) - 1):
        ax.annotate(f"t={t + 1}", z[t], fontsize=8)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("answer-token trajectory (k-means states)")
    fig.colorbar(sc, ax=ax, label="state")
    im = axes[1].imshow(trans, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(trans):
        axes[1].text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    axes[1].set_xticks(range(len(trans)))
    axes[1].set_yticks(range(len(trans)))
    axes[1].set_xlabel("next state")
    axes[1].set_ylabel("state")
    axes[1].set_title("row-normalised transitions")
    fig.colorbar(im, ax=axes[1])
    return _save(fig, path)


def energy_curves(
    energy: np.ndarray, path: str | os.PathLike[str], title: str, groups: dict[str, np.ndarray] | None = None
) -> Path:
    """Median and IQR of per-query SDI energy vs step (log y). ``energy``: [M, tau]."""
    fig, ax = _subplots(figsize=(7, 3.6))
    groups = groups or {"all queries": np.arange(len(energy))}
    steps = np.arange(1, energy.shape[1] + 1)
    for k, (name, idx) in enumerate(groups.items()):
        e = energy[idx]
        med, lo, hi = np.median(e, 0), np.quantile(e, 0.25, 0), np.quantile(e, 0.75, 0)
        ax.plot(steps, np.maximum(med, 1e-30), color=f"C{k}", label=name)
        ax.fill_between(steps, np.maximum(lo, 1e-30), np.maximum(hi, 1e-30), color=f"C{k}", alpha=0.25)
    ax.set_yscale("log")
    ax.set_xlabel("loop iteration t")
    ax.set_ylabel("SDI energy sum_i |SDI_t| (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def lines(
    x: np.ndarray,
    ys: dict[str, np.ndarray],
    path: str | os.PathLike[str],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
) -> Path:
    fig, ax = _subplots(figsize=(7, 3.6))
    for k, (name, y) in enumerate(ys.items()):
        ax.plot(x, y, "o-", ms=3, color=f"C{k}", label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def intervals(
    labels: list[str], means: list[float], los: list[float], his: list[float], path: str | os.PathLike[str],
    xlabel: str, title: str,
) -> Path:  # fmt: skip
    """One horizontal bar per label with its confidence interval."""
    fig, ax = _subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    y = np.arange(len(labels))
    ax.barh(y, means, color="C0", alpha=0.7)
    ax.errorbar(
        means,
        y,
        xerr=[np.array(means) - np.array(los), np.array(his) - np.array(means)],
        fmt="none",
        color="k",
        capsize=3,
    )
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.invert_yaxis()
    return _save(fig, path)


def loglog(
    x: np.ndarray, ys: dict[str, np.ndarray], path: str | os.PathLike[str], xlabel: str, ylabel: str, title: str
) -> Path:
    fig, ax = _subplots(figsize=(7, 3.6))
    for k, (name, y) in enumerate(ys.items()):
        ax.loglog(x, y, "o-", ms=3, color=f"C{k}", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)

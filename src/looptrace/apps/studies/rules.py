"""The pieces every study's verdict rules are written with (:mod:`looptrace.apps.studies.verdicts` runs them):
the verdict words, one write-up directory's JSON files, one row, and two helpers over runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from looptrace.errors import ConfigError

#: the verdict words a row may carry (a rule that returns another one is a bug)
VERDICTS = (
    "reproduced",
    "reproduced in direction",
    "partly",
    "not reproduced",
    "holds by construction",
    "not comparable",
    "not in the paper",
)


class Docs:
    """The JSON files of one write-up directory, read once each (``docs("results.json")``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        if name not in self._cache:
            path = self.directory / name
            try:
                self._cache[name] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"verdicts of {self.directory}: cannot read {path} ({exc})") from exc
        return self._cache[name]

    @property
    def read(self) -> list[str]:
        return sorted(self._cache)


def row(verdict: str, why: str, cites: str, **evidence: Any) -> dict[str, Any]:
    """One verdict: the word(s), the clause that justifies them, where the paper states the finding, and the
    numbers the rule read."""
    if verdict not in VERDICTS:
        raise ConfigError(f"verdict {verdict!r} is not one of {VERDICTS}")
    if "|" in why or "|" in cites:  # the text goes into a Markdown table cell, where "|" starts a new cell
        raise ConfigError(f"a verdict's text may not contain '|' (it is shown in a table): {why!r}")
    return {
        "verdict": verdict,
        "why": why,
        "text": f"{verdict}: {why}" if why else verdict,
        "cites": cites,
        "evidence": evidence,
    }


def in_all(values: list[float], pred: Callable[[float], bool]) -> bool:
    return bool(values) and all(pred(v) for v in values)


def span(values: list[float], fmt: str = ".3f") -> str:
    """'a to b' over runs (or the one value)."""
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}} to {hi:{fmt}}"

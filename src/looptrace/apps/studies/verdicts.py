"""The verdicts of the case-study write-ups, derived from their committed JSON by one rule per row.

A write-up's point-by-point table says, finding by finding, whether the paper's result holds here. Each
row's verdict is a field of ``verdicts.json`` beside the write-up, written by its study's rules
(``looptrace.apps.studies.<study>.verdicts``) from the directory's other JSON files (results, the spread over
seeds, the paper's values, the training log), never by hand::

    python -m looptrace.apps.studies.verdicts                      # every write-up below
    python -m looptrace.apps.studies.verdicts docs/results/parity  # one

and ``tests/test_writeups.py`` derives every row again from the committed numbers, so a verdict that no
longer matches its numbers fails the suite. A row is::

    {"verdict": "reproduced" | "partly" | "not reproduced" | "holds by construction" | ...,
     "why": the clause that says which numbers decided it,
     "text": "verdict: why" (what the table shows),
     "cites": where in the paper the finding is stated (section, figure, table),
     "evidence": the numbers the rule read}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from looptrace.errors import ConfigError
from looptrace.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[4]

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


def _rules() -> dict[str, Callable[[Docs], dict[str, dict[str, Any]]]]:
    from looptrace.apps.studies.parity.verdicts import rules as parity
    from looptrace.apps.studies.recursive_gpt.verdicts import rules as recursive_gpt
    from looptrace.apps.studies.sudoku.verdicts import rules as sudoku

    return {"parity": parity, "sudoku": sudoku, "recursive-gpt": recursive_gpt}


#: write-up directories with verdicts, by the study whose rules derive them
DIRECTORIES = {
    "parity": ROOT / "docs" / "results" / "parity",
    "sudoku": ROOT / "docs" / "results" / "sudoku",
    "recursive-gpt": ROOT / "docs" / "results" / "recursive-gpt",
}


def derive(directory: Path, study: str | None = None) -> dict[str, Any]:
    """The verdicts the rules give on the JSON now in ``directory`` (``study``: whose rules; default: the
    directory's name)."""
    directory = Path(directory)
    name = study or directory.name
    rules = _rules()
    if name not in rules:
        raise ConfigError(f"no verdict rules for {name!r} (known: {sorted(rules)}); pass study=")
    docs = Docs(directory)
    rows = rules[name](docs)
    return {
        "format": "looptrace-verdicts",
        "study": name,
        "derived_by": f"python -m looptrace.apps.studies.verdicts {_shown(directory)}",
        "sources": docs.read,
        "rows": rows,
    }


def _shown(directory: Path) -> str:
    try:
        return str(directory.resolve().relative_to(ROOT))
    except ValueError:
        return str(directory)


def stale(directory: Path, study: str | None = None) -> list[str]:
    """Rows of the committed ``verdicts.json`` that the rules no longer give on the directory's numbers (each
    as "KEY: committed -> derived"), and rows present in only one of the two."""
    try:
        committed = json.loads((Path(directory) / "verdicts.json").read_text())["rows"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        return [f"verdicts.json: unreadable ({exc})"]
    derived = json.loads(json.dumps(derive(directory, study)["rows"]))  # as it would be written
    out = [f"{k}: only in verdicts.json" for k in committed if k not in derived]
    out += [f"{k}: not in verdicts.json" for k in derived if k not in committed]
    for k in committed.keys() & derived.keys():
        if committed[k] != derived[k]:
            out.append(f"{k}: {committed[k]['text']!r} -> {derived[k]['text']!r}")
    return sorted(out)


def write(directory: Path, study: str | None = None) -> Path:
    out = Path(directory) / "verdicts.json"
    atomic_write_bytes(out, (json.dumps(derive(directory, study), indent=2) + "\n").encode())
    return out


def main(argv: list[str]) -> None:
    for d in argv or [str(p) for p in DIRECTORIES.values()]:
        print(f"derived {write(Path(d))}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""``python -m looptrace.apps.studies.sudoku.rederive [DIR ...]``: recompute each run's comparison and the
spread over runs (``seeds.json``) from the ``results.json`` files already in DIR (default
``docs/results/sudoku``), without the models (:func:`looptrace.apps.studies.sudoku.study.rederive`)."""

from __future__ import annotations

import sys
from pathlib import Path

from looptrace.apps.studies.sudoku.study import rederive


def main(argv: list[str]) -> None:
    for d in argv or ["docs/results/sudoku"]:
        print(f"rederived {rederive(Path(d))}")


if __name__ == "__main__":
    main(sys.argv[1:])

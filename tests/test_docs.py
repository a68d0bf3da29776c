"""The documentation runs: every code block of the quickstart and the guides executes, the CLI reference
is current, and the site builds with warnings as errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXECUTED = [
    "index.md",
    "guide/huggingface.md",
    "guide/inkling.md",
    "guide/hrm-text.md",
    "guide/training-loop.md",
    "guide/recurrent-depth.md",
    "guide/evaluation.md",
    "guide/which-estimator.md",
]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", EXECUTED)
def test_every_code_block_runs(page: str, tmp_path, monkeypatch) -> None:
    if page in ("guide/huggingface.md", "guide/inkling.md", "guide/hrm-text.md"):
        pytest.importorskip("transformers")
    blocks = python_blocks(DOCS / page)
    assert blocks, f"{page} has no python code block"
    monkeypatch.chdir(tmp_path)  # pages write their checkpoints into the working directory
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page}, code block {i} fails: {type(exc).__name__}: {exc}\n{block}") from exc


def test_the_quickstart_is_under_20_lines_and_in_the_readme() -> None:
    block = python_blocks(DOCS / "index.md")[0]
    assert len(block.strip().splitlines()) < 20, "the quickstart must stay under 20 lines"
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:60])
    assert "pip install looptrace" in first_screen and block.strip() in readme, (
        "README's first screen: pip install + quickstart"
    )


def test_cli_reference_is_current() -> None:
    from looptrace.apps.cli_reference import reference_markdown

    assert (DOCS / "reference" / "cli.md").read_text() == reference_markdown(), (
        "docs/reference/cli.md is stale: run `python -m looptrace.apps.cli_reference docs/reference/cli.md`"
    )
    # a default of 0 is a default (0 == False in Python: the table hid every zero default)
    assert "| `--seed` | seed of the target sampling (true Fisher) | `0` |" in reference_markdown()


def test_site_builds_with_warnings_as_errors(tmp_path) -> None:
    pytest.importorskip("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stderr[-3000:]}"
    assert (tmp_path / "site" / "guide" / "huggingface" / "index.html").exists()

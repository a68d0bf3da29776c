"""Every number in a write-up comes from a committed file: each README is the rendering of its template,
and the template writes no number outside a placeholder."""

from __future__ import annotations

from pathlib import Path

import pytest

from looptrace.apps.writeup import bare_numbers, render

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "docs").rglob("README.template.md"))


@pytest.mark.parametrize("template", TEMPLATES, ids=[str(t.parent.relative_to(ROOT)) for t in TEMPLATES])
def test_readme_is_the_rendering_of_its_template(template: Path) -> None:
    readme = template.parent / "README.md"
    assert readme.exists(), f"{readme} is missing: run `python -m looptrace.apps.writeup {template.parent}`"
    assert readme.read_text() == render(template.read_text(), template.parent), (
        f"{readme} is not the rendering of its template (a number was edited by hand, or the JSON changed): run "
        f"`python -m looptrace.apps.writeup {template.parent.relative_to(ROOT)}`"
    )


@pytest.mark.parametrize("template", TEMPLATES, ids=[str(t.parent.relative_to(ROOT)) for t in TEMPLATES])
def test_templates_write_numbers_only_through_placeholders(template: Path) -> None:
    bare = bare_numbers(template.read_text())
    assert not bare, f"{template} writes numbers outside placeholders: {bare[:10]}; quote them from a JSON file"


def test_the_readme_results_section_is_rendered_from_its_template() -> None:
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- results: rendered from docs/results/summary.template.md -->", "<!-- results: end -->"
    assert start in readme and end in readme, "README.md lost its generated results section markers"
    section = readme.split(start, 1)[1].split(end, 1)[0].strip("\n")
    template = (ROOT / "docs" / "results" / "summary.template.md").read_text()
    assert section == render(template, ROOT / "docs" / "results").strip("\n"), (
        "README.md's results section is stale: run `python -m looptrace.apps.writeup --readme`"
    )
    assert not bare_numbers(template), f"the results summary writes bare numbers: {bare_numbers(template)[:10]}"


def test_the_checks_catch_planted_numbers(tmp_path) -> None:
    (tmp_path / "r.json").write_text('{"a": {"b": [0.5, 2]}}')
    text = "ratio {{r.json:a.b[0]|.2f}} and step 3 of Fig. 2; a bare 0.75 and 12 seeds"
    assert render(text, tmp_path).startswith("ratio 0.50")
    assert bare_numbers(text) == ["0.75", "12"]

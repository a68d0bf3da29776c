"""Every number in a write-up comes from a committed file: each README is the rendering of its template,
and the template writes no number outside a placeholder."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from looptrace.apps.studies import verdicts as vd
from looptrace.apps.writeup import SECTIONS, bare_numbers, render, section_markers

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


@pytest.mark.parametrize(("page", "template", "name"), SECTIONS, ids=[s[0] for s in SECTIONS])
def test_generated_sections_are_rendered_from_their_templates(page: str, template: str, name: str) -> None:
    """A hand-written page's generated section (the guide's LDS table) is the rendering of its template, which
    writes no bare number. Catches a number typed into the page by hand, or a JSON changed without re-rendering."""
    text = (ROOT / page).read_text()
    start, end = section_markers(template, name)
    assert start in text and end in text, f"{page} lost its generated section markers ({start} ... {end})"
    section = text.split(start, 1)[1].split(end, 1)[0].strip("\n")
    src = ROOT / template
    assert section == render(src.read_text(), src.parent).strip("\n"), (
        f"{page}'s generated section is stale: run `python -m looptrace.apps.writeup --sections`"
    )
    assert not bare_numbers(src.read_text()), f"{template} writes bare numbers: {bare_numbers(src.read_text())[:10]}"


def test_the_checks_catch_planted_numbers(tmp_path) -> None:
    (tmp_path / "r.json").write_text('{"a": {"b": [0.5, 2]}}')
    text = "ratio {{r.json:a.b[0]|.2f}} and step 3 of Fig. 2; a bare 0.75 and 12 seeds"
    assert render(text, tmp_path).startswith("ratio 0.50")
    assert bare_numbers(text) == ["0.75", "12"]


# --- verdicts: every verdict a case-study write-up states is a field of its verdicts.json, derived by a rule

STUDIES = sorted(vd.DIRECTORIES)


def _table_rows(template: str) -> list[str]:
    """The body rows of the template's point-by-point table(s): lines that start a table row after a
    "## Point by point" heading, before the next heading."""
    out, inside = [], False
    for line in template.splitlines():
        if line.startswith("## "):
            inside = line.startswith("## Point by point")
            continue
        if inside and line.startswith("|") and not re.match(r"^\|\s*-", line) and "the paper's finding" not in line:
            out.append(line)
    return out


@pytest.mark.parametrize("study", STUDIES)
def test_verdicts_follow_from_the_committed_numbers(study: str) -> None:
    """Each committed verdict is what its rule gives on the committed JSON. Catches: a result re-run (or a
    number edited) without re-deriving the verdicts, so that a row still says "reproduced" over numbers that
    no longer support it."""
    directory = vd.DIRECTORIES[study]
    assert not vd.stale(directory), (
        f"{directory}/verdicts.json no longer matches its numbers: {vd.stale(directory)[:5]}; run "
        f"`python -m looptrace.apps.studies.verdicts {directory.relative_to(ROOT)}` and re-render the write-up"
    )


@pytest.mark.parametrize("study", STUDIES)
def test_each_table_row_takes_its_verdict_and_citation_from_verdicts_json(study: str) -> None:
    """Every row of the point-by-point table ends in one verdict placeholder and cites the paper through the
    same row's ``cites``, and every derived verdict is shown. Catches: a verdict typed into the template (which
    no test would hold to its numbers), a row without the paper's section or figure, a derived verdict nobody
    reads."""
    directory = vd.DIRECTORIES[study]
    template = (directory / "README.template.md").read_text()
    rows = _table_rows(template)
    assert rows, f"{directory}: no point-by-point table found"
    derived = json.loads((directory / "verdicts.json").read_text())["rows"]
    shown = []
    for line in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        m = re.fullmatch(r"\{\{verdicts\.json:rows\.([\w-]+)\.text\}\}", cells[-1])
        assert m, f"{directory}: the verdict cell of {line[:80]!r}... is not one verdicts.json placeholder"
        key = m.group(1)
        assert f"{{{{verdicts.json:rows.{key}.cites}}}}" in cells[0], (
            f"{directory}: row {key!r} does not cite the paper"
        )
        assert re.search(r"(section|Fig\.|Table|appendix)", derived[key]["cites"]), derived[key]["cites"]
        shown.append(key)
    unread = sorted(
        k
        for k in set(derived) - set(shown)
        if not re.search(rf"\{{\{{verdicts\.json:rows\.{k}\.(text|why)\}}\}}", template)
    )
    assert not unread, f"{directory}: verdicts derived but shown nowhere in the write-up: {unread}"


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("study", "file", "change", "row"),
    [
        # parity: the profile's largest magnitude moved to the read-out step -> the final peak is reproduced
        ("parity", "results.json",
         lambda d: d["comparison"]["sdi_profile"].update(largest_magnitude_step=d["probe"]["readout"]), "sdi_final_peak"),
        # parity: a seed below the stopping threshold at length 40
        ("parity", "train_time.json", lambda d: d["seeds"][0].update(accuracy_length_40=0.5), "length"),
        # sudoku: one seed's late-mass difference turned negative -> no longer the same direction in every seed
        ("sudoku", "seeds.json",
         lambda d: d["comparison"]["late_hard_minus_easy_on_hard_test"]["values"].__setitem__(0, -0.01), "late_hard_test"),
        # recursive LM: the last step's share below one half at some r
        ("recursive-gpt", "results.json", lambda d: d["comparison"].update(last_step_fraction_min=0.3), "last_step"),
        # recursive LM: a sketched run must not pass for the exact one on signed rows
        ("recursive-gpt", "results.json", lambda d: d["comparison"].update(exact=False), "signed_cumulative"),
    ],
)  # fmt: skip
def test_a_verdict_that_no_longer_matches_its_numbers_fails(tmp_path, study, file, change, row) -> None:
    """Planted: one number changed in a copy of the committed write-up directory. The row that rests on it must
    change its verdict word, and the committed verdicts.json must then be reported stale. Catches: rules that
    ignore the numbers they cite (a verdict that would survive any result)."""
    directory = tmp_path / study
    shutil.copytree(vd.DIRECTORIES[study], directory)
    before = vd.derive(directory, study)["rows"][row]["verdict"]
    _edit_json(directory / file, change)
    after = vd.derive(directory, study)["rows"][row]["verdict"]
    assert after != before, f"changing {file} left {row!r} at {before!r}"
    found = vd.stale(directory, study)
    assert any(s.startswith(f"{row}:") for s in found), f"the stale check missed {row!r}: {found}"


def test_verdict_rules_of_a_direction_over_seeds() -> None:
    """The Sudoku rule on planted spreads: positive in every seed with an interval above zero, positive in
    every seed with one that includes zero, both signs, all negative. Catches: a rule that calls a one-model
    or one-seed effect reproduced."""
    from looptrace.apps.studies.sudoku.verdicts import direction

    def sp(values: list[float], ci: list[float]) -> dict:
        return {"values": values, "ci95": ci}

    assert direction(sp([0.1, 0.2, 0.3], [0.05, 0.35]), "x")[0] == "reproduced"
    assert direction(sp([0.02, 0.08, 0.06], [-0.03, 0.14]), "x")[0] == "reproduced in direction"
    assert direction(sp([0.03, -0.01, 0.12], [-0.1, 0.2]), "x")[0] == "not reproduced"
    assert direction(sp([-0.1, -0.2, -0.3], [-0.4, -0.05]), "x")[0] == "not reproduced"
    assert direction(sp([1.1, 1.3, 1.2], [1.05, 1.4]), "x", ref=1.0)[0] == "reproduced"
    assert direction(sp([0.9, 1.3, 1.2], [0.7, 1.6]), "x", ref=1.0)[0] == "not reproduced"


def test_the_sudoku_spread_is_derived_from_the_committed_seeds(tmp_path) -> None:
    """``seeds.json`` and each seed's ``comparison`` are what ``rederive`` computes from the committed
    per-seed ``results.json`` (no model needed). Catches: a spread edited by hand, or one left behind when
    the per-seed figures (or the code that derives them) changed."""
    from looptrace.apps.studies.sudoku.study import rederive

    src = ROOT / "docs" / "results" / "sudoku"
    copy = tmp_path / "sudoku"
    shutil.copytree(src, copy)
    rederive(copy)
    assert json.loads((copy / "seeds.json").read_text()) == json.loads((src / "seeds.json").read_text()), (
        "docs/results/sudoku/seeds.json is stale: run `python -m looptrace.apps.studies.sudoku.rederive`"
    )
    for run in sorted(src.glob("*/results.json")):
        got = json.loads((copy / run.parent.name / "results.json").read_text())["comparison"]
        assert got == json.loads(run.read_text())["comparison"], f"{run}: comparison is stale"

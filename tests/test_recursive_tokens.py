"""The recursive-LM write-up's steps x tokens figure: its summaries are what its matrices give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ROOT / "docs" / "results" / "recursive-gpt" / "tokens.json"


def test_tokens_summaries_are_derived_from_the_committed_matrices() -> None:
    """Every summary of tokens.json (last-step share, share at the loss positions, the top position and its
    token, the means) is recomputed from the per-position matrices, and each matrix sums over positions to the
    example's SDI_t. Catches a summary edited by hand, a share over the wrong axis (positions vs steps), a
    matrix that is not the example's split, and the write-up's "in every one of them" (one top token for all
    examples) no longer holding."""
    r = json.loads(TOKENS.read_text())
    assert len(r["examples"]) == r["config"]["top"]
    for e in r["examples"]:
        mat = np.array(e["matrix"])
        mass = np.abs(mat)
        answer = np.zeros(mat.shape[1], bool)
        answer[e["answer_positions"]] = True
        scale = float(np.abs(e["sdi"]).max())
        assert np.abs(mat.sum(1) - np.array(e["sdi"])).max() <= max(r["conservation_rel"], 1e-6) * scale * 1.01, (
            f"example {e['index']}: the matrix does not sum over positions to its SDI_t (split of another example?)"
        )
        assert abs(sum(e["sdi"]) - e["tracin"]) <= 1e-9 * max(1.0, abs(e["tracin"]))
        assert np.isclose(e["last_step_share"], mass[-1].sum() / mass.sum())
        assert np.isclose(e["answer_share"], mass[:, answer].sum() / mass.sum())
        assert e["top_position"] == int(mass.sum(0).argmax())
        assert e["top_token"] == e["tokens"][e["top_position"]]
        assert np.isclose(e["top_position_share"], mass.sum(0).max() / mass.sum())
    for key in ("last_step_share", "answer_share", "top_position_share"):
        assert np.isclose(r[f"mean_{key}"], np.mean([e[key] for e in r["examples"]])), key
    assert r["top_tokens"] == sorted({e["top_token"] for e in r["examples"]})
    assert len(r["top_tokens"]) == 1, "the write-up says one token tops every example: rewrite that sentence"
    tracins = [abs(e["tracin"]) for e in r["examples"]]
    assert tracins == sorted(tracins, reverse=True), "the examples are not in order of |TracIn|"

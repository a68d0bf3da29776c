"""The explorer's data and page: rankings equal a brute-force argsort, sizes are bounded, per-position rows sum
to the scores, non-text data works, the page is self-contained; and ``looptrace explore`` on a real store."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import looptrace as lt
from looptrace.analysis import applications as app
from looptrace.explore import explorer_data, render_explorer, write_explorer
from looptrace.explore.page import compact
from looptrace.explore.stores import parse_queries
from tests.explorer_fixtures import WORDS, decode, synthetic


def brute_force(scores: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Proponents: the k largest positive scores (stable argsort, ties by index); opponents: the k most negative."""
    pro = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > 0][:k]
    opp = [int(i) for i in np.argsort(scores, kind="stable") if scores[i] < 0][:k]
    return pro, opp


def trains(rows: list[dict]) -> list[int]:
    return [r["train"] for r in rows]


@pytest.mark.parametrize(("n", "k"), [(60, 5), (9, 4), (300, 1)])
def test_top_k_equals_brute_force_argsort(n: int, k: int) -> None:
    """Every list (overall by TracIn, and at every step by SDI_t) is the brute-force argsort cut to k, ties in
    index order, proponents strictly positive and opponents strictly negative. Catches: a partial sort that
    breaks ties another way (the fixture plants exact ties: example 1 = example 0), a sign or order slip,
    zero scores listed, or an off-by-one step."""
    sdi, *_ = synthetic(n=n)
    data = explorer_data(sdi, k=k)
    assert [q["index"] for q in data["queries"]] == list(range(sdi.shape[1]))
    for q in data["queries"]:
        j = q["index"]
        want = brute_force(sdi[:, j].sum(-1), k)
        assert (trains(q["overall"]["proponents"]), trains(q["overall"]["opponents"])) == want, f"query {j} overall"
        for t in range(sdi.shape[2]):
            lists = q["steps"][t]
            want = brute_force(sdi[:, j, t], k)
            assert (trains(lists["proponents"]), trains(lists["opponents"])) == want, f"query {j} step {t + 1}"
            for r in lists["proponents"] + lists["opponents"]:
                assert r["score"] == sdi[r["train"], j, t]
    ties = [q for q in data["queries"] if {0, 1} <= set(trains(q["overall"]["proponents"]))]
    if k > 1 and n > 2:
        assert ties, "the planted tie (examples 0 and 1) should reach some proponent list"
        for q in ties:
            order = trains(q["overall"]["proponents"])
            assert order.index(0) + 1 == order.index(1), "ties are broken by index"


def test_profile_horizon_and_cancellation_come_from_the_analysis() -> None:
    """The step profile is the signed sum over training examples, and the horizon and the cancellation ratio
    are the analysis module's (not a copy). Catches: an unsigned profile (energy), a horizon from another
    energy, the cancellation of the summed profile instead of the pairs'."""
    sdi, *_ = synthetic()
    data = explorer_data(sdi, horizon_frac=0.2)
    energy = app.sdi_energy(sdi)
    cancel = app.query_cancellation(sdi)
    for q in data["queries"]:
        j = q["index"]
        np.testing.assert_allclose(q["profile"], sdi[:, j].sum(0), rtol=1e-12)
        np.testing.assert_allclose(q["energy"], energy[j], rtol=1e-12)
        assert q["horizon"] == app.influence_horizon(energy[j], 0.2)
        assert q["cancellation"] == pytest.approx(cancel[j], rel=1e-12)
        assert q["tracin"] == pytest.approx(sdi[:, j].sum(), rel=1e-9, abs=1e-12)
    assert (
        data["queries"][1]["cancellation"] > 0.8 > max(q["cancellation"] for q in data["queries"] if q["index"] != 1)
    ), "query 1's later steps undo its earlier ones: its cancellation ratio must stand out"


def test_query_cancellation_is_mass_weighted_pair_cancellation() -> None:
    """1 - sum_i |TracIn_ij| / sum_i sum_t |SDI_ijt|: 0 for one-signed steps, 1 for exact cancellation, and the
    heavier pair dominates. Catches: a plain mean of pair ratios, or the ratio of the summed profile."""
    sdi = np.zeros((2, 3, 2))
    sdi[:, 0] = [[1.0, 2.0], [3.0, 0.5]]  # one sign: no cancellation
    sdi[:, 1] = [[1.0, -1.0], [2.0, -2.0]]  # exact cancellation
    sdi[:, 2] = [[10.0, -10.0], [1.0, 1.0]]  # heavy cancelling pair + light one-signed pair
    got = app.query_cancellation(sdi)
    assert got[0] == 0 and got[1] == 1
    assert got[2] == pytest.approx(1 - 2 / 22)
    assert app.query_cancellation(np.zeros((2, 1, 3)))[0] == 0


def test_per_position_rows_sum_to_their_scores() -> None:
    """Each row's per-position values sum to its score (overall: TracIn; at step t: SDI_t) and are the
    example's positions for this query, cut to its tokens' length (ragged); the overall top-k examples carry
    their whole steps x positions matrix (rows summing to the step profile), the others none. Catches: a row
    taken at the wrong step, a matrix of another query, a transposed matrix, values past the example's length."""
    sdi, pos, train_tokens, query_tokens = synthetic()
    data = explorer_data(sdi, positions=pos, train_tokens=train_tokens, query_tokens=query_tokens, decode=decode, k=4)
    assert data["positions"] and data["positions_note"] is None
    for q in data["queries"]:
        j = q["index"]
        overall = set(trains(q["overall"]["proponents"] + q["overall"]["opponents"]))
        assert {int(i) for i, ex in q["examples"].items() if ex["matrix"] is not None} == overall
        for key, ex in q["examples"].items():
            i = int(key)
            assert len(data["train"][key]["tokens"]) == len(train_tokens[i])
            if ex["matrix"] is None:
                continue
            mat = np.asarray(ex["matrix"])
            assert mat.shape == (sdi.shape[2], len(train_tokens[i])), f"train {i}: matrix shape"
            np.testing.assert_array_equal(mat, pos[i, j, :, : len(train_tokens[i])])
            np.testing.assert_allclose(mat.sum(-1), ex["steps"], rtol=1e-12, atol=1e-12)
        for t, lists in [(None, q["overall"]), *enumerate(q["steps"])]:
            for r in lists["proponents"] + lists["opponents"]:
                i, values = r["train"], np.asarray(r["positions"])
                assert values.sum() == pytest.approx(r["score"], rel=1e-9, abs=1e-12), (j, t, i)
                want = pos[i, j, :, : len(train_tokens[i])]
                np.testing.assert_allclose(values, want.sum(0) if t is None else want[t], rtol=1e-12, atol=1e-12)


def test_positions_that_do_not_sum_to_sdi_are_refused() -> None:
    """Per-position values from another run (here: one value moved) are refused with a message naming the pair.
    Catches: the check switched off, or a tolerance so loose that it never fires."""
    sdi, pos, train_tokens, _ = synthetic()
    bad = pos.copy()
    j = 0
    i = int(np.argmax(sdi[:, j].sum(-1)))  # the top proponent: always embedded
    bad[i, j, 2, 0] += 1e-3 * np.abs(pos[i, j, 2]).sum()
    with pytest.raises(lt.ConfigError, match=rf"positions\[{i}, {j}, 2\].*must sum to the scores"):
        explorer_data(sdi, positions=bad, train_tokens=train_tokens, k=3)
    cut = [t[:-1] if n == i else t for n, t in enumerate(train_tokens)]  # one token too few: a value is cut off
    with pytest.raises(lt.ConfigError, match="is the token count right"):
        explorer_data(sdi, positions=pos, train_tokens=cut, k=3)


def test_non_text_data_shows_indices_and_values() -> None:
    """No tokens and no decoder: rows carry values for all L positions, no strings; token ids without a
    decoder are shown as numbers. Catches: a decoder required, or values dropped without tokens."""
    sdi, pos, train_tokens, _ = synthetic()
    data = explorer_data(sdi, positions=pos, k=3)
    assert not data["text"] and all(e["tokens"] is None and e["length"] == pos.shape[3] for e in data["train"].values())
    row = data["queries"][0]["overall"]["proponents"][0]
    assert len(row["positions"]) == pos.shape[3] and data["queries"][0]["label"] == "query 0"
    ids = explorer_data(sdi, train_tokens=train_tokens, k=3)
    i = ids["queries"][0]["overall"]["proponents"][0]["train"]
    assert ids["train"][str(i)]["tokens"] == [str(int(t)) for t in train_tokens[i]]
    assert ids["queries"][0]["examples"][str(i)]["matrix"] is None
    plain = explorer_data(sdi, k=2, positions_note="no per-position features here")
    assert plain["positions_note"] == "no per-position features here" and not plain["positions"]


def test_torch_and_memory_mapped_inputs_give_the_same_data(tmp_path: Path) -> None:
    """A torch tensor, a memory-mapped .npy and a non-contiguous query selection read the same numbers.
    Catches: a block read that slices the wrong queries."""
    sdi, pos, *_ = synthetic()
    np.save(tmp_path / "s.npy", sdi)
    ref = explorer_data(sdi, positions=pos, k=3)
    assert explorer_data(torch.from_numpy(sdi), positions=torch.from_numpy(pos), k=3) == ref
    assert explorer_data(np.load(tmp_path / "s.npy", mmap_mode="r"), positions=pos, k=3) == ref
    picked = explorer_data(sdi, positions=pos, k=3, queries=[5, 2, 3])
    assert picked["queries"] == [ref["queries"][j] for j in (5, 2, 3)]


def test_size_is_bounded() -> None:
    """At most k rows per list and 2k(tau+1) listed examples per query; only listed examples are embedded;
    a cap on embedded numbers leaves queries out (with a warning and a note) and bounds the page. Catches:
    all N examples embedded, a cap that is not applied, a page that grows with N."""
    k = 2
    small = synthetic(n=40, m=12, tau=4)
    big = synthetic(n=2000, m=12, tau=4)
    pages = []
    for sdi, pos, toks, _ in (small, big):
        data = explorer_data(sdi, positions=pos, train_tokens=toks, decode=decode, k=k)
        tau = sdi.shape[2]
        listed: set[int] = set()
        for q in data["queries"]:
            rows = [q["overall"], *q["steps"]]
            assert all(len(r["proponents"]) <= k and len(r["opponents"]) <= k for r in rows)
            assert len(q["examples"]) <= 2 * k * (tau + 1) == data["bound"]["rows_per_query_max"]
            listed |= {int(i) for i in q["examples"]}
        assert set(map(int, data["train"])) == listed
        pages.append(len(render_explorer(data).encode()))
        assert pages[-1] < 12 * data["bound"]["numbers"] + 100_000, "the docs say: about 8-12 bytes per number"
    assert pages[1] < 1.5 * pages[0], f"the page grew with N: {pages}"
    sdi, pos, toks, _ = big
    full = explorer_data(sdi, positions=pos, k=k)
    cap = full["bound"]["numbers"] // 3
    with pytest.warns(RuntimeWarning, match="embeds .* of 12 queries"):
        cut = explorer_data(sdi, positions=pos, k=k, max_numbers=cap)
    b = cut["bound"]
    assert b["truncated"] and 1 <= b["queries_embedded"] < 12 and b["numbers"] <= cap
    assert cut["queries"] == full["queries"][: b["queries_embedded"]]
    assert "of 12 queries" in b["note"] and str(k) in b["note"]


def test_page_is_self_contained_and_embeds_the_data(tmp_path: Path) -> None:
    """One file: inlined CSS and JS, no external resource or request, the data as JSON that round-trips (even
    with a token '</script>'), the bound stated. Catches: a CDN link, an unescaped '</' that ends the script
    early, rows' positions embedded twice."""
    sdi, pos, train_tokens, query_tokens = synthetic()
    train_tokens[0] = np.full(len(train_tokens[0]), WORDS.index("</script>"))
    data = explorer_data(sdi, positions=pos, train_tokens=train_tokens, query_tokens=query_tokens, decode=decode, k=3)
    path = write_explorer(data, tmp_path / "e.html", title="t <x>")
    text = path.read_text()
    assert text.count("</script>") == 2 and "<title>t &lt;x&gt;</title>" in text
    assert not re.search(r"<link|<img|\bsrc=|@import|fetch\(|XMLHttpRequest|import\(", text)
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {"http://www.w3.org/2000/svg"}
    embedded = json.loads(re.search(r'<script type="application/json" id="lt-data">(.*?)</script>', text, re.S)[1])
    assert embedded == json.loads(json.dumps(compact(data)))
    q = embedded["queries"][0]
    row = q["overall"]["proponents"][0]
    assert "positions" not in row, "rows' per-position values are read from the matrix, not embedded twice"
    others = [
        r for lists in q["steps"] for r in lists["proponents"] if q["examples"][str(r["train"])]["matrix"] is None
    ]
    assert others and all(len(r["positions"]) == data["train"][str(r["train"])]["length"] for r in others)
    assert "This file embeds the top 3 proponents and opponents" in text and "numbers (cap" in text
    with pytest.raises(lt.ConfigError, match="explorer_data"):
        write_explorer({"queries": []}, tmp_path / "x.html")


def test_bad_inputs_are_refused_with_a_message() -> None:
    """Shapes, decoders, read-out steps, query selections and non-finite scores get a ConfigError that says
    what is expected. Catches: silently wrong pages."""
    sdi, pos, toks, _ = synthetic()
    cases = [
        (dict(sdi=sdi[0]), "3 axes"),
        (dict(sdi=sdi, positions=pos[:, :, :2]), r"\[N, M, tau, L\]"),
        (dict(sdi=sdi, train_tokens=toks[:3]), "one 1-D id array per example"),
        (dict(sdi=sdi, train_tokens=[np.zeros((2, 2), dtype=int)] * len(toks)), "1-D integer array"),
        (dict(sdi=sdi, train_tokens=toks, decode=lambda ids: "".join(decode(ids))), "list of .* strings"),
        (dict(sdi=sdi, decode=decode), "needs token ids"),
        (dict(sdi=sdi, readout_step=7), r"in 1\.\.6"),
        (dict(sdi=sdi, readout_step=[1, 2]), "one per query"),
        (dict(sdi=sdi, queries=[0, 0]), "distinct query indices"),
        (dict(sdi=sdi, k=0), "positive integer"),
        (dict(sdi=np.where(np.arange(7)[:, None] == 4, np.nan, 1.0) * sdi), "non-finite values for query 4"),
    ]
    for kwargs, message in cases:
        s = kwargs.pop("sdi")
        with pytest.raises(lt.ConfigError, match=message):
            explorer_data(s, **kwargs)


def test_parse_queries() -> None:
    assert parse_queries(None, 5) is None and parse_queries("", 5) is None
    assert parse_queries("0:3,4,1", 5) == [0, 1, 2, 4]
    assert parse_queries("3:", 5) == [3, 4]
    for bad in ("x", "7", "-1"):
        with pytest.raises(lt.ConfigError):
            parse_queries(bad, 5)


# ---------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A small store filled by `looptrace featurize` (two checkpoints, 40 train and 12 query examples)."""
    from looptrace.cli import main
    from tests.store_fixtures import save_checkpoints

    root = tmp_path_factory.mktemp("explore")
    args = ["featurize", "--store", str(root / "st"), "--model", "tests.store_fixtures:make_model", "--loss",
            "tests.store_fixtures:loss_fn", "--dataset", "tests.store_fixtures:make_dataset", "--step-module", "core",
            "--dim", "64", "--shard-size", "64", "--batch-size", "20", "--method", "countsketch", "--budget", "shared",
            "--verify", "false", "--quiet"]  # fmt: skip
    for c in save_checkpoints(str(root)):
        args += ["--checkpoint", c]
    assert main(args) == 0
    return root / "st"


def _embedded(path: Path) -> dict:
    text = path.read_text()
    return json.loads(re.search(r'<script type="application/json" id="lt-data">(.*?)</script>', text, re.S)[1])


def test_explore_command_on_a_store(store_dir: Path, tmp_path: Path, capsys) -> None:
    """`looptrace explore` on a filled store: the rankings are the store's own `topk` (brute force, exact
    re-scoring) at every step and overall, the token ids are the recorded dataset's, decoded by --decode; the
    page says there are no per-position features; its arguments are saved beside it. Catches: scores
    without eta, a step off by one, tokens from another dataset."""
    from looptrace.cli import main
    from looptrace.store import FeatureStore, topk
    from tests.store_fixtures import make_dataset

    out = tmp_path / "out" / "explorer.html"
    args = ["explore", "--store", str(store_dir), "--out", str(out), "--k", "3"]
    assert main([*args, "--decode", "tests.explorer_fixtures:decode", "--readout-step", "2"]) == 0
    assert "without token heatmaps" in capsys.readouterr().out
    data = _embedded(out)
    assert data["n_train"] == 40 and data["n_query"] == 12 and data["tau"] == 3 and data["text"]
    assert not data["positions"] and "no per-position training features" in data["positions_note"]
    assert json.loads(Path(str(out) + ".json").read_text())["k"] == 3
    store = FeatureStore.open(store_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # FAISS may be missing: brute force, the same answer
        for step in (None, 1, 2, 3):
            ref = topk(store, k=3, step=step, index="brute")
            for q in data["queries"]:
                lists = q["overall"] if step is None else q["steps"][step - 1]
                j = q["index"]
                pro = [int(i) for i, s in zip(ref.proponents[j], ref.proponent_scores[j], strict=True) if s > 0]
                opp = [int(i) for i, s in zip(ref.opponents[j], ref.opponent_scores[j], strict=True) if s < 0]
                assert trains(lists["proponents"]) == pro, f"query {j}, step {step}"
                assert trains(lists["opponents"]) == opp, f"query {j}, step {step}"
                got = [r["score"] for r in lists["proponents"]]
                np.testing.assert_allclose(got, ref.proponent_scores[j][: len(pro)], rtol=1e-4, atol=1e-9)
    train = make_dataset("train")
    for key, entry in data["train"].items():
        assert entry["tokens"] == decode(train[int(key)][0])
    assert data["queries"][0]["tokens"] == decode(make_dataset("query")[0][0])
    assert all(q["readout_step"] == 2 for q in data["queries"])

    copy = tmp_path / "copy"  # a store not filled by the CLI: indices, and a note saying why
    shutil.copytree(store_dir, copy)
    (copy / "featurize_args.json").unlink()
    assert main([*args[:2], str(copy), *args[3:], "--queries", "0:2"]) == 0
    err = capsys.readouterr().err
    assert "no token ids: the store has no featurize_args.json" in err
    data = _embedded(out)
    assert [q["index"] for q in data["queries"]] == [0, 1] and all(e["tokens"] is None for e in data["train"].values())


def test_explore_refuses_a_dataset_that_is_not_the_stores(store_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """When the recorded dataset factory now returns other examples, the page shows indices and says why
    (the fingerprint differs) instead of showing another example's text. Catches: tokens taken unchecked."""
    from looptrace.cli import main
    from tests import store_fixtures

    original = store_fixtures.make_dataset

    def shifted(role: str, n: int | None = None):
        ds = original(role, n)
        x, y = ds.tensors
        return torch.utils.data.TensorDataset((x + 1) % 11, y)

    monkeypatch.setattr(store_fixtures, "make_dataset", shifted)
    out = tmp_path / "e.html"
    assert main(["explore", "--store", str(store_dir), "--out", str(out), "--k", "2"]) == 0
    assert "not the one the store was filled with" in capsys.readouterr().err
    assert all(e["tokens"] is None for e in _embedded(out)["train"].values())

"""The explorer in a real browser: headless Chromium opens the page from disk, and the rendered DOM is checked
against the data (rows, token spans, the matrix), through the URL hash (``--dump-dom``) and through clicks,
the step selector and the keyboard (the DevTools protocol over ``--remote-debugging-pipe``: no websocket, no
dependency beyond the standard library).

Skipped when Chromium is not installed: ``apt-get install -y chromium`` (Debian) puts it at /usr/bin/chromium;
``LOOPTRACE_CHROMIUM=/path/to/chrome`` points elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from looptrace.explore import explorer_data, write_explorer
from tests.explorer_fixtures import decode, synthetic

CHROMIUM = os.environ.get("LOOPTRACE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"headless Chromium not found at {CHROMIUM}: `apt-get install -y chromium` (Debian) to run the "
        "browser tests, or set LOOPTRACE_CHROMIUM",
    ),
]


# ------------------------------------------------------------------------------------------------ the pages
@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Any]:
    """A text page with per-position values and a non-text page (no tokens), with the data they embed."""
    root = tmp_path_factory.mktemp("explorer")
    sdi, pos, train_tokens, query_tokens = synthetic(n=80, m=7, tau=6, length=9)
    text = explorer_data(
        sdi, positions=pos, train_tokens=train_tokens, query_tokens=query_tokens, decode=decode, k=4, readout_step=5
    )
    plain = explorer_data(sdi, positions=pos, k=3)
    bare = explorer_data(sdi, k=3, positions_note="no per-position features in this test")
    return {
        "text": (write_explorer(text, root / "text.html"), text),
        "plain": (write_explorer(plain, root / "plain.html"), plain),
        "bare": (write_explorer(bare, root / "bare.html"), bare),
    }


def url(path: Path, fragment: str = "") -> str:
    return path.resolve().as_uri() + (f"#{fragment}" if fragment else "")


# ------------------------------------------------------------------------------------------------ --dump-dom
class Dom(HTMLParser):
    """The parts of a dumped page the tests read: body attributes, table rows with their token spans, matrix
    cells, and the text of elements with an id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.body: dict[str, str] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.cells: list[dict[str, str]] = []
        self.matrix: dict[str, str] = {}
        self.text: dict[str, str] = {}
        self.hidden: set[str] = set()
        self._tbody: str | None = None
        self._span: dict[str, Any] | None = None
        self._ids: list[tuple[str, str]] = []  # (tag, id) of open elements with an id

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if a.get("id"):
            self._ids.append((tag, a["id"]))
            self.text.setdefault(a["id"], "")
            if "hidden" in a:
                self.hidden.add(a["id"])
            if a["id"] == "lt-matrix":
                self.matrix = a
        if tag == "tbody" and a.get("id", "").startswith("lt-rows-"):
            self._tbody = a["id"]
            self.rows[a["id"]] = []
        elif tag == "tr" and self._tbody and "lt-row" in a.get("class", ""):
            self.rows[self._tbody].append({**a, "spans": []})
        elif tag == "span" and self._tbody and "lt-tok" in a.get("class", "") and self.rows[self._tbody]:
            self._span = {**a, "text": ""}
            self.rows[self._tbody][-1]["spans"].append(self._span)
        elif tag == "td" and "lt-cell" in a.get("class", ""):
            self.cells.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._tbody = None
        if tag == "span":
            self._span = None
        if self._ids and self._ids[-1][0] == tag:
            self._ids.pop()

    def handle_data(self, data: str) -> None:
        if self._span is not None:
            self._span["text"] += data
        for _, ident in self._ids:
            self.text[ident] += data


def dump(page: Path, fragment: str = "") -> Dom:
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url(page, fragment)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 0 and "</html>" in out.stdout, f"chromium --dump-dom failed: {out.stderr[-2000:]}"
    dom = Dom()
    dom.feed(out.stdout)
    assert dom.body.get("data-ready") == "1", f"the page did not finish rendering: {dom.text.get('lt-errors')}"
    assert "lt-errors" in dom.hidden and not dom.text["lt-errors"].strip(), dom.text["lt-errors"]
    return dom


def check_rows(dom: Dom, data: dict[str, Any], query: int, step: int) -> None:
    """The rendered rows are the data's lists for (query, step), in order, each with its example's token spans:
    one per position, the token's text, and values that sum to the row's score."""
    q = next(q for q in data["queries"] if q["index"] == query)
    lists = q["overall"] if step == 0 else q["steps"][step - 1]
    for role, key in (("pro", "proponents"), ("opp", "opponents")):
        rows = dom.rows[f"lt-rows-{role}"]
        assert [int(r["data-train"]) for r in rows] == [r["train"] for r in lists[key]], (
            f"{key}, query {query} step {step}"
        )
        for got, want in zip(rows, lists[key], strict=True):
            assert float(got["data-score"]) == pytest.approx(want["score"], rel=1e-5)
            train = data["train"][str(want["train"])]
            if not data["positions"]:
                assert all("data-value" not in s for s in got["spans"])
                continue
            values = [float(s["data-value"]) for s in got["spans"]]
            assert len(values) == train["length"] == len(want["positions"])
            scale = float(np.abs(want["positions"]).max())  # the page keeps 4 significant digits per matrix entry
            np.testing.assert_allclose(values, want["positions"], rtol=0, atol=2e-3 * scale)
            assert sum(values) == pytest.approx(want["score"], abs=1e-2 * scale)
            texts = [s["text"] for s in got["spans"]]
            if train["tokens"] is not None:
                assert texts == [t.replace("\n", "↵") or "∅" for t in train["tokens"]]
            else:
                assert texts == [str(p) for p in range(train["length"])], "non-text: position indices"


def test_opens_on_the_first_query_with_its_overall_proponents(pages) -> None:
    """No fragment: the first query, all steps (TracIn), its proponents with token heatmaps, and the first
    proponent's steps x positions matrix. Catches: an empty first view, rows out of order, spans missing."""
    path, data = pages["text"]
    dom = dump(path)
    assert (dom.body["data-query"], dom.body["data-step"]) == ("0", "0")
    assert dom.rows["lt-rows-pro"], "the first view shows proponents"
    check_rows(dom, data, 0, 0)
    first = data["queries"][0]["overall"]["proponents"][0]["train"]
    assert int(dom.matrix["data-train"]) == first
    assert len(dom.cells) == (data["tau"] + 1) * data["train"][str(first)]["length"], "tau rows + the column sums"
    assert "read-out" in dom.text["lt-profile"] and "horizon" in dom.text["lt-profile"]
    assert "influence through that position" in dom.text["lt-positions-note"]
    assert "This file embeds the top 4" in dom.text["lt-bound"]


def test_the_address_selects_query_and_step(pages) -> None:
    """#query=3&step=2 shows query 3's lists at loop step 2 (not the overall ones), and the matrix of its first
    proponent at that step. Catches: a step off by one, the hash ignored."""
    path, data = pages["text"]
    dom = dump(path, "query=3&step=2")
    assert (dom.body["data-query"], dom.body["data-step"]) == ("3", "2")
    check_rows(dom, data, 3, 2)
    q3 = data["queries"][3]
    assert [r["train"] for r in q3["steps"][1]["proponents"]] != [r["train"] for r in q3["overall"]["proponents"]]
    dom = dump(path, "query=3&step=2&example=" + str(q3["steps"][1]["opponents"][1]["train"]))
    assert int(dom.matrix["data-train"]) == q3["steps"][1]["opponents"][1]["train"]


def test_non_text_pages_show_indices_and_values(pages) -> None:
    """Without tokens the spans are position indices with values; without per-position values the rows show
    the example and the page says why there are no colours. Catches: a page that needs tokens."""
    path, data = pages["plain"]
    dom = dump(path, "query=2&step=4")
    check_rows(dom, data, 2, 4)
    path, data = pages["bare"]
    dom = dump(path, "query=1")
    check_rows(dom, data, 1, 0)
    assert "no per-position features in this test" in dom.text["lt-positions-note"]
    assert "lt-matrix-missing" in dom.text


# ------------------------------------------------------------------------------------------------ DevTools
class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: replies out;
    JSON messages ending in NUL)."""

    def __init__(self) -> None:
        self.profile = tempfile.TemporaryDirectory()
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends at 3 and 4, inheritable
            a, b = os.dup(cmd_r), os.dup(res_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}", "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:  # events (no id) and other replies are skipped
            while b"\0" not in self._buf:
                chunk = os.read(self._res_r, 1 << 16)
                assert chunk, "Chromium closed the DevTools pipe"
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})

    def open(self, address: str) -> None:
        target = self.send("Target.createTarget", {"url": address}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
            "sessionId"
        ]
        self.wait("document.body && document.body.dataset.ready === '1'")

    def js(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in res, f"{expression}: {res['exceptionDetails']}"
        return res["result"].get("value")

    def act(self, statements: str) -> None:
        """Run statements in their own block (a ``const`` does not leak into the next call)."""
        self.js("{" + statements + "}")

    def wait(self, expression: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not self.js(f"!!({expression})"):
            assert time.monotonic() < end, f"timed out waiting for {expression}"
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=20)
        finally:
            os.close(self._cmd_w)
            os.close(self._res_r)
            self.profile.cleanup()


ROWS = "[...document.querySelectorAll('#lt-rows-{}' + ' tr.lt-row')].map(r => Number(r.dataset.train))"
SPANS = "[...document.querySelectorAll('#lt-rows-pro tr.lt-row')].map(r => r.querySelectorAll('.lt-tok').length)"


def test_clicks_the_step_selector_and_keys_change_the_view(pages) -> None:
    """In a live page: clicking a query, choosing a step in the selector, clicking a bar of the step profile,
    clicking an opponent row, the arrow keys and the search box each change what is shown, to exactly the
    data's lists, and the address follows. Catches: handlers that do not re-render, a selector out of sync."""
    path, data = pages["text"]
    qs = {q["index"]: q for q in data["queries"]}

    def lists(query: int, step: int, key: str) -> list[int]:
        q = qs[query]
        return [r["train"] for r in (q["overall"] if step == 0 else q["steps"][step - 1])[key]]

    browser = Chromium()
    try:
        browser.open(url(path))
        assert browser.js(ROWS.format("pro")) == lists(0, 0, "proponents")
        browser.js("document.querySelector('#lt-query-list [data-query=\"4\"]').click()")
        assert browser.js("document.body.dataset.query") == "4"
        assert browser.js(ROWS.format("pro")) == lists(4, 0, "proponents")
        assert browser.js(ROWS.format("opp")) == lists(4, 0, "opponents")

        browser.act(
            "const s = document.getElementById('lt-step-select'); s.value = '3'; s.dispatchEvent(new Event('change'))"
        )
        assert browser.js("document.body.dataset.step") == "3"
        assert browser.js(ROWS.format("pro")) == lists(4, 3, "proponents")
        assert browser.js("document.getElementById('lt-step-select').value") == "3"
        lengths = [data["train"][str(i)]["length"] for i in lists(4, 3, "proponents")]
        assert browser.js(SPANS) == lengths, "every row has one token span per position"

        browser.js(
            "document.querySelector('#lt-profile rect.lt-bar[data-step=\"5\"]').dispatchEvent(new MouseEvent('click'))"
        )
        assert browser.js("document.body.dataset.step") == "5"
        assert browser.js(ROWS.format("opp")) == lists(4, 5, "opponents")
        assert browser.js("location.hash") == "#query=4&step=5"

        kinds = set()
        for n, target in enumerate(lists(4, 5, "opponents")):  # whole matrices (overall top k) and partial ones
            browser.js(f"document.querySelectorAll('#lt-rows-opp tr.lt-row')[{n}].click()")
            assert browser.js("Number(document.getElementById('lt-matrix').dataset.train)") == target
            full = qs[4]["examples"][str(target)]["matrix"] is not None
            kinds.add(full)
            listed = sum(
                target in lists(4, t, "proponents") + lists(4, t, "opponents") for t in range(1, data["tau"] + 1)
            )
            cells = browser.js("document.querySelectorAll('#lt-matrix tbody td.lt-cell').length")
            assert cells == (data["tau"] if full else listed) * data["train"][str(target)]["length"], (target, full)
            assert browser.js("document.querySelectorAll('#lt-matrix tbody td.lt-cell-missing').length") == (
                0 if full else data["tau"] - listed
            )
        assert kinds == {True, False}, "the fixture should list both an overall top-k example and another one here"
        assert browser.js("document.querySelector('#lt-matrix tr.chosen').dataset.step") == "5"

        browser.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowLeft'}))")
        assert browser.js("document.body.dataset.step") == "4"
        assert browser.js(ROWS.format("pro")) == lists(4, 4, "proponents")
        browser.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowDown'}))")
        assert browser.js("document.body.dataset.query") == "5"

        shown = (
            "[...document.querySelectorAll('#lt-query-list li')].filter(li => !li.hidden).map(li => li.dataset.query)"
        )
        browser.act(
            "const i = document.getElementById('lt-search'); i.value = '#2'; i.dispatchEvent(new Event('input'))"
        )
        assert browser.js(shown) == ["2"]
        word = qs[6]["label"].split()[1].lower()
        browser.act(
            f"const i = document.getElementById('lt-search'); i.value = {json.dumps(word)}; i.dispatchEvent(new Event('input'))"
        )
        found = [int(j) for j in browser.js(shown)]
        assert 6 in found and all(word in qs[j]["label"].lower() for j in found)
        assert browser.js("document.getElementById('lt-errors').textContent") == ""
    finally:
        browser.close()

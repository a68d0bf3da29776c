// looptrace explorer: renders the JSON in #lt-data (written by looptrace.explore.write_explorer).
// State lives in the URL hash (#query=J&step=T&example=I; step 0 = all steps), so a view can be linked
// and a test can open one directly. Everything is built with createElement/textContent (token strings
// are data, never markup).
(function () {
  "use strict";
  const errors = [];
  function fail(msg) {
    errors.push(String(msg));
    const el = document.getElementById("lt-errors");
    if (el) { el.hidden = false; el.textContent = "explorer error: " + errors.join("\n"); }
  }
  window.addEventListener("error", (e) => fail(e.message));

  const SVG = "http://www.w3.org/2000/svg";
  const POS = [33, 102, 172], NEG = [178, 24, 43];  // --pos, --neg
  const D = JSON.parse(document.getElementById("lt-data").textContent);
  const Q = D.queries, TAU = D.tau, HAS_POS = D.positions;
  const byIndex = new Map(Q.map((q) => [q.index, q]));
  // example: the training example the user picked (null: the first row of the current view is shown)
  const state = { query: Q.length ? Q[0].index : null, step: 0, example: null };
  let shownExample = null;

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else if (k === "style") e.style.cssText = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of [].concat(children || [])) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function svg(tag, attrs, children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
    for (const c of [].concat(children || [])) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function tip(text) { const t = document.createElementNS(SVG, "title"); t.textContent = text; return t; }
  // signed, 3 significant digits, true minus sign
  function fmt(v, digits) {
    digits = digits || 3;
    if (v === 0) return "0";
    const a = Math.abs(v);
    const s = a >= 1e-3 && a < 1e5 ? a.toPrecision(digits) : a.toExponential(digits - 1);
    return (v > 0 ? "+" : "\u2212") + s;
  }
  function cls(v) { return v > 0 ? "pos" : v < 0 ? "neg" : ""; }
  function colour(v, vmax) {
    if (!vmax || !v) return "rgb(255,255,255)";
    const a = Math.min(1, Math.abs(v) / vmax), c = v > 0 ? POS : NEG;
    const mix = (i) => Math.round(255 + (c[i] - 255) * a);
    return `rgb(${mix(0)},${mix(1)},${mix(2)})`;
  }
  function inkFor(v, vmax) { return vmax && Math.abs(v) / vmax > 0.55 ? "#fff" : "#111"; }
  function absMax(arrays) {
    let m = 0;
    for (const a of arrays) for (const v of a) { const x = Math.abs(v); if (x > m) m = x; }
    return m;
  }
  function stepName(t) { return t === 0 ? "all steps" : `step ${t}`; }
  function scoreName(t) { return t === 0 ? "TracIn" : `SDI\u209c (t=${t})`; }
  function trainInfo(i) { return D.train[String(i)] || { tokens: null, label: null, length: 0 }; }
  function shown(tok) { return tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205"; }

  // a row's per-position values (null without positions): embedded with the row, or read from its
  // example's matrix (a row of it at a step, its column sums overall)
  function rowValues(q, row, step) {
    if (row.positions) return row.positions;
    const ex = q.examples[String(row.train)];
    if (!ex || !ex.matrix) return null;
    if (step > 0) return ex.matrix[step - 1];
    const out = new Array(ex.matrix[0] ? ex.matrix[0].length : 0).fill(0);
    for (const r of ex.matrix) for (let p = 0; p < r.length; p++) out[p] += r[p];
    return out;
  }
  // the example's steps x positions matrix: embedded (overall top-k), else the rows of the steps where it is
  // listed (null for the other steps)
  function exampleMatrix(q, i) {
    const ex = q.examples[String(i)];
    if (ex.matrix) return { rows: ex.matrix, full: true };
    if (!HAS_POS) return null;
    const rows = q.steps.map((lists, t) => {
      const r = [...lists.proponents, ...lists.opponents].find((x) => x.train === i);
      return r ? rowValues(q, r, t + 1) : null;
    });
    return rows.some((r) => r) ? { rows, full: false } : null;
  }

  // ------------------------------------------------------------------ the URL hash
  function readHash() {
    const h = new URLSearchParams(location.hash.replace(/^#/, ""));
    const q = parseInt(h.get("query"), 10), t = parseInt(h.get("step"), 10), x = parseInt(h.get("example"), 10);
    if (byIndex.has(q)) state.query = q;
    if (t >= 0 && t <= TAU) state.step = t;
    state.example = Number.isInteger(x) ? x : null;
  }
  function writeHash() {
    let h = `#query=${state.query}&step=${state.step}`;
    if (state.example !== null) h += `&example=${state.example}`;
    if (location.hash !== h) {
      try { history.replaceState(null, "", h); } catch (e) { /* some file:// contexts refuse it */ }
    }
  }

  // ------------------------------------------------------------------ query list
  const list = document.getElementById("lt-query-list");
  const search = document.getElementById("lt-search");
  function buildList() {
    for (const q of Q) {
      const text = (q.label || "") + " " + (q.tokens ? q.tokens.join(D.text ? "" : " ") : "");
      const li = el("li", {
        class: "lt-query-item", "data-query": q.index, "data-search": text.toLowerCase(), role: "option",
        title: `query ${q.index}: ${q.label}`, onclick: () => select({ query: q.index, example: null }),
      }, [
        el("span", { class: "idx", text: `#${q.index}` }),
        el("span", { class: "label", text: q.label }),
        el("span", { class: "stat num " + cls(q.tracin), text: fmt(q.tracin, 2), title: "\u03a3 TracIn over the training set" }),
      ]);
      list.append(li);
    }
  }
  function filterList() {
    const s = search.value.trim().toLowerCase();
    const num = /^#?\d+$/.test(s) ? s.replace("#", "") : null;
    let n = 0;
    for (const li of list.children) {
      const ok = !s || (num !== null && li.dataset.query.startsWith(num)) || li.dataset.search.includes(s);
      li.hidden = !ok;
      if (ok) n++;
    }
    document.getElementById("lt-query-count").textContent =
      `${n} of ${Q.length} queries` + (D.bound.queries_embedded < D.n_query ? ` (${D.n_query} in the scores)` : "");
  }

  // ------------------------------------------------------------------ step profile (signed bars)
  function profileChart(q) {
    const W = 760, H = 190, L = 62, R = 12, T = 22, B = 40;
    const pw = W - L - R, ph = H - T - B, bw = pw / TAU;
    const ymax = absMax([q.profile]) || 1;
    const y = (v) => T + ph / 2 - (v / ymax) * (ph / 2);
    const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, id: "lt-profile-svg", role: "img",
      "aria-label": "step profile: the query's SDI summed over training examples, per loop step" });
    g.append(svg("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), stroke: "#888", "stroke-width": 1 }));
    for (const v of [ymax, ymax / 2, -ymax / 2, -ymax]) {
      g.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eee" }));
      g.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#5d6670",
        "font-family": "monospace" }, [fmt(v, 2)]));
    }
    const every = TAU <= 24 ? 1 : TAU <= 48 ? 2 : TAU <= 120 ? 5 : 10;
    for (let t = 1; t <= TAU; t++) {
      const v = q.profile[t - 1], x = L + (t - 1) * bw;
      const chosen = state.step === t, dim = state.step !== 0 && !chosen;
      const top = Math.min(y(v), y(0)), h = Math.max(Math.abs(y(v) - y(0)), v === 0 ? 0 : 1);
      const bar = svg("rect", {
        class: "lt-bar", "data-step": t, "data-value": v, x: x + bw * 0.1, width: Math.max(1, bw * 0.8), y: top, height: h,
        fill: v >= 0 ? "#2166ac" : "#b2182b", "fill-opacity": dim ? 0.35 : 0.9,
        stroke: chosen ? "#000" : null, "stroke-width": chosen ? 1.5 : null,
      }, [tip(`step ${t}: \u03a3\u1d62 SDI = ${fmt(v, 4)}; energy \u03a3\u1d62 |SDI| = ${fmt(q.energy[t - 1], 4).replace("+", "")}` +
        (t === q.readout_step ? " (read-out step)" : "") + " \u2014 click to rank by this step")]);
      bar.addEventListener("click", () => select({ step: t }));
      g.append(bar);
      // a transparent full-height target so that small bars are easy to click
      const hit = svg("rect", { x, width: bw, y: T, height: ph, fill: "transparent", class: "lt-bar-hit", "data-step": t },
        [tip(`step ${t}: ${fmt(v, 4)}`)]);
      hit.addEventListener("click", () => select({ step: t }));
      g.append(hit);
      if ((t - 1) % every === 0 || t === TAU)
        g.append(svg("text", { x: x + bw / 2, y: H - B + 14, "text-anchor": "middle", "font-size": 11, fill: "#444" }, [String(t)]));
    }
    // read-out step: a triangle under the axis
    const rx = L + (q.readout_step - 0.5) * bw;
    g.append(svg("path", { id: "lt-readout-mark", "data-step": q.readout_step,
      d: `M${rx} ${H - B + 18} l-6 10 h12 z`, fill: "#222" }, [tip(`read-out step ${q.readout_step}`)]));
    g.append(svg("text", { x: Math.min(Math.max(rx, L + 30), W - R - 30), y: H - 1, "text-anchor": "middle",
      "font-size": 11, fill: "#222" }, [`read-out (t=${q.readout_step})`]));
    // influence horizon: the last step whose energy is >= frac x its peak
    if (q.horizon >= 1 && q.horizon <= TAU) {
      const hx = L + q.horizon * bw;
      g.append(svg("line", { id: "lt-horizon-mark", "data-step": q.horizon, x1: hx, x2: hx, y1: T - 4, y2: T + ph,
        stroke: "#8a5a00", "stroke-dasharray": "4 3", "stroke-width": 1.2 }, [tip(`influence horizon: step ${q.horizon}`)]));
      g.append(svg("text", { x: hx + (hx > W - 120 ? -4 : 4), y: T - 8, "text-anchor": hx > W - 120 ? "end" : "start",
        "font-size": 11, fill: "#8a5a00" }, [`horizon t=${q.horizon}`]));
    }
    g.append(svg("text", { x: L, y: 12, "font-size": 11, fill: "#5d6670" }, ["\u03a3\u1d62 SDI(z\u1d62, z\u2032)\u209c"]));
    g.append(svg("text", { x: L - 6, y: H - B + 14, "text-anchor": "end", "font-size": 11, fill: "#5d6670" }, ["step t"]));
    return g;
  }

  // a tiny signed bar chart of one training example's SDI over steps for this query
  function sparkline(q, steps) {
    const W = Math.min(140, Math.max(48, TAU * 4)), H = 30, mid = 13, bw = W / TAU;
    const m = absMax([steps]) || 1;
    const g = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "lt-spark" });
    g.append(svg("line", { x1: 0, x2: W, y1: mid, y2: mid, stroke: "#bbb", "stroke-width": 0.5 }));
    for (let t = 1; t <= TAU; t++) {
      const v = steps[t - 1], h = (Math.abs(v) / m) * 12;
      const dim = state.step !== 0 && state.step !== t;
      g.append(svg("rect", { x: (t - 1) * bw + bw * 0.1, width: Math.max(0.8, bw * 0.8), y: v >= 0 ? mid - h : mid, height: h,
        fill: v >= 0 ? "#2166ac" : "#b2182b", "fill-opacity": dim ? 0.3 : 0.95 }));
    }
    const rx = (q.readout_step - 0.5) * bw;
    g.append(svg("path", { d: `M${rx} ${H - 4} l-3 4 h6 z`, fill: "#222" }));
    g.append(tip("this example's SDI at each step for this query: " + steps.map((v, t) => `t${t + 1} ${fmt(v, 3)}`).join(", ")));
    return g;
  }

  // ------------------------------------------------------------------ tokens as a signed heatmap
  function tokenCell(i, values, vmax) {
    const info = trainInfo(i);
    const cell = el("td", { class: "lt-tokens", "data-train": i });
    const toks = info.tokens;
    if (values) {
      for (let p = 0; p < values.length; p++) {
        const v = values[p], tok = toks ? toks[p] : null;
        const text = tok === null ? String(p) : shown(tok);
        cell.append(el("span", {
          class: "lt-tok" + (tok === null ? " idx" : D.text ? "" : " id"), "data-pos": p, "data-value": v,
          style: `background:${colour(v, vmax)};color:${inkFor(v, vmax)}`,
          title: `position ${p}` + (tok === null ? "" : ` \u00b7 ${JSON.stringify(tok)}`) + ` \u00b7 ${fmt(v, 4)}`,
          text,
        }));
        if (tok !== null && tok.includes("\n")) cell.append(el("br"));
      }
    } else if (toks) {
      toks.forEach((tok, p) => {
        cell.append(el("span", { class: "lt-tok plain" + (D.text ? "" : " id"), "data-pos": p, title: `position ${p}`,
          text: shown(tok) }));
        if (tok.includes("\n")) cell.append(el("br"));
      });
    } else {
      cell.append(el("span", { class: "muted", text: info.label || `training example ${i}` }));
    }
    return cell;
  }

  function table(q, role, rows, vmax) {
    const body = el("tbody", { id: `lt-rows-${role}`, "data-role": role });
    if (!rows.length) {
      const what = role === "pro" ? "a positive" : "a negative";
      body.append(el("tr", { class: "lt-empty" }, [el("td", { colspan: 5,
        text: `No training example has ${what} score ${state.step ? "at step " + state.step : "summed over steps"}.` })]));
    }
    rows.forEach((r, n) => {
      const ex = q.examples[String(r.train)], info = trainInfo(r.train);
      const tr = el("tr", {
        class: "lt-row" + (shownExample === r.train ? " selected" : ""), "data-role": role, "data-train": r.train,
        "data-rank": n + 1, "data-score": r.score, "data-step": state.step,
        title: "show this example's steps \u00d7 positions matrix below",
        onclick: () => select({ example: r.train }, true),
      }, [
        el("td", { class: "rank num", text: String(n + 1) }),
        el("td", { class: "ex" }, [
          el("span", { class: "num", text: `#${r.train}` }),
          info.label && info.tokens ? null : el("div", { class: "muted", style: "font-size:11px", text: info.label || "" }),
        ]),
        el("td", { class: "score num " + cls(r.score), text: fmt(r.score, 3),
          title: `${scoreName(state.step)} = ${r.score}` + (state.step ? `; TracIn = ${fmt(ex.tracin, 4)}` : "") +
            `; cancellation across steps ${ex.cancellation.toFixed(2)}` }),
        el("td", { class: "spark" }, [sparkline(q, ex.steps)]),
        tokenCell(r.train, rowValues(q, r, state.step), vmax),
      ]);
      body.append(tr);
    });
    return el("table", { class: "lt-table", id: `lt-table-${role}` }, [
      el("thead", {}, [el("tr", {}, [
        el("th", { text: "#" }), el("th", { text: "train" }), el("th", { text: scoreName(state.step), style: "text-align:right" }),
        el("th", { text: "SDI by step" }), el("th", { text: HAS_POS ? "training example (colour: influence through each position)" : "training example" }),
      ])]),
      body,
    ]);
  }

  function legend(vmax, id, what) {
    return el("span", { class: "lt-legend", id, "data-vmax": vmax }, [
      el("span", { text: what }),
      el("span", { class: "ends num neg", text: fmt(-vmax, 2) }),
      el("span", { class: "grad", title: "one diverging scale, linear, zero = white" }),
      el("span", { class: "ends num pos", text: fmt(vmax, 2) }),
    ]);
  }

  // ------------------------------------------------------------------ steps x positions of one example
  function matrixPanel(q) {
    const box = document.getElementById("lt-matrix-panel");
    box.replaceChildren();
    const i = shownExample;
    if (i === null) return;
    const ex = q.examples[String(i)], info = trainInfo(i);
    box.append(el("h3", { id: "lt-matrix-title", "data-train": i }, [
      `Training example #${i} \u00d7 query #${q.index}: loop steps \u00d7 positions `,
      el("small", { text: `TracIn ${fmt(ex.tracin, 3)}` + (info.label && !info.tokens ? ` \u00b7 ${info.label}` : "") }),
    ]));
    const mat = exampleMatrix(q, i);
    if (!mat) {
      box.append(el("p", { class: "lt-warn", id: "lt-matrix-missing",
        text: "No steps \u00d7 positions matrix: " + (D.positions_note || "no per-position values in this file") + "." }));
      return;
    }
    const M = mat.rows, known = M.filter((r) => r), len = known[0].length, vmax = absMax(known) || 0;
    const toks = info.tokens;
    box.append(el("p", { class: "lt-caption" }, [
      "Row t: the influence at loop step t through each position (it sums to SDI\u209c, right). ",
      mat.full ? "Bottom row: summed over steps, each position's share of TracIn. "
        : "Only the rows of the steps where this example is in the top k are in this file (the whole matrix is kept " +
          "for the overall top k); the others are grey. ",
      legend(vmax, "lt-matrix-legend", "scale:"),
    ]));
    const head = el("tr", {}, [el("th", { text: "t \\ pos" })]);
    for (let p = 0; p < len; p++)
      head.append(el("th", { title: `position ${p}` + (toks ? ` \u00b7 ${JSON.stringify(toks[p])}` : "") },
        [el("div", { class: "colhead", text: toks ? shown(toks[p]) : String(p) })]));
    head.append(el("th", { text: "\u03a3 = SDI\u209c" }));
    const body = el("tbody");
    M.forEach((r, t) => {
      const tr = el("tr", { class: (t + 1 === q.readout_step ? "readout " : "") + (t + 1 === state.step ? "chosen" : ""),
        "data-step": t + 1 }, [el("th", { text: (t + 1 === q.readout_step ? "\u25b8 " : "") + (t + 1),
        title: t + 1 === q.readout_step ? "read-out step" : `step ${t + 1}` })]);
      if (r) {
        r.forEach((v, p) => tr.append(el("td", { class: "lt-cell", "data-step": t + 1, "data-pos": p, "data-value": v,
          style: `background:${colour(v, vmax)}`,
          title: `step ${t + 1} \u00b7 position ${p}` + (toks ? ` ${JSON.stringify(toks[p])}` : "") + ` \u00b7 ${fmt(v, 4)}` })));
      } else {
        tr.append(el("td", { class: "lt-cell-missing", colspan: len, title: "not in this file: the example is not in the top k at this step" }));
      }
      tr.append(el("td", { class: "sum num " + cls(ex.steps[t]), text: fmt(ex.steps[t], 3) }));
      body.append(tr);
    });
    const parts = [el("thead", {}, [head]), body];
    if (mat.full) {
      const colSum = new Array(len).fill(0);
      for (const r of M) for (let p = 0; p < len; p++) colSum[p] += r[p];
      const cmax = absMax([colSum]);
      parts.push(el("tfoot", {}, [el("tr", { "data-step": 0 }, [el("th", { text: "\u03a3 steps" }),
        ...colSum.map((v, p) => el("td", { class: "lt-cell", "data-step": 0, "data-pos": p, "data-value": v,
          style: `background:${colour(v, cmax)}`,
          title: `all steps \u00b7 position ${p}` + (toks ? ` ${JSON.stringify(toks[p])}` : "") + ` \u00b7 ${fmt(v, 4)} (own scale)` })),
        el("td", { class: "sum num " + cls(ex.tracin), text: fmt(ex.tracin, 3) })])]));
    }
    box.append(el("div", { id: "lt-matrix-wrap" }, [el("table", { class: "lt-matrix", id: "lt-matrix", "data-train": i,
      "data-full": mat.full ? "1" : "0" }, parts)]));
  }

  // ------------------------------------------------------------------ the chosen query
  function render() {
    const q = byIndex.get(state.query);
    document.body.dataset.query = state.query;
    document.body.dataset.step = state.step;
    for (const li of list.children) {
      const on = Number(li.dataset.query) === state.query;
      li.classList.toggle("selected", on);
      li.setAttribute("aria-selected", on);
    }
    const main = document.getElementById("lt-query-panel");
    main.replaceChildren();
    if (!q) { main.append(el("p", { text: "No queries in this file." })); return; }
    const lists = state.step === 0 ? q.overall : q.steps[state.step - 1];
    if (state.example !== null && q.examples[String(state.example)]) shownExample = state.example;
    else {
      const first = lists.proponents[0] || lists.opponents[0] || q.overall.proponents[0] || q.overall.opponents[0];
      shownExample = first ? first.train : null;
    }
    document.body.dataset.example = shownExample === null ? "" : shownExample;
    writeHash();

    main.append(el("h2", { id: "lt-query-title", "data-query": q.index }, [`Query #${q.index} `,
      el("small", { text: q.tokens ? `${q.tokens.length} tokens` : "" })]));
    if (q.tokens || q.label) main.append(el("div", { id: "lt-query-text",
      text: q.tokens ? q.tokens.join(D.text ? "" : " ") : q.label }));
    const stat = (id, name, val, sub, c, value) => el("div", { class: "lt-stat", id, "data-value": value }, [
      el("span", { class: "name", text: name }), el("span", { class: "val " + (c || ""), text: val }),
      sub ? el("div", { class: "sub", text: sub }) : null]);
    main.append(el("div", { class: "lt-stats" }, [
      stat("lt-stat-tracin", "\u03a3 TracIn over training set", fmt(q.tracin, 3), "= \u03a3 of the step profile", cls(q.tracin), q.tracin),
      stat("lt-stat-horizon", "influence horizon", q.horizon ? `t = ${q.horizon}` : "none",
        `energy \u2265 ${Math.round(D.horizon_frac * 100)} % of its peak up to here`, "", q.horizon),
      stat("lt-stat-cancellation", "cancellation ratio", q.cancellation.toFixed(3),
        "1 \u2212 \u03a3\u1d62|TracIn| / \u03a3\u1d62\u03a3\u209c|SDI|", "", q.cancellation),
      stat("lt-stat-readout", "read-out step", `t = ${q.readout_step}`, `of \u03c4 = ${TAU} loop steps`, "", q.readout_step),
    ]));
    main.append(el("figure", { id: "lt-profile" }, [profileChart(q), el("figcaption", {}, [
      "Step profile: the query's SDI summed over the training set, per loop step (blue: lowers the query's loss, red: raises it). ",
      "\u25b2 marks the read-out step, the dashed line the influence horizon (the last step whose energy \u03a3\u1d62|SDI\u1d62\u209c| ",
      `is at least ${Math.round(D.horizon_frac * 100)} % of its peak). Click a bar to rank the training set by that step.`])]));

    // controls: the step selector and the legend of the token colours
    const sel = el("select", { id: "lt-step-select", "aria-label": "rank by" });
    sel.append(el("option", { value: 0, text: "all steps: TracIn = \u03a3\u209c SDI\u209c" }));
    for (let t = 1; t <= TAU; t++)
      sel.append(el("option", { value: t, text: `step ${t}: SDI\u209c` + (t === q.readout_step ? " (read-out)" : "") + (t === q.horizon ? " (horizon)" : "") }));
    sel.value = String(state.step);
    sel.addEventListener("change", () => select({ step: Number(sel.value) }));
    const values = [];
    if (HAS_POS) for (const r of [...lists.proponents, ...lists.opponents]) values.push(rowValues(q, r, state.step) || []);
    const vmax = absMax(values);
    main.append(el("div", { class: "lt-controls" }, [
      el("label", {}, ["Rank training examples by ", sel]),
      el("button", { id: "lt-step-prev", title: "previous step (\u2190)", onclick: () => select({ step: Math.max(0, state.step - 1) }) }, ["\u25c0"]),
      el("button", { id: "lt-step-next", title: "next step (\u2192)", onclick: () => select({ step: Math.min(TAU, state.step + 1) }) }, ["\u25b6"]),
      HAS_POS ? legend(vmax, "lt-legend", "token colour:") : el("span", { class: "muted", text: "no token colours" }),
    ]));
    if (HAS_POS) {
      main.append(el("p", { class: "lt-note", id: "lt-positions-note" }, [
        "A token's colour is the influence through that position: the part of the row's score ",
        state.step ? `(SDI at step ${state.step}) ` : "(TracIn, summed over steps) ",
        "that comes through the training example's gradient at that position. A position's hidden state carries information ",
        "from the whole sequence through attention, so this is where the influence enters the parameters, not which input ",
        "token causes it (Grosse et al. 2023, \u00a73.3). One linear scale for all rows of this view; the values sum to the score. ",
        "Hover a token for its value.",
      ]));
    } else {
      main.append(el("p", { class: "lt-warn", id: "lt-positions-note", text: "No token heatmaps: " + D.positions_note + "." }));
    }
    main.append(el("h3", {}, [`Top proponents \u00b7 ${stepName(state.step)} `, el("small", { text: "(training lowered this query's loss)" })]));
    main.append(table(q, "pro", lists.proponents, vmax));
    main.append(el("h3", {}, [`Top opponents \u00b7 ${stepName(state.step)} `, el("small", { text: "(training raised this query's loss)" })]));
    main.append(table(q, "opp", lists.opponents, vmax));
    main.append(el("section", { id: "lt-matrix-panel" }));
    matrixPanel(q);
  }

  function select(change, keepScroll) {
    Object.assign(state, change);
    if (change.query !== undefined && change.example === undefined) state.example = null;  // a new query: follow its rows
    const y = window.scrollY;
    render();
    if (keepScroll) window.scrollTo(0, y);
  }

  // ------------------------------------------------------------------ start
  try {
    buildList();
    readHash();
    filterList();
    render();
    search.addEventListener("input", filterList);
    window.addEventListener("hashchange", () => { readHash(); render(); });
    document.addEventListener("keydown", (e) => {
      if (e.target && /^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName)) return;
      if (e.key === "ArrowRight") select({ step: Math.min(TAU, state.step + 1) }, true);
      else if (e.key === "ArrowLeft") select({ step: Math.max(0, state.step - 1) }, true);
      else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
        const visible = [...list.children].filter((li) => !li.hidden).map((li) => Number(li.dataset.query));
        const at = visible.indexOf(state.query), next = visible[at + (e.key === "ArrowDown" ? 1 : -1)];
        if (next !== undefined) { e.preventDefault(); select({ query: next }); }
      }
    });
    document.body.dataset.ready = "1";
  } catch (e) {
    fail(e && e.stack ? e.stack : e);
  }
})();

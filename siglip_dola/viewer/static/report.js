"use strict";
// Renders the report's rows from the embedded JSON, one page at a time; the filters live in the URL hash
// (#mode=dynamic&outcome=fixed&cls=3&layer=4&sort=delta-desc&page=0) so a view can be linked or reloaded.
(function () {
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const OUTCOME_KEYS = ["both-wrong", "fixed", "broken", "both-right"];
  const RETRIEVAL = D.task === "retrieval";
  const PAGE = RETRIEVAL ? 20 : 50;
  const N = RETRIEVAL ? D.query.length : D.label.length;
  const DEFAULTS = {mode: D.mode_order[0], outcome: "all", cls: "all", layer: "all", sort: "index", page: "0"};
  const state = Object.assign({}, DEFAULTS);

  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (p) => (p === null || p === undefined) ? "–" : Number(p).toFixed(3);
  const el = (id) => document.getElementById(id);

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    for (const key of Object.keys(DEFAULTS)) state[key] = params.has(key) ? params.get(key) : DEFAULTS[key];
    if (!D.modes[state.mode]) state.mode = DEFAULTS.mode;
    if (state.outcome !== "all" && OUTCOME_KEYS.indexOf(state.outcome) < 0) state.outcome = "all";
  }

  function writeHash() {
    const params = new URLSearchParams();
    for (const key of Object.keys(DEFAULTS)) if (state[key] !== DEFAULTS[key]) params.set(key, state[key]);
    const hash = params.toString();
    if (location.hash.slice(1) !== hash) history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  }

  function set(key, value) {
    state[key] = String(value);
    if (key !== "page") state.page = "0";
    writeHash();
    render();
  }

  function matching() {
    const M = D.modes[state.mode];
    const outcome = OUTCOME_KEYS.indexOf(state.outcome);
    const cls = state.cls === "all" || RETRIEVAL ? null : Number(state.cls);
    const layer = state.layer === "all" ? null : state.layer;
    const rows = [];
    for (let i = 0; i < N; i++) {
      if (outcome >= 0 && M.outcome[i] !== outcome) continue;
      if (cls !== null && D.label[i] !== cls) continue;
      if (layer !== null && String(M.layer[i]) !== layer) continue;
      rows.push(i);
    }
    if (!RETRIEVAL && state.sort !== "index") {
      const sign = state.sort === "delta-asc" ? 1 : -1;
      const delta = (i) => M.true_prob[i] - D.off.true_prob[i];
      rows.sort((a, b) => sign * (delta(a) - delta(b)) || a - b);
    }
    return rows;
  }

  function options(values, current, label) {
    return values.map(([value, text]) =>
      `<option value="${esc(value)}"${String(value) === current ? " selected" : ""}>${esc(text)}</option>`).join("");
  }

  function renderControls() {
    const M = D.modes[state.mode];
    const counts = [0, 0, 0, 0];
    M.outcome.forEach((o) => counts[o]++);
    const layers = Array.from(new Set(M.layer.filter((j) => j !== null && j !== undefined))).sort((a, b) => a - b);
    let html = "";
    if (D.mode_order.length > 1) {
      html += `<label>DoLa mode <select id="f-mode">${options(D.mode_order.map((m) => [m, m]), state.mode)}</select></label>`;
    }
    html += `<span class="seg" id="f-outcome"><button data-v="all" class="${state.outcome === "all" ? "on" : ""}">all ${N}</button>`;
    for (const k of [1, 2, 3, 0]) {
      html += `<button data-v="${OUTCOME_KEYS[k]}" class="${state.outcome === OUTCOME_KEYS[k] ? "on" : ""}">${esc(D.outcomes[k])} ${counts[k]}</button>`;
    }
    html += "</span>";
    if (!RETRIEVAL) {
      const classes = Object.keys(D.classes).map((k) => [k, D.classes[k]]);
      html += `<label>true class <select id="f-cls">${options([["all", "all classes"], ...classes], state.cls)}</select></label>`;
    }
    html += `<label>premature layer <select id="f-layer">${options([["all", "all layers"], ...layers.map((j) => [j, "layer " + j])], state.layer)}</select></label>`;
    if (!RETRIEVAL) {
      html += `<label>sort <select id="f-sort">${options([["index", "input order"], ["delta-desc", "Δ p(true) ↓ (most helped first)"],
        ["delta-asc", "Δ p(true) ↑ (most hurt first)"]], state.sort)}</select></label>`;
    }
    el("controls").innerHTML = html;
    for (const [id, key] of [["f-mode", "mode"], ["f-cls", "cls"], ["f-layer", "layer"], ["f-sort", "sort"]]) {
      if (el(id)) el(id).addEventListener("change", (e) => set(key, e.target.value));
    }
    el("f-outcome").querySelectorAll("button").forEach((b) => b.addEventListener("click", () => set("outcome", b.dataset.v)));
  }

  function thumb(uri, alt) {
    return uri ? `<img src="${uri}" alt="${esc(alt)}">` : `<div class="ph" title="${esc(alt)}">no image</div>`;
  }

  function top3(entries, label) {
    return `<ul class="top3">${entries.map(([c, p]) =>
      `<li class="${c === label ? "true" : ""}">${esc(D.classes[c] || c)}<span class="p">${fmt(p)}</span></li>`).join("")}</ul>`;
  }

  function sparkline(values, layers, chosen) {
    const points = values.map((v, k) => [k, v]).filter(([, v]) => v !== null);
    if (!points.length) return "–";
    if (points.length === 1) return `<span title="JSD(q_N || q_${layers[points[0][0]]})">${points[0][1].toFixed(3)}</span>`;
    const top = Math.max(...points.map(([, v]) => v)) || 1;
    const x = (k) => 3 + (layers.length > 1 ? 74 * k / (layers.length - 1) : 37);
    const y = (v) => 21 - 18 * v / top;
    const title = points.map(([k, v]) => `layer ${layers[k]}: ${v.toFixed(3)}`).join("\n");
    const k = layers.indexOf(chosen);
    const dot = k >= 0 && values[k] !== null ? `<circle cx="${x(k).toFixed(1)}" cy="${y(values[k]).toFixed(1)}" r="2.5"/>` : "";
    return `<svg class="spark" width="80" height="24" viewBox="0 0 80 24"><title>${esc(title)}</title>` +
      `<polyline points="${points.map(([k, v]) => x(k).toFixed(1) + "," + y(v).toFixed(1)).join(" ")}"/>${dot}</svg>`;
  }

  function classificationRows(rows) {
    const M = D.modes[state.mode];
    const body = rows.map((i) => {
      const delta = M.true_prob[i] - D.off.true_prob[i];
      const o = M.outcome[i];
      return `<tr class="row" data-outcome="${OUTCOME_KEYS[o]}" data-index="${i}"><td>${i}</td><td>${thumb(D.thumb[i], D.id[i])}</td>` +
        `<td title="${esc(D.id[i])}">${esc(D.classes[D.label[i]] || D.label[i])}</td><td>${top3(D.off.top[i], D.label[i])}</td>` +
        `<td>${top3(M.top[i], D.label[i])}</td><td class="delta ${delta > 0 ? "up" : delta < 0 ? "down" : ""}">${(delta >= 0 ? "+" : "") + delta.toFixed(3)}</td>` +
        `<td>${M.layer[i] ?? "–"}</td><td>${sparkline(M.jsd[i], M.jsd_layers, M.layer[i])}</td><td>${M.head[i] ?? "–"}</td>` +
        `<td class="o-${OUTCOME_KEYS[o]}">${esc(D.outcomes[o])}</td></tr>`;
    }).join("");
    return `<table class="rows"><thead><tr><th>#</th><th>image</th><th>true label</th><th>off top-3</th>` +
      `<th>${esc(state.mode)} top-3</th><th>Δ p(true)</th><th>premature layer</th><th>JSD by layer</th>` +
      `<th>head set</th><th>outcome</th></tr></thead><tbody>${body}</tbody></table>`;
  }

  function hits(ids, scores, gold) {
    return ids.map((id, r) => `<div class="hit${gold.indexOf(id) >= 0 ? " gold" : ""}" title="${esc(id)}">` +
      `${thumb(D.thumbs[id], id)}${r + 1}. ${fmt(scores[r])}${gold.indexOf(id) >= 0 ? " ✓ gold" : ""}</div>`).join("");
  }

  function retrievalRows(rows) {
    const M = D.modes[state.mode];
    return rows.map((i) => `<div class="query row" data-outcome="${OUTCOME_KEYS[M.outcome[i]]}" data-index="${i}">` +
      `<div class="q">#${i} “${esc(D.query[i])}”</div><div class="meta">gold: ${esc(D.gold[i].join(", "))} · ` +
      `premature layer ${M.layer[i] ?? "–"} · <span class="o-${OUTCOME_KEYS[M.outcome[i]]}">${esc(D.outcomes[M.outcome[i]])}</span></div>` +
      `<div class="rankings"><div class="ranking"><h4>off</h4><div class="hits">${hits(D.off.top[i], D.off.score[i], D.gold[i])}</div></div>` +
      `<div class="ranking"><h4>${esc(state.mode)}</h4><div class="hits">${hits(M.top[i], M.score[i], D.gold[i])}</div></div></div></div>`).join("");
  }

  function render() {
    const started = performance.now();
    renderControls();
    const rows = matching();
    const pages = Math.max(1, Math.ceil(rows.length / PAGE));
    let page = Math.min(Math.max(parseInt(state.page, 10) || 0, 0), pages - 1);
    const shown = rows.slice(page * PAGE, (page + 1) * PAGE);
    el("count").textContent = `${rows.length} of ${N} ${RETRIEVAL ? "queries" : "images"} match` +
      (rows.length > PAGE ? ` · showing ${page * PAGE + 1}–${page * PAGE + shown.length}` : "");
    el("table").innerHTML = RETRIEVAL ? retrievalRows(shown) : classificationRows(shown);
    el("pager").innerHTML = pages > 1 ? `<button id="prev"${page === 0 ? " disabled" : ""}>‹ previous</button>` +
      `<span>page ${page + 1} of ${pages}</span><button id="next"${page >= pages - 1 ? " disabled" : ""}>next ›</button>` : "";
    if (el("prev")) el("prev").addEventListener("click", () => set("page", page - 1));
    if (el("next")) el("next").addEventListener("click", () => set("page", page + 1));
    document.body.dataset.matching = String(rows.length);
    document.body.dataset.renderMs = (performance.now() - started).toFixed(1);
    document.body.dataset.ready = "1";
  }

  el("rows-title").textContent = RETRIEVAL ? "Per query: off and DoLa rankings side by side (gold marked)" : "Per image";
  window.addEventListener("hashchange", () => { readHash(); render(); });
  readHash();
  render();
})();

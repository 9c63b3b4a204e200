/* servetune report pages: charts, sortable/filterable tables, CSV export, the trial drill-down, live refresh.
 * Plain JavaScript, no dependencies besides Plotly. Data from the study is only ever inserted as text
 * (textContent, createTextNode), never as HTML; the server escapes what Plotly renders as pseudo-HTML. */
(function () {
  "use strict";

  var ST = window.ST = {state: {filter: "", stateFilter: "", onlySla: false, onlyFront: false, sort: null,
                                trial: null, details: {}}};

  function $(id) { return document.getElementById(id); }
  function json(id) {
    var el = $(id);
    if (!el) { return null; }
    try { return JSON.parse(el.textContent); } catch (e) { console.warn("bad JSON in #" + id, e); return null; }
  }
  var TEMPLATE = json("st-template");
  var PLOT_CONFIG = {responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"]};

  // el("div", {class: "x"}, "text", child, ...): strings become text nodes, never markup.
  function el(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) { return; }
        if (k === "text") { node.textContent = v; } else if (k.slice(0, 2) === "on") { node.addEventListener(k.slice(2), v); }
        else { node.setAttribute(k, v === true ? "" : String(v)); }
      });
    }
    for (var i = 2; i < arguments.length; i++) { append(node, arguments[i]); }
    return node;
  }
  function append(node, child) {
    if (child === null || child === undefined || child === false) { return; }
    if (Array.isArray(child)) { child.forEach(function (c) { append(node, c); }); return; }
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }

  function plot(node, fig) {
    if (!node || !fig || !window.Plotly) { return null; }
    var layout = Object.assign({}, fig.layout || {});
    if (!layout.template && TEMPLATE) { layout.template = TEMPLATE; }
    return Plotly.newPlot(node, fig.data || [], layout, PLOT_CONFIG);
  }
  ST.plot = plot;

  // -- page data -------------------------------------------------------------------------------------------
  function page() { return json("st-page") || {mode: "static"}; }
  function apiBase(p) { return (p.base || "") + "/api/studies/" + encodeURIComponent(p.study); }

  // -- charts ----------------------------------------------------------------------------------------------
  // Charts are drawn when they come near the viewport: a study page holds a dozen or more, and drawing them
  // all up front is most of the time to first paint. Printing draws the rest first.
  var pending = [];
  function drawChart(node, fig) {
    var p = plot(node, fig);
    if (p && (node.classList.contains("pareto") || node.classList.contains("compare"))) {
      p.then(function () {
        node.on("plotly_click", function (ev) {
          var pt = ev && ev.points && ev.points[0];
          var cd = pt && pt.customdata;
          if (!Array.isArray(cd) || cd.length < 2) { return; }
          if (cd.length > 2) {  // a comparison: open the trial in its own study, where the app has one
            var link = (page().links || {})[cd[2]];
            if (link) { location.href = link + "#trial=" + Number(cd[1]); }
            return;
          }
          openTrial(Number(cd[1]));
        });
      });
    }
    return p;
  }
  function drawCharts() {
    var figs = json("st-figures") || {};
    var observer = "IntersectionObserver" in window ? new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (!e.isIntersecting) { return; }
        observer.unobserve(e.target);
        var id = e.target.id;
        pending = pending.filter(function (x) { return x !== id; });
        drawChart(e.target, figs[id]);
      });
    }, {rootMargin: "300px 0px"}) : null;
    pending = [];
    Object.keys(figs).forEach(function (id) {
      var node = $(id);
      if (!node) { return; }
      if (observer) { pending.push(id); observer.observe(node); } else { drawChart(node, figs[id]); }
    });
    function drawPending(id) {
      var n = $(id);
      pending = pending.filter(function (x) { return x !== id; });
      if (n && !n.classList.contains("js-plotly-plot")) { if (observer) { observer.unobserve(n); } return drawChart(n, figs[id]); }
    }
    ST.drawAll = function () { pending.slice().forEach(drawPending); };
    // The rest, one at a time while the browser is idle, so scrolling rarely meets a blank chart and the
    // page stays responsive meanwhile.
    var generation = ST.generation = (ST.generation || 0) + 1;
    var idle = window.requestIdleCallback || function (f) { return setTimeout(f, 200); };
    function drain() {
      if (generation !== ST.generation || !pending.length) { return; }
      var p = drawPending(pending[0]);
      var next = function () { setTimeout(function () { idle(drain, {timeout: 3000}); }, 150); };
      if (p && p.then) { p.then(next, next); } else { next(); }
    }
    setTimeout(function () { idle(drain, {timeout: 3000}); }, 1000);
  }
  window.addEventListener("beforeprint", function () { if (ST.drawAll) { ST.drawAll(); } });

  // -- tables: sort, filter, CSV ---------------------------------------------------------------------------
  function headerCells(table) {
    var rows = table.tHead ? table.tHead.rows : [];
    return rows.length ? Array.prototype.slice.call(rows[rows.length - 1].cells) : [];
  }
  function cellValue(td) {
    if (!td) { return ""; }
    var v = td.getAttribute("data-v");
    return v === null ? td.textContent.trim() : v;
  }
  function asNumber(v) {
    if (v === "" || v === null || v === undefined) { return null; }
    var n = Number(v);
    return isFinite(n) ? n : null;
  }
  function compare(a, b) {
    // Absent values always sort last; numbers numerically, the rest as text.
    if (a === "" && b === "") { return 0; }
    if (a === "") { return 1; }
    if (b === "") { return -1; }
    var na = asNumber(a), nb = asNumber(b);
    if (na !== null && nb !== null) { return na - nb; }
    return String(a).localeCompare(String(b), undefined, {numeric: true});
  }
  // A table's row groups: a main row and the note rows that follow it.
  function groups(tbody) {
    var out = [];
    Array.prototype.forEach.call(tbody.rows, function (tr) {
      if (tr.hasAttribute("data-of") && out.length) { out[out.length - 1].push(tr); } else { out.push([tr]); }
    });
    return out;
  }
  function sortTable(table, col, dir) {
    var tbody = table.tBodies[0];
    if (!tbody) { return; }
    var gs = groups(tbody);
    gs.forEach(function (g, i) { g.index = i; });
    gs.sort(function (x, y) {
      var a = cellValue(x[0].cells[col]), b = cellValue(y[0].cells[col]);
      var c = compare(a, b);
      if (a !== "" && b !== "") { c = dir === "descending" ? -c : c; }
      return c || x.index - y.index;
    });
    gs.forEach(function (g) { g.forEach(function (tr) { tbody.appendChild(tr); }); });
    headerCells(table).forEach(function (th, i) {
      if (th.classList.contains("sortable")) { th.setAttribute("aria-sort", i === col ? dir : "none"); }
    });
  }
  function initSorting(table) {
    headerCells(table).forEach(function (th, i) {
      if (!th.classList.contains("sortable")) { return; }
      th.setAttribute("aria-sort", "none");
      th.addEventListener("click", function () {
        var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
        sortTable(table, i, dir);
        if (table.id === "trial-table") { ST.state.sort = {key: th.getAttribute("data-key"), dir: dir}; }
      });
    });
  }

  function csvField(v) {
    var s = String(v === null || v === undefined ? "" : v);
    if (/^[=+\-@\t\r]/.test(s) && asNumber(s) === null) { s = "'" + s; }  // no formulas in a spreadsheet
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  function tableCsv(table) {
    var head = headerCells(table).map(function (th) { return th.getAttribute("data-key") || th.textContent.trim(); });
    var lines = [head.map(csvField).join(",")];
    Array.prototype.forEach.call(table.tBodies[0] ? table.tBodies[0].rows : [], function (tr) {
      if (tr.hasAttribute("data-of") || tr.hidden) { return; }
      var cells = Array.prototype.map.call(tr.cells, cellValue);
      lines.push(cells.map(csvField).join(","));
    });
    return lines.join("\r\n") + "\r\n";
  }
  ST.tableCsv = tableCsv;
  function download(name, text) {
    var blob = new Blob([text], {type: "text/csv;charset=utf-8"});
    var a = el("a", {href: URL.createObjectURL(blob), download: name});
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 0);
  }
  function initCsvButtons(root) {
    root.querySelectorAll("button[data-csv]").forEach(function (b) {
      b.addEventListener("click", function () {
        var table = $(b.getAttribute("data-csv"));
        if (!table) { return; }
        var name = (table.getAttribute("data-name") || table.id || "table").replace(/[^A-Za-z0-9._-]+/g, "_");
        download(name + ".csv", tableCsv(table));
      });
    });
  }

  // The trial filter: words match anywhere in a row; key<op>value compares a column (tensor_parallel=2,
  // server.tpot_p99_ms<30, state!=failed, ttft~9); several terms must all hold.
  var TERM = /^([^<>=!~]+?)(<=|>=|!=|=|<|>|~)(.*)$/;
  function parseFilter(text, table) {
    var heads = headerCells(table).map(function (th, i) {
      return {i: i, key: (th.getAttribute("data-key") || "").toLowerCase(), title: th.textContent.trim().toLowerCase()};
    });
    var terms = [], unknown = [];
    text.trim().split(/\s+/).forEach(function (word) {
      if (!word) { return; }
      var m = TERM.exec(word);
      if (!m) { terms.push({text: word.toLowerCase()}); return; }
      var k = m[1].toLowerCase();
      if (k === "#" || k === "trial") { k = "number"; }
      var cols = heads.filter(function (h) {
        return h.key === k || h.title === k || h.key.slice(-(k.length + 1)) === "." + k;
      }).map(function (h) { return h.i; });
      if (!cols.length) { unknown.push(m[1]); terms.push({text: word.toLowerCase()}); return; }
      terms.push({cols: cols, op: m[2], value: m[3]});
    });
    return {terms: terms, unknown: unknown};
  }
  function termHolds(t, tr) {
    if (t.text !== undefined) { return tr.textContent.toLowerCase().indexOf(t.text) >= 0; }
    return t.cols.some(function (c) {
      var v = cellValue(tr.cells[c]), shown = tr.cells[c] ? tr.cells[c].textContent.trim().toLowerCase() : "";
      var a = asNumber(v), b = asNumber(t.value);
      var s = String(v).toLowerCase(), w = t.value.toLowerCase();
      switch (t.op) {
        case "~": return s.indexOf(w) >= 0 || shown.indexOf(w) >= 0;
        case "=": return a !== null && b !== null ? a === b : (s === w || shown === w);
        case "!=": return a !== null && b !== null ? a !== b : (s !== w && shown !== w);
        default:
          if (a === null || b === null) { return false; }
          return t.op === "<" ? a < b : t.op === ">" ? a > b : t.op === "<=" ? a <= b : a >= b;
      }
    });
  }
  function applyTrialFilter() {
    var table = $("trial-table");
    if (!table) { return; }
    var st = ST.state, parsed = parseFilter(st.filter, table), shown = 0, total = 0;
    var slaCols = headerCells(table).map(function (th, i) {
      return /\.sla_met$/.test(th.getAttribute("data-key") || "") ? i : -1;
    }).filter(function (i) { return i >= 0; });
    groups(table.tBodies[0]).forEach(function (g) {
      var tr = g[0];
      total += 1;
      var ok = parsed.terms.every(function (t) { return termHolds(t, tr); });
      if (ok && st.stateFilter) { ok = cellValue(tr.cells[1]) === st.stateFilter; }
      if (ok && st.onlyFront) { ok = tr.getAttribute("data-front") === "1"; }
      if (ok && st.onlySla) {
        ok = cellValue(tr.cells[1]) === "complete" && slaCols.every(function (c) { return cellValue(tr.cells[c]) === "met"; });
      }
      g.forEach(function (r) { r.hidden = !ok; });
      if (ok) { shown += 1; }
    });
    var count = $("trial-count");
    if (count) { count.textContent = shown === total ? total + " trials" : "showing " + shown + " of " + total + " trials"; }
    var err = $("filter-error");
    if (err) { err.textContent = parsed.unknown.length ? "no column named " + parsed.unknown.join(", ") + " (matched as text)" : ""; }
  }
  ST.applyTrialFilter = applyTrialFilter;
  function initTrialTable() {
    var table = $("trial-table");
    if (!table) { return; }
    var st = ST.state;
    var f = $("trial-filter"), s = $("state-filter"), sla = $("only-sla"), front = $("only-front");
    if (f) { f.value = st.filter; f.addEventListener("input", function () { st.filter = f.value; applyTrialFilter(); }); }
    if (s) {
      s.value = st.stateFilter;
      if (s.value !== st.stateFilter) { st.stateFilter = ""; }
      s.addEventListener("change", function () { st.stateFilter = s.value; applyTrialFilter(); });
    }
    if (sla) { sla.checked = st.onlySla; sla.addEventListener("change", function () { st.onlySla = sla.checked; applyTrialFilter(); }); }
    if (front) { front.checked = st.onlyFront; front.addEventListener("change", function () { st.onlyFront = front.checked; applyTrialFilter(); }); }
    if (st.sort) {
      headerCells(table).forEach(function (th, i) { if (th.getAttribute("data-key") === st.sort.key) { sortTable(table, i, st.sort.dir); } });
    }
    table.tBodies[0].addEventListener("click", function (ev) {
      if (ev.target.closest("a, button, input")) { return; }
      var tr = ev.target.closest("tr");
      if (!tr) { return; }
      var n = tr.getAttribute("data-trial") || tr.getAttribute("data-of");
      if (n !== null) { openTrial(Number(n)); }
    });
    applyTrialFilter();
  }

  // -- the drill-down --------------------------------------------------------------------------------------
  function trialNumbers() {
    var table = $("trial-table");
    if (!table || !table.tBodies[0]) { return []; }
    return Array.prototype.filter.call(table.tBodies[0].rows, function (tr) { return tr.hasAttribute("data-trial") && !tr.hidden; })
      .map(function (tr) { return Number(tr.getAttribute("data-trial")); });
  }
  function getDetail(n) {
    var p = page();
    if (p.mode !== "serve") {
      var all = json("st-details") || {};
      return Promise.resolve(all[String(n)] || null);
    }
    var key = p.version + ":" + n;
    if (ST.state.details[key]) { return Promise.resolve(ST.state.details[key]); }
    return fetch(apiBase(p) + "/trials/" + n, {headers: {Accept: "application/json"}}).then(function (r) {
      if (r.status === 404) { return null; }
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    }).then(function (d) { if (d) { ST.state.details[key] = d; } return d; });
  }
  function kv(name, value) { return el("div", null, el("span", {text: name}), value); }
  function plainTable(id, name, head, rows, rowClass) {
    var t = el("table", {class: "plain exportable", id: id, "data-name": name},
      el("thead", null, el("tr", null, head.map(function (h) { return el("th", {text: h}); }))),
      el("tbody", null, rows.map(function (r, i) {
        return el("tr", {class: rowClass ? rowClass(i) : null}, r.map(function (c) { return el("td", {text: c}); }));
      })));
    return t;
  }
  function csvButton(id) {
    var b = el("button", {class: "btn", type: "button", "data-csv": id, text: "⤓ CSV"});
    b.addEventListener("click", function () {
      var table = $(id);
      if (table) { download((table.getAttribute("data-name") || id).replace(/[^A-Za-z0-9._-]+/g, "_") + ".csv", tableCsv(table)); }
    });
    return b;
  }
  function renderDetail(d) {
    var body = $("drill-body");
    body.textContent = "";
    var title = $("drill-title");
    title.textContent = "Trial #" + d.number + " ";
    title.appendChild(el("span", {class: "badge state-" + d.state, text: d.state}));
    if (d.is_baseline) { title.appendChild(el("span", {class: "badge baseline", text: "★ baseline"})); }
    var figures = [];

    if (d.failure) {
      body.appendChild(el("div", {class: "failure"}, el("b", {text: d.failure.kind}), ": ", d.failure.reason));
    }
    body.appendChild(el("div", {class: "facts-grid", style: "margin-top:12px"}, d.facts.map(function (f) { return kv(f.name, f.value); })));

    d.scenarios.forEach(function (s) {
      var v = s.verdict;
      body.appendChild(el("h3", null, "Scenario " + s.name + " ", el("span", {class: "hint", text: s.kind + (s.qps ? " · " + s.qps + " queries/s" : "")})));
      body.appendChild(el("div", {class: "verdict"},
        "SLA ", el("span", {class: v.sla === "met" ? "ok" : v.sla === "missed" ? "bad" : v.sla === "contaminated" ? "warn-text" : "", text: v.sla}),
        v.sla_reason ? " (" + v.sla_reason + ")" : "",
        " · run ", el("span", {class: v.valid === "valid" ? "ok" : v.valid === "not valid" ? "warn-text" : "", text: v.valid}),
        v.invalid_reasons ? " (" + v.invalid_reasons + ")" : "",
        v.notes ? " · " + v.notes : ""));
      body.appendChild(el("div", {class: "metrics"}, s.metrics.map(function (m) { return kv(m.name, m.value); })));
      if (s.audit && s.audit.rows.length) {
        var aid = "drill-audit-" + s.name.replace(/[^A-Za-z0-9_-]+/g, "_");
        body.appendChild(el("h4", {text: "Audit against the engine's own counters and log"}));
        body.appendChild(plainTable(aid, "trial-" + d.number + "-" + s.name + "-audit", s.audit.head, s.audit.rows,
          function (i) { return s.audit.flags[i] || null; }));
        body.appendChild(el("p", null, csvButton(aid)));
      }
      var r = s.roofline;
      body.appendChild(el("div", {class: "roofline"},
        el("b", {text: "roofline: " + r.text}), el("span", {class: "estimate", text: "estimate"}), " ",
        r.fraction !== null
          ? r.measured + " measured of a " + r.bound + " bound with " + r.concurrency_text +
            " sequences in flight (" + r.concurrency_source + "; " + r.bound_kind + "-bound)." +
            (r.bound_at_max !== r.bound ? " At max_concurrency the bound is " + r.bound_at_max + "." : "") +
            " " + r.note + "."
          : r.note));
    });
    if (d.scenarios.length) {
      body.appendChild(el("p", {class: "hint", text: "Roofline: " + d.roofline_note + "."}));
    }
    if (d.quality) {
      var q = d.quality;
      body.appendChild(el("h3", null, q.title + " ",
        q.reference !== null && !q.is_reference ? el("span", {class: "hint", text: "trial #" + q.reference}) : null));
      body.appendChild(el("div", {class: "verdict"}, "verdict ",
        el("span", {class: q.status === "passed" ? "ok" : (q.status === "failed" || q.status === "not checked") ? "bad" : "", text: q.status}),
        q.reason ? " (" + q.reason + ")" : ""));
      body.appendChild(el("div", {class: "metrics"}, q.figures.map(function (f) { return kv(f.name, f.value); })));
      if (q.examples.length) {
        body.appendChild(plainTable("drill-quality", "trial-" + d.number + "-quality",
          ["prompt", "baseline", "this trial", "differs at token"],
          q.examples.map(function (x) { return [x.prompt, x.baseline, x.trial, String(x.at)]; })));
      }
    }
    if (d.figures && d.figures.load) {
      body.appendChild(el("h3", {text: "Across load levels"}));
      var lf = el("div", {class: "figure", id: "drill-load"});
      body.appendChild(lf);
      figures.push([lf, d.figures.load]);
    }
    if (d.figures && d.figures.cdf) {
      body.appendChild(el("h3", {text: "Latency distribution (CDF of requests)"}));
      var cf = el("div", {class: "figure", id: "drill-cdf"});
      body.appendChild(cf);
      figures.push([cf, d.figures.cdf]);
    }

    var sp = d.speculation;
    if (sp && sp.rows.length) {
      body.appendChild(el("h3", null, "Speculative decoding ", el("span", {class: "hint", text: "the engine's counters per load level"})));
      var pos = [];
      for (var i = 0; i < sp.positions; i++) { pos.push("pos " + (i + 1)); }
      body.appendChild(plainTable("drill-spec", "trial-" + d.number + "-speculation",
        ["scenario", "level", "output tok/s"].concat(sp.columns, pos),
        sp.rows.map(function (r) {
          var cells = r.per_position.slice();
          while (cells.length < sp.positions) { cells.push("—"); }
          return [r.scenario, r.level, r.output_tokens_per_s].concat(r.values, cells);
        })));
      body.appendChild(el("p", null, csvButton("drill-spec"),
        el("span", {class: "hint", text: "  acceptance rate: accepted ÷ draft tokens; mean accepted length: 1 + accepted ÷ drafts (the bonus token counts); pos i: share of drafts whose token i was accepted"})));
    }

    body.appendChild(el("h3", null, "Configuration",
      d.baseline_number !== null && !d.is_baseline ? el("span", {class: "hint", text: " against the baseline, trial #" + d.baseline_number}) : null));
    if (d.config.length) {
      var head = d.baseline_number !== null && !d.is_baseline ? ["parameter", "this trial", "baseline"] : ["parameter", "value"];
      var rows = d.config.map(function (c) { return head.length === 3 ? [c.name, c.value, c.baseline] : [c.name, c.value]; });
      body.appendChild(plainTable("drill-config", "trial-" + d.number + "-config", head, rows,
        function (i) { return d.config[i].differs ? "differs" : null; }));
      body.appendChild(el("p", null, csvButton("drill-config")));
    } else {
      body.appendChild(el("p", {class: "empty", text: "No parameters recorded."}));
    }

    body.appendChild(el("h3", {text: "Launch command"}));
    if (d.command_parts.length) {
      var pre = el("pre", {id: "drill-command"});
      d.command_parts.forEach(function (part, i) {
        if (i) { pre.appendChild(document.createTextNode(" ")); }
        pre.appendChild(part.changed ? el("mark", {text: part.text, title: "differs from the baseline's command"}) : document.createTextNode(part.text));
      });
      body.appendChild(pre);
      var copy = el("button", {class: "btn", type: "button", text: "copy command"});
      copy.addEventListener("click", function () {
        if (navigator.clipboard) { navigator.clipboard.writeText(d.command).then(function () { copy.textContent = "copied"; }, function () {}); }
      });
      body.appendChild(el("p", null, copy, d.is_baseline ? "" : el("span", {class: "hint", text: "  highlighted: not in the baseline's command"})));
    } else {
      body.appendChild(el("p", {class: "empty", text: "No command: the trial never launched an engine."}));
    }

    if (d.warmup) {
      body.appendChild(el("h3", {text: "Warm-up before the first level"}));
      body.appendChild(el("p", {class: d.warmup.clean ? "" : "warn-text", text: d.warmup.text}));
      body.appendChild(plainTable("drill-warmup", "trial-" + d.number + "-warmup", d.warmup.head, d.warmup.rows));
    }

    body.appendChild(el("h3", {text: "Engine /metrics over the trial"}));
    if (d.deltas.rows.length) {
      var dh = ["metric", "change (whole trial)"].concat(d.deltas.scenarios);
      body.appendChild(plainTable("drill-deltas", "trial-" + d.number + "-metrics", dh,
        d.deltas.rows.map(function (r) { return [r.name, r.total].concat(r.per_scenario); })));
      body.appendChild(el("p", null, csvButton("drill-deltas")));
    } else {
      body.appendChild(el("p", {class: "empty", text: "No /metrics were scraped."}));
    }

    body.appendChild(el("h3", {text: "engine.log (last lines)"}));
    body.appendChild(d.log_tail ? el("pre", {id: "drill-log", text: d.log_tail}) : el("p", {class: "empty", text: "No engine log."}));

    figures.forEach(function (f) { plot(f[0], f[1]); });
  }
  function showDrawer(show) {
    $("drill").hidden = !show;
    $("drill-backdrop").hidden = !show;
  }
  function markSelected(n) {
    document.querySelectorAll("tr.trow.selected").forEach(function (tr) { tr.classList.remove("selected"); });
    var tr = $("trial-" + n);
    if (tr) { tr.classList.add("selected"); }
  }
  function openTrial(n, keepHash) {
    if (n === null || n === undefined || isNaN(n)) { return; }
    ST.state.trial = n;
    markSelected(n);
    var body = $("drill-body");
    $("drill-title").textContent = "Trial #" + n;
    body.textContent = "";
    body.appendChild(el("p", {class: "hint", text: "loading…"}));
    showDrawer(true);
    if (!keepHash && location.hash !== "#trial=" + n) { history.replaceState(null, "", "#trial=" + n); }
    return getDetail(n).then(function (d) {
      if (ST.state.trial !== n) { return; }
      if (!d) { body.textContent = ""; body.appendChild(el("p", {class: "empty", text: "Trial #" + n + " is not in this study (yet)."})); return; }
      renderDetail(d);
    }).catch(function (e) {
      body.textContent = "";
      body.appendChild(el("p", {class: "filter-error", text: "Could not load trial #" + n + ": " + e.message}));
    });
  }
  ST.openTrial = openTrial;
  function closeTrial() {
    ST.state.trial = null;
    showDrawer(false);
    markSelected(null);
    if (/^#trial=/.test(location.hash)) { history.replaceState(null, "", location.pathname + location.search); }
  }
  ST.closeTrial = closeTrial;
  function step(delta) {
    var ns = trialNumbers(), i = ns.indexOf(ST.state.trial);
    if (!ns.length) { return; }
    openTrial(ns[i < 0 ? 0 : (i + delta + ns.length) % ns.length]);
  }
  function initDrawer() {
    window.addEventListener("hashchange", fromHash);
    if (!$("drill")) { return; }
    $("drill-close").addEventListener("click", closeTrial);
    $("drill-backdrop").addEventListener("click", closeTrial);
    $("drill-prev").addEventListener("click", function () { step(-1); });
    $("drill-next").addEventListener("click", function () { step(1); });
    document.addEventListener("keydown", function (ev) {
      if ($("drill").hidden || /INPUT|SELECT|TEXTAREA/.test((ev.target.tagName || ""))) { return; }
      if (ev.key === "Escape") { closeTrial(); } else if (ev.key === "ArrowLeft") { step(-1); } else if (ev.key === "ArrowRight") { step(1); }
    });
    document.addEventListener("click", function (ev) {
      var a = ev.target.closest && ev.target.closest("a[data-trial]");
      if (a) { ev.preventDefault(); openTrial(Number(a.getAttribute("data-trial"))); }
    });
  }
  function fromHash() {
    var m = /^#trial=(\d+)$/.exec(location.hash);
    if (!$("drill")) { return; }
    if (m) { openTrial(Number(m[1]), true); }
  }

  // -- live refresh (servetune report serve) --------------------------------------------------------------
  var POLL_MS = 2000;
  function setLive(cls, text) {
    var live = $("live");
    if (!live) { return; }
    live.className = "live " + cls;
    live.querySelector(".text").textContent = text;
  }
  function refresh(p) {
    var scroll = window.scrollY;
    return fetch(location.pathname + location.search, {headers: {Accept: "text/html"}}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.text();
    }).then(function (html) {
      var doc = new DOMParser().parseFromString(html, "text/html");
      var fresh = doc.getElementById("st-app");
      if (!fresh) { throw new Error("no report in the page"); }
      document.querySelectorAll("#st-app .js-plotly-plot").forEach(function (n) { Plotly.purge(n); });
      $("st-app").replaceWith(document.importNode(fresh, true));
      initApp();
      window.scrollTo(0, scroll);
      if (ST.state.trial !== null) { openTrial(ST.state.trial, true); }
    });
  }
  function pollUrl(p) { return p.poll || (p.study ? apiBase(p) : ""); }
  function poll() {
    var p = page();
    if (p.mode !== "serve" || !pollUrl(p)) { return; }
    var busy = false;
    function tick() {
      if (busy || document.hidden) { return; }
      busy = true;
      fetch(pollUrl(p), {headers: {Accept: "application/json"}, cache: "no-store"}).then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      }).then(function (s) {
        var cur = page();
        var when = new Date().toLocaleTimeString();
        if (s.version !== cur.version) {
          setLive("on", "updating…");
          return refresh(cur).then(function () { setLive("on", "live · updated " + when); });
        }
        setLive(s.active ? "on" : "", (s.active ? "live" : "idle") + " · checked " + when);
      }).catch(function (e) { setLive("error", "offline (" + e.message + ")"); })
        .then(function () { busy = false; });
    }
    setLive("on", "live");
    setInterval(tick, POLL_MS);
  }

  function initApp() {
    drawCharts();
    document.querySelectorAll("table.exportable").forEach(function (t) { if (t.id !== "trial-table") { initSorting(t); } });
    var trials = $("trial-table");
    if (trials) { initSorting(trials); }
    initTrialTable();
    initCsvButtons($("st-app") || document);
  }

  function start() {
    initApp();
    initDrawer();
    fromHash();
    poll();
    if (typeof ST.onStart === "function") { ST.onStart(); }
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();

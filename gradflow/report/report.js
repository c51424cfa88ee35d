// gradflow report: draws the run data of the page (or of /data.json, live) with plotly.
(() => {
  "use strict";
  const MAX_STAGE_LABELS = 30;
  const POLL_MS = 1000;
  const state = { data: null, log: true, filter: "", panels: new Map(), pending: new Map() };

  // Plots are drawn when they come near the screen: a 1000-layer report has megabytes of
  // heat maps, and the page is usable as soon as the visible ones are drawn.
  let firstBatch = null;
  const firstDrawn = new Promise((resolve) => {
    firstBatch = resolve;
  });
  const observer = new IntersectionObserver((entries) => {
    const jobs = entries
      .filter((e) => e.isIntersecting && state.pending.has(e.target))
      .map((e) => drawNow(e.target));
    if (firstBatch) {
      Promise.all(jobs).then(firstBatch);
      firstBatch = null;
    }
  });

  function drawNow(div) {
    const job = state.pending.get(div);
    state.pending.delete(div);
    observer.unobserve(div);
    return job().then(() => {
      div.dataset.drawn = "1";
    });
  }

  // Draw now if the plot is on the page already, else when it comes near the screen.
  function lazy(div, job) {
    state.pending.set(div, job);
    if (div.dataset.drawn) return drawNow(div);
    observer.observe(div);
    return null;
  }

  function drawAll() {
    return Promise.all([...state.pending.keys()].map(drawNow));
  }

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  }

  // plotly reads a subset of HTML in every label (<b>, <a href>, <span style>, entities):
  // text from run files goes in escaped, so that it shows as the text it is.
  function esc(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function table(rows) {
    const t = el("table");
    rows.forEach((cells) => {
      const tr = el("tr");
      cells.forEach((c) => tr.appendChild(el("td", c)));
      t.appendChild(tr);
    });
    return t;
  }

  // base64 float32, one row of bins per layer -> rows of Float32Array views
  function decode(b64, nRows) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const all = new Float32Array(bytes.buffer);
    const cols = nRows ? all.length / nRows : 0;
    return Array.from({ length: nRows }, (_, r) => all.subarray(r * cols, (r + 1) * cols));
  }

  // log10 of each value; zeros (and negatives) as the smallest positive value: a tiny update
  function logRows(rows, floor) {
    return rows.map((row) =>
      row.map((v) => (v > 0 ? Math.log10(v) : Number.isNaN(v) ? NaN : floor)),
    );
  }

  function matcher(text) {
    if (!text) return () => true;
    const low = text.toLowerCase();
    let re = null;
    try {
      re = new RegExp(text, "i");
    } catch (err) {
      re = null; // not a regular expression: a plain substring
    }
    return (name) => name.toLowerCase().includes(low) || (re !== null && re.test(name));
  }

  // NaN is a value not measured; an infinite value was recorded as such.
  function fmt(v) {
    if (Number.isNaN(v)) return "not measured";
    if (!Number.isFinite(v)) return v > 0 ? "inf" : "-inf";
    return Number(v).toPrecision(4);
  }

  // plotly leaves a non-finite cell blank, as it does a missing one: +-inf take the colour
  // scale's ends instead.
  function clampInfinite(row, lo, hi) {
    if (!row.some((v) => v === Infinity || v === -Infinity)) return row;
    return row.map((v) => (v === Infinity ? hi : v === -Infinity ? lo : v));
  }

  function spanText(unit, span) {
    return span[0] === span[1] ? `${unit} ${span[0]}` : `${unit}s ${span[0]}–${span[1]}`;
  }

  // Stage names at the centres of their rows, a line between stages, the bottleneck in bold.
  function stageMarks(run, rows) {
    const groups = [];
    rows.forEach((row, i) => {
      const s = run.stage_of[row];
      const last = groups[groups.length - 1];
      if (last && last.stage === s) last.stop = i + 1;
      else groups.push({ stage: s, start: i, stop: i + 1 });
    });
    const every = Math.max(1, Math.ceil(groups.length / MAX_STAGE_LABELS));
    const labelled = groups.filter((g, i) => i % every === 0 || run.stages[g.stage].bottleneck);
    const shapes = groups.slice(1).map((g) => ({
      type: "line", xref: "paper", x0: 0, x1: 1, y0: g.start - 0.5, y1: g.start - 0.5,
      line: { color: "black", width: 0.6 }, opacity: 0.6,
    }));
    groups.filter((g) => run.stages[g.stage].bottleneck).forEach((g) => shapes.push({
      type: "rect", xref: "paper", x0: 0, x1: 0.015, y0: g.start - 0.5, y1: g.stop - 0.5,
      fillcolor: "#262626", line: { width: 0 },
    }));
    return {
      tickvals: labelled.map((g) => (g.start + g.stop - 1) / 2),
      ticktext: labelled.map((g) => {
        const st = run.stages[g.stage];
        return st.bottleneck ? `<b>${esc(st.name)}</b>` : esc(st.name);
      }),
      shapes,
    };
  }

  function logTicks(lo, hi) {
    const vals = [];
    for (let k = Math.floor(lo); k <= Math.ceil(hi); k++) vals.push(k);
    return { tickvals: vals, ticktext: vals.map((k) => `1e${k}`) };
  }

  // Steps and epochs are whole numbers: a tick per unit where few fit, plotly's choice otherwise.
  function integerTicks(edges) {
    const first = Math.ceil(edges[0]);
    return edges[edges.length - 1] - edges[0] <= 12 ? { tickmode: "linear", tick0: first, dtick: 1 } : {};
  }

  function drawPanel(div, section, panel, diff, showscale) {
    const data = state.data;
    const run = data.runs[panel.run];
    const match = matcher(state.filter);
    const keep = [];
    panel.rows.forEach((row, k) => {
      if (match(run.layers[row].name)) keep.push(k);
    });
    const logMode = state.log;
    panel._rows = panel._rows || (diff ? {} : { raw: decode(panel.values, panel.rows.length) });
    let rows;
    let zmin;
    let zmax;
    let colorbar = { title: { text: esc(section.label), side: "right" }, thickness: 12 };
    let colorscale = data.colourscales.heat;
    let what = "value";
    if (diff) {
      colorscale = data.colourscales.diff;
      // Fractions (a fixed 0..1 scale) differ as A − B: a ratio of zero fractions is 0 / 0.
      const ratio = logMode && section.log;
      const key = ratio ? "ratio" : "diff";
      panel._rows[key] = panel._rows[key] || decode(panel[key], panel.rows.length);
      rows = panel._rows[key];
      const r = (ratio ? panel.ratio_range : panel.diff_range) || [0, 1];
      zmax = r[1] || 1;
      zmin = -zmax;
      what = ratio ? "log10 A / B" : "A − B";
      colorbar.title.text = esc(`${what}: ${section.label}`);
    } else if (logMode && section.log && section.log_range) {
      const lo = Math.log10(section.log_range[0]);
      const hi = Math.log10(section.log_range[1]);
      panel._rows.log = panel._rows.log || logRows(panel._rows.raw, lo);
      rows = panel._rows.log;
      zmin = lo;
      zmax = hi;
      colorbar = { ...colorbar, ...logTicks(lo, hi) };
    } else {
      rows = panel._rows.raw;
      [zmin, zmax] = section.range || [0, 1];
    }
    const z = keep.map((k) => clampInfinite(rows[k], zmin, zmax));
    const marks = stageMarks(run, keep.map((k) => panel.rows[k]));
    const traces = [{
      type: "heatmap", x: panel.edges, y: Array.from({ length: keep.length + 1 }, (_, i) => i - 0.5),
      z, zmin, zmax, colorscale, hoverinfo: "none", colorbar, showscale,
    }];
    const shown = keep.map((k) => run.layers[panel.rows[k]].name);
    run.events.forEach((ev) => {
      const y = shown.indexOf(ev.layer);
      if (y < 0) return;
      traces.push({
        type: "scatter", mode: "markers", x: [section.unit === "epoch" ? ev.epoch : ev.step], y: [y],
        marker: { symbol: "x", size: 11, color: "#ff00ff", line: { color: "black", width: 1 } },
        name: esc(`first non-finite ${ev.probe}: ${ev.layer}, step ${ev.step}`), hoverinfo: "name",
        showlegend: false,
      });
    });
    const layout = {
      title: { text: esc(panel.title), x: 0, xanchor: "left", font: { size: 13 } },
      margin: { l: 90, r: 10, t: 34, b: 40 },
      height: Math.min(560, Math.max(320, 120 + 10 * keep.length)),
      plot_bgcolor: data.no_value, // no value: the layer did not run, nothing in the bin
      xaxis: { title: { text: section.unit }, zeroline: false, showgrid: false, ...integerTicks(panel.edges) },
      yaxis: {
        autorange: "reversed", tickmode: "array", tickvals: marks.tickvals,
        ticktext: marks.ticktext, ticks: "", showgrid: false, zeroline: false,
      },
      shapes: marks.shapes,
      uirevision: `${state.filter}`,
      dragmode: "zoom",
    };
    state.panels.set(div.id, { run, panel, keep, rows: diff ? rows : panel._rows.raw, what, unit: section.unit });
    div.dataset.rows = String(keep.length);
    return Plotly.react(div, traces, layout, { displaylogo: false, responsive: true }).then(() => {
      if (div.dataset.hover) return;
      div.dataset.hover = "1";
      div.on("plotly_hover", (ev) => showTooltip(div, ev));
      div.on("plotly_unhover", () => { document.getElementById("tooltip").hidden = true; });
    });
  }

  function showTooltip(div, ev) {
    const info = state.panels.get(div.id);
    const p = ev.points && ev.points[0];
    if (!info || !p || p.data.type !== "heatmap") return;
    const [r, c] = Array.isArray(p.pointNumber) ? p.pointNumber : p.pointIndex;
    const k = info.keep[r];
    if (k === undefined) return;
    const layer = info.run.layers[info.panel.rows[k]];
    const tip = document.getElementById("tooltip");
    const lines = [
      ["layer", layer.name],
      ["kind", `${layer.kind}, depth ${layer.depth}`],
      ["at", spanText(info.unit, info.panel.spans[c])],
      [info.what, fmt(info.rows[k][c])],
    ];
    // Tied parameters: the other modules that own this layer's parameters.
    if (layer.aliases && layer.aliases.length) lines.splice(1, 0, ["also", layer.aliases.join(", ")]);
    tip.replaceChildren(...lines.map(([key, val]) => {
      const line = el("div");
      line.appendChild(el("span", `${key} `, "key"));
      line.appendChild(el("span", val, `val-${key.replace(/\W+/g, "-")}`));
      return line;
    }));
    tip.hidden = false;
    const e = ev.event || {};
    const x = (e.clientX || 0) + 14;
    const y = (e.clientY || 0) + 14;
    tip.style.left = `${Math.min(x, window.innerWidth - tip.offsetWidth - 4)}px`;
    tip.style.top = `${Math.min(y, window.innerHeight - tip.offsetHeight - 4)}px`;
  }

  function plotDiv(container, id) {
    let div = document.getElementById(id);
    if (!div) {
      div = el("div", undefined, "plot");
      div.id = id;
      container.appendChild(div);
    }
    return div;
  }

  function drawHeatmaps() {
    const root = document.getElementById("heatmaps");
    const seen = new Set();
    // Every section and div first: plotly sizes a plot to its div's width when drawn.
    const todo = [];
    state.data.heatmaps.forEach((section) => {
      const sid = `heat-${section.stat.replace(/\W+/g, "-")}`;
      seen.add(sid);
      let box = document.getElementById(sid);
      if (!box) {
        box = el("div", undefined, "heat-section");
        box.id = sid;
        box.appendChild(el("h2", `${section.label} (${section.stat})`));
        box.appendChild(el("div", undefined, "row"));
        box.appendChild(el("p", "", "note"));
        root.appendChild(box);
      }
      box.classList.toggle("wide", section.panels.length > 1);
      const row = box.querySelector(".row");
      const d = section.diff;
      section.panels.forEach((panel, i) => {
        const div = plotDiv(row, `${sid}-run${panel.run}`);
        todo.push([div, section, panel, false, i === section.panels.length - 1]);
      });
      if (d && d.diff) todo.push([plotDiv(row, `${sid}-diff`), section, d, true, true]);
      const notes = [];
      if (section.log && !section.log_range) notes.push("no positive values: linear colour");
      if (!section.log) notes.push("fixed scale 0..1");
      if (section.panels.length > 1) notes.push("one colour scale for all runs");
      if (section.infinite) notes.push("infinite values at the ends of the colour scale (hover: inf)");
      if (section.left_out) notes.push(section.left_out);
      if (d && d.diff) notes.push("difference over the layers both runs have, matched by name");
      if (d && d.note) notes.push(d.note);
      box.querySelector(".note").textContent = notes.join("; ");
    });
    root.querySelectorAll(".heat-section").forEach((box) => {
      if (!seen.has(box.id)) box.remove();
    });
    const match = matcher(state.filter);
    document.getElementById("layer-count").textContent = state.data.runs
      .map((run) => {
        const count = `${run.label}: ${run.layers.filter((l) => match(l.name)).length} of ${run.layers.length} layers`;
        return run.not_measured ? `${count} (${run.not_measured} never measured: not shown)` : count;
      })
      .join("; ");
    return todo.map((args) => lazy(args[0], () => drawPanel(...args)));
  }

  function epochSpan(traces) {
    const xs = traces.flatMap((t) => t.x);
    return [Math.min(...xs), Math.max(...xs)];
  }

  function drawCurves() {
    const root = document.getElementById("curves");
    const runs = state.data.runs;
    const jobs = [];
    const layout = (title, x, range) => ({
      title: { text: title, x: 0, xanchor: "left", font: { size: 13 } },
      height: 360, margin: { l: 60, r: 10, t: 34, b: 40 },
      xaxis: { title: { text: x }, ...integerTicks(range) },
      legend: { orientation: "h", y: -0.2 }, showlegend: true,
    });
    const loss = runs
      .filter((run) => run.curves.loss.x.length)
      .map((run) => ({ type: "scatter", mode: "lines", name: esc(run.label), ...run.curves.loss }));
    const metrics = [];
    runs.forEach((run) => {
      Object.entries(run.curves.metrics).forEach(([name, series]) => {
        metrics.push({
          type: "scatter", mode: series.x.length < 30 ? "lines+markers" : "lines",
          name: esc(`${run.label}, ${name}`), line: { dash: name.startsWith("val") ? "dash" : "solid" },
          ...series,
        });
      });
    });
    if (!root.querySelector("h2")) root.appendChild(el("h2", "learning curves"));
    if (loss.length) {
      jobs.push(lazy(plotDiv(root, "curve-loss"), () => Plotly.react(document.getElementById("curve-loss"),
        loss, layout("loss per recorded step (mean per bin)", "step", [0, Infinity]), { displaylogo: false })));
    }
    if (metrics.some((t) => t.x.length)) {
      jobs.push(lazy(plotDiv(root, "curve-metrics"), () => Plotly.react(document.getElementById("curve-metrics"),
        metrics, layout("per-epoch metrics (click the legend to hide one)", "epoch", epochSpan(metrics)), { displaylogo: false })));
    }
    return jobs;
  }

  function drawRuns() {
    const root = document.getElementById("runs");
    root.replaceChildren(...state.data.runs.map((run, i) => {
      const card = el("div", undefined, "run");
      card.appendChild(el("h2", run.label));
      const count = el("p", `${run.steps} steps, ${run.epochs} epochs`, "count");
      count.id = `run-${i}-steps`;
      count.dataset.steps = String(run.steps);
      card.appendChild(count);
      card.appendChild(el("pre", run.summary, "summary")); // as `gradflow info` prints it
      const cfg = el("details");
      cfg.appendChild(el("summary", `config (${run.config.length} entries)`));
      cfg.appendChild(table(run.config));
      card.appendChild(cfg);
      return card;
    }));
  }

  function draw() {
    drawRuns();
    const jobs = [...drawHeatmaps(), ...drawCurves()].filter((job) => job !== null);
    if (firstBatch && state.pending.size === 0) {
      firstBatch();
      firstBatch = null;
    }
    return Promise.all([...jobs, firstDrawn]);
  }

  function redraw() {
    Promise.all(drawHeatmaps()).catch((err) => console.error(err));
  }

  function ready() {
    window.gradflowReady = true;
    window.gradflowReadyMs = performance.now();
    document.body.dataset.ready = "1";
  }

  async function poll(last) {
    let stamp = last;
    const status = document.getElementById("live-status");
    try {
      const res = await fetch("status.json", { cache: "no-store" });
      const now = await res.json();
      // The data changes with the row counts and when a file is replaced (a new version).
      stamp = JSON.stringify([now.counts, now.version]);
      if (stamp !== last) {
        const data = await fetch("data.json", { cache: "no-store" });
        if (!data.ok) throw new Error(await data.text());
        state.data = await data.json();
        await draw();
        if (!window.gradflowReady) ready();
      }
      const checked = new Date().toLocaleTimeString();
      status.textContent = now.error
        ? `live: ${now.error} (checked ${checked}; showing the last data read)`
        : `live, checked ${checked}`;
      status.classList.toggle("error", Boolean(now.error));
    } catch (err) {
      stamp = last;
      status.textContent = `live: ${err.message || err}`;
      status.classList.add("error");
    }
    setTimeout(() => poll(stamp), POLL_MS);
  }

  function init() {
    const filter = document.getElementById("layer-filter");
    filter.addEventListener("input", () => {
      state.filter = filter.value.trim();
      redraw();
    });
    const log = document.getElementById("log-colour");
    log.addEventListener("change", () => {
      state.log = log.checked;
      redraw();
    });
    window.addEventListener("beforeprint", drawAll);
    document.getElementById("heatmaps").addEventListener("mouseleave", () => {
      document.getElementById("tooltip").hidden = true;
    });
    const embedded = JSON.parse(document.getElementById("gradflow-data").textContent);
    if (embedded === null) {
      poll(null);
      return;
    }
    state.data = embedded;
    draw().then(ready).catch((err) => console.error(err));
  }

  init();
})();

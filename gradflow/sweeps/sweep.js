// gradflow sweep: draws the page's data (runs table, scalar plot, small multiples) with plotly.
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("gradflow-data").textContent);
  const config = { displaylogo: false, responsive: true };
  const sort = { column: -1, descending: false };

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  }

  // Scalars to four significant digits; a missing one (NaN in the run) as n/a.
  function cellText(value, numeric) {
    if (!numeric) return value;
    return value === null ? "n/a" : Number(value).toPrecision(4);
  }

  function compare(a, b, numeric) {
    if (numeric) {
      if (a === null) return b === null ? 0 : 1;
      if (b === null) return -1;
      return a - b;
    }
    return String(a).localeCompare(String(b), undefined, { numeric: true });
  }

  function drawTable() {
    const table = data.table;
    const head = el("thead");
    const header = el("tr");
    table.columns.forEach((name, c) => {
      const th = el("th", name + (sort.column === c ? (sort.descending ? " ▼" : " ▲") : ""));
      th.title = "sort by " + name;
      th.addEventListener("click", () => {
        sort.descending = sort.column === c ? !sort.descending : false;
        sort.column = c;
        drawTable();
      });
      if (table.numeric[c]) th.className = "num";
      header.appendChild(th);
    });
    head.appendChild(header);
    let rows = table.rows.slice();
    if (sort.column >= 0) {
      const c = sort.column;
      rows.sort((a, b) => compare(a[c], b[c], table.numeric[c]) * (sort.descending ? -1 : 1));
    }
    const body = el("tbody");
    rows.forEach((row) => {
      const tr = el("tr");
      row.forEach((value, c) => tr.appendChild(el("td", cellText(value, table.numeric[c]), table.numeric[c] ? "num" : undefined)));
      body.appendChild(tr);
    });
    const node = document.getElementById("runs");
    node.replaceChildren(head, body);
    node.dataset.rows = String(rows.length);
  }

  function drawScalar() {
    const scalar = document.getElementById("scalar").value;
    const x = document.getElementById("x").value;
    const fig = data.scalar_figures[`${scalar}|${x}`];
    const div = document.getElementById("scalar-plot");
    div.dataset.key = `${scalar}|${x}`;
    return Plotly.react(div, fig.data, fig.layout, config);
  }

  function options(select, items, chosen) {
    items.forEach(([value, label, title]) => {
      const option = el("option", label);
      option.value = value;
      if (title) option.title = title;
      select.appendChild(option);
    });
    select.value = chosen;
    select.addEventListener("change", () => {
      drawScalar().catch((err) => console.error(err));
    });
  }

  function drawHeatmaps() {
    const root = document.getElementById("heatmaps");
    return data.heatmaps.map((section) => {
      const box = el("div", undefined, "heat-section");
      const div = el("div", undefined, "plot");
      div.id = `heat-${section.stat.replace(/\W+/g, "-")}`;
      box.appendChild(div);
      root.appendChild(box);
      return Plotly.newPlot(div, section.figure.data, section.figure.layout, config);
    });
  }

  function init() {
    document.getElementById("title").textContent = data.title;
    document.getElementById("structure").textContent = data.structure;
    document.getElementById("notes").replaceChildren(...data.notes.map((note) => el("li", note)));
    drawTable();
    options(document.getElementById("scalar"),
      data.scalars.map((s) => [s.name, s.label, s.doc]), data.default.scalar);
    options(document.getElementById("x"),
      data.xs.map((x) => [x, x || "run"]), data.default.x);
    Promise.all([drawScalar(), ...drawHeatmaps()]).then(() => {
      window.gradflowReady = true;
      document.body.dataset.ready = "1";
    }).catch((err) => console.error(err));
  }

  init();
})();

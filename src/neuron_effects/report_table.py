"""The report's table of every neuron: searchable, sortable, a click opens its per-prompt effects.

The page must stay usable at 8,177 neurons x 100 prompts and self-contained, so the data is
embedded once, compactly, and the rows are drawn by a small hand-written script:

* one JSON block: the summary rows (numbers to 4 significant digits) and, per series, the
  [neurons x prompts] matrix of per-prompt effects on the target logit as base64 little-endian
  float32 (``direct`` and ``total``, plus ``total_atp`` and ``total_relp`` when present).
  ``indirect`` is not stored: it is ``total - direct`` by definition and computed in the page.
  The matrices are decoded only when a neuron is first opened;
* the script draws at most :data:`PAGE_ROWS` rows of the filtered and sorted list at a time (a
  button shows more), so the page holds a few hundred rows whatever the number of neurons.

Why not a table library: the well-kept ones (DataTables, Tabulator, Grid.js) weigh 50-400 kB
minified, need their licence inlined and a pinned copy kept up to date, and still need custom code
for the per-prompt plot; what is needed here (substring filter, column sort, paging, one inline
SVG) is about a hundred lines.
"""

from __future__ import annotations

import base64
import html
import json
import math
from typing import Any

import numpy as np
import pandas as pd

# (column of neurons.parquet, header, kind): always shown.
COLUMNS = [
    ("neuron_id", "neuron", "text"),
    ("layer", "layer", "num"),
    ("classification", "class", "text"),
    ("classification_frozen_norm", "class (frozen norm)", "text"),
    ("mean_direct_ratio", "mean direct ratio", "num"),
    ("consistency", "consistency", "num"),
    ("aligned_fraction", "sign alignment", "num"),
    ("mean_total", "mean total", "num"),
]
# Shown when neurons.parquet has them (added by the mediation and attribution-patching steps).
OPTIONAL_COLUMNS = [
    ("top_mediator", "top mediator", "text"),
    ("indirect_share_attn", "indirect share via attention", "num"),
    ("atp_spearman", "AtP Spearman", "num"),
    ("relp_spearman", "RelP Spearman", "num"),
    ("edge_real_fraction", "real edges", "num"),
]
# Per-prompt series of per_prompt.parquet (effects on the target logit); indirect = total - direct.
SERIES = ("direct", "total")
OPTIONAL_SERIES = ("total_atp", "total_relp")
PAGE_ROWS = 200


def _rounded(value: Any) -> Any:
    """JSON-safe cell value: floats to 4 significant digits, NaN -> None, numpy -> Python."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(f"{value:.4g}")
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return str(value)


def _matrix(per_prompt: pd.DataFrame, neuron_ids: pd.Index, prompt_ids: pd.Index,
            column: str) -> str:
    """``per_prompt[column]`` as a [neurons x prompts] float32 matrix (NaN where a pair is
    missing; rows of other neurons are left out), row-major, base64 of its little-endian
    bytes."""
    matrix = np.full((len(neuron_ids), len(prompt_ids)), np.nan, dtype="<f4")
    rows = neuron_ids.get_indexer(per_prompt["neuron_id"])
    listed = rows >= 0
    matrix[rows[listed], prompt_ids.get_indexer(per_prompt["prompt_id"][listed])] = \
        per_prompt[column].to_numpy()[listed]
    return base64.b64encode(matrix.tobytes()).decode("ascii")


def neuron_table_data(neurons: pd.DataFrame, per_prompt: pd.DataFrame) -> dict[str, Any]:
    """What the page's script reads: columns, one row per neuron (in ``neurons``' order), the
    prompt ids (in ``per_prompt``'s order) and the per-prompt series."""
    columns = [c for c in COLUMNS + OPTIONAL_COLUMNS if c[0] in neurons.columns]
    neuron_ids = pd.Index(neurons["neuron_id"])
    prompt_ids = pd.Index(pd.unique(per_prompt["prompt_id"]))
    series = [name for name in SERIES + OPTIONAL_SERIES if name in per_prompt.columns]
    return {
        "columns": [{"key": key, "label": label, "kind": kind} for key, label, kind in columns],
        "rows": [[_rounded(value) for value in row]
                 for row in neurons[[key for key, _, _ in columns]].itertuples(index=False)],
        "prompts": [str(p) for p in prompt_ids],
        "series": {name: _matrix(per_prompt, neuron_ids, prompt_ids, name) for name in series},
    }


STYLE = """
.table-search{width:100%;max-width:28rem;padding:.35rem .5rem;font-size:.95rem}
.neuron-box{max-height:70vh;overflow:auto;border:1px solid #ddd;margin:.5rem 0}
.neuron-box table{margin:0;width:100%}.neuron-box thead th{position:sticky;top:0;z-index:1}
.neuron-box th{cursor:pointer;user-select:none;white-space:nowrap}
.neuron-box th[aria-sort=ascending]::after{content:" \\25B2"}
.neuron-box th[aria-sort=descending]::after{content:" \\25BC"}
.neuron-box tbody tr.neuron{cursor:pointer}.neuron-box tbody tr.neuron:hover{background:#f4f8ff}
.neuron-box tr.open{background:#eef3fb}.neuron-detail td{background:#fbfbfb}
.neuron-detail .values{max-height:16rem;overflow:auto;display:inline-block;vertical-align:top}
.neuron-detail svg{max-width:100%;height:auto;display:block}
"""

SCRIPT = r"""
(() => {
  const data = JSON.parse(document.getElementById("neuron-table-data").textContent);
  const box = document.getElementById("neuron-table");
  const search = document.getElementById("neuron-search");
  const status = document.getElementById("neuron-status");
  const more = document.getElementById("neuron-more");
  const body = box.querySelector("tbody");
  const heads = Array.from(box.querySelectorAll("thead th"));
  const PAGE = %(page)d, COLOURS = {direct: "#ee6677", indirect: "#4477aa", total: "#222222",
    total_atp: "#228833", total_relp: "#aa3377"};
  const show = v => v === null ? "\u2013" : String(v);
  const text = data.rows.map(row => row.map(show).join(" ").toLowerCase());
  let order = data.rows.map((_, i) => i), shown = [], limit = PAGE, sortKey = -1, sortDir = 1;
  const opened = new Set();
  let series = null;
  function decode() {  // base64 little-endian float32 [neurons x prompts] -> Float32Array
    if (series) return series;
    series = {};
    for (const [name, b64] of Object.entries(data.series)) {
      const raw = atob(b64), bytes = new Uint8Array(raw.length);
      for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
      series[name] = new Float32Array(bytes.buffer);
    }
    return series;
  }
  function perPrompt(index) {
    const s = decode(), n = data.prompts.length, at = index * n, values = {};
    for (const name of Object.keys(s)) values[name] = Array.from(s[name].subarray(at, at + n));
    if (values.direct && values.total) {
      values.indirect = values.total.map((t, i) => t - values.direct[i]);
    }
    return values;
  }
  const fmt = v => Number.isFinite(v) ? Number(v.toPrecision(4)).toString() : "\u2013";
  function plot(values) {
    const names = ["direct", "indirect", "total", "total_atp", "total_relp"].filter(k => values[k]);
    const n = data.prompts.length, W = 760, H = 190, L = 56, R = 10, T = 18, B = 22;
    let top = 0;
    for (const k of names) for (const v of values[k]) if (Number.isFinite(v)) top = Math.max(top, Math.abs(v));
    top = top || 1;
    const slot = (W - L - R) / n, gap = Math.min(5, slot / (names.length + 1));
    const x = i => L + (i + 0.5) * slot, y = v => T + (H - T - B) * (1 - v / top) / 2;
    let svg = `<svg viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" ` +
      `aria-label="per-prompt effects"><line x1="${L}" x2="${W - R}" y1="${y(0)}" y2="${y(0)}" ` +
      `stroke="#999" stroke-width="0.6"/>` +
      `<text x="${L - 4}" y="${y(top) + 4}" font-size="10" text-anchor="end">${fmt(top)}</text>` +
      `<text x="${L - 4}" y="${y(-top) + 4}" font-size="10" text-anchor="end">${fmt(-top)}</text>` +
      `<text x="${L - 4}" y="${y(0) + 4}" font-size="10" text-anchor="end">0</text>` +
      `<text x="${(L + W - R) / 2}" y="${H - 4}" font-size="10" text-anchor="middle">` +
      `prompts (${n}), effect on the target logit</text>`;
    names.forEach((k, j) => {
      svg += `<text x="${L + 8 + j * 90}" y="11" font-size="11" fill="${COLOURS[k]}">\u25CF ${k}</text>`;
      values[k].forEach((v, i) => {
        if (Number.isFinite(v)) svg += `<circle cx="${x(i) + (j - (names.length - 1) / 2) * gap}" cy="${y(v)}" r="2.4" ` +
          `fill="${COLOURS[k]}" fill-opacity="0.75"><title>${escape(data.prompts[i])} ${k}: ${fmt(v)}</title></circle>`;
      });
    });
    return svg + "</svg>";
  }
  function escape(s) {
    return String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
  }
  function detail(index) {
    const values = perPrompt(index);
    const names = ["direct", "indirect", "total", "total_atp", "total_relp"].filter(k => values[k]);
    const rows = data.prompts.map((p, i) => `<tr><td>${escape(p)}</td>` +
      names.map(k => `<td class="num">${fmt(values[k][i])}</td>`).join("") + "</tr>").join("");
    return `<tr class="neuron-detail"><td colspan="${heads.length}">${plot(values)}` +
      `<div class="values"><table><thead><tr><th>prompt</th>${names.map(k => `<th>${k}</th>`).join("")}` +
      `</tr></thead><tbody>${rows}</tbody></table></div></td></tr>`;
  }
  function render() {
    const terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    shown = order.filter(i => terms.every(t => text[i].includes(t)));
    body.innerHTML = shown.slice(0, limit).map(i => {
      const cells = data.rows[i].map((v, c) => `<td${data.columns[c].kind === "num" ? ' class="num"' : ""}>` +
        `${escape(show(v))}</td>`).join("");
      const row = `<tr class="neuron${opened.has(i) ? " open" : ""}" data-index="${i}">${cells}</tr>`;
      return opened.has(i) ? row + detail(i) : row;
    }).join("");
    status.textContent = `${shown.length.toLocaleString("en")} of ${data.rows.length.toLocaleString("en")} ` +
      `neurons match; showing ${Math.min(limit, shown.length).toLocaleString("en")}.`;
    more.hidden = shown.length <= limit;
  }
  function sortBy(c) {
    sortDir = sortKey === c ? -sortDir : 1;
    sortKey = c;
    const kind = data.columns[c].kind;
    order.sort((a, b) => {
      const u = data.rows[a][c], v = data.rows[b][c];
      if (u === null || v === null) return (u === null) - (v === null);
      return sortDir * (kind === "num" ? u - v : String(u).localeCompare(String(v), "en", {numeric: true}));
    });
    heads.forEach((h, i) => h.setAttribute("aria-sort", i === c ? (sortDir > 0 ? "ascending" : "descending") : "none"));
    render();
  }
  heads.forEach((h, c) => h.addEventListener("click", () => sortBy(c)));
  search.addEventListener("input", () => { limit = PAGE; render(); });
  more.addEventListener("click", () => { limit += PAGE; render(); });
  body.addEventListener("click", event => {
    const row = event.target.closest("tr.neuron");
    if (!row) return;
    const i = Number(row.dataset.index);
    if (opened.has(i)) opened.delete(i); else opened.add(i);
    render();
  });
  render();
})();
"""


def _json_for_script(value: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</`` can close it)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def neuron_table_section(neurons: pd.DataFrame, per_prompt: pd.DataFrame,
                         table_scope: str = ": every neuron of the run") -> str:
    """The section "All neurons": a search box, the table (its own scroll box) and its data and
    script, all inline (``table_scope``: which neurons the table holds, after their number)."""
    data = neuron_table_data(neurons, per_prompt)
    head = "".join(f'<th scope="col" aria-sort="none">{html.escape(c["label"])}</th>'
                   for c in data["columns"])
    return (
        f"<style>{STYLE}</style>"
        f"<h2>All neurons</h2><p>{len(neurons):,} neurons{table_scope}. Type in the box to "
        "filter by neuron id or any text of a row (space-separated terms must all match), click "
        "a column header to sort, click a neuron to see its per-prompt direct, indirect and "
        "total effects on the target logit (indirect = total − direct).</p>"
        '<input type="search" id="neuron-search" class="table-search" '
        'placeholder="Search neurons, e.g. L12/N345 or logit-dominant" '
        'aria-label="Search neurons" autocomplete="off">'
        '<p id="neuron-status" aria-live="polite"></p>'
        f'<div class="neuron-box" id="neuron-table"><table><thead><tr>{head}</tr></thead>'
        "<tbody></tbody></table></div>"
        '<button type="button" id="neuron-more">Show more</button>'
        f'<script type="application/json" id="neuron-table-data">{_json_for_script(data)}'
        f"</script><script>{SCRIPT % {'page': PAGE_ROWS}}</script>"
    )

"""The report's HTML and figure helpers: the page's style, tables and figures as HTML, figures
as inline PNG data URIs, and the per-prompt scatter plot by layer (:mod:`neuron_effects.report`
and its sections use them)."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2.2rem}table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}
td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{background:#e6f4ea;border:1px solid #34a853;padding:.5rem 1rem}
.fail{background:#fce8e6;border:1px solid #ea4335;padding:.5rem 1rem}
.banner{background:#d93025;color:#fff;padding:.7rem 1rem;font-size:1.05rem}
.warn{background:#fef7e0;border:1px solid #f9ab00;padding:.5rem 1rem}
figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}img{max-width:100%}
.defs{background:#f8f8f8;padding:.6rem 1rem;font-size:.9rem}code{font-size:.85rem}
.table-box{max-width:100%;overflow-x:auto}
.verdicts{background:#f8f8f8;border:1px solid #ddd;padding:.5rem 1rem}.verdicts ul{margin:.3rem 0}
.verdicts .bad{color:#c5221f;font-weight:600}#contents ol{columns:2;margin:.3rem 0}
"""


def figure_uri(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def format_cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return html.escape(", ".join(map(str, value)))
    return html.escape(str(value))


def html_table(frame: pd.DataFrame, columns: list[str] | None = None) -> str:
    frame = frame if columns is None else frame[columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{format_cell(v)}</td>' if isinstance(v, (int, float, np.number))
            and not isinstance(v, bool) else f"<td>{format_cell(v)}</td>" for v in row
        ) + "</tr>" for row in frame.itertuples(index=False)
    )
    return (f'<div class="table-box"><table><thead><tr>{head}</tr></thead><tbody>{body}'
            "</tbody></table></div>")  # a wide table scrolls in its own box, not the page


def figure_html(uri: str, caption: str) -> str:
    return (f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


SCATTER_POINTS = 200_000  # points drawn at most in a scatter plot


def layer_scatter(per_prompt: pd.DataFrame, x: str, y: str, *, diagonal: float, line: str,
                   xlabel: str, ylabel: str, legend: str) -> str:
    """Per-prompt points ``y`` against ``x`` coloured by layer, symlog axes, with the line
    y = ``diagonal`` · x."""
    figure, axis = plt.subplots(figsize=(6.5, 5.2))
    if len(per_prompt) > SCATTER_POINTS:  # a census: a seeded random sample of the rows
        axis.set_title(f"a random {SCATTER_POINTS:,} of the {len(per_prompt):,} rows",
                       fontsize=9)
        per_prompt = per_prompt.sample(SCATTER_POINTS, random_state=0)
    points = axis.scatter(per_prompt[x], per_prompt[y], c=per_prompt["layer"],
                          cmap="viridis", s=6, alpha=0.6, linewidths=0)
    limit = float(np.nanmax(np.abs(per_prompt[[x, y]].to_numpy()))) or 1.0
    axis.plot([-limit, limit], [-diagonal * limit, diagonal * limit], color="#999", lw=0.7,
              ls=":", label=line)
    axis.set_xscale("symlog", linthresh=1e-3)
    axis.set_yscale("symlog", linthresh=1e-3)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8, loc=legend)
    figure.colorbar(points, ax=axis, label="layer")
    return figure_uri(figure)


def png_bytes(uri: str) -> bytes:
    """The PNG inside a data URI made by :func:`_figure_uri`."""
    return base64.b64decode(uri.split(",", 1)[1])


def section_id(title: str) -> str:
    """The anchor of a section titled ``title`` (HTML allowed): its text in lower case, each run
    of characters other than letters and digits one hyphen."""
    text = html.unescape(re.sub(r"<[^>]+>", "", title)).lower()
    return re.sub(r"[^0-9a-z]+", "-", text).strip("-") or "section"


def with_contents(body: str) -> tuple[str, str]:
    """``body`` with an id on every ``<h2>`` (:func:`section_id`, a suffix ``-2``, ``-3``... on
    a repeated title), and the contents list linking to them, in page order."""
    taken: set[str] = set()
    entries = []

    def anchored(match: re.Match) -> str:
        title = match.group(1)
        base = identifier = section_id(title)
        repeat = 1
        while identifier in taken:
            repeat += 1
            identifier = f"{base}-{repeat}"
        taken.add(identifier)
        text = html.escape(html.unescape(re.sub(r"<[^>]+>", "", title)))
        entries.append(f'<li><a href="#{identifier}">{text}</a></li>')
        return f'<h2 id="{identifier}">{title}</h2>'

    body = re.sub(r"<h2>(.*?)</h2>", anchored, body, flags=re.S)
    return body, f'<nav id="contents"><b>Contents</b><ol>{"".join(entries)}</ol></nav>'


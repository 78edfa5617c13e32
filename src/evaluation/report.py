"""The evaluation's HTML report: one self-contained file (every image a data URI, no script or style from elsewhere)
that opens offline. It shows the metrics table, the CMC curve and, for a sample of queries and for the worst ones
(the lowest rank of the first match), the caption with its top gallery images, matches framed green, the others red,
and the rank of the first match. On load, a line of script records how many images decoded in the body's
``data-images-loaded`` attribute ("loaded/total"), which the headless-browser test reads."""
from __future__ import annotations

import base64
import html
import io
from typing import Mapping, Sequence

__all__ = ["write_html"]

THUMB_HEIGHT = 128

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.query { margin: 1.2em 0; } .caption { margin: 0.3em 0; max-width: 70em; }
.rank { font-weight: bold; } .top { display: flex; gap: 6px; flex-wrap: wrap; }
figure { margin: 0; text-align: center; font-size: 0.8em; }
figure img { border: 4px solid #d20000; display: block; } figure.hit img { border-color: #00aa00; }
.notes { color: #a40; }
"""

_COUNT_IMAGES = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumb(img) -> str:
    """A gallery image as a JPEG data URI, scaled to THUMB_HEIGHT pixels high."""
    img = img.convert("RGB")
    w = max(1, round(img.width * THUMB_HEIGHT / max(1, img.height)))
    buf = io.BytesIO()
    img.resize((w, THUMB_HEIGHT)).save(buf, format="JPEG", quality=85)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _table(markdown: str) -> str:
    """format_table's markdown table as HTML (one home for the columns)."""
    lines = [ln.strip().strip("|").split("|") for ln in markdown.strip().splitlines()]
    head, body = lines[0], lines[2:]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>" for row in body]
    return "\n".join(out + ["</table>"])


def _query(row: dict) -> str:
    first = row.get("first_hit")
    shown = len(row["images"])
    rank = (f"first match at rank {first}" + (f" (not in the top {shown})" if first > shown else "")
            if first else "no match in the gallery")
    figures = []
    for j, (img, hit) in enumerate(zip(row["images"], row["matches"])):
        label = f"{j + 1}{' match' if hit else ''}"
        figures.append(f'<figure class="{"hit" if hit else "miss"}"><img src="{_thumb(img)}" alt="rank {label}">'
                       f"<figcaption>{label}</figcaption></figure>")
    return (f'<div class="query"><p class="caption">[{html.escape(str(row.get("title", "")))}] '
            f'{html.escape(row["caption"])} &mdash; <span class="rank">{rank}</span></p>'
            f'<div class="top">{"".join(figures)}</div></div>')


def _queries(title: str, rows: Sequence[dict], empty: str) -> list[str]:
    return [f"<h2>{title}</h2>"] + ([_query(r) for r in rows] or [f"<p>{empty}</p>"])


def write_html(path: str, tag: str, header: Mapping[str, str], table: str, notes: Sequence[str], cmc_png: str,
               examples: Sequence[dict]) -> str:
    """Write the report of ``TAG`` to ``path``: ``table`` is format_table's markdown, ``notes`` lines under it,
    ``cmc_png`` the CMC figure's file, ``examples`` the protocol's rows (``kind`` 'sample' or 'worst')."""
    with open(cmc_png, "rb") as f:
        cmc = _data_uri(f.read(), "image/png")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Evaluation "
             f"{html.escape(tag)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Evaluation {html.escape(tag)}</h1>",
             "<ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in header.items()) + "</ul>",
             "<h2>Text-to-image retrieval (percent)</h2>", _table(table)]
    parts += [f'<p class="notes">{html.escape(n)}</p>' for n in notes]
    parts.append(f'<h2>CMC</h2><img src="{cmc}" alt="CMC curve">')
    parts += _queries("Sample queries", [r for r in examples if r.get("kind", "sample") == "sample"],
                      "none drawn (--examples 0)")
    parts += _queries("Worst queries (lowest first match)", [r for r in examples if r.get("kind") == "worst"],
                      "none (--worst 0)")
    parts.append(f"<script>{_COUNT_IMAGES}</script></body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path

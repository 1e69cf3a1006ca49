"""HTML building blocks of the report: one self-contained page, a small CSS block, no external
resources. The only script is a self-check that marks ``<body data-images-ok>`` once every
image has decoded (used by the tests; harmless elsewhere)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape as _html_escape

CSS = """
:root { --ink:#1d2430; --muted:#5b6575; --line:#e3e7ee; --accent:#2563eb; --bg:#f6f8fb; --note:#fff7e0; --note-line:#f0c36d; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color:var(--ink); background:var(--bg); }
header { background:#14213d; color:#fff; padding:22px 32px 16px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .meta { color:#c9d3e6; font-size:12.5px; }
nav { background:#fff; border-bottom:1px solid var(--line); padding:8px 32px; position:sticky; top:0; z-index:2; font-size:13px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; white-space:nowrap; }
main { max-width:1500px; margin:0 auto; padding:8px 32px 40px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:14px 20px 18px; margin:18px 0; }
h2 { font-size:17px; margin:2px 0 6px; }
h3 { font-size:14px; margin:12px 0 6px; color:#28324a; }
p.lead { margin:0 0 10px; color:var(--muted); font-size:13px; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(440px, 1fr)); gap:14px 18px; align-items:start; }
figure { margin:0; }
figure img { max-width:100%; height:auto; display:block; border:1px solid var(--line); border-radius:4px; background:#fff; }
figcaption { font-size:12px; color:var(--muted); margin-top:4px; }
figcaption b { color:var(--ink); }
table { border-collapse:collapse; font-size:13px; margin:4px 0 8px; }
th, td { padding:5px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:#f0f3f8; font-weight:600; }
table.kv td:first-child { white-space:nowrap; color:var(--muted); }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
td.best { font-weight:700; color:#0b7a3b; }
code, .hash { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12px; }
.note { background:var(--note); border-left:4px solid var(--note-line); padding:6px 10px; margin:6px 0; font-size:12.5px; border-radius:3px; }
details { margin:6px 0; }
summary { cursor:pointer; font-weight:600; }
.tablewrap { overflow-x:auto; }
.panel { display:grid; gap:4px; align-items:start; margin:6px 0 4px; }
.panel .rowlabel { font-size:12px; font-weight:600; color:#28324a; align-self:center; padding-right:8px; }
.panel figure img { width:100%; image-rendering:pixelated; border:none; border-radius:2px; }
.panel figure span { display:block; font-size:10.5px; line-height:1.3; color:var(--muted); white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.panelbox { border:1px solid var(--line); border-radius:6px; padding:8px 10px; }
.panelbox h3 { margin:2px 0 4px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:10px 0 30px; }
"""

SELF_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.every(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.setAttribute('data-images-ok', ok ? 'true' : 'false');
  document.body.setAttribute('data-images-count', String(images.length));
});
"""


def escape(text: object, quote: bool = True) -> str:
    """``text`` for HTML: markup characters escaped, and every non-printable character (control
    codes, terminal escape sequences, line breaks, bidi overrides; names in a report can come from
    a bundle) written as a visible escape such as ``\\x1b``."""
    from relaylearn.bundle import escape_text

    return _html_escape(escape_text(str(text)), quote=quote)


def note(text: str) -> str:
    return f'<div class="note">{escape(text)}</div>'


def notes(texts: Iterable[str]) -> str:
    return "".join(note(t) for t in texts)


def figure(uri: str, caption: str = "", alt: str = "") -> str:
    """An embedded image (``uri`` must be a data: URI) with a caption (HTML allowed)."""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{escape(alt or "figure")}">{cap}</figure>'


def image_panel(rows: Sequence[tuple[str, Sequence[tuple[str, str]]]], group: int = 0, max_cell_px: int = 150, caption: str = "", title: str = "") -> str:
    """A grid of embedded images: ``rows`` = [(row label, [(data URI, caption), ...])]; every
    ``group`` columns a wider gap. Small images are upscaled without smoothing."""
    ncols = max((len(cells) for _, cells in rows), default=0)
    spacer = [bool(group) and c > 0 and c % group == 0 for c in range(ncols)]
    columns = ["max-content"] + [("12px " if gap else "") + f"minmax(0, {max_cell_px}px)" for gap in spacer]
    parts = ['<figure class="panelbox">' + (f"<h3>{escape(title)}</h3>" if title else "")]
    parts.append(f'<div class="panel" style="grid-template-columns:{" ".join(columns)}">')
    for label, cells in rows:
        parts.append(f'<div class="rowlabel">{escape(label)}</div>')
        for c in range(ncols):
            if spacer[c]:
                parts.append("<div></div>")
            if c < len(cells):
                uri, cap = cells[c]
                text = f'<span title="{escape(cap)}">{escape(cap)}</span>' if cap else ""
                parts.append(f'<figure><img src="{uri}" alt="{escape(cap or label)}">{text}</figure>')
            else:
                parts.append("<div></div>")
    parts.append("</div>")
    if caption:
        parts.append(f"<figcaption>{caption}</figcaption>")
    parts.append("</figure>")
    return "".join(parts)


def table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], numeric: set[int] = frozenset(), best: set[tuple[int, int]] = frozenset()) -> str:
    """``rows`` hold HTML-ready cells (escape text before); no ``header``: a key/value table;
    ``numeric`` columns align right;
    ``best`` = (row, column) cells to highlight."""
    head = f"<thead><tr>{''.join(f'<th>{escape(h)}</th>' for h in header)}</tr></thead>" if header else ""
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, cell in enumerate(row):
            classes = " ".join(x for x in ("num" if c in numeric else "", "best" if (r, c) in best else "") if x)
            cells.append(f'<td class="{classes}">{cell}</td>' if classes else f"<td>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    kind = "" if header else ' class="kv"'
    return f'<div class="tablewrap"><table{kind}>{head}<tbody>{"".join(body)}</tbody></table></div>'


def section(anchor: str, title: str, body: str, lead: str = "") -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>{lead_html}{body}</section>'


def page(title: str, meta: str, sections: Sequence[tuple[str, str, str]], footer: str) -> str:
    """The whole document; ``sections`` = [(anchor, nav label, section HTML)]."""
    nav = "".join(f'<a href="#{escape(a)}">{escape(label)}</a>' for a, label, _ in sections)
    body = "".join(html for _, _, html in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f'<body><header><h1>{escape(title)}</h1><div class="meta">{meta}</div></header>'
        f"<nav>{nav}</nav><main>{body}</main><footer>{footer}</footer>"
        f"<script>{SELF_CHECK}</script></body></html>\n"
    )

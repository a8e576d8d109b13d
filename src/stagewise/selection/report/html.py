"""The document as one self-contained HTML page: inline CSS, plots inlined as SVG, nothing fetched."""

from __future__ import annotations

import html
import re

from stagewise.selection.report.blocks import Block, Items, Para, Section, Table
from stagewise.selection.report.formatting import _meta_line

_STATUS_CLASSES = {"ok": "ok", "shortened": "warn", "skipped": "muted", "failed": "bad", "error": "bad"}

_CSS = """
:root { --fg: #1f2933; --muted: #6b7280; --line: #e5e7eb; --accent: #2563eb; --hl: #fff7d6; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 32px 48px; background: #fff; min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
.meta { color: var(--muted); font-size: 13.5px; margin: 0 0 22px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 5px; border-bottom: 1px solid var(--line); }
p { margin: 8px 0; max-width: 860px; }
section.verdict { background: #ecfdf3; border: 1px solid #a7e3c0; border-left: 6px solid #16a34a;
  border-radius: 8px; padding: 4px 22px 12px; }
section.verdict.first-stage-only { background: #fff8eb; border-color: #f5d595; border-left-color: #d97706; }
section.verdict h2 { border: none; margin-top: 12px; margin-bottom: 2px; }
section.verdict p.strong { font-size: 16.5px; max-width: none; }
section.verdict ul { margin: 6px 0 4px; padding-left: 20px; font-size: 15.5px; }
section.verdict li { margin: 4px 0; }
p.strong { font-weight: 600; }
table { border-collapse: collapse; font-size: 12.5px; margin: 10px 0 16px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 7px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background: #f3f4f6; font-weight: 600; border-bottom: 2px solid #d1d5db; vertical-align: bottom; }
td.num, th.num { text-align: right; }
td.num { white-space: nowrap; }
td.name { white-space: nowrap; }
td.note { color: var(--muted); min-width: 150px; max-width: 320px; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.chosen td { background: var(--hl); font-weight: 600; }
tr.chosen td:first-child { box-shadow: inset 4px 0 0 #f59e0b; }
table.kv { font-size: 14px; }
table.kv { min-width: 340px; }
table.kv th { font-weight: 500; color: var(--muted); white-space: nowrap; padding-right: 22px; }
section.third { display: inline-block; vertical-align: top; width: 32%; margin-right: 1.3%; }
section.third table.kv { min-width: 0; width: 100%; }
table.kv tr:nth-child(even) { background: none; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.badge.ok { background: #dcfce7; color: #166534; } .badge.warn { background: #fef3c7; color: #92400e; }
.badge.muted { background: #e5e7eb; color: #4b5563; } .badge.bad { background: #fee2e2; color: #991b1b; }
td.no { color: #b91c1c; font-weight: 600; }
figure { margin: 12px 0 20px; }
figure svg { display: block; width: 720px; max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; }
.scroll { overflow-x: auto; }
footer { margin-top: 36px; color: var(--muted); font-size: 12.5px; }
"""


def _html_cell(text: str, header: str, numeric: bool) -> str:
    classes = ["num"] if numeric else ["name"] if header in {"Name", "Reranker"} else []
    body = html.escape(text)
    if header in {"Status"} and text in _STATUS_CLASSES:
        body = f'<span class="badge {_STATUS_CLASSES[text]}">{body}</span>'
    if header == "Note":
        classes.append("note")
    if header == "In budget" and text == "no":
        classes.append("no")
    return f"<td class=\"{' '.join(classes)}\">{body}</td>" if classes else f"<td>{body}</td>"


def _nbsp_unit(header: str) -> str:
    """Keep a one-letter unit on the line of the word before it: "Train s" never breaks into "Train" / "s"."""
    return re.sub(r" s$", "&nbsp;s", header)


def _html_table(t: Table) -> str:
    if t.key_value:
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in t.rows)
        return f'<table class="kv"><tbody>{rows}</tbody></table>'
    head = "".join(f'<th{" class=num" if i in t.numeric else ""}>{_nbsp_unit(html.escape(h))}</th>'
                   for i, h in enumerate(t.headers))
    body = []
    for r, row in enumerate(t.rows):
        cells = "".join(_html_cell(c, t.headers[i], i in t.numeric) for i, c in enumerate(row))
        body.append(f'<tr class="chosen">{cells}</tr>' if r in t.highlight else f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_block(b: Block, plots: dict[str, str | None]) -> str:
    if isinstance(b, Para):
        return f'<p class="strong">{html.escape(b.text)}</p>' if b.strong else f"<p>{html.escape(b.text)}</p>"
    if isinstance(b, Items):
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        return _html_table(b)
    return f'<figure role="img" aria-label="{html.escape(b.alt)}">{plots[b.key]}</figure>'


def render_html(sel: dict, sections: list[Section], plots: dict[str, str | None]) -> str:
    title = html.escape(str(sel.get("title") or "Stagewise model selection"))
    body = "".join(  # no whitespace between sections: "third" ones sit side by side
        f'<section class="{s.css}"><h2>{html.escape(s.title)}</h2>\n'
        + "\n".join(_html_block(b, plots) for b in s.blocks) + "</section>"
        for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
            f"<style>{_CSS}</style></head>\n<body><main>\n<h1>{title}</h1>\n"
            f'<p class="meta">{html.escape(_meta_line(sel))}</p>\n{body}\n'
            f"<footer>Written by stagewise. The input is in selection.json next to this file.</footer>\n"
            f"</main></body></html>\n")

"""The document as Markdown, with the plots as SVG files next to it (``<plot>.svg``)."""

from __future__ import annotations

import re

from stagewise.selection.report.blocks import Block, Figure, Items, Para, Section
from stagewise.selection.report.formatting import _meta_line


def _md_escape(text: str) -> str:
    text = re.sub(r"([\\`*_|\[\]])", r"\\\1", str(text)).replace("<", "&lt;")
    return text.replace("\n", " ")


def _md_block(b: Block, plots: dict[str, str | None]) -> str:
    if isinstance(b, Para):
        return f"**{_md_escape(b.text)}**" if b.strong else _md_escape(b.text)
    if isinstance(b, Items):
        return "\n".join(f"- {_md_escape(i)}" for i in b.items)
    if isinstance(b, Figure):
        return f"![{_md_escape(b.alt)}]({b.key}.svg)"
    if b.key_value:
        return "\n".join(f"- **{_md_escape(k)}:** {_md_escape(v)}" for k, v in b.rows)
    lines = ["| " + " | ".join(_md_escape(h) for h in b.headers) + " |",
             "|" + "|".join("---:" if i in b.numeric else "---" for i in range(len(b.headers))) + "|"]
    for r, row in enumerate(b.rows):
        cells = [_md_escape(c) for c in row]
        if r in b.highlight:
            cells = [f"**{c}**" if c else c for c in cells]
            cells[0] = "▶ " + cells[0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(sel: dict, sections: list[Section], plots: dict[str, str | None]) -> str:
    out = [f"# {_md_escape(sel.get('title') or 'Stagewise model selection')}", "", f"_{_md_escape(_meta_line(sel))}_"]
    for s in sections:
        out += ["", f"## {_md_escape(s.title)}"]
        for b in s.blocks:
            out += ["", _md_block(b, plots)]
    out += ["", "Chosen rows are marked ▶ and in bold. The input is in `selection.json`.", ""]
    return "\n".join(out)

"""The selection report: what was measured, what is recommended and why, in a form a person can read and keep.

A selection run ends with a dict (see ``tests/fixtures/selection_example.json`` for its shape). The report turns
it into one self-contained ``report.html`` (inline CSS, plots inlined as SVG: it opens offline and can be mailed
or archived as a single file), the same content as ``report.md`` with the plots next to it as SVG files, and the
input itself as ``selection.json``. Both documents are rendered from one document model (sections of paragraphs,
lists, tables and figures), so the HTML and the Markdown never disagree. Every file is written atomically, so an
interrupted run never leaves half a report.

Modules, each importing only those above it (none imports the package itself):

- ``formatting``: numbers, labels and look-ups into the selection dict, as the report writes them.
- ``blocks``: the document model (paragraphs, lists, tables, figures, sections).
- ``document``: the report's sections, built from a selection dict.
- ``plots``: the matplotlib plots, as inline SVG.
- ``html`` and ``markdown``: the document rendered as a page and as Markdown.
- ``write``: ``write_report`` (every file, atomically) and ``render_screenshot`` (headless Chromium).
"""

"""The document model: a report is sections of paragraphs, lists, tables and figures.

Both renderers (``html``, ``markdown``) read this model and nothing else of the selection, so the HTML and the
Markdown never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class Para:
    text: str
    strong: bool = False


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns
    highlight: set[int] = field(default_factory=set)  # chosen rows
    key_value: bool = False  # two columns, a label and its value


@dataclass
class Figure:
    key: str  # one of PLOTS
    alt: str


Block = Union[Para, Items, Table, Figure]


@dataclass
class Section:
    title: str
    blocks: list[Block]
    css: str = ""

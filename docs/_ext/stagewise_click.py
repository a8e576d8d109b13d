"""The ``stagewise`` command as a click object, for sphinx-click (docs/reference/cli.md).

Typer (0.2x) runs on its own vendored copy of click, so ``typer.main.get_command(app)`` is not a ``click.Command``
and sphinx-click refuses it. This module walks typer's command tree once and rebuilds it from real click objects:
the same names, help texts, options, arguments and defaults. Nothing here runs the commands.

sphinx-click reads help texts as reStructuredText, and typer shows them as rich markup. So each help text is
first made plain the way the terminal shows it (rich markup removed), then made safe as reStructuredText: the
characters RST would read as markup (``*``, ``|``, a trailing ``_``, backslashes) are escaped, and a
`backticked` span, which the help texts use for code, becomes an RST literal.
"""

from __future__ import annotations

import re

import click
import typer
import typer._click as typer_click

from stagewise.cli import app

_MARKUP_MODE = getattr(app, "rich_markup_mode", None)
_CODE = re.compile(r"`([^`]+)`")
_RST_SPECIAL = re.compile(r"([\\*|`]|_(?=\W|$))")


def _rst(text: str | None) -> str | None:
    """A typer help text as the terminal shows it, escaped for reStructuredText (see the module's docstring)."""
    if not text:
        return text
    if _MARKUP_MODE == "rich":
        from rich.errors import MarkupError
        from rich.text import Text

        try:
            text = Text.from_markup(text).plain
        except MarkupError:  # not valid markup: the terminal could not show it either; keep the text as written
            pass
    pieces, end = [], 0
    for code in _CODE.finditer(text):
        pieces += [_RST_SPECIAL.sub(r"\\\1", text[end:code.start()]), f"``{code.group(1)}``"]
        end = code.end()
    pieces.append(_RST_SPECIAL.sub(r"\\\1", text[end:]))
    return "".join(pieces)


class _Argument(click.Argument):
    """A click argument that keeps typer's help text (sphinx-click prints ``help`` when an argument has one)."""

    def __init__(self, *args, help: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = help


def _param(p) -> click.Parameter:
    if type(p).__name__ == "TyperArgument":
        return _Argument([p.name], required=p.required, nargs=p.nargs, metavar=p.metavar, help=_rst(p.help),
                         default=None if p.required else p.default)
    option = click.Option([p.name, *p.opts], help=_rst(p.help), required=p.required, is_flag=p.is_flag or None,
                          multiple=p.multiple, count=p.count, hidden=p.hidden, metavar=p.metavar,
                          show_default=p.show_default, envvar=p.envvar,
                          default=None if p.required else p.default, type=None if p.is_flag else click.STRING)
    option.secondary_opts = list(p.secondary_opts)
    return option


def _command(cmd, name: str, parent_ctx=None) -> click.Command:
    ctx = typer_click.Context(cmd, info_name=name, parent=parent_ctx)
    common = dict(name=name, help=_rst(cmd.help), short_help=_rst(cmd.short_help), epilog=_rst(cmd.epilog), hidden=cmd.hidden,
                  params=[_param(p) for p in cmd.params])
    if hasattr(cmd, "list_commands"):
        subcommands = [_command(cmd.get_command(ctx, n), n, ctx) for n in cmd.list_commands(ctx)]
        return click.Group(commands=subcommands, **common)
    return click.Command(deprecated=cmd.deprecated, **common)


cli = _command(typer.main.get_command(app), "stagewise")

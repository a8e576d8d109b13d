"""The ``stagewise`` command's root: the typer app and its groups (data, train, index), and how a user's mistake
is shown (one line, exit code 2). The commands live in the modules beside it, by group; ``stagewise.cli`` imports
them all, so that its ``app`` is the whole command."""

from __future__ import annotations

import functools
import sys

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from stagewise.errors import StagewiseError
from stagewise.progress import console, printable, warnings_on_console

UsageError = typer.BadParameter.__base__  # click's, whether typer vendors click (0.2x) or uses the package


def _print_error(message: str) -> None:
    """Every user mistake, whoever caught it, as one red line on stderr (control characters made visible)."""
    console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)


class _OneLineUsageErrors(typer.core.TyperGroup):
    """click's usage errors (a bad option value, an unknown option or command) as one ``error:`` line with exit
    code 2, like every other user mistake, instead of a usage block and a boxed panel."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except UsageError as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            raise self._one_line(e) from None

    @classmethod
    def _one_line(cls, e) -> Exception:
        if type(e).__name__ == "NoArgsIsHelpError":  # `stagewise` alone: the help, as click shows it
            return e
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _print_error(e.format_message() + hint)
        return typer.Exit(EXIT_USER_ERROR)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=_OneLineUsageErrors, help="Measure and choose two-stage neural search on your own data.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")
train_app = typer.Typer(no_args_is_help=True, help="Fine-tune a bi-encoder or a cross-encoder.")
app.add_typer(train_app, name="train")
index_app = typer.Typer(no_args_is_help=True, help="Build and update a persistent search index.")
app.add_typer(index_app, name="index")

EXIT_USER_ERROR = 2

#: Results (hits, metrics tables, a verdict, what an index holds) go to stdout, so that they can be piped or saved;
#: progress, warnings and errors stay on stderr (``console``).
results_console = Console()
if not results_console.is_terminal:  # pipes and files: wide enough that tables are not truncated
    results_console.width = 160


def user_errors(command):
    """Turn a StagewiseError into one red line on stderr and exit code 2: never a traceback for a user's mistake."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings_on_console():
                return command(*args, **kwargs)
        except StagewiseError as e:
            _print_error(str(e))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/] (a training run continues with --resume)")
            raise typer.Exit(130) from None

    return wrapper


def main() -> None:
    import stagewise.cli  # its app has every command module's commands (this module may run as __main__)

    stagewise.cli.app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

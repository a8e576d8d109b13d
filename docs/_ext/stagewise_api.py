"""The API reference, generated from the package itself so that no module or public name is ever left out.

* ``.. public-api::`` lists ``stagewise.__all__``: each name, linked to where it is defined, with the first line
  of its docstring.
* ``.. package-modules:: stagewise.search`` documents every module of a subpackage (found on disk, not listed by
  hand) with ``automodule``; ``.. package-modules:: stagewise`` with ``:top-level:`` the package's own modules.
* At the end of reading, any module of the package that no page documents is a warning (and the build is -W).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)
UNDOCUMENTED = ("stagewise.cli",)  # the command line has its own reference, generated from the typer app


def _modules(package: str, top_level: bool) -> list[str]:
    path = importlib.import_module(package).__path__
    found = [m for m in pkgutil.iter_modules(path, package + ".") if not m.name.endswith("__main__")]
    if top_level:
        return sorted(m.name for m in found if not m.ispkg)
    return sorted(m.name for m in pkgutil.walk_packages(path, package + ".") if not m.name.endswith("__main__"))


class _Generated(SphinxDirective):
    def parse(self, lines: list[str]) -> list[nodes.Node]:
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=self.get_source_info()[0]), container)
        return container.children


class PackageModules(_Generated):
    required_arguments = 1
    option_spec = {"top-level": directives.flag}

    def run(self) -> list[nodes.Node]:
        package = self.arguments[0]
        top_level = "top-level" in self.options
        lines = [] if top_level else [f".. automodule:: {package}", ""]
        for module in _modules(package, top_level):
            lines += [f"``{module}``", "~" * (len(module) + 4), "", f".. automodule:: {module}", "   :members:", ""]
        return self.parse(lines)


class PublicApi(_Generated):
    def run(self) -> list[nodes.Node]:
        import stagewise

        lines = []
        for name in sorted(stagewise.__all__, key=str.lower):
            obj = getattr(stagewise, name)
            role = "class" if inspect.isclass(obj) else "func"
            summary = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
            lines.append(f"* :py:{role}:`{name} <{obj.__module__}.{obj.__qualname__}>`: {summary}")
        return self.parse(lines)


def _check_every_module_documented(app, env) -> None:
    documented = set(env.domains["py"].modules)
    for module in _modules("stagewise", top_level=False):
        if module not in documented and not module.startswith(UNDOCUMENTED):
            logger.warning("the API reference leaves out module %s", module)


def setup(app):
    app.add_directive("package-modules", PackageModules)
    app.add_directive("public-api", PublicApi)
    app.connect("env-check-consistency", _check_every_module_documented)
    return {"parallel_read_safe": True}

"""The package's shape: the public names users import, no import circles, modules a reader can hold in mind."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import stagewise

PACKAGE = Path(stagewise.__file__).parent
MAX_LINES = 550  # "no module much over 500 lines": past this, split it along its seams

PUBLIC = [
    "BM25Retriever", "CrossEncoderReranker", "DataError", "DenseRetriever", "Document", "EmbeddingCache", "Hit",
    "HybridRetriever", "Index", "ModelError", "ModelSpec", "Pipeline", "Query", "RetrievalDataset", "SelectConfig",
    "StagewiseError", "SystemResult", "TrainingExamples", "VectorIndexConfig", "build_first_stage", "compare",
    "compute_metrics", "describe", "evaluate", "evaluate_pipeline", "load_beir", "load_bi_encoder",
    "load_cross_encoder", "load_dataset", "load_select_config", "load_training_examples", "resolve_model",
    "save_results", "select",
]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("stagewise",) + path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _module_level_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports when it loads (imports inside functions are deliberate and lazy).

    Importing ``a.b.c`` runs ``a`` and ``a.b`` first, so each parent package is an edge too.
    """
    targets = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
    edges = set()
    for target in targets:
        parts = target.split(".")
        edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {t for t in edges if t in modules and t != name and not name.startswith(t + ".")}


def test_public_names_keep_working_from_the_package():
    assert sorted(stagewise.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        obj = getattr(stagewise, name)
        assert obj.__module__.startswith("stagewise."), name
    namespace: dict = {}
    exec(f"from stagewise import {', '.join(PUBLIC)}", namespace)
    assert all(name in namespace for name in PUBLIC)


def test_no_import_circles_between_modules():
    modules = _modules()
    graph = {name: _module_level_imports(name, path, modules) for name, path in modules.items()}
    # the top-level package re-exports the public API, so every module it imports depends on it only through that
    graph["stagewise"] = set()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_imports_on_its_own():
    """Each module loads first in a fresh interpreter: no order-dependent import that only works by luck."""
    code = (
        "import importlib, sys\n"
        f"names = {sorted(n for n in _modules() if not n.endswith('__main__'))!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'stagewise' or m.startswith('stagewise.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {e!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_modules_stay_small_enough_to_read():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}


def test_subpackages_follow_the_flow():
    """The folders DESIGN.md draws; the README's layout section names the same ones."""
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders == ["cli", "data", "evaluation", "models", "scale", "search", "selection", "serving", "training"]
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1]
    for folder in folders:
        assert f"{folder}/" in layout, folder

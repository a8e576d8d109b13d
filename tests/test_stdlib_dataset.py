"""The embedded default dataset: deterministic, well-formed, filtered, cached."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from stagewise.data import stdlib as sd
from stagewise.data.loaders import load_dataset


@pytest.fixture(scope="module")
def dataset():
    """One real, uncached build shared by the tests that only read it (a build takes ~1.5 s)."""
    return sd.build_stdlib_dataset(use_cache=False)


def _write(root: Path, relative: str, source: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")


LONG_REST = "It explains the arguments, the return value and the errors in enough words to be useful."


# --------------------------------------------------------------------------------------------
# The real dataset
# --------------------------------------------------------------------------------------------


def test_deterministic_and_imports_nothing(dataset):
    before = set(sys.modules)
    again = sd.build_stdlib_dataset(use_cache=False)
    # The source is parsed, never imported: ``antigravity`` would open a browser, ``this`` print.
    assert not {"antigravity", "this", "turtle", "tkinter", "webbrowser"} & (set(sys.modules) - before)
    assert again == dataset
    assert again.fingerprint() == dataset.fingerprint()
    assert list(again.corpus) == list(dataset.corpus)


def test_name_source_and_sizes(dataset):
    assert dataset.name == "stdlib"
    assert dataset.source == "embedded:stdlib"
    assert dataset.splits == ["dev", "test", "train"]
    assert len(dataset.corpus) <= sd.CORPUS_SIZE
    # The standard library differs per Python version; these bounds hold for 3.9 to 3.13.
    assert 800 <= len(dataset.queries) <= sd.MAX_QUERIES
    assert len(dataset.corpus) > len(dataset.queries)  # there are distractors too


def test_splits_disjoint_and_roughly_sized(dataset):
    ids = {split: set(dataset.qrels[split]) for split in dataset.splits}
    assert not ids["train"] & ids["dev"]
    assert not ids["train"] & ids["test"]
    assert not ids["dev"] & ids["test"]
    assert ids["train"] | ids["dev"] | ids["test"] == set(dataset.queries)
    total = len(dataset.queries)
    assert 0.52 <= len(ids["train"]) / total <= 0.68
    assert 0.13 <= len(ids["dev"]) / total <= 0.27
    assert 0.13 <= len(ids["test"]) / total <= 0.27


def test_each_query_has_exactly_its_own_api(dataset):
    for split in dataset.splits:
        for qid, docs in dataset.qrels[split].items():
            assert qid in dataset.queries
            assert qid.startswith("q:")
            assert docs == {qid[2:]: 1}
            assert qid[2:] in dataset.corpus
    for doc_id, doc in dataset.corpus.items():
        assert doc.id == doc_id == doc.title


def test_query_not_in_its_document(dataset):
    for qid, text in dataset.queries.items():
        doc = dataset.corpus[qid[2:]]
        assert text.strip()
        assert text != doc.text
        assert text.lower() not in doc.full_text().lower()
        assert text.lower().rstrip(" .") not in doc.full_text().lower()


def test_query_and_document_shape(dataset):
    texts = [t.lower().rstrip(" .:;") for t in dataset.queries.values()]
    assert len(texts) == len(set(texts)), "a summary shared by two APIs would be ambiguous"
    for text in dataset.queries.values():
        assert sd.MIN_SUMMARY_WORDS <= len(text.split()) <= sd.MAX_SUMMARY_WORDS
        assert text == " ".join(text.split())
        assert not sd._BOILERPLATE.match(text)
        assert ">>>" not in text
    for doc in dataset.corpus.values():
        assert len(doc.text) <= sd.MAX_TEXT_CHARS
        assert "\n" not in doc.text and "\t" not in doc.text
        assert "(" in doc.text.split(" ", 1)[0] or doc.text.startswith(("class ", "property ", "async "))


def test_filters_on_names(dataset):
    for doc_id in dataset.corpus:
        parts = doc_id.split(".")
        assert not any(p.startswith("_") for p in parts), doc_id
        modules = parts[:-1]  # the last part is the API itself (``cgi.test`` is a public function)
        assert not {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip"} & set(modules)
        assert not any(p.startswith("test_") for p in modules), doc_id
        assert parts[0] not in ("distutils", "pydoc_data", "site-packages")


def test_well_known_apis(dataset):
    signatures = {doc_id: doc.text for doc_id, doc in dataset.corpus.items()}
    # json.dumps is a documented function with a long docstring: its document starts with the signature.
    if "json.dumps" in signatures:
        assert signatures["json.dumps"].startswith("dumps(obj, *, skipkeys=False")
    methods = [d for d in signatures if d.startswith("collections.") and d.count(".") == 2]
    assert methods, "public methods of public classes are included"
    for doc_id in methods:
        assert not signatures[doc_id].startswith(("self", "cls"))


def test_load_dataset_default_uses_it(monkeypatch, tmp_path, dataset):
    monkeypatch.setenv("STAGEWISE_CACHE", str(tmp_path))
    monkeypatch.setattr(sd, "_build_uncached", lambda root: dataset)
    assert load_dataset("default").fingerprint() == dataset.fingerprint()
    assert load_dataset("stdlib").fingerprint() == dataset.fingerprint()


# --------------------------------------------------------------------------------------------
# Filters, on a small fake standard library
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    _write(
        root,
        "mod.py",
        f'''
        def good(a, b=1, *, c=None):
            """Combine two values into one result.

            {LONG_REST}
            """

        def _private():
            """Private helper that does things well.

            {LONG_REST}
            """

        def short_rest():
            """Do a thing with few extra words.

            Only four more words.
            """

        def tiny():
            """Do it.

            {LONG_REST}
            """

        def seealso():
            """See the documentation of good for details.

            {LONG_REST}
            """

        def repeats():
            """Frobnicate the widget quickly.

            Frobnicate the widget quickly. {LONG_REST}
            """

        def old_style(x, y):
            """old_style(x, y) -> int

            Compute a checksum of two numbers.

            {LONG_REST}
            """

        class Thing:
            """A thing that holds several values together.

            {LONG_REST}
            """

            def __init__(self, size, name="x"):
                """Initialise the thing with a size and name.

                {LONG_REST}
                """

            def method(self, key, last=True):
                """Move the given key to one end of the thing.

                {LONG_REST}
                """

            @staticmethod
            def helper(x):
                """Compute something static from a single value.

                {LONG_REST}
                """

            @property
            def size(self):
                """The number of values held by this thing.

                {LONG_REST}
                """

        class _Hidden:
            def visible(self):
                """A method on a private class is not public.

                {LONG_REST}
                """

        try:
            import ssl
        except ImportError:
            pass
        else:
            def optional():
                """Only defined when an optional module is there.

                {LONG_REST}
                """
        ''',
    )
    same = f'''
        def join(a, *p):
            """Join two or more pathname components together.

            {LONG_REST}
            """
        '''
    _write(root, "posixlike.py", same)
    _write(root, "ntlike.py", same.replace("(a, *p)", "(path, *paths)"))
    _write(root, "broken.py", "def f(:\n    pass\n")
    _write(root, "_privmod.py", f'def f():\n    """A function in a private module here.\n\n    {LONG_REST}\n    """\n')
    _write(root, "__main__.py", f'def f():\n    """A function in a main module here.\n\n    {LONG_REST}\n    """\n')
    _write(root, "pkg/__init__.py", f'def top():\n    """A function in a package init file.\n\n    {LONG_REST}\n    """\n')
    _write(root, "pkg/sub.py", f'def inner():\n    """A function in a package submodule here.\n\n    {LONG_REST}\n    """\n')
    for skipped in ("test", "tests", "idlelib", "tkinter", "site-packages", "lib2to3"):
        _write(root, f"{skipped}/__init__.py", "")
        _write(root, f"{skipped}/m.py", f'def f():\n    """A function in a skipped folder here.\n\n    {LONG_REST}\n    """\n')
    _write(root, "pkg/tests/__init__.py", "")
    _write(root, "pkg/tests/m.py", f'def f():\n    """A function in a nested test folder.\n\n    {LONG_REST}\n    """\n')
    _write(root, "notapkg/m.py", f'def f():\n    """A function outside any package here.\n\n    {LONG_REST}\n    """\n')
    return root


def test_collect_apis_skips_what_is_not_public_library(fake_stdlib):
    names = {api.qualname for api in sd.collect_apis(fake_stdlib)}
    assert {"mod.good", "mod.Thing", "mod.Thing.method", "mod.Thing.helper", "mod.Thing.size"} <= names
    assert {"pkg.top", "pkg.sub.inner", "posixlike.join", "ntlike.join", "mod.optional"} <= names
    assert not any("_" == part[0] for name in names for part in name.split("."))
    assert not any(name.split(".")[0] in ("test", "tests", "idlelib", "tkinter", "lib2to3", "broken", "notapkg") for name in names)
    assert not any(".tests." in name for name in names)
    assert "mod._Hidden.visible" not in names and "mod.Thing.__init__" not in names


def test_signatures_and_summaries(fake_stdlib):
    apis = {api.qualname: api for api in sd.collect_apis(fake_stdlib)}
    assert apis["mod.good"].signature == "good(a, b=1, *, c=None)"
    assert apis["mod.Thing"].signature == "Thing(size, name='x')"
    assert apis["mod.Thing.method"].signature == "method(key, last=True)"
    assert apis["mod.Thing.helper"].signature == "helper(x)"
    assert apis["mod.Thing.size"].signature == "property size"
    assert apis["mod.good"].summary == "Combine two values into one result."
    assert apis["mod.good"].rest == LONG_REST
    # A hand-written signature line is not the summary: the description after it is.
    assert apis["mod.old_style"].summary == "Compute a checksum of two numbers."


def test_assemble_filters_trivial_and_ambiguous_pairs(fake_stdlib):
    dataset = sd.assemble(sd.collect_apis(fake_stdlib))
    queries = {qid[2:] for qid in dataset.queries}
    assert {"mod.good", "mod.Thing", "mod.Thing.method", "mod.old_style", "pkg.top"} <= queries
    assert "mod.short_rest" not in queries  # too little documentation left
    assert "mod.tiny" not in queries  # summary too short
    assert "mod.seealso" not in queries  # boilerplate
    assert "mod.repeats" not in queries  # the document repeats the summary
    assert "posixlike.join" not in queries and "ntlike.join" not in queries  # ambiguous summary
    # Failed queries with enough text stay as distractors; without enough text they are dropped.
    assert {"mod.tiny", "mod.seealso", "mod.repeats", "posixlike.join"} <= set(dataset.corpus)
    assert "mod.short_rest" not in dataset.corpus
    assert dataset.corpus["mod.good"].text == f"good(a, b=1, *, c=None) {LONG_REST}"
    assert dataset.queries["q:mod.good"] == "Combine two values into one result."


def test_corpus_cap_keeps_every_query(monkeypatch, fake_stdlib):
    apis = sd.collect_apis(fake_stdlib)
    full = sd.assemble(apis)
    monkeypatch.setattr(sd, "CORPUS_SIZE", len(full.queries) + 1)
    capped = sd.assemble(apis)
    assert len(capped.corpus) == len(full.queries) + 1
    assert capped.queries == full.queries
    assert all(qid[2:] in capped.corpus for qid in capped.queries)


def test_truncation_at_word_boundary():
    text = " ".join(["word"] * 400)
    cut = sd._truncate(text)
    assert len(cut) <= sd.MAX_TEXT_CHARS
    assert cut.endswith("word") and text.startswith(cut)


def test_split_assignment_is_stable_and_balanced():
    names = [f"module{i}.function{i}" for i in range(3000)]
    first = [sd._split_of(n) for n in names]
    assert first == [sd._split_of(n) for n in names]
    assert 0.55 <= first.count("train") / 3000 <= 0.65
    assert 0.17 <= first.count("dev") / 3000 <= 0.23


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


@pytest.fixture
def counted_builds(monkeypatch, tmp_path, dataset):
    """Point the cache at ``tmp_path`` and count rebuilds (each returns the real dataset)."""
    monkeypatch.setenv("STAGEWISE_CACHE", str(tmp_path))
    calls = []

    def build(root):
        calls.append(root)
        return dataset

    monkeypatch.setattr(sd, "_build_uncached", build)
    return calls


def _cache_file(tmp_path: Path) -> Path:
    files = list(tmp_path.glob("stdlib-dataset-*.json"))
    assert len(files) == 1, files
    return files[0]


def test_cache_hit_returns_same_dataset(counted_builds, tmp_path, dataset):
    first = sd.build_stdlib_dataset()
    assert len(counted_builds) == 1
    path = _cache_file(tmp_path)
    assert f"v{sd.BUILDER_VERSION}" in path.name
    second = sd.build_stdlib_dataset()
    assert len(counted_builds) == 1, "the second call must read the cache"
    assert second == first == dataset
    assert second.fingerprint() == dataset.fingerprint()
    assert list(second.corpus) == list(dataset.corpus)
    assert not list(tmp_path.glob("*.tmp")), "no temporary files left behind"


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: "not json at all",
        lambda text: "[]",
        lambda text: text.replace('"builder_version":', '"builder_version_":'),
    ],
)
def test_corrupt_cache_is_rebuilt(counted_builds, tmp_path, dataset, corrupt):
    sd.build_stdlib_dataset()
    path = _cache_file(tmp_path)
    path.write_text(corrupt(path.read_text(encoding="utf-8")), encoding="utf-8")
    again = sd.build_stdlib_dataset()
    assert len(counted_builds) == 2
    assert again.fingerprint() == dataset.fingerprint()
    assert sd._read_cache(path) is not None, "the rebuilt dataset is written back"


def test_tampered_cache_content_is_rebuilt(counted_builds, tmp_path, dataset):
    sd.build_stdlib_dataset()
    path = _cache_file(tmp_path)
    payload = json.loads(path.read_text(encoding="utf-8"))
    first_qid = next(iter(payload["queries"]))
    payload["queries"][first_qid] = "something else entirely"
    path.write_text(json.dumps(payload), encoding="utf-8")
    again = sd.build_stdlib_dataset()
    assert len(counted_builds) == 2
    assert again.queries[first_qid] == dataset.queries[first_qid]


def test_unwritable_cache_still_builds(monkeypatch, tmp_path, dataset):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("STAGEWISE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(sd, "_build_uncached", lambda root: dataset)
    assert sd.build_stdlib_dataset() == dataset


def _stagewise_imports(module) -> list[tuple[str, bool]]:
    """(imported stagewise module, imported inside a function) for every import statement of ``module``."""
    import ast
    import inspect

    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("stagewise"):
                found.append((child.module, inner))
            elif isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names if a.name.startswith("stagewise"))
            visit(child, inner)

    visit(ast.parse(inspect.getsource(module)), False)
    return found


def test_data_and_the_stdlib_dataset_do_not_import_each_other():
    """The dataset types live in stagewise.data.dataset; data.py uses the builder, the builder never uses data.py."""
    import stagewise.data.dataset as dataset_types
    import stagewise.data.loaders as data

    builder = _stagewise_imports(sd)
    assert not any(name == "stagewise.data.loaders" for name, _ in builder), builder
    loaders = _stagewise_imports(data)
    assert ("stagewise.data.stdlib", False) in loaders  # a plain module-level import
    assert not any(inner for _, inner in loaders), loaders  # no function-level import hack left
    assert not any(name in ("stagewise.data.loaders", "stagewise.data.stdlib") for name, _ in
                   _stagewise_imports(dataset_types))
    assert data.Document is dataset_types.Document and data.RetrievalDataset is dataset_types.RetrievalDataset
    assert sd.RetrievalDataset is data.RetrievalDataset  # the same classes whichever module a caller names

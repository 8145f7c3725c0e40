"""Listing inputs: folders, globs, missing paths, and the built-in corpus."""

from __future__ import annotations

import pytest

from pipeline.builtin_corpus import list_builtin, module_document
from pipeline.errors import InputNotFoundError, PipelineError
from pipeline.sources import list_sources


def test_folder_glob_sorted_and_hidden_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    for rel in ["b/2.txt", "1.jsonl", ".hidden.txt", ".git/x.txt"]:
        (tmp_path / rel).write_text("x")
    listed = list_sources([str(tmp_path)])
    assert [s.uri for s in listed] == [str(tmp_path / "1.jsonl"), str(tmp_path / "b/2.txt")]
    assert listed[0].size == 1 and listed[0].version.isdigit()
    globbed = list_sources([f"{tmp_path}/**/*.txt", str(tmp_path / "b/2.txt")])
    assert [s.uri for s in globbed] == [str(tmp_path / "b/2.txt")]


def test_missing_inputs_fail_fast(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file or folder"):
        list_sources([str(tmp_path / "nope")])
    with pytest.raises(InputNotFoundError, match="glob matches no file"):
        list_sources([f"{tmp_path}/*.jsonl"])
    with pytest.raises(PipelineError, match="unknown built-in corpus"):
        list_sources(["builtin://nope"])


def test_builtin_listing_is_sorted_stdlib_source():
    files = list_builtin("builtin://python-docs")
    uris = [f.uri for f in files]
    assert uris == sorted(uris) and len(uris) > 100
    assert "builtin://python-docs/json/decoder.py" in uris
    assert not any("/test/" in u or "site-packages" in u for u in uris)


def test_module_document_has_signatures_and_docstrings():
    src = b'"""Mod doc."""\nclass A(B):\n    """Class doc."""\n    def f(self, x=1):\n        """F doc."""\n'
    doc = module_document(src, "pkg.mod")
    assert doc == (
        "Module pkg.mod\n\nMod doc.\n\nclass A(B)\n\nClass doc.\n\ndef A.f(self, x=1)\n\nF doc."
    )

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


def test_hf_uris_route_to_the_hub_filesystem_without_network():
    """Listing a hub dataset needs the network (not available here); the routing does not."""
    from pipeline.storage import filesystem

    fs, path = filesystem("hf://datasets/org/name/data/train.parquet")
    assert type(fs).__name__ == "HfFileSystem"
    assert path == "datasets/org/name/data/train.parquet"


def test_s3_options_come_from_config_over_environment(monkeypatch):
    from pipeline.config import S3Options
    from pipeline.storage import s3_storage_options

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:9000")
    assert s3_storage_options(None)["client_kwargs"] == {"endpoint_url": "http://env:9000"}
    opts = s3_storage_options(S3Options(endpoint_url="http://cfg:9000", key="k", secret="s"))
    assert opts["client_kwargs"]["endpoint_url"] == "http://cfg:9000"
    assert (opts["key"], opts["secret"]) == ("k", "s")


def test_secrets_never_reach_the_manifest_config():
    import json

    from pipeline.config import PrepareConfig

    cfg = PrepareConfig(inputs=["x"], s3={"key": "AKIAEXAMPLE", "secret": "topsecret"})
    dumped = json.dumps(cfg.public_view()) + json.dumps(cfg.fingerprint_view())
    assert "topsecret" not in dumped and "AKIAEXAMPLE" not in dumped


def test_builtin_source_that_does_not_parse_is_quarantined(tmp_path, monkeypatch):
    from pipeline import builtin_corpus
    from pipeline.source_readers import read_records
    from tests.pipeline.conftest import tiny_config

    (tmp_path / "good.py").write_text('"""Fine module."""\n')
    (tmp_path / "bad.py").write_text("def broken(:\n")
    monkeypatch.setattr(builtin_corpus, "stdlib_root", lambda: str(tmp_path))
    bad, good = list_builtin("builtin://python-docs")
    cfg = tiny_config(["builtin://python-docs"])
    assert [r[3] for r in read_records(bad, cfg)] == ["unparseable_source"]
    assert [r[0] for r in read_records(good, cfg)] == ["Module good\n\nFine module."]

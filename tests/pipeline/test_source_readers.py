"""Readers: every format, every compression, and bad records quarantined one by one."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.compression import LineSplitter
from pipeline.source_readers import read_records
from pipeline.sources import detect_format, list_sources
from tests.pipeline.conftest import tiny_config, write_jsonl


def records(path, **cfg):
    (src,) = list_sources([str(path)])
    return list(read_records(src, tiny_config([str(path)], **cfg)))


def texts(recs):
    return [r[0] for r in recs if r[3] is None]


def reasons(recs):
    return [(r[3], r[1]) for r in recs if r[3] is not None]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("a.txt", ("txt", None)),
        ("a.md.gz", ("txt", "gzip")),
        ("a.jsonl.zst", ("jsonl", "zstd")),
        ("a.JSON", ("json", None)),
        ("a.parquet.zstd", ("parquet", "zstd")),
        ("a.docx", ("unsupported", None)),
    ],
)
def test_detect_format(name, expected):
    assert detect_format(name) == expected


def test_line_splitter_offsets_across_chunks():
    data = b"ab\ncdef\n\nlast"
    chunks = iter([data[:1], data[1:5], data[5:9], data[9:]])
    got = list(LineSplitter(100).lines(chunks))
    assert got == [(1, 0, b"ab"), (2, 3, b"cdef"), (3, 8, b""), (4, 9, b"last")]


def test_line_splitter_bounds_an_overlong_line():
    chunks = iter([b"short\n", b"x" * 50, b"y" * 50 + b"\nafter"])
    got = list(LineSplitter(20).lines(chunks))
    assert got == [(1, 0, b"short"), (2, 6, None), (3, 107, b"after")]


@pytest.mark.parametrize("compress", [None, "gzip", "zstd"])
def test_jsonl_all_compressions(tmp_path, compress):
    suffix = {None: "", "gzip": ".gz", "zstd": ".zst"}[compress]
    docs = [f"document number {i}" for i in range(5)]
    path = write_jsonl(tmp_path / f"x.jsonl{suffix}", [{"text": d} for d in docs], compress)
    recs = records(path)
    assert texts(recs) == docs
    assert [r[1] for r in recs] == [1, 2, 3, 4, 5]


def test_bad_lines_are_quarantined_and_later_lines_kept(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"text": "first"},
            b'{"text": "caf\xe9"}',
            b"{not json",
            {"other": "x"},
            {"text": ["a", "list"]},
            b'{"text": "lone \\ud800 surrogate"}',
            b"[1, 2]",
            {"text": "last"},
        ],
    )
    recs = records(path)
    assert texts(recs) == ["first", "last"]
    assert reasons(recs) == [
        ("invalid_utf8", 2),
        ("invalid_json", 3),
        ("missing_field", 4),
        ("non_string_field", 5),
        ("invalid_utf8", 6),
        ("missing_field", 7),
    ]
    bad_utf8 = recs[1]
    assert bad_utf8[2] == len(b'{"text": "first"}\n') + len(b'{"text": "caf')


def test_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"content": "hello"}, {"text": "ignored"}])
    recs = records(path, text_field="content")
    assert texts(recs) == ["hello"]
    assert reasons(recs) == [("missing_field", 2)]


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_truncated_stream_keeps_records_before_the_cut(tmp_path, compress):
    suffix = ".gz" if compress == "gzip" else ".zst"
    docs = [f"record {i} " + "payload " * 40 for i in range(200)]
    path = write_jsonl(tmp_path / f"t.jsonl{suffix}", [{"text": d} for d in docs], compress)
    whole = path.read_bytes()
    if compress == "zstd":
        # Several frames, so that whole frames before the cut still decode.
        cctx = zstandard.ZstdCompressor()
        raw = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs)
        whole = b"".join(cctx.compress(raw[i : i + 4096]) for i in range(0, len(raw), 4096))
    path.write_bytes(whole[: len(whole) // 2])
    recs = records(path)
    good = texts(recs)
    assert 0 < len(good) < len(docs)
    assert good == docs[: len(good)]
    (last,) = reasons(recs)
    assert last[0] == "corrupt_compression"
    assert recs[-1][1] >= len(good) + 1


def test_binary_and_unreadable_and_unsupported(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing")
    (tmp_path / "x.docx").write_bytes(b"zip")
    assert reasons(records(tmp_path / "bin.txt")) == [("binary_file", None)]
    assert records(tmp_path / "bin.txt")[0][2] == 3
    assert reasons(records(tmp_path / "gone.txt"))[0][0] == "unreadable_file"
    assert reasons(records(tmp_path / "x.docx"))[0][0] == "unsupported_format"


def test_txt_whole_file_and_paragraphs(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"para one\nstill one\n\n\npara two\r\n\nbad \xff para\n")
    whole = records(path)
    assert reasons(whole) == [("invalid_utf8", 1)]
    paras = records(path, txt_split="paragraph")
    assert texts(paras) == ["para one\nstill one", "para two"]
    assert reasons(paras) == [("invalid_utf8", 7)]
    assert [r[1] for r in paras] == [1, 5, 7]


def test_txt_file_over_the_byte_bound_is_too_long(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word " * 1000)
    recs = records(path, clean={"max_chars": 100})
    assert reasons(recs) == [("too_long", 1)]


def test_json_array_file(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": None}, {"text": "c"}]))
    recs = records(path)
    assert texts(recs) == ["a", "c"]
    assert reasons(recs) == [("missing_field", 2)]


def test_parquet_column_checks_and_nulls(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "ok.parquet")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["zipped"]}), buf)
    (tmp_path / "z.parquet.gz").write_bytes(gzip.compress(buf.getvalue()))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    ok = records(tmp_path / "ok.parquet")
    assert texts(ok) == ["a", "c"] and reasons(ok) == [("missing_field", 2)]
    assert reasons(records(tmp_path / "nocol.parquet"))[0][0] == "missing_field"
    assert reasons(records(tmp_path / "ints.parquet"))[0][0] == "non_string_field"
    assert texts(records(tmp_path / "z.parquet.gz")) == ["zipped"]
    assert reasons(records(tmp_path / "broken.parquet"))[0][0] == "unreadable_file"

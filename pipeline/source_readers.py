"""Turn one source file into records, quarantining bad ones without giving up on the file.

A record is ``(text, line, offset, reason, detail)``: ``reason`` is None for
a usable document, else a code from ``pipeline.quarantine.REASONS``; ``line``
(1-based; the element index in a JSON array, the row in Parquet) and
``offset`` (byte offset in the decompressed stream) say where it came from.
JSON nested deeper than ``json_stream.MAX_DEPTH`` is ``invalid_json``: never
handed to the recursive ``json.loads``. A
bad line never stops the lines after it; damage that ends a file (truncated
gzip/zstd, I/O error) keeps every record before it and adds one record for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import builtin_corpus
from pipeline.compression import BinaryFile, Damage, LineSplitter, decompressed_chunks, open_raw
from pipeline.config import PrepareConfig
from pipeline.json_stream import MAX_DEPTH, ArraySplitter, too_deep
from pipeline.quarantine import snippet
from pipeline.sources import SourceFile

Record = tuple[str | None, int | None, int | None, str | None, str | None]
BINARY_PROBE = 8192
TOO_LONG_LINE = "line longer than 4 * data.clean.max_chars bytes"
TOO_LONG_ELEMENT = "JSON array element longer than 4 * data.clean.max_chars bytes"


def read_records(src: SourceFile, cfg: PrepareConfig) -> Iterator[Record]:
    if src.format == "unsupported":
        name = src.uri.rsplit("/", 1)[-1]
        yield None, None, None, "unsupported_format", f"unknown suffix: {name}"
        return
    reader = {"txt": _txt, "jsonl": _jsonl, "json": _json, "parquet": _parquet, "pydoc": _pydoc}
    try:
        yield from reader[src.format](src, cfg)
    except Damage as e:
        yield None, e.line, e.offset, e.reason, e.detail
    except OSError as e:
        yield None, None, None, "unreadable_file", _describe(e)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def _max_bytes(cfg: PrepareConfig) -> int:
    """A UTF-8 character is at most 4 bytes: a longer byte string cannot pass ``max_chars``."""
    return 4 * cfg.clean.max_chars + 4


def _decode(data: bytes, line: int | None, offset: int | None) -> Record:
    try:
        return data.decode("utf-8"), line, offset, None, None
    except UnicodeDecodeError as e:
        bad = None if offset is None else offset + e.start
        return snippet(data.decode("utf-8", errors="replace")), line, bad, "invalid_utf8", e.reason


def _text_chunks(src: SourceFile, cfg: PrepareConfig) -> Iterator[bytes]:
    """Decompressed chunks of a text-like file; a NUL byte up front marks it binary."""
    with open_raw(src, cfg.s3, cfg.max_file_bytes) as raw:
        chunks = decompressed_chunks(raw, src.compression, cfg.max_file_bytes)
        head, damage = b"", None
        try:
            for chunk in chunks:
                head += chunk
                if len(head) >= BINARY_PROBE:
                    break
        except Damage as e:
            damage = e
        if b"\x00" in head[:BINARY_PROBE]:
            nul = head.index(b"\x00")
            raise BinaryFile(f"NUL byte at offset {nul}", line=None, offset=nul)
        if head:
            yield head
        if damage is not None:
            raise damage
        yield from chunks


def _lines(src: SourceFile, cfg: PrepareConfig) -> Iterator[tuple[int, int, bytes | None]]:
    return LineSplitter(_max_bytes(cfg)).lines(_text_chunks(src, cfg))


def _txt(src: SourceFile, cfg: PrepareConfig) -> Iterator[Record]:
    if cfg.txt_split == "paragraph":
        yield from _paragraphs(src, cfg)
        return
    yield from _book(src, cfg)


def _book(src: SourceFile, cfg: PrepareConfig) -> Iterator[Record]:
    """A ``.txt`` file as one document; one longer than ``clean.max_chars`` (a book: Project
    Gutenberg's, tinyshakespeare) is cut at blank lines, else at line ends, into documents of
    at most ``max_chars`` bytes, so it is trained on instead of quarantined whole. A single
    line past the reader's limit is still ``too_long``."""
    budget, limit = cfg.clean.max_chars, _max_bytes(cfg)
    buf, line_no, offset = bytearray(), 1, 0
    for chunk in _text_chunks(src, cfg):
        buf += chunk
        while len(buf) > budget:
            cut, gap = buf.rfind(b"\n\n", 0, budget + 1), 2
            if cut <= 0:
                cut, gap = buf.rfind(b"\n", 0, budget + 1), 1
            if cut <= 0:
                cut, gap = buf.find(b"\n", budget), 1
            if cut < 0:
                if len(buf) <= limit:
                    break  # a long line: wait for its end
                yield None, line_no, offset, "too_long", f"a line longer than {limit} bytes"
                return
            piece = bytes(buf[:cut])
            yield _decode(piece, line_no, offset)
            line_no += piece.count(b"\n") + gap
            offset += cut + gap
            del buf[: cut + gap]
    if len(buf) > limit:
        yield None, line_no, offset, "too_long", f"a line longer than {limit} bytes"
    elif buf.strip() or offset == 0:
        yield _decode(bytes(buf), line_no, offset)


def _paragraphs(src: SourceFile, cfg: PrepareConfig) -> Iterator[Record]:
    lines: list[bytes] = []
    first = (1, 0)
    for line_no, offset, line in _lines(src, cfg):
        if line is None:
            yield None, line_no, offset, "too_long", TOO_LONG_LINE
        elif line.strip():
            if not lines:
                first = (line_no, offset)
            lines.append(line.rstrip(b"\r"))
            continue
        if lines:
            yield _decode(b"\n".join(lines), *first)
            lines = []
    if lines:
        yield _decode(b"\n".join(lines), *first)


def _jsonl(src: SourceFile, cfg: PrepareConfig) -> Iterator[Record]:
    for line_no, offset, line in _lines(src, cfg):
        if line is None:
            yield None, line_no, offset, "too_long", TOO_LONG_LINE
        elif line.strip():
            yield _json_record(line, line_no, offset, cfg.text_field)


def _json_record(line: bytes, line_no: int, offset: int, field: str) -> Record:
    text, _, bad, reason, detail = _decode(line, line_no, offset)
    if reason is not None:
        return text, line_no, bad, reason, detail
    depth = too_deep(line)
    if depth is not None:
        return (
            snippet(text),
            line_no,
            offset,
            "invalid_json",
            f"nested {depth} deep (limit {MAX_DEPTH})",
        )
    try:
        obj = json.loads(text)
    except ValueError as e:
        return snippet(text), line_no, offset, "invalid_json", str(e)[:200]
    return _field(obj, field, snippet(text), line_no, offset)


def _field(obj: Any, field: str, raw: str | None, line: int, offset: int | None) -> Record:
    if not isinstance(obj, dict) or obj.get(field) is None:
        return raw, line, offset, "missing_field", f"no {field!r} in this record"
    value = obj[field]
    if not isinstance(value, str):
        return raw, line, offset, "non_string_field", f"{field!r} is {type(value).__name__}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return raw, line, offset, "invalid_utf8", f"lone surrogate in {field!r}: {e.reason}"
    return value, line, offset, None, None


def _json(src: SourceFile, cfg: PrepareConfig) -> Iterator[Record]:
    """A ``.json`` file is one array of objects (streamed element by element), or JSON Lines."""
    head = b""
    for chunk in _text_chunks(src, cfg):
        head = chunk.lstrip()
        if head:
            break
    if not head.startswith(b"["):
        yield from _jsonl(src, cfg)
        return
    splitter = ArraySplitter(_max_bytes(cfg))
    for index, offset, data, problem in splitter.elements(_text_chunks(src, cfg)):
        if problem is not None:
            yield None, index, offset, "invalid_json", problem
        elif data is None:
            yield None, index, offset, "too_long", TOO_LONG_ELEMENT
        else:
            yield _json_record(data, index, offset, cfg.text_field)


def _parquet(src: SourceFile, cfg: PrepareConfig) -> Iterator[Record]:
    field = cfg.text_field
    with open_raw(src, cfg.s3, cfg.max_file_bytes, seekable=True) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, ValueError) as e:
            yield None, None, None, "unreadable_file", _describe(e)
            return
        kind = pf.schema_arrow.field(field).type if field in pf.schema_arrow.names else None
        if kind is None:
            yield None, None, None, "missing_field", f"no column {field!r}"
            return
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            yield None, None, None, "non_string_field", f"column {field!r} is {kind}"
            return
        groups, rows = _row_groups_within(pf, field, cfg.max_file_bytes)
        row = 0
        for batch in pf.iter_batches(columns=[field], batch_size=1024, row_groups=groups):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    yield None, row, None, "missing_field", f"null {field!r}"
                else:
                    yield value, row, None, None, None
        if len(groups) < pf.num_row_groups:
            detail = f"column {field!r} decompresses to more than data.max_file_bytes"
            yield (
                None,
                rows + 1,
                None,
                "too_large",
                f"{detail} ({cfg.max_file_bytes}); the rest of the file is skipped",
            )


def _row_groups_within(pf: pq.ParquetFile, field: str, limit: int) -> tuple[list[int], int]:
    """The leading row groups whose text column decompresses to ``limit`` bytes in all
    (by the sizes the footer declares, before anything is decompressed), and their rows."""
    total, rows, groups = 0, 0, []
    for i in range(pf.num_row_groups):
        meta = pf.metadata.row_group(i)
        columns = (meta.column(j) for j in range(meta.num_columns))
        total += sum(c.total_uncompressed_size for c in columns if c.path_in_schema == field)
        if total > limit:
            break
        groups.append(i)
        rows += meta.num_rows
    return groups, rows


def _pydoc(src: SourceFile, cfg: PrepareConfig) -> Iterator[Record]:
    with open(builtin_corpus.local_path(src.uri), "rb") as f:
        source = f.read()
    try:
        text = builtin_corpus.module_document(source, builtin_corpus.module_name(src.uri))
    except (SyntaxError, ValueError) as e:
        yield None, None, None, "unparseable_source", _describe(e)
        return
    yield text, None, None, None, None

"""Byte streams of source files: open, decompress (gzip/zstd), split into lines.

Truncation must be loud: ``zstandard``'s stream reader returns a short read
at the end of a truncated frame instead of raising, so zstd goes through a
``decompressobj`` whose ``eof`` flag tells a finished frame from a cut one.

Output must be bounded: a zstd RLE block turns 4 bytes into 128 KiB, so the
``decompressobj`` (which has no output limit) is fed ``ZSTD_FEED`` bytes at a
time, at most 32 MiB out per call; gzip's ``read1`` is bounded by itself. A
stream that passes ``max_bytes`` decompressed raises ``TooLarge``.
"""

from __future__ import annotations

import gzip
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import zstandard

from pipeline.config import S3Options
from pipeline.sources import SourceFile
from pipeline.storage import filesystem

CHUNK = 1 << 20
ZSTD_FEED = 1 << 10


class Damage(Exception):
    """The rest of a file cannot be read; records before ``line``/``offset`` are kept."""

    reason = "unreadable_file"

    def __init__(self, detail: str, line: int | None = None, offset: int | None = None):
        super().__init__(detail)
        self.detail, self.line, self.offset = detail, line, offset


class CorruptCompression(Damage):
    reason = "corrupt_compression"


class BinaryFile(Damage):
    reason = "binary_file"


class TooLarge(Damage):
    reason = "too_large"


@contextmanager
def open_raw(
    src: SourceFile, s3: S3Options | None, max_bytes: int, seekable: bool = False
) -> Iterator[IO[bytes]]:
    """The file's bytes; ``seekable`` spools a compressed file (at most ``max_bytes``
    decompressed) to a local temp file first."""
    fs, path = filesystem(src.uri, s3)
    with fs.open(path, "rb") as f:
        if not (seekable and src.compression):
            yield f
            return
        with tempfile.TemporaryFile() as tmp:
            for chunk in decompressed_chunks(f, src.compression, max_bytes):
                tmp.write(chunk)
            tmp.seek(0)
            yield tmp


def decompressed_chunks(raw: IO[bytes], compression: str | None, max_bytes: int) -> Iterator[bytes]:
    """Chunks of at most ``CHUNK`` bytes; ``TooLarge`` once they pass ``max_bytes`` in all."""
    if compression is None:
        chunks: Iterator[bytes] = iter(lambda: raw.read(CHUNK), b"")
    elif compression == "gzip":
        chunks = _gzip_chunks(raw)
    elif compression == "zstd":
        chunks = _zstd_chunks(raw)
    else:
        raise AssertionError(compression)
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(
                f"more than data.max_file_bytes ({max_bytes}) bytes decompressed; "
                "the rest of the file is skipped"
            )
        yield chunk


def _gzip_chunks(raw: IO[bytes]) -> Iterator[bytes]:
    out = 0
    with gzip.GzipFile(fileobj=raw) as g:
        while True:
            try:
                chunk = g.read1(CHUNK)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise CorruptCompression(f"gzip: {e} after {out} bytes") from None
            if not chunk:
                return
            out += len(chunk)
            yield chunk


def _zstd_chunks(raw: IO[bytes]) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame, out = dctx.decompressobj(), False, 0
    while data := raw.read(ZSTD_FEED):
        while data:
            try:
                chunk = dobj.decompress(data)
            except zstandard.ZstdError as e:
                raise CorruptCompression(f"zstd: {e} after {out} bytes") from None
            in_frame = True
            for start in range(0, len(chunk), CHUNK):
                yield chunk[start : start + CHUNK]
            out += len(chunk)
            if not dobj.eof:
                break
            data, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
    if in_frame:
        raise CorruptCompression(f"zstd: stream ends inside a frame after {out} bytes")


class LineSplitter:
    """Split a chunk stream on ``\\n`` with 1-based line numbers and byte offsets.

    A line longer than ``max_bytes`` is yielded as ``None`` (and never held in
    memory whole), which keeps memory flat on a file with no newlines.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.line_no = 1
        self.line_start = 0

    def lines(self, chunks: Iterator[bytes]) -> Iterator[tuple[int, int, bytes | None]]:
        parts: list[bytes] = []
        held, too_long, pos = 0, False, 0
        try:
            for chunk in chunks:
                pieces = chunk.split(b"\n")
                for piece in pieces[:-1]:
                    if not too_long and held + len(piece) <= self.max_bytes:
                        parts.append(piece)
                        line = b"".join(parts)
                    else:
                        line = None
                    yield self.line_no, self.line_start, line
                    pos += len(piece) + 1
                    self.line_no, self.line_start = self.line_no + 1, pos
                    parts, held, too_long = [], 0, False
                tail = pieces[-1]
                pos += len(tail)
                held += len(tail)
                too_long = too_long or held > self.max_bytes
                parts = [] if too_long else [*parts, tail]
        except Damage as e:
            e.line = e.line if e.line is not None else self.line_no
            e.offset = e.offset if e.offset is not None else self.line_start
            raise
        if held or too_long:
            yield self.line_no, self.line_start, None if too_long else b"".join(parts)

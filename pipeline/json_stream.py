"""JSON without recursion or whole-file reads: nesting depth, and a streamed top-level array.

``json.loads`` recurses once per level of nesting, so a 2 KB line nested 1000
deep raises ``RecursionError``, and where it does depends on the caller's stack
(a Ray worker's differs from a test's). Nesting is therefore bounded up front,
at ``MAX_DEPTH`` (serde_json's default recursion limit), by a scan that jumps
between structural bytes with ``re`` and never recurses.

``ArraySplitter`` cuts a ``.json`` array into the bytes of its elements as the
chunks stream by, so each element is a record of its own (an over-long element
is quarantined alone and never held whole) and no file is read into memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

MAX_DEPTH = 128
# Outside a string only brackets, quotes and (for the array splitter) commas matter;
# inside one only the closing quote and backslash escapes.
_STRUCTURE = re.compile(rb'[\[\]{}"]')
_SPLIT = re.compile(rb'[\[\]{}",]')
_IN_STRING = re.compile(rb'["\\]')
_OPEN = b"[{"
_QUOTE, _BACKSLASH, _COMMA = 0x22, 0x5C, 0x2C
AFTER_ARRAY = "data after the end of the JSON array"
Element = tuple[int, int, bytes | None, str | None]


def nesting_depth(data: bytes) -> int:
    """How deep arrays and objects nest in ``data`` (brackets inside strings do not count)."""
    depth = deepest = i = 0
    while m := _STRUCTURE.search(data, i):
        c = data[m.start()]
        if c == _QUOTE:
            i = _string_end(data, m.start() + 1)
            if i < 0:
                break
            continue
        depth += 1 if c in _OPEN else -1
        deepest = max(deepest, depth)
        i = m.start() + 1
    return deepest


def too_deep(data: bytes) -> int | None:
    """The nesting depth of ``data`` if it is over ``MAX_DEPTH``, else None.

    Counting opening brackets is a bound that C code computes, so an ordinary
    line never pays for the scan."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return None
    depth = nesting_depth(data)
    return depth if depth > MAX_DEPTH else None


def _string_end(data: bytes, i: int) -> int:
    """The index after the quote that closes a string starting at ``i``, or -1."""
    while m := _IN_STRING.search(data, i):
        if data[m.start()] == _QUOTE:
            return m.start() + 1
        i = m.start() + 2
    return -1


class ArraySplitter:
    """Split a chunk stream holding one JSON array into its elements, as they stream by.

    Yields ``(index, offset, data, problem)``: ``index`` is 1-based, ``offset``
    the element's first byte in the stream, ``data`` its bytes, or None for an
    element over ``max_bytes`` (skipped, never held whole). An element is only
    delimited here; whether it is valid JSON is ``json.loads``'s to judge. What
    is no element (the stream ends inside the array, or data follows it) comes
    last, once, with ``data`` None and ``problem`` saying what it is.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._depth, self._in_string, self._escaped, self._closed = 0, False, False, False
        self._pos = self._start = self._index = self._held = 0
        self._parts: list[bytes] = []

    def elements(self, chunks: Iterator[bytes]) -> Iterator[Element]:
        for chunk in chunks:
            for item in self._scan(chunk):
                yield item
                if item[3] is not None:
                    return
            self._pos += len(chunk)
        if not self._closed:
            yield self._index + 1, self._start, None, "the stream ends inside the JSON array"

    def _scan(self, chunk: bytes) -> Iterator[Element]:
        if self._closed:
            if chunk.strip():
                yield self._after(chunk, self._pos)
            return
        i = seg = 0
        if self._escaped:
            i, self._escaped = 1, False
        while i < len(chunk):
            if self._in_string:
                m = _IN_STRING.search(chunk, i)
                if m is None:
                    break
                if chunk[m.start()] == _BACKSLASH:
                    i = m.start() + 2
                    self._escaped = i > len(chunk)
                else:
                    self._in_string, i = False, m.start() + 1
                continue
            m = _SPLIT.search(chunk, i)
            if m is None:
                break
            j, c, i = m.start(), chunk[m.start()], m.start() + 1
            if c == _QUOTE:
                self._in_string = True
            elif c in _OPEN:
                self._depth += 1
                if self._depth == 1:
                    self._start, seg = self._pos + i, i
            elif c == _COMMA:
                if self._depth == 1:
                    yield self._cut(chunk[seg:j])
                    self._start, seg = self._pos + i, i
            else:
                self._depth -= 1
                if self._depth == 0:
                    yield from self._close(chunk[seg:j], chunk[i:], self._pos + i)
                    return
        if self._depth > 0:
            self._held += len(chunk) - seg
            if self._held > self.max_bytes:
                self._parts = []
            else:
                self._parts.append(chunk[seg:])

    def _cut(self, tail: bytes) -> Element:
        """The element that ends with ``tail``; start the next one."""
        size = self._held + len(tail)
        data = None if size > self.max_bytes else b"".join([*self._parts, tail])
        self._parts, self._held = [], 0
        self._index += 1
        if data is None:
            return self._index, self._start, None, None
        body = data.lstrip()
        return self._index, self._start + len(data) - len(body), body, None

    def _close(self, tail: bytes, rest: bytes, rest_at: int) -> Iterator[Element]:
        self._closed = True
        # ``[]`` holds no element; ``[1, ]`` holds an empty one, which is invalid JSON.
        if (
            self._index
            or self._held + len(tail) > self.max_bytes
            or (b"".join(self._parts) + tail).strip()
        ):
            yield self._cut(tail)
        if rest.strip():
            yield self._after(rest, rest_at)

    def _after(self, data: bytes, at: int) -> Element:
        return self._index + 1, at + len(data) - len(data.lstrip()), None, AFTER_ARRAY

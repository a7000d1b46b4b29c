"""Validation of staged content against the rule for its path.

`check(kind, fd)` returns None for valid content or a reason that names the line and column. It
reads a large file through a read-only memory map, so the document is never copied into a
Python bytes object, and JSON syntax is checked by msgspec without building the document.
"""

from __future__ import annotations

import codecs
import json
import mmap
import os
import re
import threading

import msgspec

from fusestore.engine import _dupkeys, schemas

_BYTE_AT = re.compile(r"\(byte (\d+)\)")
# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or a low one on its own.
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<![0-9a-fA-F]{2})(?<!\\)(?:\\\\)*\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_UTF8_CHUNK = 1 << 20
_SMALL = 1 << 20  # read smaller files in one call; map larger ones
_PARALLEL_SCAN = 1 << 20  # documents this large scan for duplicate keys beside msgspec
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # a JSON string, quotes included


def position(data, offset: int) -> tuple[int, int]:
    """Line and column (both from 1) of byte `offset` in `data` (bytes or a memory map)."""
    offset = max(0, min(offset, len(data)))
    lines, line_start = 0, 0
    for start in range(0, offset, _UTF8_CHUNK):
        chunk = data[start : min(start + _UTF8_CHUNK, offset)]
        count = chunk.count(b"\n")
        if count:
            lines += count
            line_start = start + chunk.rfind(b"\n") + 1
    return lines + 1, offset - line_start + 1


def _at(data, offset: int, message: str) -> str:
    line, column = position(data, offset)
    return f"line {line}, column {column}: {message}"


def _utf8_error(data) -> str | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    start = 0
    while start < len(data):
        chunk = data[start : start + _UTF8_CHUNK]
        pending = len(decoder.getstate()[0])
        if not pending and chunk.isascii():
            start += len(chunk)
            continue
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as e:
            return _at(data, start - pending + e.start, "invalid UTF-8")
        start += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return _at(data, len(data), "invalid UTF-8 (incomplete sequence at the end)")
    return None


def json_error(data) -> str | None:
    """Why `data` is not exactly one UTF-8 JSON document (RFC 8259), or None when it is."""
    if len(data) == 0:
        return "line 1, column 1: empty file, expected a JSON document"
    if data[:3] == b"\xef\xbb\xbf":
        return "line 1, column 1: byte order mark is not allowed in JSON (RFC 8259)"
    duplicate = _DuplicateScan(data)
    try:
        msgspec.json.decode(data, type=msgspec.Raw)
    except msgspec.DecodeError as e:
        text = str(e)
        found = _BYTE_AT.search(text)
        offset = int(found.group(1)) if found else len(data)
        text = _BYTE_AT.sub("", text).replace("JSON is malformed: ", "").strip()
        if text in ("Input data was truncated", "invalid utf-16 surrogate pair", "unexpected end of hex escape"):
            # msgspec reports a lone surrogate escape ("\ud800") as either of these.
            window_start = max(0, offset - 16)
            lone = _LONE_SURROGATE.search(bytes(data[window_start:offset + 1]))
            if lone is not None:
                return _at(data, window_start + lone.start(), f"lone UTF-16 surrogate escape {lone.group(0).decode()}")
        if text == "Input data was truncated":
            text = "unexpected end of document (truncated)"
        elif text == "trailing characters" and found:
            offset -= 1  # msgspec points one past the first trailing byte
        return _at(data, offset, text)
    except RecursionError:
        return "line 1, column 1: nesting too deep"
    finally:
        duplicate.join()
    return _utf8_error(data) or duplicate.reason()


class _DuplicateScan:
    """RFC 8259: the names in an object SHOULD be unique; parsers disagree on which duplicate
    wins, so fusestore refuses them. One pass in C (`_dupkeys.c`) that builds nothing and lets
    go of the GIL: for a large document it runs in a thread of its own while msgspec checks the
    syntax, so the two passes take the time of one. Its answer counts only for valid JSON."""

    def __init__(self, data):
        self.data = data
        self.offset = -1
        self.thread = None
        if len(data) >= _PARALLEL_SCAN:
            self.thread = threading.Thread(target=self._scan, name="fusestore-dupkeys")
            self.thread.start()

    def _scan(self) -> None:
        self.offset = _dupkeys.find(self.data)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def reason(self) -> str | None:
        if self.thread is None:
            self._scan()
        if self.offset < 0:
            return None
        key = json.loads(_STRING.match(self.data, self.offset).group(0))
        return _at(self.data, self.offset, f"duplicate key {json.dumps(key)} in an object")


def check(kind: str, fd: int, schema: str | None = None, size: int | None = None) -> str | None:
    """Validate the whole content of the open file `fd` (of `size` bytes, when the caller
    knows) for rule kind `kind` and, when given, the document `schema` (see engine.schemas)."""
    if kind == "none":
        return None
    if kind != "json":
        raise ValueError(f"unknown validation kind {kind!r}")
    if size is None:
        size = os.fstat(fd).st_size
    if size <= _SMALL:
        return _json_and_schema(os.pread(fd, size, 0), schema)
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
        return _json_and_schema(data, schema)


def _json_and_schema(data, schema: str | None) -> str | None:
    reason = json_error(data)
    if reason is None and schema is not None:
        reason = schemas.check(schema, data)
    return reason

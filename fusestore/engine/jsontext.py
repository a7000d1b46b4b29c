"""JSON text as fusestore writes it (generated files, documents it creates or migrates): msgspec,
indented, UTF-8 rather than \\u escapes, one final newline."""

from __future__ import annotations

from typing import Any

import msgspec


def pretty(value: Any, indent: int = 2) -> bytes:
    return msgspec.json.format(msgspec.json.encode(value), indent=indent) + b"\n"

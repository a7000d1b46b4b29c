"""What changed between two versions of a file (`fusestore diff`, `fusestore backups`).

JSON documents get a structural diff: each key added, removed or changed, by its JSON path
(`$.scenes[2].text`). Arrays are aligned on equal elements first (as a line diff aligns lines),
so that an element inserted at the front reads as one addition, not as every element changed.
Text (UTF-8 without NUL bytes) gets a unified diff; anything else its sizes and SHA-256 digests.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from typing import TYPE_CHECKING, Any

import msgspec

from fusestore.engine.errors import FusestoreError
from fusestore.engine.paths import components, open_dir

if TYPE_CHECKING:
    from fusestore.engine.store import Store

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Change(msgspec.Struct, omit_defaults=True):
    """One change of a JSON document: `op` is added, removed or changed; `old` and `new` are
    the values (absent where there is none: JSON null is a value)."""

    op: str
    path: str
    old: Any = msgspec.UNSET
    new: Any = msgspec.UNSET


class Diff(msgspec.Struct, omit_defaults=True):
    """`kind`: json (`changes`), text (`unified`, the diff's lines) or binary (sizes and
    digests only). `same`: the two contents are byte for byte equal."""

    kind: str
    same: bool
    old_size: int
    new_size: int
    changes: list[Change] = []
    unified: list[str] = []
    old_sha256: str | None = None
    new_sha256: str | None = None

    def summary(self) -> str:
        """One line: what the change from old to new did."""
        if self.same:
            return "no change"
        if self.kind == "json":
            if not self.changes:
                return "same JSON value (formatting only)"
            counts = {op: sum(1 for c in self.changes if c.op == op) for op in ("changed", "added", "removed")}
            what = ", ".join(f"{n} {op}" for op, n in counts.items() if n)
            paths = ", ".join(c.path for c in self.changes[:3]) + (", ..." if len(self.changes) > 3 else "")
            return f"{what}: {paths}"
        if self.kind == "text":
            added = sum(1 for line in self.unified if line.startswith("+") and not line.startswith("+++"))
            removed = sum(1 for line in self.unified if line.startswith("-") and not line.startswith("---"))
            return f"+{added} -{removed} lines"
        return f"binary, {self.old_size} -> {self.new_size} bytes"


def json_path(parent: str, step: str | int) -> str:
    if isinstance(step, int):
        return f"{parent}[{step}]"
    if _IDENTIFIER.match(step):
        return f"{parent}.{step}"
    return f"{parent}[{msgspec.json.encode(step).decode()}]"


def json_changes(old: Any, new: Any, path: str = "$") -> list[Change]:
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key, value in old.items():
            if key not in new:
                changes.append(Change("removed", json_path(path, key), old=value))
            else:
                changes.extend(json_changes(value, new[key], json_path(path, key)))
        changes.extend(Change("added", json_path(path, key), new=value) for key, value in new.items() if key not in old)
        return changes
    if isinstance(old, list) and isinstance(new, list):
        return _array_changes(old, new, path)
    if type(old) is type(new) and old == new:  # 1, 1.0 and true are equal in Python, not in JSON
        return []
    return [Change("changed", path, old=old, new=new)]


def _array_changes(old: list, new: list, path: str) -> list[Change]:
    keys_old = [msgspec.json.encode(v) for v in old]
    keys_new = [msgspec.json.encode(v) for v in new]
    changes = []
    matcher = difflib.SequenceMatcher(None, keys_old, keys_new, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        paired = min(i2 - i1, j2 - j1) if op == "replace" else 0
        for k in range(paired):  # replaced in place: what changed inside
            changes.extend(json_changes(old[i1 + k], new[j1 + k], json_path(path, j1 + k)))
        changes.extend(Change("removed", json_path(path, i), old=old[i]) for i in range(i1 + paired, i2))
        changes.extend(Change("added", json_path(path, j), new=new[j]) for j in range(j1 + paired, j2))
    return changes


def _text(data: bytes) -> str | None:
    if b"\0" in data:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def diff(old: bytes, new: bytes, old_label: str = "old", new_label: str = "new", context: int = 3) -> Diff:
    same = old == new
    base = dict(same=same, old_size=len(old), new_size=len(new))
    try:
        old_doc, new_doc = msgspec.json.decode(old), msgspec.json.decode(new)
    except msgspec.DecodeError:
        pass
    else:
        return Diff("json", changes=[] if same else json_changes(old_doc, new_doc), **base)
    old_text, new_text = _text(old), _text(new)
    if old_text is not None and new_text is not None:
        hunks = difflib.unified_diff(old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                                     old_label, new_label, n=context)
        lines = [] if same else [line.rstrip("\n") for line in hunks]
        return Diff("text", unified=lines, **base)
    return Diff("binary", old_sha256=hashlib.sha256(old).hexdigest(), new_sha256=hashlib.sha256(new).hexdigest(),
                **base)


class TooLarge(FusestoreError):
    """A version too large to compare in memory."""


# Versions are compared in memory; past this, only their sizes are told.
MAX_BYTES = 256 << 20


def read_version(store: "Store", relpath: str, generation: int, limit: int = MAX_BYTES) -> bytes:
    """The content of `relpath` as it is now (generation 0) or as backup `generation` holds it.
    FileNotFoundError when there is no such version; TooLarge past `limit` bytes."""
    if generation == 0:
        *parents, name = components(relpath)
        dir_fd = open_dir(store.root_fd, parents)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    else:
        fd = store.backups.open_generation(relpath, generation)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise TooLarge(f"{relpath} ({'now' if generation == 0 else f'generation {generation}'}) has {size} "
                           f"bytes, more than the {limit} compared in memory")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def label(relpath: str, generation: int) -> str:
    return f"{relpath} (now)" if generation == 0 else f"{relpath} (generation {generation})"


def compare(store: "Store", relpath: str, old: int, new: int = 0, limit: int = MAX_BYTES) -> Diff:
    """What changed from version `old` to version `new` (generation numbers; 0 is now)."""
    return diff(read_version(store, relpath, old, limit), read_version(store, relpath, new, limit),
                label(relpath, old), label(relpath, new))


# A generation's change is summarised when both versions are at most this large.
SUMMARY_BYTES = 16 << 20


def change_summary(store: "Store", relpath: str, generation: int) -> str:
    """What the version after backup `generation` (the next newer one, or the current content)
    changed, in one line."""
    try:
        return compare(store, relpath, generation, generation - 1, SUMMARY_BYTES).summary()
    except TooLarge:
        return "large: not compared (fusestore diff)"
    except FileNotFoundError:
        return "then removed" if generation == 1 else "not readable"

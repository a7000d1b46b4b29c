"""The `.cache` virtual directory: the cache engine's entries as files, for programs that only
know files.

    .cache/                       media/, tts/, rate-limits.json (generated, read-only)
    .cache/<type>/                one directory per live entry, and index.json (generated, read-only)
    .cache/<type>/<key>/          the data file and metadata.json

Reading a data file counts as a use of the entry (LRU) and reads the real file, so a reader keeps
its content even if the entry is evicted meanwhile. New entries are written the way a program
writes any file: `mkdir .cache/media/<key>` (an md5 key, see `fusestore cache key`), then the data
file, and optionally `metadata.json` (a JSON object: url, tags and any fields of your own). Each
close of a changed file publishes the entry atomically through the engine, which evicts LRU
entries to stay under the size limit. A metadata.json written before the data waits, in memory,
for the data file. Everything else (unlink, rename, chmod, index.json) fails with EROFS.

The engine stages what programs write (`Cache.draft`, `publish`, `discard`, `read_metadata`);
this module maps names to entries and requests to those calls. Every engine call blocks (SQLite,
fsync), so all of them run in the filesystem's worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from typing import Callable, NamedTuple

import pyfuse3

from fusestore.engine.cache import INDEX_JSON, METADATA, RATE_LIMITS, TYPES, Cache, Draft, Entry, InvalidMetadata
from fusestore.fs.nodes import InodeTable, VirtualNode
from fusestore.fs.virtual import Attrs
from fusestore.fs.workers import Workers

log = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9a-f]{32}")
_DIR = stat.S_IFDIR | 0o755
_FILE = stat.S_IFREG | 0o644
_GENERATED = stat.S_IFREG | 0o444


class Place(NamedTuple):
    """Where a node is in `.cache`: the root (nothing set), a type directory (`top`, one of
    TYPES), the generated rate-limits.json (`top`), a type's generated index.json or an entry's
    directory (`top`, `key`), or a file of an entry (all three)."""

    top: str | None = None
    key: str | None = None
    name: str | None = None

    def child(self, name: str) -> "Place":
        if self.top is None:
            return Place(name)
        if self.key is None:
            return Place(self.top, name)
        return Place(self.top, self.key, name)

    @property
    def is_type_dir(self) -> bool:
        return self.top in TYPES and self.key is None

    @property
    def is_generated(self) -> bool:
        """rate-limits.json or an index.json: read-only files fusestore writes."""
        return (self.top == RATE_LIMITS and self.key is None) or (self.key == INDEX_JSON and self.name is None)

    @property
    def is_entry_dir(self) -> bool:
        return self.top in TYPES and self.key is not None and self.key != INDEX_JSON and self.name is None

    @property
    def is_dir(self) -> bool:
        return self.top is None or self.is_type_dir or self.is_entry_dir


def place_of(node: VirtualNode) -> Place:
    return node.key[1]


class CacheWriter:
    """An open-for-writing file of an entry: its bytes are a draft in the cache's `.tmp/`."""

    __slots__ = ("node", "place", "draft", "dirty", "published")

    def __init__(self, node: VirtualNode, draft: Draft):
        self.node = node
        self.place = place_of(node)
        self.draft = draft
        self.dirty = False
        self.published = False  # the draft became the entry's file: copy before writing on

    @property
    def fd(self) -> int:
        return self.draft.fd


class CacheReader:
    __slots__ = ("node", "fd", "data")

    def __init__(self, node: VirtualNode, fd: int | None = None, data: bytes = b""):
        self.node, self.fd, self.data = node, fd, data

    def read(self, off: int, size: int) -> bytes:
        if self.fd is not None:
            return os.pread(self.fd, size, off)
        return self.data[off:off + size]


class CacheView:
    def __init__(self, cache: Cache, rejected: Callable[[str, str, None], Exception], workers: Workers):
        self.cache = cache
        self.rejected = rejected  # the tree's rejection record: Store.rejected(path, reason, None)
        self.workers = workers
        self.started_ns = time.time_ns()
        self.pending: dict[tuple[str, str], dict | None] = {}  # made with mkdir, no entry yet
        self.writing: dict[Place, CacheWriter] = {}  # files open for writing

    # -- names and attributes -------------------------------------------------------------

    def _node(self, inodes: InodeTable, place: Place) -> VirtualNode:
        return inodes.virtual_node(("cache", place), "", 0, self)

    def _attrs(self, mode: int, size: int = 0, t: int | None = None) -> Attrs:
        t = self.started_ns if t is None else t
        return Attrs(mode, 2 if stat.S_ISDIR(mode) else 1, os.getuid(), os.getgid(), size, t, t, t)

    @staticmethod
    def _file_attrs(st: os.stat_result) -> Attrs:
        return Attrs(_FILE, 1, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    def root(self, inodes: InodeTable) -> tuple[VirtualNode, Attrs]:
        return self._node(inodes, Place()), self._attrs(_DIR)

    @staticmethod
    def fixed(node: VirtualNode) -> bool:
        """`.cache` and its type directories never change: the kernel may cache them."""
        place = place_of(node)
        return place.top is None or place.is_type_dir

    async def stat(self, node: VirtualNode) -> Attrs:
        return await self.workers.run(self._stat, place_of(node))

    def _entry(self, place: Place, use: bool = False) -> Entry:
        entry = self.cache.lookup(place.top, place.key, use=use)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry")
        return entry

    def _stat(self, place: Place) -> Attrs:
        if place.top is None or place.is_type_dir:
            return self._attrs(_DIR)
        if place.top == RATE_LIMITS:
            return self._attrs(_GENERATED, len(self.cache.rate_limits_json()))
        if place.key == INDEX_JSON:
            return self._attrs(_GENERATED, len(self.cache.index_json(place.top)))
        if place.is_entry_dir:
            entry = self.cache.lookup(place.top, place.key, use=False)
            if entry is None and (place.top, place.key) not in self.pending:
                raise FileNotFoundError(errno.ENOENT, "no such entry")
            return self._attrs(_DIR, 0, int(entry.cached_at * 1e9) if entry else None)
        writer = self.writing.get(place)
        if writer is not None:  # its writer sees what it wrote, as with any staged file
            return self._file_attrs(os.fstat(writer.fd))
        entry = self._entry(place)
        if place.name == METADATA:
            return self._attrs(_FILE, len(self.cache.metadata_json(entry)), int(entry.cached_at * 1e9))
        if place.name != entry.file:
            raise FileNotFoundError(errno.ENOENT, "no such file in the entry")
        fd = self.cache.open_data(entry)
        try:
            return self._file_attrs(os.fstat(fd))
        finally:
            os.close(fd)

    async def lookup(self, inodes: InodeTable, parent: VirtualNode, name: bytes) -> tuple[VirtualNode, Attrs]:
        text = os.fsdecode(name)
        place = place_of(parent)
        if text in (".", "..") or "/" in text:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if place.top is None and text not in (*TYPES, RATE_LIMITS):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not place.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = place.child(text)
        st = await self.workers.run(self._stat, child)
        return self._node(inodes, child), st

    async def listing(self, node: VirtualNode) -> list[bytes]:
        return await self.workers.run(self._listing, place_of(node))

    def _listing(self, place: Place) -> list[bytes]:
        if place.top is None:
            return [t.encode() for t in TYPES] + [RATE_LIMITS.encode()]
        if place.is_type_dir:
            keys = {e.key for e in self.cache.entries(place.top)}
            keys.update(k for kind, k in self.pending if kind == place.top)
            return [INDEX_JSON.encode()] + [k.encode() for k in sorted(keys)]
        entry = self.cache.lookup(place.top, place.key, use=False)
        return [] if entry is None else [os.fsencode(entry.file), METADATA.encode()]

    # -- reading ----------------------------------------------------------------------------

    async def open_read(self, node: VirtualNode) -> CacheReader:
        return await self.workers.run(self._open_read, node)

    def _open_read(self, node: VirtualNode) -> CacheReader:
        place = place_of(node)
        if place.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if place.top == RATE_LIMITS:
            return CacheReader(node, data=self.cache.rate_limits_json())
        if place.key == INDEX_JSON:
            return CacheReader(node, data=self.cache.index_json(place.top))
        if place.name == METADATA:
            return CacheReader(node, data=self.cache.metadata_json(self._entry(place)))
        entry = self._entry(place, use=True)  # reading the data is a use
        if entry.file != place.name:
            raise FileNotFoundError(errno.ENOENT, "no such file in the entry")
        return CacheReader(node, fd=self.cache.open_data(entry))

    # -- writing ----------------------------------------------------------------------------

    async def mkdir(self, inodes: InodeTable, parent: VirtualNode, name: bytes) -> tuple[VirtualNode, Attrs]:
        place = place_of(parent)
        text = os.fsdecode(name)
        if not place.is_type_dir:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not _KEY.fullmatch(text):
            log.warning("mkdir .cache/%s/%s refused: a new entry's name must be its md5 key", place.top, text)
            raise pyfuse3.FUSEError(errno.EINVAL)
        exists = await self.workers.run(self.cache.lookup, place.top, text, False)
        if exists is not None or (place.top, text) in self.pending:
            raise pyfuse3.FUSEError(errno.EEXIST)
        self.pending[(place.top, text)] = None
        return self._node(inodes, place.child(text)), self._attrs(_DIR)

    async def create(self, inodes: InodeTable, parent: VirtualNode, name: bytes) -> tuple[CacheWriter, Attrs]:
        place = place_of(parent)
        if not place.is_entry_dir:
            raise pyfuse3.FUSEError(errno.EROFS)
        text = os.fsdecode(name)
        if text == INDEX_JSON or text.startswith("."):
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self._node(inodes, place.child(text))
        writer = await self.workers.run(self._new_writer, node, None)
        return writer, self._attrs(_FILE)

    async def open_write(self, node: VirtualNode, truncate: bool) -> CacheWriter:
        if place_of(node).name is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return await self.workers.run(self._open_write, node, truncate)

    def _open_write(self, node: VirtualNode, truncate: bool) -> CacheWriter:
        place = place_of(node)
        if truncate:
            return self._new_writer(node, None)
        other = self.writing.get(place)
        entry = self.cache.lookup(place.top, place.key, use=False)
        if entry is None or (other is not None and other.dirty):
            if other is None:
                raise FileNotFoundError(errno.ENOENT, "the entry is gone")
            return self._new_writer(node, other.fd)  # a file another program is writing
        if place.name == METADATA:
            return self._new_writer(node, self.cache.metadata_json(entry))
        fd = self.cache.open_data(entry)
        try:
            return self._new_writer(node, fd)
        finally:
            os.close(fd)

    def _new_writer(self, node: VirtualNode, content: bytes | int | None) -> CacheWriter:
        writer = CacheWriter(node, self.cache.draft(content))
        node.handles += 1
        self.writing[writer.place] = writer
        return writer

    def _redraft(self, writer: CacheWriter) -> None:
        """After a commit the draft is the entry's file: go on writing on a copy of it."""
        old = writer.draft
        writer.draft = self.cache.draft(old.fd)
        writer.published = False
        self.cache.discard(old)

    async def write(self, writer: CacheWriter, off: int, buf: bytes) -> int:
        if writer.published:
            await self.workers.run(self._redraft, writer)
        written = os.pwrite(writer.fd, buf, off)
        writer.dirty = True
        return written

    async def truncate(self, writer: CacheWriter, size: int) -> None:
        if writer.published:
            await self.workers.run(self._redraft, writer)
        os.ftruncate(writer.fd, size)
        writer.dirty = True

    async def flush(self, writer: CacheWriter) -> None:
        if writer.dirty:
            writer.dirty = False
            await self.workers.run(self._commit, writer)

    def _commit(self, writer: CacheWriter) -> None:
        kind, key, name = writer.place
        current = self.cache.lookup(kind, key, use=False)
        if name == METADATA:
            try:
                fields = self.cache.read_metadata(writer.fd)
            except InvalidMetadata as e:
                raise self.rejected(f".cache/{kind}/{key}/{METADATA}", e.reason, None) from None
            if current is None:
                if (kind, key) not in self.pending:
                    raise FileNotFoundError(errno.ENOENT, "the entry is gone")
                self.pending[(kind, key)] = fields  # waits for the data file
            else:
                self.cache.put_metadata(kind, key, fields)
            return
        fields = dict(current.metadata) if current is not None else self.pending.get((kind, key)) or {}
        self.cache.publish(writer.draft, kind, key, name, fields)
        self.pending.pop((kind, key), None)
        writer.published = True
        log.info("cache: committed %s/%s/%s", kind, key, name)

    async def release(self, inodes: InodeTable, writer: CacheWriter) -> None:
        writer.node.handles -= 1
        inodes.maybe_free(writer.node)
        if self.writing.get(writer.place) is writer:
            del self.writing[writer.place]
        # A published draft's file stays in its entry: only the draft's name goes.
        await self.workers.run(self.cache.discard, writer.draft)

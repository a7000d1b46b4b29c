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

Every engine call blocks (SQLite, fsync), so all of them run in the filesystem's worker threads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import time
import uuid

import pyfuse3

from fusestore.engine.cache import INDEX_JSON, METADATA, RATE_LIMITS, TYPES, Cache
from fusestore.engine.paths import clone_or_copy
from fusestore.engine.store import Store
from fusestore.engine.validate import check
from fusestore.fs.nodes import InodeTable, VirtualNode
from fusestore.fs.virtual import Attrs
from fusestore.fs.workers import Workers

log = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9a-f]{32}")
_DIR = stat.S_IFDIR | 0o755
_FILE = stat.S_IFREG | 0o644
_GENERATED = stat.S_IFREG | 0o444


class CacheWriter:
    """An open-for-writing file of an entry: its bytes are staged in the cache's `.tmp/`."""

    __slots__ = ("node", "kind", "key", "name", "fd", "stage", "dirty", "published")

    def __init__(self, node: VirtualNode, fd: int, stage: str):
        self.node = node
        self.kind, self.key, self.name = node.key[1], node.key[2], node.key[3]
        self.fd, self.stage = fd, stage
        self.dirty = False
        self.published = False  # the staged file became the entry's file: copy before writing


class CacheReader:
    __slots__ = ("node", "fd", "data")

    def __init__(self, node: VirtualNode, fd: int | None = None, data: bytes = b""):
        self.node, self.fd, self.data = node, fd, data

    def read(self, off: int, size: int) -> bytes:
        if self.fd is not None:
            return os.pread(self.fd, size, off)
        return self.data[off:off + size]


class CacheView:
    def __init__(self, cache: Cache, store: Store, workers: Workers):
        self.cache = cache
        self.store = store  # counts and logs rejections with the tree's own
        self.workers = workers
        self.started_ns = time.time_ns()
        self.pending: dict[tuple[str, str], dict | None] = {}  # made with mkdir, no entry yet
        self.writing: dict[tuple[str, str, str], CacheWriter] = {}  # files open for writing

    # -- names and attributes -------------------------------------------------------------

    def _node(self, inodes: InodeTable, key: tuple) -> VirtualNode:
        return inodes.virtual_node(("cache", *key), "", 0, self)

    def _attrs(self, mode: int, size: int = 0, t: int | None = None) -> Attrs:
        t = self.started_ns if t is None else t
        return Attrs(mode, 2 if stat.S_ISDIR(mode) else 1, os.getuid(), os.getgid(), size, t, t, t)

    def root(self, inodes: InodeTable) -> tuple[VirtualNode, Attrs]:
        return self._node(inodes, ()), self._attrs(_DIR)

    @staticmethod
    def fixed(node: VirtualNode) -> bool:
        """`.cache` and its type directories never change: the kernel may cache them."""
        return len(node.key) == 1 or (len(node.key) == 2 and node.key[1] in TYPES)

    async def stat(self, node: VirtualNode) -> Attrs:
        return await self.workers.run(self._stat, node.key[1:])

    def _stat(self, parts: tuple) -> Attrs:
        if len(parts) == 0 or (len(parts) == 1 and parts[0] in TYPES):
            return self._attrs(_DIR)
        if parts == (RATE_LIMITS,):
            return self._attrs(_GENERATED, len(self.cache.rate_limits_json()))
        kind, key = parts[0], parts[1]
        if len(parts) == 2:
            if key == INDEX_JSON:
                return self._attrs(_GENERATED, len(self.cache.index_json(kind)))
            entry = self.cache.lookup(kind, key, use=False)
            if entry is None and (kind, key) not in self.pending:
                raise FileNotFoundError(errno.ENOENT, "no such entry")
            return self._attrs(_DIR, 0, int(entry.cached_at * 1e9) if entry else None)
        name = parts[2]
        writer = self.writing.get(parts)
        if writer is not None:  # its writer sees what it wrote, as with any staged file
            st = os.fstat(writer.fd)
            return Attrs(_FILE, 1, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        entry = self.cache.lookup(kind, key, use=False)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry")
        t = int(entry.cached_at * 1e9)
        if name == METADATA:
            return self._attrs(_FILE, len(self.cache.metadata_json(entry)), t)
        if name != entry.file:
            raise FileNotFoundError(errno.ENOENT, "no such file in the entry")
        fd = self.cache.open_data(entry)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return Attrs(_FILE, 1, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    async def lookup(self, inodes: InodeTable, parent: VirtualNode, name: bytes) -> tuple[VirtualNode, Attrs]:
        text = os.fsdecode(name)
        parts = parent.key[1:]
        if text in (".", "..") or "/" in text:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if len(parts) == 0 and text not in (*TYPES, RATE_LIMITS):
            raise pyfuse3.FUSEError(errno.ENOENT)
        generated = (len(parts) == 1 and parts[0] == RATE_LIMITS) or (len(parts) == 2 and parts[1] == INDEX_JSON)
        if len(parts) >= 3 or generated:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = (*parts, text)
        st = await self.workers.run(self._stat, child)
        return self._node(inodes, child), st

    async def listing(self, node: VirtualNode) -> list[bytes]:
        return await self.workers.run(self._listing, node.key[1:])

    def _listing(self, parts: tuple) -> list[bytes]:
        if not parts:
            return [t.encode() for t in TYPES] + [RATE_LIMITS.encode()]
        if len(parts) == 1:
            keys = {e.key for e in self.cache.entries(parts[0])}
            keys.update(k for kind, k in self.pending if kind == parts[0])
            return [INDEX_JSON.encode()] + [k.encode() for k in sorted(keys)]
        entry = self.cache.lookup(parts[0], parts[1], use=False)
        return [] if entry is None else [os.fsencode(entry.file), METADATA.encode()]

    # -- reading ----------------------------------------------------------------------------

    async def open_read(self, node: VirtualNode) -> CacheReader:
        return await self.workers.run(self._open_read, node)

    def _open_read(self, node: VirtualNode) -> CacheReader:
        parts = node.key[1:]
        if len(parts) < 2 or (len(parts) == 2 and parts[1] != INDEX_JSON):
            if parts == (RATE_LIMITS,):
                return CacheReader(node, data=self.cache.rate_limits_json())
            raise pyfuse3.FUSEError(errno.EISDIR)
        if len(parts) == 2:
            return CacheReader(node, data=self.cache.index_json(parts[0]))
        kind, key, name = parts
        if name == METADATA:
            entry = self.cache.lookup(kind, key, use=False)
            if entry is None:
                raise FileNotFoundError(errno.ENOENT, "the entry is gone")
            return CacheReader(node, data=self.cache.metadata_json(entry))
        entry = self.cache.lookup(kind, key)  # reading the data is a use
        if entry is None or entry.file != name:
            raise FileNotFoundError(errno.ENOENT, "the entry is gone")
        return CacheReader(node, fd=self.cache.open_data(entry))

    # -- writing ----------------------------------------------------------------------------

    def _entry_dir(self, parent: VirtualNode) -> tuple[str, str]:
        parts = parent.key[1:]
        if len(parts) != 2 or parts[0] not in TYPES or parts[1] == INDEX_JSON:
            raise pyfuse3.FUSEError(errno.EROFS)
        return parts[0], parts[1]

    async def mkdir(self, inodes: InodeTable, parent: VirtualNode, name: bytes) -> tuple[VirtualNode, Attrs]:
        parts = parent.key[1:]
        text = os.fsdecode(name)
        if len(parts) != 1 or parts[0] not in TYPES:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not _KEY.fullmatch(text):
            log.warning("mkdir .cache/%s/%s refused: a new entry's name must be its md5 key", parts[0], text)
            raise pyfuse3.FUSEError(errno.EINVAL)
        exists = await self.workers.run(self.cache.lookup, parts[0], text, False)
        if exists is not None or (parts[0], text) in self.pending:
            raise pyfuse3.FUSEError(errno.EEXIST)
        self.pending[(parts[0], text)] = None
        return self._node(inodes, (parts[0], text)), self._attrs(_DIR)

    async def create(self, inodes: InodeTable, parent: VirtualNode, name: bytes) -> tuple[CacheWriter, Attrs]:
        kind, key = self._entry_dir(parent)
        text = os.fsdecode(name)
        if text == INDEX_JSON or text.startswith("."):
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self._node(inodes, (kind, key, text))
        writer = await self.workers.run(self._new_writer, node, None)
        return writer, self._attrs(_FILE)

    async def open_write(self, node: VirtualNode, truncate: bool) -> CacheWriter:
        parts = node.key[1:]
        if len(parts) != 3:
            raise pyfuse3.FUSEError(errno.EROFS)
        return await self.workers.run(self._open_write, node, truncate)

    def _open_write(self, node: VirtualNode, truncate: bool) -> CacheWriter:
        kind, key, name = node.key[1:]
        if truncate:
            return self._new_writer(node, None)
        other = self.writing.get(node.key[1:])
        entry = self.cache.lookup(kind, key, use=False)
        if entry is None or (other is not None and other.dirty):
            if other is None:
                raise FileNotFoundError(errno.ENOENT, "the entry is gone")
            return self._new_writer(node, other.fd)  # a file another program is writing
        if name == METADATA:
            return self._new_writer(node, self.cache.metadata_json(entry))
        fd = self.cache.open_data(entry)
        try:
            return self._new_writer(node, fd)
        finally:
            os.close(fd)

    def _new_writer(self, node: VirtualNode, content: bytes | int | None) -> CacheWriter:
        stage = f"{os.getpid()}-{uuid.uuid4().hex}"
        fd = os.open(stage, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=self.cache._tmp_fd)
        if isinstance(content, bytes):
            os.write(fd, content)
        elif isinstance(content, int):
            clone_or_copy(content, fd)
        node.handles += 1
        writer = CacheWriter(node, fd, stage)
        self.writing[node.key[1:]] = writer
        return writer

    def _restage(self, writer: CacheWriter) -> None:
        """After a commit the staged file is the entry's: go on writing on a copy of it."""
        old_fd, old_stage = writer.fd, writer.stage
        fresh = self._new_writer(writer.node, old_fd)
        writer.node.handles -= 1
        writer.fd, writer.stage, writer.published = fresh.fd, fresh.stage, False
        self.writing[writer.node.key[1:]] = writer
        os.close(old_fd)
        self._drop_stage(old_stage)

    async def write(self, writer: CacheWriter, off: int, buf: bytes) -> int:
        if writer.published:
            await self.workers.run(self._restage, writer)
        written = os.pwrite(writer.fd, buf, off)
        writer.dirty = True
        return written

    async def truncate(self, writer: CacheWriter, size: int) -> None:
        if writer.published:
            await self.workers.run(self._restage, writer)
        os.ftruncate(writer.fd, size)
        writer.dirty = True

    async def flush(self, writer: CacheWriter) -> None:
        if writer.dirty:
            writer.dirty = False
            await self.workers.run(self._commit, writer)

    def _commit(self, writer: CacheWriter) -> None:
        kind, key, name = writer.kind, writer.key, writer.name
        os.fsync(writer.fd)
        current = self.cache.lookup(kind, key, use=False)
        if name == METADATA:
            fields = self._parse_metadata(writer)
            if current is None:
                if (kind, key) not in self.pending:
                    raise FileNotFoundError(errno.ENOENT, "the entry is gone")
                self.pending[(kind, key)] = fields  # waits for the data file
            else:
                self.cache.put_metadata(kind, key, fields)
            return
        if current is not None:
            fields = {k: v for k, v in current.metadata.items()}
        else:
            fields = self.pending.get((kind, key)) or {}
        self.cache.put_file(kind, key, name, self.cache._tmp_fd, writer.stage, fields)
        self.pending.pop((kind, key), None)
        writer.published = True
        log.info("cache: committed %s/%s/%s", kind, key, name)

    def _parse_metadata(self, writer: CacheWriter) -> dict:
        reason = check("json", writer.fd)
        if reason is None:
            size = os.fstat(writer.fd).st_size
            value = json.loads(os.pread(writer.fd, size, 0))
            if isinstance(value, dict):
                return value
            reason = "metadata.json must be a JSON object"
        raise self.store.rejected(f".cache/{writer.kind}/{writer.key}/{METADATA}", reason, None)

    async def release(self, inodes: InodeTable, writer: CacheWriter) -> None:
        writer.node.handles -= 1
        inodes.maybe_free(writer.node)
        if self.writing.get(writer.node.key[1:]) is writer:
            del self.writing[writer.node.key[1:]]
        os.close(writer.fd)
        # After a commit the entry holds its own link to the staged file: only the name goes.
        await self.workers.run(self._drop_stage, writer.stage)

    def _drop_stage(self, stage: str) -> None:
        try:
            os.unlink(stage, dir_fd=self.cache._tmp_fd)
        except FileNotFoundError:
            pass

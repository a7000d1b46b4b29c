"""The media and TTS cache (spec section 4): entries on disk in the spec's layout, an index to find
and evict them, and rate limits, shared safely by every process that opens the same directory.

Layout of the cache directory (by default `.fusestore/cache` of the backing tree):

    media/<key>/<data file>, media/<key>/metadata.json
    tts/<key>/<data file>,   tts/<key>/metadata.json
    rate-limits.json         request times per provider (see `acquire`)
    index.sqlite             the index (WAL mode; a rollback journal when several hosts share the
                             tree), rebuilt from the entries when missing or damaged
    .tmp/, .trash/           entries being built and entries being removed

Guarantees:
- An entry appears whole or not at all: it is built and fsynced in `.tmp/`, then renamed into
  place (exchanged with the previous entry of the same key, which is then removed). A reader
  holding an entry's data file open keeps reading it after the entry is replaced or evicted.
- The index agrees with the entries after a crash at any point. Every structural change first
  records an intent (type, key, owner: host, pid) in a committed transaction; a process that
  finds an intent whose owner on its own host is dead re-reads that key's entry from disk.
  Lookups heal a row whose entry went missing. An index that cannot be opened is rebuilt by
  scanning the entries, which is also how an existing cache directory of the spec's layout is
  adopted.
- The total size (data and metadata of every entry, both types) stays under the limit after
  every insert by evicting the least recently used entries, found through the index (no scan).
- Expired entries are never served: a lookup that meets one removes it, `gc` removes them all.
- Usage (`usageCount`, `lastUsedAt`) lives in the index, which is authoritative for it; the
  `metadata.json` on disk keeps what was true when the entry was written.

All calls block; the filesystem calls them from worker threads. Each thread uses its own SQLite
connection, and every process may open the same directory at once, on this host or on another
one sharing the tree over a network filesystem:
- On a network filesystem (`paths.NETWORK_FILESYSTEMS`: several hosts may use the index) the
  index uses SQLite's rollback journal, whose locks are fcntl locks on the database file
  (cluster-wide on NFSv4 and CephFS, as SQLite's own notes on network filesystems require);
  WAL mode needs memory shared by every process using the index, which hosts do not share.
  Elsewhere it keeps WAL: every process using it runs on this machine, and a use of an entry
  (an index write) costs about a tenth of what the rollback journal's fsyncs cost. A change of
  mode takes effect when no process holds the index; until then a cache on a network
  filesystem refuses to open (CacheError) rather than use WAL there.
- Work in progress is named by its owner's host and pid. A process judges (and recovers) only
  what its own host's dead processes left; what a host that died left waits for that host's next
  daemon, or for `fusestore check --repair --host ID` (`recover(dead_hosts=...)`).
- Rate limits take an fcntl lock too; their windows compare times taken on different hosts, so
  those hosts' clocks must agree (NTP).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Mapping

import msgspec

from fusestore.engine import locks, procs
from fusestore.engine.config import Cache as CacheConfig
from fusestore.engine.errors import FusestoreError
from fusestore.engine.jskey import cache_key
from fusestore.engine.jsontext import pretty
from fusestore.engine.paths import (
    DIR_FLAGS,
    NETWORK_FILESYSTEMS,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    clone_or_copy,
    filesystem_type,
    renameat2,
)
from fusestore.engine.state import STATE_NAME, check_host_id, default_host_id
from fusestore.engine.validate import check

log = logging.getLogger(__name__)

TYPES = ("media", "tts")
METADATA = "metadata.json"
INDEX_JSON = "index.json"
RATE_LIMITS = "rate-limits.json"
_INDEX_DB = "index.sqlite"
_TMP, _TRASH = ".tmp", ".trash"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_RESERVED = {METADATA, INDEX_JSON}
_OWN_FIELDS = ("type", "key", "file", "cachedAt", "expiresAt", "usageCount", "lastUsedAt")
_COUNTERS = ("hits", "misses", "inserts", "evictions", "expired")
_LEAVING = {"evictions": "lru", "expired": "expired", None: "cleared"}  # the reason of a cache-evict event


def _no_events(kind: str, path: str, **fields) -> None:
    """The `emit` of a cache nobody follows."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries(
    type TEXT NOT NULL, key TEXT NOT NULL,
    file TEXT NOT NULL,          -- the data file's name in the entry directory
    size INTEGER NOT NULL,       -- bytes of the data file and metadata.json
    ino INTEGER NOT NULL,        -- the entry directory's inode: tells a replaced entry apart
    cached_at REAL NOT NULL, expires_at REAL NOT NULL,
    usage_count INTEGER NOT NULL, last_used_at REAL,
    lru REAL NOT NULL,           -- last use, or cachedAt: the eviction order
    meta TEXT NOT NULL,          -- metadata.json as written
    PRIMARY KEY(type, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_lru ON entries(lru);
CREATE INDEX IF NOT EXISTS entries_expiry ON entries(expires_at);
CREATE TABLE IF NOT EXISTS counters(type TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY(type, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS intents(id INTEGER PRIMARY KEY,
    op TEXT NOT NULL,            -- 'put': re-read the key from disk; 'remove': its directory goes
    type TEXT NOT NULL, key TEXT NOT NULL,
    ino INTEGER,                 -- for 'remove': the directory to remove, if still in place
    owner TEXT NOT NULL);        -- pid:starttime@host of the process doing it
"""


class CacheError(FusestoreError):
    """A cache request that cannot be carried out; the message says why."""


class InvalidMetadata(CacheError):
    """A metadata.json written by a program that is not a JSON object; `reason` says where."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Entry(msgspec.Struct, frozen=True):
    """A cached item: `path` is its data file."""

    type: str
    key: str
    path: str
    file: str
    size: int
    cached_at: float
    expires_at: float
    usage_count: int
    last_used_at: float | None
    metadata: dict

    def to_json(self) -> dict:
        return self.metadata | {"type": self.type, "key": self.key, "file": self.file, "size": self.size,
                                "path": self.path}


class Slot(msgspec.Struct, frozen=True):
    """The answer of `acquire`: whether the call may go ahead now, and when the next slot opens
    (seconds from now; 0 when allowed)."""

    allowed: bool
    wait: float
    used: int
    limit: int


class TypeStats(msgspec.Struct):
    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    expired: int = 0


class CacheStats(msgspec.Struct):
    dir: str
    max_bytes: int
    total_bytes: int
    types: dict[str, TypeStats]


def directory(backing: str, config: CacheConfig) -> str:
    """The cache directory of a backing tree: `cache.dir` of its config (relative to the tree,
    or absolute), else `.fusestore/cache` in the tree."""
    if config.dir is None:
        return os.path.join(backing, STATE_NAME, "cache")
    return os.path.join(backing, os.path.expanduser(config.dir))


def iso(t: float | None) -> str | None:
    """A time as JavaScript's `Date.toISOString()` prints it."""
    if t is None:
        return None
    ms = int(round(t * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def parse_time(value: Any) -> float | None:
    """Epoch seconds from an ISO 8601 string or epoch milliseconds (as JavaScript keeps them)."""
    import datetime

    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value / 1000.0
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.timezone.utc)
        return parsed.timestamp()
    return None


def _check_type(kind: str) -> str:
    if kind not in TYPES:
        raise CacheError(f"unknown cache type {kind!r} (use media or tts)")
    return kind


def _check_key(key: str) -> str:
    if not key or key.startswith(".") or "/" in key or "\0" in key or key in _RESERVED:
        raise CacheError(f"invalid cache key {key!r}")
    return key


def _check_file(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name or name == INDEX_JSON:
        raise CacheError(f"invalid data file name {name!r}")
    return name


def _own_name(host: str) -> str:
    """A fresh name in `.tmp/` or `.trash/`: `pid-random-host`, so that `recover` removes what a
    process of its host that died left there."""
    return f"{os.getpid()}-{uuid.uuid4().hex}-{host}"


def _name_owner(name: str) -> tuple[int | None, str | None]:
    """(pid, host) of a `.tmp/` or `.trash/` name; host None for a name made before names had
    hosts (one host then)."""
    parts = name.split("-", 2)
    pid = int(parts[0]) if parts[0].isdigit() else None
    return pid, parts[2] if len(parts) == 3 else None


def _process_token(pid: int) -> str | None:
    """pid and start time: names a process uniquely even after its pid is reused."""
    started = procs.start_time(pid)
    return None if started is None else f"{pid}:{started}"


class Cache:
    """One cache directory. `clock` returns the current time (tests pass a fake one)."""

    def __init__(self, directory: str, config: CacheConfig | None = None, clock: Callable[[], float] = time.time,
                 verify: bool = False, host: str | None = None, shared: bool | None = None):
        self.dir = os.path.abspath(directory)
        self.host = check_host_id(host or default_host_id())
        # Maybe used by several hosts: the rollback journal, not WAL.
        self.shared = filesystem_type(self.dir) in NETWORK_FILESYSTEMS if shared is None else shared
        self.journal_mode = ""  # what the index's connections got (`_connect`)
        self.config = config or CacheConfig()
        self.clock = clock
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        self.fd = os.open(self.dir, DIR_FLAGS)
        self._type_fds = {}
        for name in (*TYPES, _TMP, _TRASH):
            try:
                os.mkdir(name, 0o755 if name in TYPES else 0o700, dir_fd=self.fd)
            except FileExistsError:
                pass
        for kind in TYPES:
            self._type_fds[kind] = os.open(kind, DIR_FLAGS, dir_fd=self.fd)
        self._tmp_fd = os.open(_TMP, DIR_FLAGS, dir_fd=self.fd)
        self._trash_fd = os.open(_TRASH, DIR_FLAGS, dir_fd=self.fd)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._version_db: sqlite3.Connection | None = None  # index_version's, never writes
        # Index rows as last read or written here, with the index version then (`_row`).
        self._rows: dict[tuple[str, str], tuple[int, tuple | None]] = {}
        self.owner = f"{_process_token(os.getpid()) or os.getpid()}@{self.host}"
        # Told of each insert and of each entry that leaves (`fusestore.events`), from any
        # thread: emit(kind, path, **fields). The daemon's event ring, or a note to it.
        self.emit: Callable[..., None] = _no_events
        self._open_index(verify)
        if shared and self.journal_mode == "wal":
            self.close()
            raise CacheError(f"the cache index {self.dir}/{_INDEX_DB}, on a network filesystem, is in WAL mode and "
                             "held open by a process that uses it from its local filesystem (a daemon or program "
                             "on the file server itself?): serve and use the tree through the network mount on "
                             "every host, the server too")
        self.recover()

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        for fd in (*self._type_fds.values(), self._tmp_fd, self._trash_fd, self.fd):
            os.close(fd)
        self._type_fds.clear()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the index ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(os.path.join(self.dir, _INDEX_DB), timeout=60.0, isolation_level=None,
                             check_same_thread=False)
        # PERSIST, when shared: the journal file stays between transactions (zeroed, not
        # deleted), which saves a create and an unlink per transaction, round trips on a
        # network filesystem. A change of mode takes effect once no other process has it open.
        want = "persist" if self.shared else "wal"
        try:
            self.journal_mode = db.execute(f"PRAGMA journal_mode={want}").fetchone()[0].lower()
        except sqlite3.OperationalError as e:
            self.journal_mode = db.execute("PRAGMA journal_mode").fetchone()[0].lower()
            log.info("cache index: kept in %s mode while another process uses it (%s)", self.journal_mode, e)
        db.execute("PRAGMA synchronous=FULL")
        return db

    @property
    def db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _open_index(self, verify: bool) -> None:
        """Open the index, or rebuild it from the entries when it is missing or damaged. A full
        check of the index file (`verify`) is worth its time at mount and in `gc`, not on every
        command."""
        path = os.path.join(self.dir, _INDEX_DB)
        fresh = not os.path.exists(path)
        try:
            self._create_schema()
            ok = not verify or self.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        except sqlite3.DatabaseError as e:
            log.warning("cache index %s is damaged (%s): rebuilding it from the entries", path, e)
            ok = False
        if not ok:
            self._discard_index()
            self._create_schema()
            fresh = True
        if fresh:
            self.rebuild()

    def _create_schema(self) -> None:
        self.db.executescript(_SCHEMA)

    def _discard_index(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
            self._version_db = None
            self._rows.clear()
        self._local = threading.local()
        for suffix in ("", "-journal", "-wal", "-shm"):
            try:
                os.rename(os.path.join(self.dir, _INDEX_DB + suffix),
                          os.path.join(self.dir, _TRASH, f"damaged-{time.time_ns()}{_INDEX_DB}{suffix}"))
            except FileNotFoundError:
                pass

    class _Transaction:
        def __init__(self, cache: "Cache", db: sqlite3.Connection, durable: bool):
            self.cache, self.db, self.durable = cache, db, durable

        def __enter__(self) -> sqlite3.Connection:
            if not self.durable:
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            retired, self.cache._local.retired = getattr(self.cache._local, "retired", []), []
            try:
                self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                if not self.durable:
                    self.db.execute("PRAGMA synchronous=FULL")
            if not exc_type:
                for kind, key, counter in retired:
                    self.cache.emit("cache-evict", f".cache/{kind}/{key}", reason=_LEAVING[counter])

    def index_version(self) -> int:
        """A number that changes whenever a change to the index is committed, by this process
        or another: SQLite's data_version, asked on a connection of its own that never writes."""
        with self._connections_lock:
            if self._version_db is None:
                self._version_db = self._connect()
                self._connections.append(self._version_db)
            return self._version_db.execute("PRAGMA data_version").fetchone()[0]

    def _write(self, durable: bool = True) -> "Cache._Transaction":
        """A write transaction; other processes wait for its commit (busy timeout 60 s)."""
        return Cache._Transaction(self, self.db, durable)

    @staticmethod
    def _count(db: sqlite3.Connection, kind: str, name: str, n: int = 1) -> None:
        db.execute("INSERT INTO counters VALUES(?,?,?) ON CONFLICT(type,name) DO UPDATE SET value=value+?",
                   (kind, name, n, n))

    # -- reading -----------------------------------------------------------------------------

    def lookup(self, kind: str, key: str, use: bool = True) -> Entry | None:
        """The live entry of `key`, or None. An expired entry is removed; a hit with `use` counts
        as a use (LRU) and a hit; a miss counts as a miss."""
        _check_type(kind)
        _check_key(key)
        row = self._row(kind, key)
        if row is not None and not self._row_matches_disk(kind, key, row):
            row = self._reconcile(kind, key)
        elif row is None and self._exists_on_disk(kind, key):
            row = self._reconcile(kind, key)  # written by a process that died before indexing it
        now = self.clock()
        if row is not None and row[6] <= now:
            self._remove(kind, [key], "expired")
            row = None
        if row is None:
            if use:
                with self._write(durable=False) as db:
                    self._count(db, kind, "misses")
            return None
        if use:
            with self._write(durable=False) as db:
                fresh = db.execute("UPDATE entries SET usage_count=usage_count+1, last_used_at=?, lru=? "
                                   "WHERE type=? AND key=? RETURNING *", (now, now, kind, key)).fetchone()
                self._count(db, kind, "hits")
            if fresh is not None:
                row = fresh
                self._remember(kind, key, row)  # our own change: no need to read it back
        return self._entry(row)

    def _row(self, kind: str, key: str) -> tuple | None:
        """The index row of `key`: as read or written here before while the index has not
        changed since (by this process or another), else read now. The kernel's lookups of an
        entry and of its file, the open and the getattrs of one `cat` through the mount then
        read the index once; what `lookup` checks on disk it checks on every call."""
        version = self.index_version()  # before the read: a change meanwhile makes it stale
        found = self._rows.get((kind, key))
        if found is not None and found[0] == version:
            return found[1]
        row = self._select_row(kind, key)
        self._remember(kind, key, row, version)
        return row

    def _select_row(self, kind: str, key: str) -> tuple | None:
        return self.db.execute("SELECT * FROM entries WHERE type=? AND key=?", (kind, key)).fetchone()

    def _remember(self, kind: str, key: str, row: tuple | None, version: int | None = None) -> None:
        if len(self._rows) > 4096:
            self._rows.clear()
        self._rows[(kind, key)] = (self.index_version() if version is None else version, row)

    def get(self, url: str, params: Mapping[str, Any] | None = None, type: str = "media") -> Entry | None:
        """The entry cached for `url` and `params`, counted as a use; None on a miss."""
        return self.lookup(type, cache_key(url, params))

    def open_data(self, entry: Entry) -> int:
        """An O_RDONLY fd on the entry's data file, safe from symlinks; it stays readable after
        the entry is replaced or evicted."""
        fd = os.open(entry.key, DIR_FLAGS, dir_fd=self._type_fds[entry.type])
        try:
            return os.open(entry.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        """Live entries, by type and key, without counting uses."""
        now = self.clock()
        query = "SELECT * FROM entries WHERE expires_at > ?" + (" AND type=?" if kind else "") + " ORDER BY type, key"
        args = (now, _check_type(kind)) if kind else (now,)
        for row in self.db.execute(query, args).fetchall():
            yield self._entry(row)

    def metadata_json(self, entry: Entry) -> bytes:
        """The entry's metadata.json as the mount shows it: as written, with current usage."""
        return pretty(entry.metadata)

    def index_json(self, kind: str) -> bytes:
        """The generated `<type>/index.json`: every live entry of the type."""
        items = {e.key: {"url": e.metadata.get("url"), "file": e.file, "size": e.size,
                         "cachedAt": iso(e.cached_at), "expiresAt": iso(e.expires_at),
                         "usageCount": e.usage_count, "lastUsedAt": iso(e.last_used_at)}
                 for e in self.entries(kind)}
        return pretty({"type": kind, "entries": items}, indent=1)

    def stats(self) -> CacheStats:
        types = {kind: TypeStats() for kind in TYPES}
        rows = self.db.execute("SELECT type, COUNT(*), COALESCE(SUM(size),0) FROM entries GROUP BY type")
        for kind, count, total in rows:
            if kind in types:
                types[kind].entries, types[kind].bytes = count, total
        for kind, name, value in self.db.execute("SELECT type, name, value FROM counters"):
            if kind in types and name in _COUNTERS:
                setattr(types[kind], name, value)
        return CacheStats(self.dir, self.config.max_bytes, sum(t.bytes for t in types.values()), types)

    def total_bytes(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(size),0) FROM entries").fetchone()[0]

    def _entry(self, row: tuple) -> Entry:
        kind, key, file, size, _ino, cached_at, expires_at, usage, last_used, _lru, meta = row
        try:
            metadata = msgspec.json.decode(meta)
        except msgspec.DecodeError:
            metadata = {}
        metadata.update(type=kind, key=key, file=file, cachedAt=iso(cached_at), expiresAt=iso(expires_at),
                        usageCount=usage, lastUsedAt=iso(last_used))
        path = os.path.join(self.dir, kind, key, file)
        return Entry(kind, key, path, file, size, cached_at, expires_at, usage, last_used, metadata)

    # -- writing -----------------------------------------------------------------------------

    def put(self, url: str | None, source: str | bytes | int, type: str = "media", *,
            params: Mapping[str, Any] | None = None, tags: list[str] | tuple[str, ...] = (),
            file: str | None = None, extra: Mapping[str, Any] | None = None, key: str | None = None) -> Entry:
        """Insert (or replace) the entry for `url`+`params` with the data in `source` (a path,
        bytes, or an fd read from offset 0). Returns the new entry; evicts LRU entries to stay
        under the size limit."""
        kind = _check_type(type)
        if key is None:
            if url is None:
                raise CacheError("an entry needs a url or a key")
            key = cache_key(url, params)
        _check_key(key)
        if file is None:
            name = source if isinstance(source, str) else (url or "")
            ext = os.path.splitext(name.split("?")[0].rstrip("/"))[1]
            file = "data" + (ext if 0 < len(ext) <= 10 else "")
        _check_file(file)
        if file == METADATA:
            raise CacheError("the data file cannot be named metadata.json")
        metadata: dict[str, Any] = dict(extra or {})
        metadata.update(url=url, tags=list(tags))
        if params:
            metadata["params"] = dict(params)
        def fill(build_fd: int) -> None:
            out = os.open(file, _NEW_FILE, 0o644, dir_fd=build_fd)
            try:
                if isinstance(source, bytes):
                    view = memoryview(source)
                    while view:
                        view = view[os.write(out, view):]
                elif isinstance(source, int):
                    clone_or_copy(source, out)
                else:
                    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        clone_or_copy(src, out)
                    finally:
                        os.close(src)
                os.fsync(out)
            finally:
                os.close(out)

        return self._build(kind, key, file, fill, metadata)

    def put_file(self, kind: str, key: str, file: str, src_dir_fd: int, src_name: str,
                 metadata: Mapping[str, Any]) -> Entry:
        """Insert (or replace) entry `key` with the data file `src_name` of `src_dir_fd`, which
        is hard-linked (not copied) and must be on the cache's filesystem and already fsynced."""
        _check_type(kind)
        _check_key(key)
        _check_file(file)

        def fill(build_fd: int) -> None:
            os.link(src_name, file, src_dir_fd=src_dir_fd, dst_dir_fd=build_fd, follow_symlinks=False)

        return self._build(kind, key, file, fill, dict(metadata))

    # -- drafts: the files programs write for an entry (the mount's `.cache` view) -----------

    def draft(self, content: bytes | int | None = None) -> Draft:
        """A new file in `.tmp/` for an entry's data or metadata: empty, holding `content`
        (bytes), or a copy of the open file `content` (reflinked where the filesystem can)."""
        name = _own_name(self.host)
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=self._tmp_fd)
        draft = Draft(name, fd)
        try:
            if isinstance(content, bytes):
                os.write(fd, content)
            elif isinstance(content, int):
                clone_or_copy(content, fd)
        except BaseException:
            self.discard(draft)
            raise
        return draft

    def publish(self, draft: Draft, kind: str, key: str, file: str, metadata: Mapping[str, Any]) -> Entry:
        """Make the draft, fsynced here, the data file `file` of entry `key` (inserted or
        replaced, evicting as needed). The draft stays open; its file is the entry's now."""
        os.fsync(draft.fd)
        return self.put_file(kind, key, file, self._tmp_fd, draft.name, metadata)

    def discard(self, draft: Draft) -> None:
        """Close the draft and remove its name; an entry it became keeps its own link."""
        os.close(draft.fd)
        try:
            os.unlink(draft.name, dir_fd=self._tmp_fd)
        except FileNotFoundError:
            pass

    @staticmethod
    def read_metadata(fd: int) -> dict:
        """The fields of the metadata.json in `fd`: one JSON object (validated as the tree's
        JSON is, then decoded once). Raises InvalidMetadata."""
        reason = check("json", fd)
        if reason is None:
            value = msgspec.json.decode(os.pread(fd, os.fstat(fd).st_size, 0))
            if isinstance(value, dict):
                return value
            reason = "metadata.json must be a JSON object"
        raise InvalidMetadata(reason)

    def _build(self, kind: str, key: str, file: str, fill: Callable[[int], None], metadata: dict,
               keep_times: Entry | None = None) -> Entry:
        build = self._new_build()
        try:
            fill(build.fd)
            return self._publish(kind, key, build, file, metadata, keep_times)
        finally:
            build.discard()

    def put_metadata(self, kind: str, key: str, fields: Mapping[str, Any]) -> Entry:
        """Replace the user fields of an existing entry's metadata (url, tags, anything else);
        the fields fusestore keeps (times, usage, file) are its own. The data file is linked,
        not copied."""
        _check_type(kind)
        _check_key(key)
        current = self.lookup(kind, key, use=False)
        if current is None:
            raise CacheError(f"no {kind} entry {key}")
        def fill(build_fd: int) -> None:
            src_dir = os.open(key, DIR_FLAGS, dir_fd=self._type_fds[kind])
            try:
                os.link(current.file, current.file, src_dir_fd=src_dir, dst_dir_fd=build_fd, follow_symlinks=False)
            finally:
                os.close(src_dir)

        metadata = {k: v for k, v in fields.items() if k not in _OWN_FIELDS}
        return self._build(kind, key, current.file, fill, metadata, keep_times=current)

    def _new_build(self) -> "_Build":
        name = _own_name(self.host)
        os.mkdir(name, 0o755, dir_fd=self._tmp_fd)
        return _Build(self, name, os.open(name, DIR_FLAGS, dir_fd=self._tmp_fd))

    def _publish(self, kind: str, key: str, build: "_Build", file: str, metadata: dict,
                 keep_times: Entry | None = None) -> Entry:
        now = self.clock()
        cached_at = keep_times.cached_at if keep_times else now
        expires_at = keep_times.expires_at if keep_times else now + self.config.expiry_seconds(kind)
        metadata = dict(metadata)
        metadata.setdefault("url", None)
        metadata.setdefault("tags", [])
        metadata.update(cachedAt=iso(cached_at), expiresAt=iso(expires_at), usageCount=0, lastUsedAt=None)
        if keep_times:
            metadata.update(usageCount=keep_times.usage_count, lastUsedAt=iso(keep_times.last_used_at))
        text = pretty(metadata)
        fd = os.open(METADATA, _NEW_FILE, 0o644, dir_fd=build.fd)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(build.fd)
        size = os.stat(file, dir_fd=build.fd, follow_symlinks=False).st_size + len(text)
        ino = os.fstat(build.fd).st_ino
        if size > self.config.max_bytes:
            raise CacheError(f"an entry of {size} bytes cannot fit the cache's limit of {self.config.max_bytes} bytes")
        intent = self._intend(kind, key)
        type_fd = self._type_fds[kind]
        stored = {k: v for k, v in metadata.items() if k not in ("usageCount", "lastUsedAt")}
        usage = keep_times.usage_count if keep_times else 0
        last_used = keep_times.last_used_at if keep_times else None
        with self._write() as db:
            try:
                renameat2(self._tmp_fd, build.name, type_fd, key, RENAME_NOREPLACE)
            except FileExistsError:
                # The previous entry is swapped out whole and removed after the commit.
                self._exchange(build.name, type_fd, key)
            else:
                build.published = True
            row = (kind, key, file, size, ino, cached_at, expires_at, usage, last_used, last_used or cached_at,
                   msgspec.json.encode(stored).decode())
            db.execute("INSERT OR REPLACE INTO entries VALUES(?,?,?,?,?,?,?,?,?,?,?)", row)
            db.execute("DELETE FROM intents WHERE id=?", (intent,))
            # A retired directory of this key is gone now (trashed already, or exchanged into our
            # build): its removal must not take the new one, even if it got the same inode number.
            db.execute("DELETE FROM intents WHERE op='remove' AND type=? AND key=?", (kind, key))
            if not keep_times:
                self._count(db, kind, "inserts")
            evicted = self._choose_victims(db)
        os.fsync(type_fd)
        build.discard()
        self.emit("cache-insert", f".cache/{kind}/{key}", size=size)
        if evicted:
            self._finish_removals()
        return self._entry(row)  # what this call wrote, even if another process replaced it since

    def _exchange(self, build_name: str, type_fd: int, key: str) -> None:
        """Swap the built entry `build_name` in `.tmp/` with the entry `key`. Where the
        filesystem cannot exchange (NFS, CephFS: EINVAL), the old entry is moved aside first:
        meanwhile a reader finds no entry (a miss), and a crash then leaves none, which the
        recovery of the intent puts right in the index."""
        try:
            renameat2(self._tmp_fd, build_name, type_fd, key, RENAME_EXCHANGE)
            return
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        aside = _own_name(self.host)
        renameat2(type_fd, key, self._tmp_fd, aside, RENAME_NOREPLACE)
        renameat2(self._tmp_fd, build_name, type_fd, key, RENAME_NOREPLACE)
        os.rename(aside, build_name, src_dir_fd=self._tmp_fd, dst_dir_fd=self._tmp_fd)  # discarded as the build

    def _intend(self, kind: str, key: str) -> int:
        with self._write() as db:
            return db.execute("INSERT INTO intents(op, type, key, owner) VALUES('put',?,?,?)",
                              (kind, key, self.owner)).lastrowid

    def _retire(self, db: sqlite3.Connection, kind: str, key: str, ino: int | None, counter: str | None) -> None:
        """Inside a write transaction: the entry leaves the index now; its directory (if it is
        still the one with inode `ino`) leaves the disk in `_finish_removals`, or in the
        recovery of whoever finds the intent after a crash."""
        db.execute("DELETE FROM entries WHERE type=? AND key=?", (kind, key))
        db.execute("INSERT INTO intents(op, type, key, ino, owner) VALUES('remove',?,?,?,?)",
                   (kind, key, ino, self.owner))
        if counter:
            self._count(db, kind, counter)
        self._local.__dict__.setdefault("retired", []).append((kind, key, counter))

    def _choose_victims(self, db: sqlite3.Connection) -> int:
        """Inside a write transaction: retire the least recently used entries until the total
        is under the limit. Returns how many."""
        over = db.execute("SELECT COALESCE(SUM(size),0) FROM entries").fetchone()[0] - self.config.max_bytes
        victims = []
        if over > 0:
            for kind, key, size, ino in db.execute("SELECT type, key, size, ino FROM entries ORDER BY lru LIMIT 10000"):
                if over <= 0:
                    break
                victims.append((kind, key, ino))
                over -= size
        for kind, key, ino in victims:
            self._retire(db, kind, key, ino, "evictions")
            log.info("cache: evicting %s/%s", kind, key)
        return len(victims)

    def _finish_removals(self) -> None:
        """Move the directories of this process's retired entries to the trash and empty it.
        Under the write lock, so no other process can put a new entry under the same key
        between the inode check and the rename."""
        with self._write() as db:
            for ident, kind, key, ino in db.execute(
                    "SELECT id, type, key, ino FROM intents WHERE op='remove' AND owner=?", (self.owner,)).fetchall():
                self._trash_if(kind, key, ino)
                db.execute("DELETE FROM intents WHERE id=?", (ident,))
        self._empty_trash()

    def _trash_if(self, kind: str, key: str, ino: int | None) -> None:
        type_fd = self._type_fds[kind]
        try:
            if ino is not None and os.stat(key, dir_fd=type_fd, follow_symlinks=False).st_ino != ino:
                return  # a newer entry took the key: it stays
            renameat2(type_fd, key, self._trash_fd, _own_name(self.host))
        except FileNotFoundError:
            pass

    def _remove(self, kind: str, keys: list[str], counter: str | None) -> int:
        """Remove entries: rows first (with intents), then the directories."""
        with self._write() as db:
            for key in keys:
                row = db.execute("SELECT ino FROM entries WHERE type=? AND key=?", (kind, key)).fetchone()
                if row is not None:
                    ino = row[0]
                else:  # on disk only (clear): take the directory that is there now
                    try:
                        ino = os.stat(key, dir_fd=self._type_fds[kind], follow_symlinks=False).st_ino
                    except FileNotFoundError:
                        continue
                self._retire(db, kind, key, ino, counter)
        self._finish_removals()
        return len(keys)

    def _empty_trash(self) -> None:
        mine = (os.getpid(), self.host)
        for name in os.listdir(self._trash_fd):
            if _name_owner(name) == mine:
                _remove_tree(self._trash_fd, name)

    def clear(self, kind: str | None = None) -> int:
        """Remove every entry (of one type). Returns how many."""
        kinds = [_check_type(kind)] if kind else list(TYPES)
        count = 0
        for k in kinds:
            keys = set(os.listdir(self._type_fds[k]))
            keys.update(r[0] for r in self.db.execute("SELECT key FROM entries WHERE type=?", (k,)))
            count += self._remove(k, sorted(keys), None)
        return count

    def gc(self) -> int:
        """Remove every expired entry, finish what dead processes left; returns how many expired."""
        self.recover()
        now = self.clock()
        count = 0
        for kind in TYPES:
            rows = self.db.execute("SELECT key FROM entries WHERE type=? AND expires_at <= ?", (kind, now))
            keys = [r[0] for r in rows]
            if keys:
                count += self._remove(kind, keys, "expired")
        return count

    # -- consistency ---------------------------------------------------------------------------

    def _exists_on_disk(self, kind: str, key: str) -> bool:
        try:
            os.stat(f"{key}/{METADATA}", dir_fd=self._type_fds[kind], follow_symlinks=False)
            return True
        except OSError:
            return False

    def _row_matches_disk(self, kind: str, key: str, row: tuple) -> bool:
        try:
            return os.stat(key, dir_fd=self._type_fds[kind], follow_symlinks=False).st_ino == row[4]
        except FileNotFoundError:
            return False

    def _read_entry(self, kind: str, key: str) -> tuple | None:
        """An index row made from the entry on disk, or None when there is no usable entry."""
        type_fd = self._type_fds[kind]
        try:
            fd = os.open(key, DIR_FLAGS, dir_fd=type_fd)
        except OSError:
            return None
        try:
            ino = os.fstat(fd).st_ino
            try:
                mfd = os.open(METADATA, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                return None
            try:
                meta_bytes = os.read(mfd, 1 << 20)
            finally:
                os.close(mfd)
            try:
                meta = msgspec.json.decode(meta_bytes)
            except msgspec.DecodeError:
                log.warning("cache: %s/%s has a damaged metadata.json; it is not served", kind, key)
                return None
            if not isinstance(meta, dict):
                return None
            data = sorted(n for n in os.listdir(fd) if n != METADATA)
            if not data:
                return None
            file = meta.get("file") if meta.get("file") in data else data[0]
            st = os.stat(file, dir_fd=fd, follow_symlinks=False)
            size = st.st_size + len(meta_bytes)
            cached_at = parse_time(meta.get("cachedAt") or meta.get("downloaded_at")) or st.st_mtime
            expires_at = (parse_time(meta.get("expiresAt") or meta.get("expires_at"))
                          or cached_at + self.config.expiry_seconds(kind))
            usage = meta.get("usageCount") if isinstance(meta.get("usageCount"), int) else 0
            last_used = parse_time(meta.get("lastUsedAt"))
            stored = {k: v for k, v in meta.items() if k not in ("usageCount", "lastUsedAt")}
            return (kind, key, file, size, ino, cached_at, expires_at, usage, last_used,
                    last_used or cached_at, msgspec.json.encode(stored).decode())
        finally:
            os.close(fd)

    def _reconcile(self, kind: str, key: str) -> tuple | None:
        """Make the index row of `key` agree with the disk; returns the row (None: no entry)."""
        with self._write() as db:
            row = self._read_entry(kind, key)  # under the lock: no writer changes the key meanwhile
            if row is not None and db.execute("SELECT 1 FROM intents WHERE op='remove' AND type=? AND key=? AND ino=?",
                                              (kind, key, row[4])).fetchone():
                row = None  # retired (evicted, expired, cleared), its directory not yet removed
            old = db.execute("SELECT usage_count, last_used_at FROM entries WHERE type=? AND key=?",
                             (kind, key)).fetchone()
            if row is None:
                db.execute("DELETE FROM entries WHERE type=? AND key=?", (kind, key))
            else:
                if old is not None:  # keep the usage the index knew
                    row = row[:7] + (max(old[0], row[7]), old[1] or row[8], old[1] or row[8] or row[5]) + row[10:]
                db.execute("INSERT OR REPLACE INTO entries VALUES(?,?,?,?,?,?,?,?,?,?,?)", row)
        return row

    def _dead(self, pid: int | None, host: str | None, dead_hosts: frozenset[str]) -> bool:
        """Whether the process `pid` of `host` (None: a record of the one-host days) is gone, as
        far as this host can tell: its own processes, and every process of `dead_hosts`."""
        if host in dead_hosts:
            return True
        if host not in (self.host, None):
            return False  # another host's: alive for all we know
        return pid is None or (pid != os.getpid() and _process_token(pid) is None)

    def recover(self, dead_hosts: frozenset[str] = frozenset()) -> int:
        """Finish the work of processes that died mid-change: each key they were changing is
        re-read from disk. Also removes their half-built entries. Returns how many keys. Only
        this host's processes are judged, and those of `dead_hosts` (hosts known gone)."""
        dead = []
        intents = self.db.execute("SELECT id, op, type, key, ino, owner FROM intents").fetchall()
        for ident, op, kind, key, ino, owner in intents:
            token, at, host = owner.partition("@")
            pid = token.partition(":")[0]
            pid = int(pid) if pid.isdigit() else None
            host = host if at else None
            if host in dead_hosts or (host in (self.host, None) and (pid is None or _process_token(pid) != token)):
                dead.append((ident, op, kind, key, ino))
        for ident, op, kind, key, ino in dead:
            if op == "remove":
                with self._write() as db:
                    self._trash_if(kind, key, ino)
                    db.execute("DELETE FROM intents WHERE id=?", (ident,))
            else:
                self._reconcile(kind, key)
                with self._write() as db:
                    db.execute("DELETE FROM intents WHERE id=?", (ident,))
        if dead:
            log.warning("cache: finished %d change(s) of processes that died", len(dead))
            # An entry a dead process published but had not indexed may take the total over.
            with self._write() as db:
                evicted = self._choose_victims(db)
            if evicted:
                self._finish_removals()
        for folder_fd in (self._tmp_fd, self._trash_fd):
            for name in os.listdir(folder_fd):
                if self._dead(*_name_owner(name), dead_hosts):
                    _remove_tree(folder_fd, name)
        return len(dead)

    def rebuild(self) -> int:
        """Make the index from the entries on disk (adopting a cache of the spec's layout)."""
        rows = []
        for kind in TYPES:
            for key in os.listdir(self._type_fds[kind]):
                if key.startswith(".") or key in _RESERVED:
                    continue
                row = self._read_entry(kind, key)
                if row is not None:
                    rows.append(row)
        with self._write() as db:
            db.execute("DELETE FROM entries")
            db.execute("DELETE FROM intents")
            db.executemany("INSERT OR REPLACE INTO entries VALUES(?,?,?,?,?,?,?,?,?,?,?)", rows)
        log.info("cache: index of %s rebuilt from %d entries", self.dir, len(rows))
        return len(rows)

    # -- rate limits -----------------------------------------------------------------------------

    def acquire(self, provider: str, limit: int, per_seconds: float) -> Slot:
        """Sliding-window rate limit shared by every process: may a call to `provider` go ahead
        now, given at most `limit` calls per `per_seconds`? An allowed call is recorded."""
        if limit < 1 or per_seconds <= 0:
            raise CacheError("a rate limit needs limit >= 1 and per_seconds > 0")
        lock = os.open("rate-limits.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644, dir_fd=self.fd)
        try:
            locks.lock_exclusive(lock)  # an fcntl lock: it holds across hosts on NFSv4 and CephFS
            state = self._read_rate_limits()
            now = self.clock()
            providers = state.setdefault("providers", {})
            record = providers.setdefault(provider, {})
            times = (parse_time(x) for x in record.get("requests", []))
            recent = sorted(t for t in times if t is not None and t > now - per_seconds)
            allowed = len(recent) < limit
            wait = 0.0 if allowed else max(0.0, recent[len(recent) - limit] + per_seconds - now)
            if allowed:
                recent.append(now)
            record.update(limit=limit, perSeconds=per_seconds, requests=[iso(t) for t in recent])
            if allowed:
                self._write_rate_limits(state)
            return Slot(allowed, wait, len(recent), limit)
        finally:
            os.close(lock)

    def _read_rate_limits(self) -> dict:
        try:
            fd = os.open(RATE_LIMITS, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return {}
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                state = msgspec.json.decode(f.read())
        except msgspec.DecodeError:
            log.warning("cache: %s is damaged; rate limits start afresh", RATE_LIMITS)
            return {}
        finally:
            os.close(fd)
        return state if isinstance(state, dict) else {}

    def _write_rate_limits(self, state: dict) -> None:
        tmp = f"{_TMP}/{_own_name(self.host)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=self.fd)
        try:
            os.write(fd, pretty(state))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, RATE_LIMITS, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        os.fsync(self.fd)

    def rate_limits_json(self) -> bytes:
        return pretty(self._read_rate_limits())


class Draft:
    """A file being written for an entry, in the cache's `.tmp/` (`Cache.draft`)."""

    __slots__ = ("name", "fd")

    def __init__(self, name: str, fd: int):
        self.name, self.fd = name, fd


class _Build:
    """An entry being built in `.tmp/`; removed unless it was published."""

    def __init__(self, cache: Cache, name: str, fd: int):
        self.cache, self.name, self.fd = cache, name, fd
        self.published = False

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if not self.published:
            _remove_tree(self.cache._tmp_fd, self.name)
            self.published = True  # nothing left to discard


def _remove_tree(dir_fd: int, name: str) -> None:
    """rm -r of `name` below `dir_fd`, never following symlinks."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            os.unlink(name, dir_fd=dir_fd)
            return
        raise
    try:
        for child in os.listdir(fd):
            try:
                os.unlink(child, dir_fd=fd)
            except IsADirectoryError:
                _remove_tree(fd, child)
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass

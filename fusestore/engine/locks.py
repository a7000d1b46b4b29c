"""Locks that hold across every host serving one backing tree (`state/locks`).

Several daemons, one per host, may serve a tree kept on a shared filesystem (NFSv4, CephFS): they
coordinate through that filesystem's own locks, never through memory. These are open file
description locks (fcntl F_OFD_SETLK): byte-range locks that NFSv4 and CephFS make cluster-wide
and that a local filesystem keeps between processes, so two daemons on one machine see exactly
what two hosts see. Owned by the open file description, not the process, so each thread here
opens the lock file itself and threads exclude each other as processes do; a process that dies
loses its locks at once (on NFS, when its host's lease expires).

One lock file holds every lock: a path's commit lock is one byte at an offset derived from the
path (62 bits of its BLAKE2b digest), so no lock file is ever made or removed per path, and the
offsets below `_FIRST_PATH` name tree-wide locks (trimming the backups). Lock order: several
path locks in increasing offset; a tree-wide lock is only ever tried (never waited for) while a
path lock is held. Never nest a path's lock in itself: the inner release would free the outer.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import threading
from contextlib import contextmanager
from typing import Iterator

LOCK_FILE = "locks"
BACKUPS_TRIM = 1  # tree-wide: one trim of the backups at a time
_FIRST_PATH = 1 << 16
_PATH_BITS = (1 << 62) - 1

# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
_FLOCK = "hhqqi4x"


class LockBusy(Exception):
    """A lock asked for without waiting is held by another host, process or thread."""


class LocksUnsupported(OSError):
    """The filesystem of the state directory refuses byte-range locks."""


def path_offset(relpath: str, purpose: bytes = b"") -> int:
    digest = hashlib.blake2b(purpose + relpath.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return _FIRST_PATH + (int.from_bytes(digest, "big") & _PATH_BITS) % (_PATH_BITS - _FIRST_PATH)


def _set(fd: int, kind: int, offset: int, wait: bool) -> bool:
    request = struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
    except OSError as e:
        if not wait and e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def holder(fd: int, offset: int) -> bool:
    """Whether another open file description holds a lock on byte `offset` of `fd`'s file."""
    request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    reply = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
    return struct.unpack(_FLOCK, reply)[0] != fcntl.F_UNLCK


def lock_exclusive(fd: int, offset: int = 0, wait: bool = True) -> bool:
    """Take an exclusive lock on byte `offset` of `fd`'s file; without `wait`, False when held."""
    return _set(fd, fcntl.F_WRLCK, offset, wait)


def unlock(fd: int, offset: int = 0) -> None:
    _set(fd, fcntl.F_UNLCK, offset, True)


class TreeLocks:
    """The commit locks of one tree: `path(relpath)` is held while a file's content, name or
    backups change (`Store.commit`, `Store.remove`, renames). Each holder takes a descriptor of
    the lock file of its own from a free list (as many as holders at once), since a lock is
    its descriptor's: two threads sharing one would not exclude each other."""

    def __init__(self, state_fd: int):
        self._state_fd = state_fd
        self._free: list[int] = []
        self._all: list[int] = []
        self._fds_lock = threading.Lock()
        self._disabled = False

    def _take(self) -> int:
        with self._fds_lock:
            if self._free:
                return self._free.pop()
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=self._state_fd)
        with self._fds_lock:
            self._all.append(fd)
        return fd

    def _give(self, fd: int) -> None:
        with self._fds_lock:
            self._free.append(fd)

    def close(self) -> None:
        with self._fds_lock:
            for fd in self._all:
                os.close(fd)
            self._all.clear()
            self._free.clear()

    def disable(self) -> None:
        """For a filesystem without byte-range locks, served by one host: commits of one file
        are then serialized by that host's daemon alone."""
        self._disabled = True

    def probe(self) -> None:
        """Raise LocksUnsupported when the filesystem refuses byte-range locks."""
        fd = self._take()
        try:
            lock_exclusive(fd, 0, wait=False)
            unlock(fd, 0)
        except OSError as e:
            raise LocksUnsupported(e.errno, e.strerror) from None
        finally:
            self._give(fd)

    @contextmanager
    def path(self, *relpaths: str, wait: bool = True) -> Iterator[None]:
        """Hold the commit locks of `relpaths` (in offset order, so two holders of the same
        pair never wait for each other). Without `wait`, LockBusy when one is held."""
        yield from self._hold(sorted({path_offset(p) for p in relpaths}), wait)

    def claim(self, relpath: str) -> int | None:
        """Claim `relpath` for this host while it holds the file open in place (a database):
        the file's own locks (SQLite's fcntl locks) stay on this host's kernel and cannot keep
        another host's programs out, so only one host at a time may have it open. Returns the
        descriptor that holds the claim (close it to give the claim up; None where there are no
        locks); LockBusy when another host holds it."""
        if self._disabled:
            return None
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=self._state_fd)
        try:
            if not lock_exclusive(fd, path_offset(relpath, b"in place\0"), wait=False):
                raise LockBusy(relpath)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def tree(self, offset: int, wait: bool = True) -> Iterator[None]:
        yield from self._hold([offset], wait)

    def _hold(self, offsets: list[int], wait: bool) -> Iterator[None]:
        if self._disabled:
            yield
            return
        fd = self._take()
        taken = []
        try:
            for offset in offsets:
                if not lock_exclusive(fd, offset, wait):
                    raise LockBusy(offset)
                taken.append(offset)
            yield
        finally:
            for offset in reversed(taken):
                unlock(fd, offset)
            self._give(fd)

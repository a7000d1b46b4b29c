"""The state directory `BACKING/.fusestore/`: fusestore's own files beside the tree they protect.

It lives on the same filesystem as the tree, so moving a staged file into place, keeping a backup
by hard link and quarantining rejected bytes are all renames or links, never copies.

Layout: `staging/` (writes in progress), `backups/` (generations, see engine.backups),
`quarantine/` (rejected or orphaned bytes), `lock` (held by the serving daemon),
`control.sock` (the daemon's status and unmount socket), `fusestore.log`.
"""

from __future__ import annotations

import errno
import fcntl
import os

from fusestore.engine.errors import FusestoreError
from fusestore.engine.paths import DIR_FLAGS

STATE_NAME = ".fusestore"
# The virtual directories a mount shows at its root, over whatever the backing tree has there.
BACKUPS_NAME = ".backups"
CACHE_NAME = ".cache"


class Busy(FusestoreError):
    """Another fusestore already serves this backing tree."""


class StateDir:
    def __init__(self, root_fd: int, backing: str):
        self.backing = backing
        try:
            os.mkdir(STATE_NAME, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
        self.fd = os.open(STATE_NAME, DIR_FLAGS, dir_fd=root_fd)
        self.path = os.path.join(backing, STATE_NAME)
        self.staging_fd = self._subdir("staging")
        self.backups_fd = self._subdir("backups")
        self.quarantine_fd = self._subdir("quarantine")
        self._lock_fd: int | None = None

    def _subdir(self, name: str) -> int:
        try:
            os.mkdir(name, 0o700, dir_fd=self.fd)
        except FileExistsError:
            pass
        return os.open(name, DIR_FLAGS, dir_fd=self.fd)

    @property
    def log_path(self) -> str:
        return os.path.join(self.path, "fusestore.log")

    @property
    def socket_path(self) -> str:
        # Bound through /proc so that a long BACKING path cannot exceed the 108-byte sun_path.
        return f"/proc/self/fd/{self.fd}/control.sock"

    def lock(self) -> None:
        """Take the exclusive lock for serving this tree; raise Busy naming the holder's pid."""
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=self.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"{self.backing} is already served by another fusestore (pid {holder or '?'})") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        for fd in (self._lock_fd, self.staging_fd, self.backups_fd, self.quarantine_fd, self.fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = None

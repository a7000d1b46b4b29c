"""The state directory `BACKING/.fusestore/`: fusestore's own files beside the tree they protect.

It lives on the same filesystem as the tree, so moving a staged file into place, keeping a backup
by hard link and quarantining rejected bytes are all renames or links, never copies.

Layout: shared by every host that serves the tree: `backups/` (generations, see engine.backups),
`cache/` (engine.cache), `locks` (engine.locks). Per host, in `hosts/<host id>/`: `staging/`
(writes in progress), `quarantine/` (rejected or orphaned bytes), `lock` (held by the host's
serving daemon), `control.sock` (its status and unmount socket), `fusestore.log`. A host's
staged files are its own: only a daemon started for that host, or a repair naming it, ever
recovers them, so one host's crash recovery never takes another live host's open files.

The host id is the machine's hostname unless `-o host_id=NAME` (or FUSESTORE_HOST_ID) says
otherwise. Trees made before hosts had directories of their own kept `staging/`, `quarantine/`
and `lock` at the top; the first daemon of a host to take its lock moves what they hold into its
own directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket

import msgspec

from fusestore.engine import locks
from fusestore.engine.errors import FusestoreError
from fusestore.engine.paths import DIR_FLAGS, RENAME_NOREPLACE, renameat2

STATE_NAME = ".fusestore"
# The virtual directories a mount shows at its root, over whatever the backing tree has there.
BACKUPS_NAME = ".backups"
CACHE_NAME = ".cache"
HOSTS_NAME = "hosts"
RETIRED = "retired"  # in a host's directory: recovered by `check --repair --host`, gone for good
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def default_host_id() -> str:
    """FUSESTORE_HOST_ID, else the hostname made a valid host id (a machine whose name was never
    set is "(none)": "none")."""
    named = os.environ.get("FUSESTORE_HOST_ID")
    if named:
        return named
    return re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-._")[:64] or "localhost"


def check_host_id(name: str) -> str:
    if not _HOST_ID.fullmatch(name):
        raise FusestoreError(f"host id {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
    return name


class Busy(FusestoreError):
    """Another fusestore already serves this backing tree."""


class StateDir:
    def __init__(self, root_fd: int, backing: str, host: str | None = None):
        self.backing = backing
        self.host = check_host_id(host or default_host_id())
        try:
            os.mkdir(STATE_NAME, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
        self.fd = os.open(STATE_NAME, DIR_FLAGS, dir_fd=root_fd)
        self.path = os.path.join(backing, STATE_NAME)
        self.hosts_fd = self._subdir(self.fd, HOSTS_NAME)
        self.host_fd = self._subdir(self.hosts_fd, self.host)
        self.host_path = os.path.join(self.path, HOSTS_NAME, self.host)
        self.staging_fd = self._subdir(self.host_fd, "staging")
        self.quarantine_fd = self._subdir(self.host_fd, "quarantine")
        self.backups_fd = self._subdir(self.fd, "backups")
        self.locks = locks.TreeLocks(self.fd)
        self._lock_fd: int | None = None

    @staticmethod
    def _subdir(dir_fd: int, name: str) -> int:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)

    @property
    def log_path(self) -> str:
        return os.path.join(self.host_path, "fusestore.log")

    @property
    def socket_path(self) -> str:
        # Bound through /proc so that a long BACKING path cannot exceed the 108-byte sun_path.
        return f"/proc/self/fd/{self.host_fd}/control.sock"

    def lock(self) -> None:
        """Take the exclusive lock for serving this tree on this host; raise Busy naming the
        holder. An open file description lock: on a shared filesystem, other hosts see it held
        (`hosts`)."""
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=self.host_fd)
        try:
            taken = locks.lock_exclusive(fd, 0, wait=False)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            # A filesystem without byte-range locks: one host only may serve the tree (the
            # daemon checks), and flock keeps a second daemon of this host out.
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
            except BlockingIOError:
                taken = False
        if not taken:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            raise Busy(f"{self.backing} is already served by another fusestore on host {self.host} "
                       f"(pid {holder[0] if holder else '?'})")
        try:
            self._adopt_top_level_state()
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd
        try:
            os.unlink(RETIRED, dir_fd=self.host_fd)
        except FileNotFoundError:
            pass

    def retire(self) -> None:
        """Mark the host gone for good (`check --repair --host`): it no longer counts as one of
        the tree's hosts; its quarantine and log stay. A daemon started for it clears the mark."""
        fd = os.open(RETIRED, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=self.host_fd)
        os.close(fd)

    def announce(self, device: int) -> None:
        """Write into the held lock what finds this daemon: pid, machine, the mount's device."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()} {socket.gethostname()} {device}\n".encode(), 0)

    def _adopt_top_level_state(self) -> None:
        """Move what a tree of the one-host layout holds in `staging/` and `quarantine/` into
        this host's directories (once; a daemon of that layout must not be serving)."""
        try:
            old = os.open("lock", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.fd)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(f"{self.backing} is served by a fusestore of an earlier version "
                           f"(pid {os.pread(old, 32, 0).decode(errors='replace').strip() or '?'})") from None
            for name, into in (("staging", self.staging_fd), ("quarantine", self.quarantine_fd)):
                try:
                    dfd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
                except FileNotFoundError:
                    continue
                try:
                    for entry in os.listdir(dfd):
                        try:
                            renameat2(dfd, entry, into, entry, RENAME_NOREPLACE)
                        except FileExistsError:
                            pass
                finally:
                    os.close(dfd)
                try:
                    os.rmdir(name, dir_fd=self.fd)
                except OSError:
                    pass
            for name in ("control.sock", "lock"):
                try:
                    os.unlink(name, dir_fd=self.fd)
                except FileNotFoundError:
                    pass
        finally:
            os.close(old)

    def close(self) -> None:
        self.locks.close()
        for fd in (self._lock_fd, self.staging_fd, self.quarantine_fd, self.backups_fd, self.host_fd, self.hosts_fd,
                   self.fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = None


class Host(msgspec.Struct, frozen=True):
    """A host that has served the tree: its id, whether a daemon serves it now (its lock is
    held), and the pid and machine name that daemon wrote."""

    id: str
    serving: bool
    pid: int | None = None
    machine: str | None = None
    retired: bool = False


def other_hosts(backing: str, host: str) -> list[str]:
    """The hosts other than `host` that serve or have served the tree (a daemon took their lock)
    and are not retired: with any, the tree is shared."""
    hosts_path = os.path.join(backing, STATE_NAME, HOSTS_NAME)
    try:
        names = os.listdir(hosts_path)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n != host and os.path.exists(os.path.join(hosts_path, n, "lock"))
                  and not os.path.exists(os.path.join(hosts_path, n, RETIRED)))


def hosts(state_fd: int) -> list[Host]:
    """Every host directory of the tree, live or not. A lock test: on a shared filesystem a
    daemon of another machine shows as serving."""
    try:
        hosts_fd = os.open(HOSTS_NAME, DIR_FLAGS, dir_fd=state_fd)
    except FileNotFoundError:
        return []
    found = []
    try:
        for name in sorted(os.listdir(hosts_fd)):
            retired = os.path.exists(f"/proc/self/fd/{hosts_fd}/{name}/{RETIRED}")
            try:
                fd = os.open(f"{name}/lock", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=hosts_fd)
            except (FileNotFoundError, NotADirectoryError):
                found.append(Host(name, False, retired=retired))
                continue
            try:
                serving = locks.holder(fd, 0)
                words = os.pread(fd, 200, 0).decode(errors="replace").split()
            finally:
                os.close(fd)
            pid = int(words[0]) if words and words[0].isdigit() else None
            found.append(Host(name, serving, pid if serving else None,
                              words[1] if serving and len(words) > 1 else None, retired and not serving))
    finally:
        os.close(hosts_fd)
    return found

"""Finding fusestore trees: the mounts on this machine, and the backing tree of a path.

Commands and the Python API that take no path of their own (`cache`, `status`) work on the tree
named by `--root` (a backing tree or a mount of one) or, without it, on the tree that holds the
current directory, found upward as git finds its repository.
"""

from __future__ import annotations

import errno
import os
import time

from fusestore import control
from fusestore.engine import config as config_mod
from fusestore.engine.errors import FusestoreError
from fusestore.engine.paths import components, open_dir
from fusestore.engine.state import STATE_NAME
from fusestore.engine.store import Rejected, Store


class TreeNotFound(FusestoreError):
    """No backing tree or mount at or above the given directory."""


def _unescape_mountinfo(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _fusestore_mountinfo() -> list[tuple[str, str, int]]:
    """(mountpoint, backing, device number) of every fusestore mount on this machine."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 2 and rfields[0] == "fuse.fusestore":
                major, _, minor = fields[2].partition(":")
                result.append((_unescape_mountinfo(fields[4]), _unescape_mountinfo(rfields[1]),
                               os.makedev(int(major), int(minor))))
    return result


def mount_device(mountpoint: str) -> int | None:
    """The device number of the fusestore mount at `mountpoint` (from /proc, and without a
    stat of the mountpoint, which the mount itself would have to answer)."""
    absolute = os.path.abspath(mountpoint)
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    return next((dev for m, _, dev in _fusestore_mountinfo() if m == real), None)


def fusestore_mounts() -> list[tuple[str, str]]:
    """(mountpoint, backing) of every fusestore mount on this machine."""
    return [(mountpoint, backing) for mountpoint, backing, _ in _fusestore_mountinfo()]


def open_mount_root(mountpoint: str, device: int) -> int:
    """An fd of the mount's root directory, checked to be that mount (device `device`): a path
    string would reach the directory underneath once the mount is gone, and a program writing
    there would fill the mountpoint instead of the tree."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if os.fstat(fd).st_dev != device:
        os.close(fd)
        raise OSError(errno.ENOTCONN, f"the fusestore mount on {mountpoint} is gone")
    return fd


def mount_of(path: str) -> tuple[str, str] | None:
    """The fusestore mount that holds `path` (mountpoint, backing), or None."""
    real = os.path.realpath(path)
    best = None
    for mountpoint, backing in fusestore_mounts():
        if real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/"):
            if best is None or len(mountpoint) > len(best[0]):
                best = (mountpoint, backing)
    return best


def find_tree(root: str | None = None, start: str | None = None) -> str:
    """The backing tree for `root` (a backing tree or a mount of one, taken as given) or, without
    it, for `start` (default: the current directory): its mount's backing, or the nearest
    directory upward that holds a state directory."""
    start = os.path.realpath(root or start or os.getcwd())
    found = mount_of(start)
    if found:
        return found[1]
    if root is not None:
        if not os.path.isdir(start):
            raise TreeNotFound(f"{root} is not a directory")
        return start
    tree = tree_above(start)
    if tree is None:
        raise TreeNotFound(f"no fusestore tree at or above {start} (use --root)")
    return tree


def tree_above(path: str) -> str | None:
    """The nearest directory at or above `path` (a real path) that holds a state directory."""
    probe = path
    while not os.path.isdir(os.path.join(probe, STATE_NAME)):
        if probe == "/":
            return None
        probe = os.path.dirname(probe)
    return probe


class TreeWriter:
    """Commits into a tree the right way for its state: through its mount when a daemon serves
    it (so the daemon validates, backs up and commits, and its readers see the change), or
    directly through the engine while holding the tree's lock when none does. Raises
    `Busy` when a daemon holds the lock without a mount this process can see."""

    def __init__(self, backing: str):
        self.backing = os.path.realpath(backing)
        served = [(m, dev) for m, b, dev in _fusestore_mountinfo() if os.path.realpath(b) == self.backing]
        self.mountpoint = served[0][0] if served else None
        self.device = served[0][1] if served else None
        # Everything through the mount is done relative to this fd, never by path: if the mount
        # goes away meanwhile, writes fail (ENOTCONN) instead of landing under the mountpoint.
        self.mount_fd = open_mount_root(*served[0]) if served else None
        try:
            self.store = Store(self.backing, config_mod.load(self.backing), control.host_of(self.backing, self.device))
        except BaseException:
            self._close_mount()
            raise
        if self.mountpoint is None:
            try:
                self.store.state.lock()
            except BaseException:
                self.store.close()
                raise

    def close(self) -> None:
        self.store.close()
        self._close_mount()

    def _close_mount(self) -> None:
        if self.mount_fd is not None:
            os.close(self.mount_fd)
            self.mount_fd = None

    def __enter__(self) -> "TreeWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _daemon_dir(self) -> str:
        return control.daemon_dir(self.backing, self.device)

    @property
    def _base_fd(self) -> int:
        """Where paths start: the mount's root when served, else the backing tree's."""
        return self.store.root_fd if self.mount_fd is None else self.mount_fd

    def makedirs(self, relpath: str) -> None:
        os.close(open_dir(self._base_fd, components(relpath), create=True))

    def touch(self, relpath: str) -> None:
        """Create `relpath` empty if it does not exist (an append-through file such as a log;
        nothing to commit), leaving an existing one as it is."""
        *parents, name = components(relpath)
        dir_fd = open_dir(self._base_fd, parents)
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd))
        finally:
            os.close(dir_fd)

    def write(self, relpath: str, data: bytes | int) -> None:
        """Commit `data` (bytes, or everything an open fd holds) as the new content of
        `relpath`; raises `Rejected` when its rule refuses it (nothing changes then)."""
        if self.mount_fd is None:
            if isinstance(data, int):
                stage = self.store.stage_copy(data, relpath)
            else:
                stage = self.store.new_stage(relpath, 0o644)
                _write_all(stage.fd, data)
            dir_fd, name = self.store.open_parent_creating(relpath)
            try:
                self.store.commit_once(stage, dir_fd, name, relpath)
            finally:
                os.close(dir_fd)
            return
        *parents, name = components(relpath)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        deadline = time.monotonic() + 10
        dir_fd = open_dir(self.mount_fd, parents)
        try:
            while True:
                try:
                    fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
                    break
                except FileNotFoundError:
                    # The kernel still knows the name of a file removed in the backing tree; the
                    # daemon has told it to forget the name (or the entry timeout runs out).
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            os.close(dir_fd)
        try:
            if isinstance(data, int):
                offset = 0
                while chunk := os.pread(data, 1 << 20, offset):
                    _write_all(fd, chunk)
                    offset += len(chunk)
            else:
                _write_all(fd, data)
        except BaseException:
            os.close(fd)
            raise
        try:
            os.close(fd)
        except OSError as e:
            if e.errno == errno.EBADMSG:
                raise Rejected(relpath, self._reason(relpath), None) from None
            raise

    def delete(self, relpath: str) -> None:
        """Remove file `relpath`, its content kept as backup generation 1 (as an unlink through
        the mount does); FileNotFoundError when there is none."""
        *parents, name = components(relpath)
        dir_fd = open_dir(self._base_fd, parents)
        try:
            if self.mount_fd is None:
                self.store.remove(dir_fd, name, relpath)
            else:
                os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def restore(self, relpath: str, generation: int) -> None:
        """Commit backup `generation` of `relpath` as its new content (the current content
        becomes generation 1); FileNotFoundError when there is no such generation."""
        src = self.store.backups.open_generation(relpath, generation)
        try:
            self.write(relpath, src)
        finally:
            os.close(src)
        if self.mount_fd is not None:
            control.note(self._daemon_dir(), "restore", relpath, generation=generation)

    def _reason(self, relpath: str) -> str:
        """The daemon's reason for refusing `relpath` (from its status), as far as it says."""
        try:
            status = control.ask(self._daemon_dir(), "status", timeout=10).status
            for r in reversed(status.recent_rejections if status else []):
                if r.path == relpath:
                    return r.reason
        except (OSError, ConnectionError):
            pass
        return "refused by its rule (see fusestore status)"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

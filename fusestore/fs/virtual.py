"""The `.backups` virtual directory: read-only views of the backup generations.

`.backups/<relative path>/<N>` is generation N of that file (1 the newest previous content), with
the time it was superseded as its mtime and without write permission bits. A path that is both a
directory of backed-up files and a file with generations of its own lists both; a child literally
named like a generation number is shadowed by the generation. Names come from the kernel one
component at a time and are looked up through the store's fd-relative walk, so `..` or a name
with a slash can never reach outside the backups.
"""

from __future__ import annotations

import errno
import os
import stat
import time

import pyfuse3

from fusestore.engine.backups import Backups
from fusestore.engine.state import BACKUPS_NAME, CACHE_NAME
from fusestore.fs.nodes import InodeTable, VirtualNode

__all__ = ["BACKUPS_NAME", "CACHE_NAME", "Attrs", "BackupsView", "GenerationReader"]
_DIR_MODE = stat.S_IFDIR | 0o555


class Attrs:
    """Attributes not read from one backing file (a virtual entry, a file's open version), named
    as in os.stat_result."""

    __slots__ = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns",
                 "st_ctime_ns", "st_rdev", "st_blksize", "st_blocks", "st_dev", "st_ino")

    def __init__(self, mode: int, nlink: int, uid: int, gid: int, size: int, atime: int, mtime: int, ctime: int):
        self.st_mode, self.st_nlink, self.st_uid, self.st_gid, self.st_size = mode, nlink, uid, gid, size
        self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns = atime, mtime, ctime
        self.st_rdev, self.st_blksize, self.st_blocks = 0, 4096, (size + 511) // 512
        self.st_dev = self.st_ino = 0  # the backing file's, where there is one


class BackupsView:
    def __init__(self, backups: Backups):
        self.backups = backups
        self.started_ns = time.time_ns()

    def _dir_stat(self) -> Attrs:
        t = self.started_ns
        return Attrs(_DIR_MODE, 2, os.getuid(), os.getgid(), 0, t, t, t)

    def root(self, inodes: InodeTable) -> tuple[VirtualNode, Attrs]:
        return inodes.virtual_node(("dir", ""), "", 0, self), self._dir_stat()

    @staticmethod
    def fixed(node: VirtualNode) -> bool:
        """Whether the kernel may cache the node's name and attributes (only `.backups` itself)."""
        return node.key == ("dir", "")

    async def stat(self, node: VirtualNode) -> Attrs:
        return self._stat(node)

    def _stat(self, node: VirtualNode) -> Attrs:
        if node.generation == 0:
            if node.relpath and not self.backups.is_dir(node.relpath):
                raise FileNotFoundError(errno.ENOENT, "no backups there")
            return self._dir_stat()
        st, superseded = self.backups.stat_generation(node.relpath, node.generation)
        mode = stat.S_IFREG | (stat.S_IMODE(st.st_mode) & ~0o7222)
        return Attrs(mode, 1, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns, superseded, superseded)

    async def lookup(self, inodes: InodeTable, parent: VirtualNode, name: bytes) -> tuple[VirtualNode, Attrs]:
        if parent.generation:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        text = os.fsdecode(name)
        if text in (".", ".."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        relpath = f"{parent.relpath}/{text}" if parent.relpath else text
        if text.isdigit() and parent.relpath and int(text) >= 1:
            node = inodes.virtual_node(("gen", parent.relpath, int(text)), parent.relpath, int(text), self)
            try:
                return node, self._stat(node)
            except FileNotFoundError:
                inodes.maybe_free(node)
        if not self.backups.is_dir(relpath):
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = inodes.virtual_node(("dir", relpath), relpath, 0, self)
        return node, self._dir_stat()

    async def listing(self, node: VirtualNode) -> list[bytes]:
        names, count = self.backups.listing(node.relpath)
        if not node.relpath:
            count = 0
        return [str(n).encode() for n in range(1, count + 1)] + [os.fsencode(n) for n in names]

    async def open_read(self, node: VirtualNode) -> "GenerationReader":
        if node.generation == 0:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return GenerationReader(node, self.backups.open_generation(node.relpath, node.generation))


class GenerationReader:
    __slots__ = ("node", "fd")

    def __init__(self, node: VirtualNode, fd: int):
        self.node, self.fd = node, fd

    def read(self, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

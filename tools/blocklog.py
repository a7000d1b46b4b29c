"""A disk that remembers every write and every flush, for power-cut tests (`tools/power-cut`).

Serves one file, `disk.img`, through FUSE: its content starts as a given image, every write to
it is appended to a log, and every fsync (which is what a loop device turns a block flush into)
appends a flush mark and bumps a counter kept in the file FLUSHES. A loop device over
`disk.img` is then a block device whose history can be replayed to any flush: the state a
power cut right after that flush would have left, all that the filesystem above had made
durable and nothing it had not (the same idea as device-mapper's log-writes target, which this
machine's kernel lacks).

    python tools/blocklog.py BASE_IMAGE MOUNTPOINT LOG FLUSHES

Log records: 'W' + offset (8 bytes) + length (8 bytes) + data, or 'F' + flush number (8 bytes).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys

import pyfuse3
import trio

DISK_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"disk.img"


class BlockLog(pyfuse3.Operations):
    def __init__(self, base: str, log_path: str, flushes_path: str):
        super().__init__()
        with open(base, "rb") as f:
            self.image = bytearray(f.read())
        self.log = open(log_path, "wb", buffering=1 << 20)
        self.flushes = 0
        self.flushes_fd = os.open(flushes_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.flushes_fd, struct.pack("<Q", 0), 0)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o644, 1, len(self.image)
        e.st_blksize, e.st_blocks = 4096, (e.st_size + 511) // 512
        e.attr_timeout = e.entry_timeout = 0
        return e

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, DISK_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(DISK_INODE)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attrs(inode)

    async def open(self, inode, flags, ctx):
        if inode != DISK_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=1, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        return bytes(self.image[off:off + size])

    async def write(self, fh, off, buf):
        if off + len(buf) > len(self.image):
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.image[off:off + len(buf)] = buf
        self.log.write(b"W" + struct.pack("<QQ", off, len(buf)) + buf)
        return len(buf)

    async def fsync(self, fh, datasync):
        self.flushes += 1
        self.log.write(b"F" + struct.pack("<Q", self.flushes))
        self.log.flush()
        os.pwrite(self.flushes_fd, struct.pack("<Q", self.flushes), 0)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        self.log.flush()


def replay(base: str, log_path: str):
    """Yield (flush number, image, writes after it) for each flush mark of the log: the image is
    the base with every write logged before that mark (one bytearray, changed in place between
    yields); the writes are those logged after the mark and before the next one, as (offset,
    data): a disk with a volatile cache may have kept any of them when the power went."""
    with open(base, "rb") as f:
        image = bytearray(f.read())
    number, pending = None, []
    with open(log_path, "rb") as log:
        while kind := log.read(1):
            if kind == b"W":
                off, length = struct.unpack("<QQ", log.read(16))
                pending.append((off, log.read(length)))
            elif kind == b"F":
                if number is not None:
                    yield number, image, pending
                for off, data in pending:
                    image[off:off + len(data)] = data
                (number,) = struct.unpack("<Q", log.read(8))
                pending = []
            else:
                raise ValueError(f"bad record {kind!r} in {log_path}")
    if number is not None:
        yield number, image, pending


def read_flushes(path: str) -> int:
    """The number of flushes done so far (FLUSHES, read while the disk runs)."""
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def main(argv: list[str]) -> int:
    base, mountpoint, log_path, flushes_path = argv
    fs = BlockLog(base, log_path, flushes_path)
    options = set(pyfuse3.default_options) | {"fsname=blocklog", "allow_other"}
    options.discard("default_permissions")
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
        fs.log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

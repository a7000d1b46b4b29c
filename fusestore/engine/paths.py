"""Walking the backing tree by directory file descriptors, never by resolving path strings.

Every function here opens one component at a time relative to a directory fd with O_NOFOLLOW, so
no symlink in the backing tree (or swapped in while we work) can lead fusestore's own reads and
writes outside BACKING. Relative paths are `str` with `/` separators, as the rules see them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_ficlone = 0x40049409


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def one_line(text: str) -> str:
    """`text` with control characters and undecodable bytes escaped (`\\n`, `\\x1b`), for logs
    and terminal output: a file may be named `a\\n2026-01-01 INFO ...`, and must not be able to
    forge a line of the log."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


def components(relpath: str) -> list[str]:
    """Split a relative path into names, refusing anything that could leave the tree."""
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    for part in parts:
        if part == ".." or "\0" in part:
            raise OSError(errno.EINVAL, f"invalid path component {part!r}")
    if relpath.startswith("/"):
        raise OSError(errno.EINVAL, "absolute paths are not allowed here")
    return parts


def open_dir(base_fd: int, parts: list[str], create: bool = False, mode: int = 0o755) -> int:
    """Open the directory `parts` below `base_fd`, one component at a time, without following links."""
    fd = os.open(".", DIR_FLAGS, dir_fd=base_fd)
    try:
        for part in parts:
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def renameat2(src_dir: int, src: str | bytes, dst_dir: int, dst: str | bytes, flags: int = 0) -> None:
    """renameat2(2). Network filesystems (NFS, CephFS) take no flags (EINVAL): there
    RENAME_NOREPLACE is done by `_rename_noreplace`; RENAME_EXCHANGE fails as it would."""
    src_b = os.fsencode(src)
    dst_b = os.fsencode(dst)
    if _renameat2(src_dir, src_b, dst_dir, dst_b, flags) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL and flags == RENAME_NOREPLACE:
            _rename_noreplace(src_dir, src_b, dst_dir, dst_b)
            return
        raise OSError(err, os.strerror(err), os.fsdecode(dst))


def _rename_noreplace(src_dir: int, src: bytes, dst_dir: int, dst: bytes) -> None:
    """RENAME_NOREPLACE where the filesystem lacks it: a file is linked to its new name (which
    fails if the name exists: as atomic as the flag) and then unlinked from the old; a crash in
    between leaves both names, never neither. A directory (fusestore moves only directories of
    its own, never empty ones) is renamed after a check; rename(2) never replaces a directory
    that has entries."""
    if not stat.S_ISDIR(os.stat(src, dir_fd=src_dir, follow_symlinks=False).st_mode):
        os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        os.unlink(src, dir_fd=src_dir)
        return
    try:
        os.stat(dst, dir_fd=dst_dir, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate knows only mode 0)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def clone_or_copy(src_fd: int, dst_fd: int) -> None:
    """Make `dst_fd` a copy of `src_fd`: a reflink where the filesystem can, else the data
    extents with copy_file_range, so holes stay holes (a byte-by-byte copy of a 10 GiB sparse
    file would allocate 10 GiB)."""
    import fcntl

    try:
        fcntl.ioctl(dst_fd, _ficlone, src_fd)
        return
    except OSError:
        pass
    size = os.fstat(src_fd).st_size
    for start, end in data_extents(src_fd, size):
        offset = start
        while offset < end:
            n = os.copy_file_range(src_fd, dst_fd, end - offset, offset, offset)
            if n == 0:
                size = offset  # the source shrank while we copied
                break
            offset += n
    os.ftruncate(dst_fd, size)


def data_extents(fd: int, size: int):
    """The (start, end) ranges of `fd` that hold data, by SEEK_DATA and SEEK_HOLE; the whole
    file where the filesystem cannot tell."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield offset, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


# Filesystems that several machines mount at once: what lives there may be used by processes
# that share no memory (engine.cache keeps its index out of WAL mode there).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "ceph", "cifs", "smb3", "9p", "afs", "lustre", "gpfs", "beegfs", "ocfs2", "gfs2", "glusterfs",
    "fuse.glusterfs", "fuse.juicefs", "fuse.sshfs", "fuse.s3fs", "fuse.ceph-fuse", "fuse.cephfs",
})


def filesystem_type(path: str) -> str:
    """The type of the filesystem that holds `path` (nfs4, ceph, ext4...), from /proc."""
    real, best, fstype = os.path.realpath(path), "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, fstype = point, right.split()[0]
    return fstype

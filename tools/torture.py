"""fusestore torture: a seeded, model-based exerciser that applies the same random operations to
a fusestore mount and to a plain directory side by side and compares every result, errno,
content and listing.

Usage: tools/torture [--ops N] [--seed S] [--long]

`--long` runs a million operations. A failure prints the seed and the operations that led to
it, so `tools/torture --seed S --ops N` replays it. The test suite runs a short mode of the same
code (tests/test_torture.py).

Besides one-shot operations on paths, it keeps up to four descriptors open in each tree at
once, opened alike (read-only, read-write, write-only, with O_CREAT, O_TRUNC, O_APPEND, and
O_CREAT with read-only access), and works through them: writes at offsets and at the end found
by lseek(SEEK_END), sparse writes far past the end, fallocate in every mode, reads, fstat,
ftruncate, fsync, the close of a `dup` and the exit of a forked child that inherited the
descriptor (both commit points).

Differences that are fusestore's by design are kept out of the comparison: inode numbers and
times are not compared, and files with more than one hard link are not written (a commit
replaces the name written through; the other names keep the old content, as after `sed -i`).
A read-only descriptor of a committed file keeps reading the version it opened, so its reads
are compared only while nobody has written that file since it opened (nor held it for writing
when it opened); likewise a read through a
new open of a file that a write-capable descriptor holds reads the committed version, not the
uncommitted writes a plain file shows. Names never end in .json
or .log, whose rules differ from a plain directory on purpose.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from fusestore.engine.state import default_host_id

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOCATE_MODES = (0, 1, 3, 16)  # plain, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE
AT_FDCWD = -100
RENAME_FLAGS = (0, 1, 2)  # plain, RENAME_NOREPLACE, RENAME_EXCHANGE

DIRS = ["", "d0", "d1", "d0/e0"]
NAMES = ["f0", "f1", "f2.bin", "f3.txt", "d0", "d1", "e0", "l0"]


class Mismatch(Exception):
    pass


def _said(result) -> str:
    """A short form of an outcome for the history: ok, or the errno's name."""
    return result[0] if result[0] == "ok" else result[1]


def _differ(what: str, mount, plain) -> Mismatch:
    return Mismatch(f"{what}: mount {mount!r:.300} != plain {plain!r:.300}")


def _rename(src: str, dst: str, flags: int) -> None:
    if _renameat2(AT_FDCWD, src.encode(), AT_FDCWD, dst.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def outcome(fn, *args):
    """('ok', value) or ('err', errno name)."""
    try:
        return "ok", fn(*args)
    except OSError as e:
        return "err", errno.errorcode.get(e.errno, str(e.errno))


# -- operations: each takes the root it works under and returns something comparable -----------

def _write(root, path, flags, data, off=None):
    fd = os.open(os.path.join(root, path), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flags, 0o644)
    try:
        return os.write(fd, data) if off is None else os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def op_write(root, path, off, data):
    return _write(root, path, 0, data, off)


def op_overwrite(root, path, data):
    return _write(root, path, os.O_TRUNC, data)


def op_append(root, path, data):
    return _write(root, path, os.O_APPEND, data)


def op_create_excl(root, path):
    os.close(os.open(os.path.join(root, path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))


def op_truncate(root, path, size):
    os.truncate(os.path.join(root, path), size)


def op_rename(root, src, dst, flags):
    _rename(os.path.join(root, src), os.path.join(root, dst), flags)


def op_link(root, src, dst):
    os.link(os.path.join(root, src), os.path.join(root, dst), follow_symlinks=False)


def op_unlink(root, path):
    os.unlink(os.path.join(root, path))


def op_mkdir(root, path):
    os.mkdir(os.path.join(root, path), 0o755)


def op_rmdir(root, path):
    os.rmdir(os.path.join(root, path))


def op_symlink(root, target, path):
    os.symlink(target, os.path.join(root, path))


def op_chmod(root, path, mode):
    os.chmod(os.path.join(root, path), mode, follow_symlinks=True)


def op_utime(root, path, ns):
    os.utime(os.path.join(root, path), ns=(ns, ns))


def op_read(root, path, off, size):
    fd = os.open(os.path.join(root, path), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return os.pread(fd, size, off)
    finally:
        os.close(fd)


def op_stat(root, path):
    st = os.lstat(os.path.join(root, path))
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
    return st.st_mode, size, st.st_nlink if not stat.S_ISDIR(st.st_mode) else None


def op_readdir(root, path):
    return sorted(os.listdir(os.path.join(root, path)))


def op_readlink(root, path):
    return os.readlink(os.path.join(root, path))


# -- descriptors held open across operations ----------------------------------------------------

OPEN_FLAGS = [os.O_RDONLY, os.O_RDWR, os.O_WRONLY, os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
              os.O_RDWR | os.O_APPEND, os.O_RDONLY | os.O_CREAT, os.O_RDWR | os.O_TRUNC]


def fd_open(root, path, flags):
    return os.open(os.path.join(root, path), flags | os.O_NOFOLLOW, 0o644)


def fd_pwrite(fd, data, off):
    return os.pwrite(fd, data, off)


def fd_write_at_end(fd, data):
    end = os.lseek(fd, 0, os.SEEK_END)
    return end, os.write(fd, data)


def fd_read(fd, off, size):
    return os.pread(fd, size, off)


def fd_fstat(fd):
    return os.fstat(fd).st_size


def fd_truncate(fd, size):
    os.ftruncate(fd, size)


def fd_fallocate(fd, mode, off, length):
    if _fallocate(fd, mode, off, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fd_fsync(fd):
    os.fsync(fd)


def fd_close_dup(fd):
    os.close(os.dup(fd))


def fd_child_exits(fd):
    """A child inherits the descriptor and exits: its close is a flush of the same handle."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def snapshot(root: str) -> dict:
    """Every entry below root: type, mode, size, content or link target."""
    out = {}
    for dirpath, dirnames, filenames, dfd in os.fwalk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            key = os.path.normpath(os.path.join(rel, name))
            if stat.S_ISDIR(st.st_mode):
                out[key] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISLNK(st.st_mode):
                out[key] = ("link", os.readlink(name, dir_fd=dfd))
            else:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    data = os.pread(fd, st.st_size + 1, 0)
                finally:
                    os.close(fd)
                out[key] = ("file", stat.S_IMODE(st.st_mode), st.st_nlink, data)
    return out


class Exerciser:
    def __init__(self, mount_root: str, plain_root: str, seed: int):
        self.roots = (mount_root, plain_root)
        self.rng = random.Random(seed)
        self.seed = seed
        self.history: list[str] = []
        # Open descriptors: slot -> (mount fd, plain fd, flags, writes to the plain inode seen
        # when it opened, path); and writes per plain inode, for the read-only isolation rule.
        self.fds: dict[int, tuple[int, int, int, int, str]] = {}
        self.writes: dict[tuple[int, int], int] = {}

    def path(self) -> str:
        d = self.rng.choice(DIRS)
        name = self.rng.choice(NAMES)
        return f"{d}/{name}" if d else name

    def data(self) -> bytes:
        return bytes(self.rng.randrange(256) for _ in range(self.rng.choice([0, 1, 7, 100, 5000])))

    def _multilinked(self, path: str) -> bool:
        """Whether writing `path` would write a file with several hard links (through a
        symlink too: `l0 -> f0` writes f0)."""
        try:
            st = os.stat(os.path.join(self.roots[1], path))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_nlink > 1

    def _written(self, key) -> None:
        if key is not None:
            self.writes[key] = self.writes.get(key, 0) + 1

    def _inode(self, path: str | None = None, fd: int | None = None):
        try:
            st = os.fstat(fd) if fd is not None else os.stat(os.path.join(self.roots[1], path))
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None

    def _held(self) -> set:
        """The plain inodes that a write-capable descriptor holds (one that may have
        uncommitted writes)."""
        return {self._inode(fd=pfd) for _, pfd, flags, _, _ in self.fds.values()
                if flags & (os.O_ACCMODE | os.O_CREAT | os.O_TRUNC)}

    def _linked_elsewhere(self, pfd: int, path: str) -> bool:
        """Whether the file behind a descriptor has a name besides the one it was opened by (a
        hard link, or its name was unlinked or renamed while another link stays): writes go to
        the name written through, by design, where a plain file has one inode for all names."""
        st = os.fstat(pfd)
        if st.st_nlink == 0:
            return False  # no name at all: an anonymous file on both sides
        if st.st_nlink > 1:
            return True
        try:
            now = os.stat(os.path.join(self.roots[1], path), follow_symlinks=False)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)

    def close_all(self) -> None:
        for slot in list(self.fds):
            self._close(slot)

    def _close(self, slot: int) -> None:
        mfd, pfd, _, _, _ = self.fds.pop(slot)
        results = [outcome(os.close, fd) for fd in (mfd, pfd)]
        self.history.append(f"close[{slot}] {_said(results[1])}")
        if results[0] != results[1]:
            raise _differ(f"close[{slot}]", *results)

    def fd_step(self) -> None:
        r = self.rng
        slot = r.randrange(4)
        if slot not in self.fds:
            p, flags = self.path(), r.choice(OPEN_FLAGS)
            if flags & os.O_TRUNC and self._multilinked(p):
                return
            self._written(self._inode(p) if flags & os.O_TRUNC else None)
            # An open that creates the file holds its open version; O_CREAT of a file that exists
            # is a plain open (the kernel drops the flag).
            creates = bool(flags & os.O_CREAT) and not os.path.lexists(os.path.join(self.roots[1], p))
            results = [outcome(fd_open, root, p, flags) for root in self.roots]
            self.history.append(f"open[{slot}]({p!r}, {flags:#o}) {_said(results[1])}")
            if (results[0][0], results[1][0]) == ("ok", "ok"):
                pfd = results[1][1]
                key = self._inode(fd=pfd)
                # Opened while a writer holds the file: it reads the committed version, never
                # what the plain file shows.
                seen = -1 if key in self._held() else self.writes.get(key, 0)
                self.fds[slot] = (results[0][1], pfd, flags if creates else flags & ~os.O_CREAT, seen, p)
                return
            for kind, fd in results:
                if kind == "ok":
                    os.close(fd)
            if results[0] != results[1]:
                raise _differ(f"open({p!r}, {flags:#o})", *results)
            return
        mfd, pfd, flags, seen, path = self.fds[slot]
        key = self._inode(fd=pfd)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        kind = r.choice(["pwrite", "end", "sparse", "read", "read", "fstat", "truncate", "fsync", "dup", "child",
                         "fallocate", "close", "close"])
        changes = kind in ("pwrite", "end", "sparse", "truncate", "fallocate")
        if changes and (not writable or self._linked_elsewhere(pfd, path)):
            kind = "fstat"  # a read-only descriptor gets EBADF alike; hard links: see above
        if kind == "close":
            self._close(slot)
            return
        call = {
            "pwrite": lambda: (fd_pwrite, self.data(), r.choice([0, 5, 4096, 70000])),
            "end": lambda: (fd_write_at_end, self.data()),
            "sparse": lambda: (fd_pwrite, b"sparse", r.choice([1 << 20, 3 << 20])),
            "read": lambda: (fd_read, r.choice([0, 3, 4096]), r.choice([10, 100000])),
            "fstat": lambda: (fd_fstat,),
            "truncate": lambda: (fd_truncate, r.choice([0, 2, 5000])),
            "fsync": lambda: (fd_fsync,),
            "fallocate": lambda: (fd_fallocate, r.choice(FALLOCATE_MODES), r.choice([0, 100, 5000]),
                                  r.choice([1, 4096, 70000])),
            "dup": lambda: (fd_close_dup,),
            "child": lambda: (fd_child_exits,),
        }[kind]()
        fn, rest = call[0], call[1:]
        if fn in (fd_pwrite, fd_write_at_end, fd_truncate, fd_fallocate):
            self._written(key)
        results = [outcome(fn, fd, *rest) for fd in (mfd, pfd)]
        self.history.append(f"{fn.__name__}[{slot}]{tuple(rest)!r:.100} {_said(results[1])}")
        isolated = not writable and not flags & (os.O_CREAT | os.O_TRUNC) and self.writes.get(key, 0) != seen
        if fn in (fd_read, fd_fstat) and (isolated or self._linked_elsewhere(pfd, path)):
            return  # by design: a read-only descriptor keeps its version; hard links: see above
        if results[0] != results[1]:
            raise _differ(f"{fn.__name__}[{slot}]{tuple(rest)!r:.100}", *results)

    def step(self) -> None:
        r = self.rng
        if r.random() < 0.3:
            self.fd_step()
            return
        kind = r.choice(["write", "overwrite", "append", "create_excl", "truncate", "rename", "link", "unlink",
                         "mkdir", "rmdir", "symlink", "chmod", "utime", "read", "stat", "readdir", "readlink",
                         "write", "overwrite", "read", "stat"])
        p = self.path()
        if kind in ("write", "overwrite", "append", "truncate") and self._multilinked(p):
            kind = "stat"  # by design: see the module docstring
        args = {
            "write": lambda: (op_write, p, r.choice([0, 3, 4096, 70000]), self.data()),
            "overwrite": lambda: (op_overwrite, p, self.data()),
            "append": lambda: (op_append, p, self.data()),
            "create_excl": lambda: (op_create_excl, p),
            "truncate": lambda: (op_truncate, p, r.choice([0, 1, 10, 9000])),
            "rename": lambda: (op_rename, p, self.path(), r.choice(RENAME_FLAGS)),
            "link": lambda: (op_link, p, self.path()),
            "unlink": lambda: (op_unlink, p),
            "mkdir": lambda: (op_mkdir, p),
            "rmdir": lambda: (op_rmdir, p),
            "symlink": lambda: (op_symlink, r.choice(["f0", "../f1", "d0", "nowhere"]), p),
            "chmod": lambda: (op_chmod, p, r.choice([0o600, 0o644, 0o755, 0o700])),
            "utime": lambda: (op_utime, p, r.randrange(10**18)),
            "read": lambda: (op_read, p, r.choice([0, 2, 4096]), r.choice([1, 100, 100000])),
            "stat": lambda: (op_stat, p),
            "readdir": lambda: (op_readdir, r.choice(DIRS) or "."),
            "readlink": lambda: (op_readlink, p),
        }[kind]()
        fn, rest = args[0], args[1:]
        if fn is op_rename and rest[2] == 2 and (self._multilinked(rest[0]) or self._multilinked(rest[1])):
            return
        if fn in (op_write, op_overwrite, op_append, op_truncate):
            self._written(self._inode(p))
        results = [outcome(fn, root, *rest) for root in self.roots]
        self.history.append(f"{fn.__name__}{tuple(rest)!r:.100} {_said(results[1])}")
        if fn is op_read and self._inode(p) in self._held():
            return  # by design: see the module docstring
        if results[0] != results[1]:
            raise _differ(f"{fn.__name__}{tuple(rest)!r:.100}", *results)

    def compare_trees(self) -> None:
        self.close_all()  # every descriptor closed: both trees hold what was committed
        a, b = snapshot(self.roots[0]), snapshot(self.roots[1])
        if a != b:
            keys = sorted(set(a) | set(b))
            diff = [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]
            raise Mismatch(f"trees differ: {diff[:5]!r}")


def run(mount_root: str, plain_root: str, ops: int, seed: int, check_every: int = 50) -> None:
    """Apply `ops` random operations to both roots; raise Mismatch (with the seed and the last
    operations) at the first difference."""
    ex = Exerciser(mount_root, plain_root, seed)
    try:
        for i in range(ops):
            ex.step()
            if (i + 1) % check_every == 0:
                ex.compare_trees()
        ex.compare_trees()
    except Mismatch as e:
        for mfd, pfd, _, _, _ in ex.fds.values():
            for fd in (mfd, pfd):
                outcome(os.close, fd)
        tail = "\n  ".join(ex.history[-25:])
        raise Mismatch(f"seed {seed}, after {len(ex.history)} operations: {e}\nlast operations:\n  {tail}") from None


def daemon_usage(pid: int) -> tuple[int, int]:
    """The daemon's resident memory (MiB) and open file descriptors."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss // 1024, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--long", action="store_true", help="a million operations")
    args = parser.parse_args()
    ops = 1_000_000 if args.long else args.ops
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    work = tempfile.mkdtemp(prefix="fusestore-torture-", dir="/var/tmp")
    backing, mnt, plain = (os.path.join(work, n) for n in ("backing", "mnt", "plain"))
    for d in (backing, mnt, plain):
        os.mkdir(d)
    fusestore = [sys.executable, "-m", "fusestore"]
    subprocess.run([*fusestore, "mount", backing, mnt], check=True)
    with open(os.path.join(backing, ".fusestore", "hosts", default_host_id(), "lock")) as f:
        pid = int(f.read().split()[0])
    before = daemon_usage(pid)
    t = time.monotonic()
    try:
        run(mnt, plain, ops, seed)
        after = daemon_usage(pid)
    except Mismatch as e:
        print(f"FAILED: {e}\nreplay: tools/torture --seed {seed} --ops {ops}", file=sys.stderr)
        return 1
    finally:
        subprocess.run([*fusestore, "unmount", mnt])
        shutil.rmtree(work, ignore_errors=True)
    print(f"{ops} operations, seed {seed}: mount and plain directory agree, 0 failures "
          f"({time.monotonic() - t:.0f}s; daemon RSS {before[0]} -> {after[0]} MiB, "
          f"open fds {before[1]} -> {after[1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

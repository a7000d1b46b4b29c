"""Backup generations: the previous contents of every file, kept by hard link, never by copy.

`state/backups/` mirrors the tree. The generations of the file `a/b.json` are the entries of the
directory `backups/a/b.json/` named `%<nanoseconds>`, the moment the content was superseded.
Generation 1 is the newest. Names are never renumbered: rotation only deletes the oldest, so a
crash at any point leaves a consistent set. Tree names that begin with `%` are stored with one
more `%` in front, so they can never be taken for a generation.

All generations together have a budget of bytes on disk: the running total is taken once (a
walk) and then kept up to date by every generation added or rotated out; a generation that takes
it over the budget makes the oldest generations of any file go, down to nine tenths of it, never
generation 1 of a file that still exists. `usage()` and `trim()` are safe from several threads.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import msgspec

from fusestore.engine.paths import RENAME_NOREPLACE, clone_or_copy, components, open_dir, renameat2


class Generation(msgspec.Struct, frozen=True):
    number: int
    name: str
    superseded_ns: int
    size: int


def escape(name: str) -> str:
    return "%" + name if name.startswith("%") else name


def unescape(name: str) -> str | None:
    """The tree name stored as `name`, or None when `name` is a generation."""
    if name.startswith("%%"):
        return name[1:]
    if name.startswith("%"):
        return None
    return name


def _is_generation(name: str) -> bool:
    return len(name) > 1 and name[0] == "%" and name[1:].isdigit()


def _bytes(st: os.stat_result) -> int:
    return st.st_blocks * 512


class Backups:
    def __init__(self, backups_fd: int, keep: int, budget: int | None = None):
        self.fd = backups_fd
        self.keep_count = keep
        self.budget = budget
        self._total: int | None = None  # bytes on disk of all generations, once walked
        # Other hosts serving the tree keep and drop generations too, unseen by this count:
        # with several hosts it is walked again when older than this many seconds (None: never).
        self.recount_seconds: float | None = None
        self._walked = 0.0
        self._lock = threading.Lock()  # guards _total
        self._trimming = threading.Lock()  # one trim at a time; others need not wait

    def usage(self) -> int:
        """Bytes on disk that all generations take (walks the backups once, then counts)."""
        with self._lock:
            if self._total is not None and self.recount_seconds is not None \
                    and time.monotonic() - self._walked > self.recount_seconds:
                self._total = None
            if self._total is None:
                self._walked = time.monotonic()
                total = 0
                for _dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=self.fd):
                    for name in files:
                        if _is_generation(name):
                            try:
                                total += _bytes(os.stat(name, dir_fd=dfd, follow_symlinks=False))
                            except FileNotFoundError:
                                pass
                self._total = total
            return self._total

    def figures(self) -> tuple[int, int, int]:
        """Files with backups, their generations, and the generations' bytes (st_size), by a
        walk of the backups (for `status`)."""
        files = generations = size = 0
        for _dirpath, _dirs, names, dfd in os.fwalk(".", dir_fd=self.fd):
            found = [n for n in names if _is_generation(n)]
            if found:
                files += 1
                generations += len(found)
                for name in found:
                    try:
                        size += os.stat(name, dir_fd=dfd, follow_symlinks=False).st_size
                    except FileNotFoundError:
                        pass
        return files, generations, size

    def _count(self, delta: int) -> None:
        with self._lock:
            if self._total is not None:
                self._total += delta

    def over_budget(self) -> bool:
        return self.budget is not None and self.usage() > self.budget

    def trim(self, live: Callable[[str], bool]) -> int:
        """Delete the oldest generations until all take at most nine tenths of the budget,
        never generation 1 of a path where `live(relpath)` (the file exists). Returns how many
        went; 0 at once when another thread is trimming."""
        if self.budget is None or not self._trimming.acquire(blocking=False):
            return 0
        try:
            target = self.budget * 9 // 10
            if self.recount_seconds is not None:
                with self._lock:
                    self._total = None  # count what every host added before choosing
            if self.usage() <= target:
                return 0
            candidates = []
            for relpath in self.paths():
                for gen in self.generations(relpath):
                    if not (gen.number == 1 and live(relpath)):
                        candidates.append((gen.superseded_ns, relpath, gen.name))
            candidates.sort()
            deleted = 0
            for _ns, relpath, name in candidates:
                if self.usage() <= target:
                    break
                dfd = self._dir(relpath)
                try:
                    deleted += self._unlink(dfd, name)
                finally:
                    os.close(dfd)
            return deleted
        finally:
            self._trimming.release()

    def _unlink(self, dfd: int, name: str) -> bool:
        """Delete one generation and take its bytes off the total; False if it was gone."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return False
        if st.st_nlink == 1:  # a hard link to a live file costs the backups nothing
            self._count(-_bytes(st))
        return True

    def _dir(self, relpath: str, create: bool = False) -> int:
        return open_dir(self.fd, [escape(p) for p in components(relpath)], create=create, mode=0o700)

    def keep(self, src_dir_fd: int, name: str | bytes, relpath: str, sync_first: int | None = None) -> None:
        """Keep the current file `name` in `src_dir_fd` as generation 1 of `relpath`.

        A file with one name is kept by hard link: no data is copied. A file with other hard
        links is copied (a reflink where the filesystem can), so those names keep a true link
        count. The backup directory is fsynced before this returns, so the caller may then let
        the old content lose its name: the backup is complete and durable first.

        `sync_first` is an fd to fsync after the link and before the directory: a commit passes
        its staged file, and on a journaling filesystem that one journal commit then carries
        the link too, so the directory's fsync finds nothing left to write.
        """
        dfd = self._dir(relpath, create=True)
        try:
            now = time.time_ns()
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=src_dir_fd)
            try:
                src_st = os.fstat(src)
                shared = src_st.st_nlink > 1
                tmp = None
                if shared:
                    tmp = f".copy-{now}"
                    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                    try:
                        clone_or_copy(src, out)
                        st = os.fstat(src)
                        os.fchmod(out, st.st_mode & 0o7777)
                        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                        os.fsync(out)
                    finally:
                        os.close(out)
                while True:
                    gen = f"%{now:020d}"
                    try:
                        if tmp is None:
                            os.link(name, gen, src_dir_fd=src_dir_fd, dst_dir_fd=dfd, follow_symlinks=False)
                        else:
                            renameat2(dfd, tmp, dfd, gen, RENAME_NOREPLACE)
                        break
                    except FileExistsError:
                        now += 1
            finally:
                os.close(src)
            # The old content's blocks are the generation's once the name is replaced.
            self._count(_bytes(src_st))
            if sync_first is not None:
                os.fsync(sync_first)
            os.fsync(dfd)
            self._rotate(dfd)
        finally:
            os.close(dfd)

    def _rotate(self, dfd: int) -> None:
        names = sorted((n for n in os.listdir(dfd) if _is_generation(n)), reverse=True)
        for old in names[self.keep_count :]:
            self._unlink(dfd, old)

    def generations(self, relpath: str) -> list[Generation]:
        """The generations of `relpath`, newest (number 1) first; empty when there are none."""
        try:
            dfd = self._dir(relpath)
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            result = []
            names = sorted((n for n in os.listdir(dfd) if _is_generation(n)), reverse=True)
            for number, name in enumerate(names, 1):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                result.append(Generation(number, name, int(name[1:]), st.st_size))
            return result
        finally:
            os.close(dfd)

    def open_generation(self, relpath: str, number: int) -> int:
        """A read-only fd on generation `number` of `relpath`; FileNotFoundError when missing."""
        for gen in self.generations(relpath):
            if gen.number == number:
                dfd = self._dir(relpath)
                try:
                    return os.open(gen.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                finally:
                    os.close(dfd)
        raise FileNotFoundError(f"no backup generation {number} of {relpath}")

    def stat_generation(self, relpath: str, number: int) -> tuple[os.stat_result, int]:
        """The backup file's stat and the time (ns) it was superseded."""
        for gen in self.generations(relpath):
            if gen.number == number:
                dfd = self._dir(relpath)
                try:
                    return os.stat(gen.name, dir_fd=dfd, follow_symlinks=False), gen.superseded_ns
                finally:
                    os.close(dfd)
        raise FileNotFoundError(f"no backup generation {number} of {relpath}")

    def listing(self, relpath: str) -> tuple[list[str], int]:
        """Below `relpath`: the tree names that have backups and the number of generations."""
        try:
            dfd = self._dir(relpath)
        except (FileNotFoundError, NotADirectoryError):
            return [], 0
        try:
            names, count = [], 0
            for entry in os.scandir(dfd):
                if _is_generation(entry.name):
                    count += 1
                elif entry.is_dir(follow_symlinks=False):
                    tree_name = unescape(entry.name)
                    if tree_name is not None:
                        names.append(tree_name)
            return sorted(names), count
        finally:
            os.close(dfd)

    def is_dir(self, relpath: str) -> bool:
        try:
            os.close(self._dir(relpath))
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def paths(self) -> list[str]:
        """Every tree path that has generations, including deleted files."""
        found = []
        for dirpath, _dirs, files, _fd in os.fwalk(".", dir_fd=self.fd):
            if any(_is_generation(f) for f in files):
                parts = [unescape(p) for p in dirpath.split("/")[1:]]
                if None not in parts:
                    found.append("/".join(parts))
        return sorted(found)

    def expire(self, older_than_ns: int, keep_newest: Callable[[str], bool]) -> int:
        """Delete generations superseded before `older_than_ns`; generation 1 stays wherever
        `keep_newest(relpath)` (the file still exists). Returns how many were deleted."""
        deleted = 0
        for relpath in self.paths():
            gens = self.generations(relpath)
            doomed = [g for g in gens
                      if g.superseded_ns < older_than_ns and not (g.number == 1 and keep_newest(relpath))]
            if not doomed:
                continue
            dfd = self._dir(relpath)
            try:
                for gen in doomed:
                    deleted += self._unlink(dfd, gen.name)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return deleted

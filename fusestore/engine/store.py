"""The store: stages, commits, backups and quarantine of one backing tree.

This is the only code that replaces a file's content. Close, rename, restore and recovery all go
through `Store.commit`, whose steps keep the tree consistent if the process dies between any two:

1. validate the staged content (invalid: raise `Invalid`, the stage untouched: a writer that
   still holds it goes on with it; the last one, or `commit_once`, sends it to the quarantine
   and records the refusal);
2. copy mode, owner and extended attributes of the current file onto the staged file;
3. hard-link the current file as backup generation 1;
4. fsync the staged file, then the backup directory;
5. rename the staged file over the target (the atomic step);
6. fsync the target's directory;
7. if backups now take more than their budget, drop the oldest generations.

A crash before 5 leaves the old content in place and the staged file in `staging/`, which the next
mount moves to the quarantine; after 5 the new content is complete. Everything here is blocking:
the filesystem layer calls it from worker threads, the CLI calls it directly.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
import urllib.parse
from typing import Callable

import msgspec

from fusestore.engine import _publish, layout, locks, validate
from fusestore.engine import config as config_mod
from fusestore.engine.backups import Backups
from fusestore.engine.paths import DIR_FLAGS, RENAME_NOREPLACE, clone_or_copy, components, open_dir, renameat2
from fusestore.engine.state import StateDir

log = logging.getLogger(__name__)

_PATH_SUFFIX = ".path"
_POOL_PREFIX = "pool-"
_POOL_SIZE = 16
_POOL_MODE = 0o600
_STAGE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


class Rejected(Exception):
    """Content failed its rule; it was kept in the quarantine."""

    def __init__(self, relpath: str, reason: str, quarantined: str | None):
        super().__init__(f"{relpath}: {reason}")
        self.relpath = relpath
        self.reason = reason
        self.quarantined = quarantined


class Invalid(Exception):
    """Content its rule refuses; nothing was recorded or moved yet."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _no_events(kind: str, relpath: str, **fields) -> None:
    """The `emit` of a store nobody follows (no daemon)."""


def _without_setid(mode: int) -> int:
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


class Rejection(msgspec.Struct, frozen=True):
    path: str
    time: float
    reason: str
    quarantined: str | None


class Stats(msgspec.Struct):
    commits: int = 0
    rejections: int = 0
    quarantined: int = 0
    backups_kept: int = 0
    recent_rejections: list[Rejection] = []


class Stage:
    """A private staged copy of one file's next content, in `state/staging/`."""

    __slots__ = ("fd", "name", "relpath")

    def __init__(self, fd: int, name: str, relpath: str):
        self.fd = fd
        self.name = name
        self.relpath = relpath


class Store:
    def __init__(self, backing: str, config: config_mod.Config, host: str | None = None):
        self.backing = os.path.abspath(backing)
        self.config = config
        self.root_fd = os.open(self.backing, DIR_FLAGS)
        self.state = StateDir(self.root_fd, self.backing, host)
        # Held while a file's content, name or backups change: serializes commits of one file
        # across every host serving the tree (engine.locks).
        self.locks = self.state.locks
        self.backups = Backups(self.state.backups_fd, config.backups.keep, config.backups.budget)
        self.stats = Stats()
        self._names = itertools.count()
        # Empty files made ahead of need (see refill_pool): creating an inode right after an
        # fsync costs a journal wait, which then stays off the path of a file's open().
        self._pool: list[tuple[int, str]] = []
        self._rules = functools.lru_cache(maxsize=16384)(config.rule_for)
        # Told of each commit, rejection and quarantine (`fusestore.events`; the daemon's
        # EventHub.emit, or nothing): emit(kind, relpath, **fields), from any thread.
        self.emit: Callable[..., None] = _no_events

    def close(self) -> None:
        self._drain_pool()
        self.state.close()
        os.close(self.root_fd)

    def rule(self, relpath: str) -> config_mod.Rule:
        # Asked several times per file (create, open, commit): the glob matching is worth keeping.
        return self._rules(relpath)

    # -- staging ---------------------------------------------------------------------------

    def new_stage(self, relpath: str, mode: int = 0o600, owner: tuple[int, int] | None = None) -> Stage:
        """An empty staged file for `relpath`, with `mode` and `owner` for a file that is new.

        The path is written into the staged file's name (recovery reads it back from there), so
        nothing about it can end up on the committed file; a path too long for a name goes into
        a `.path` file beside it."""
        quoted = urllib.parse.quote(relpath, safe="", errors="surrogateescape")
        while True:
            prefix = f"{time.time_ns()}-{os.getpid()}-{next(self._names)}."
            long_path = len(prefix) + len(quoted) > 250
            name = prefix + ("@" if long_path else quoted)
            try:
                fd = self._take_pooled(name, mode)
                if fd is None:
                    fd = os.open(name, _STAGE_FLAGS, mode, dir_fd=self.state.staging_fd)
                break
            except FileExistsError:
                continue
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            os.fchown(fd, *owner)
            if mode & 0o6000:
                os.fchmod(fd, mode)  # chown cleared the set-id bits
        if long_path:
            side = os.open(name + _PATH_SUFFIX, _STAGE_FLAGS, 0o600, dir_fd=self.state.staging_fd)
            try:
                os.write(side, relpath.encode("utf-8", "surrogateescape"))
            finally:
                os.close(side)
        return Stage(fd, name, relpath)

    def _take_pooled(self, name: str, mode: int) -> int | None:
        try:
            fd, pooled = self._pool.pop()
        except IndexError:
            return None
        try:
            renameat2(self.state.staging_fd, pooled, self.state.staging_fd, name, RENAME_NOREPLACE)
            if mode != _POOL_MODE:
                os.fchmod(fd, mode)
            os.utime(fd)  # made minutes ago: a new or truncated file's times are those of now
        except BaseException:
            os.close(fd)
            raise
        return fd

    def pool_low(self) -> bool:
        return len(self._pool) < _POOL_SIZE // 2

    def refill_pool(self) -> None:
        """Make empty staged files ahead of need (blocking: call from a worker thread)."""
        while len(self._pool) < _POOL_SIZE:
            name = f"{_POOL_PREFIX}{time.time_ns()}-{os.getpid()}-{next(self._names)}"
            fd = os.open(name, _STAGE_FLAGS, _POOL_MODE, dir_fd=self.state.staging_fd)
            self._pool.append((fd, name))

    def _drain_pool(self) -> None:
        while self._pool:
            fd, name = self._pool.pop()
            os.close(fd)
            try:
                os.unlink(name, dir_fd=self.state.staging_fd)
            except FileNotFoundError:
                pass

    def _forget_stage_name(self, name: str) -> None:
        if name.endswith(".@"):
            try:
                os.unlink(name + _PATH_SUFFIX, dir_fd=self.state.staging_fd)
            except FileNotFoundError:
                pass

    def stage_copy(self, src_fd: int, relpath: str) -> Stage:
        stage = self.new_stage(relpath)
        try:
            clone_or_copy(src_fd, stage.fd)
        except BaseException:
            self.discard(stage)
            raise
        return stage

    def discard(self, stage: Stage) -> None:
        try:
            os.unlink(stage.name, dir_fd=self.state.staging_fd)
        except FileNotFoundError:
            pass
        self._forget_stage_name(stage.name)
        os.close(stage.fd)

    # -- commit ----------------------------------------------------------------------------

    def commit(self, stage: Stage, dir_fd: int, name: str | bytes, relpath: str, backup: bool = True,
               kill_setid: bool = False, wait: bool = True) -> os.stat_result | None:
        """Replace `name` in `dir_fd` by the staged content. On success the stage's name is
        gone and its fd, still open, is the committed file's: the caller closes it.

        Content its rule refuses raises `Invalid`, and any other failure its OSError, both with
        the stage untouched: the caller decides whether it stays the file's open version (a
        writer still holds it) or goes to the quarantine (`commit_once`, the last release).
        `backup=False` says the current content is an intermediate state of the same writer,
        not worth a generation. `kill_setid` says an unprivileged process wrote the content: as
        on any filesystem, the set-user-ID bit (and the set-group-ID bit of a group-executable
        file) do not carry over, nor stay on a file's first content. Returns the stat of the file
        the name had before (None for a new file).

        All of it happens under the file's commit lock (engine.locks), which another host may
        hold: without `wait`, `LockBusy` then, the stage untouched."""
        with self.locks.path(relpath, wait=wait):
            return self._commit(stage, dir_fd, name, relpath, backup, kill_setid)

    def _commit(self, stage: Stage, dir_fd: int, name: str | bytes, relpath: str, backup: bool,
                kill_setid: bool) -> os.stat_result | None:
        rule = self.rule(relpath)
        try:
            current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        reason = self._check_content(rule, stage.fd, current.st_size if current is not None else None)
        if reason is not None:
            raise Invalid(reason)
        if current is not None and not stat.S_ISREG(current.st_mode):
            raise IsADirectoryError(errno.EISDIR, f"{relpath} is no longer a regular file")
        if current is not None:
            self._carry_metadata(current, dir_fd, name, stage.fd, kill_setid)
        elif kill_setid:
            mode = stat.S_IMODE(os.fstat(stage.fd).st_mode)
            if mode & 0o6000:
                os.fchmod(stage.fd, _without_setid(mode))
        kept = current is not None and rule.backups and backup
        if kept:
            self.backups.keep(dir_fd, name, relpath, sync_first=stage.fd)
            self.stats.backups_kept += 1
        try:
            # fsync of the staged file (unless kept synced it), rename, fsync of the directory
            _publish.publish(-1 if kept else stage.fd, self.state.staging_fd, os.fsencode(stage.name), dir_fd,
                             os.fsencode(name))
        except OSError as e:
            if getattr(e, "renamed", False):
                self._forget_stage_name(stage.name)
            raise
        self._forget_stage_name(stage.name)
        if kept:
            self.keep_backups_in_budget()
        self.stats.commits += 1
        log.debug("committed %s", relpath)
        self.emit("commit", relpath, size=os.fstat(stage.fd).st_size, generation=1 if kept else None)
        return current

    def commit_once(self, stage: Stage, dir_fd: int, name: str | bytes, relpath: str) -> None:
        """`commit` for a writer that will not try again (restore, repair, migrate): refused or
        failed content goes to the quarantine, and a refusal is recorded and raised as
        `Rejected`."""
        try:
            self.commit(stage, dir_fd, name, relpath)
        except Invalid as e:
            self.reject(stage, relpath, e.reason)
        except OSError as e:
            self.quarantine(stage, relpath, f"commit failed: {e.strerror or e}")
            raise
        os.close(stage.fd)

    def reject(self, stage: Stage, relpath: str, reason: str) -> None:
        quarantined = self.quarantine(stage, relpath, reason, report=False)
        raise self.rejected(relpath, reason, quarantined)

    def rejected(self, relpath: str, reason: str, quarantined: str | None) -> Rejected:
        """Count and log a rejection; returns the exception to raise."""
        self.stats.rejections += 1
        record = Rejection(relpath, time.time(), reason, quarantined)
        self.stats.recent_rejections = (self.stats.recent_rejections + [record])[-20:]
        kept = f"bytes kept in quarantine as {quarantined}" if quarantined else "nothing was changed"
        log.warning("rejected %s: %s (%s)", relpath, reason, kept)
        self.project_event(relpath, "errors.log", "error", "rejected", reason=reason, quarantined=quarantined)
        self.emit("reject", relpath, reason=reason, quarantined=quarantined)
        return Rejected(relpath, reason, quarantined)

    def quarantined_after_refusal(self, relpath: str, quarantined: str | None) -> None:
        """Content whose refusal was recorded while a writer still held it went to the
        quarantine at the last release: say where, in the log and in that record."""
        if quarantined is None:
            return
        log.warning("kept the refused content of %s in the quarantine as %s", relpath, quarantined)
        recent = self.stats.recent_rejections
        for i in range(len(recent) - 1, -1, -1):
            if recent[i].path == relpath:
                if recent[i].quarantined is None:
                    recent[i] = msgspec.structs.replace(recent[i], quarantined=quarantined)
                break

    def quarantine(self, stage: Stage, relpath: str, reason: str, report: bool = True) -> str | None:
        """Move the staged bytes to `state/quarantine/` with a `.reason` record; consumes `stage`.
        With `report`, the project's warnings.log hears of it (a rejection reports itself)."""
        if os.fstat(stage.fd).st_size == 0:
            self.discard(stage)
            return None
        while True:
            # The reason first: whoever sees the bytes in the quarantine finds why (a crash in
            # between leaves a reason without bytes, which nothing lists).
            name = self.quarantine_name(relpath)
            try:
                self._write_reason(name, relpath, reason)
            except FileExistsError:
                continue
            renameat2(self.state.staging_fd, stage.name, self.state.quarantine_fd, name, RENAME_NOREPLACE)
            break
        self._forget_stage_name(stage.name)
        os.close(stage.fd)
        self.stats.quarantined += 1
        if report:
            self.project_event(relpath, "warnings.log", "warning", "quarantined", reason=reason, quarantined=name)
            self.emit("quarantine", relpath, reason=reason, quarantined=name)
        return name

    def project_event(self, relpath: str, log_name: str, level: str, event: str, **fields) -> None:
        """Append one JSON line about `relpath` to `<project>/logs/<log_name>` when the path is
        in a project (a `project-*` directory) that has a logs directory. One write() with
        O_APPEND, so a pipeline appending to the same file through the mount never sees its
        lines cut."""
        project = layout.project_of(relpath)
        if project is None:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "level": level,
                  "source": "fusestore", "event": event, "path": relpath[len(project) + 1:], **fields}
        line = msgspec.json.encode(record) + b"\n"
        try:
            dfd = open_dir(self.root_fd, components(layout.logs_dir(project)))
        except OSError:
            return
        try:
            fd = os.open(log_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=dfd)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("could not append to %s/logs/%s: %s", project, log_name, e.strerror or e)
        finally:
            os.close(dfd)

    def quarantine_name(self, relpath: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        flat = relpath.replace("/", "%")[-150:] or "unknown"
        return f"{stamp}-{time.time_ns() % 1_000_000_000:09d}-{flat}"

    def _write_reason(self, name: str, relpath: str, reason: str) -> None:
        record = msgspec.json.encode({"path": relpath, "time": time.time(), "reason": reason})
        fd = os.open(name + ".reason", _STAGE_FLAGS & ~os.O_RDWR | os.O_WRONLY, 0o600, dir_fd=self.state.quarantine_fd)
        try:
            os.write(fd, record + b"\n")
        finally:
            os.close(fd)

    def _carry_metadata(self, current: os.stat_result, dir_fd: int, name: str | bytes, fd: int,
                        kill_setid: bool) -> None:
        mine = os.fstat(fd)
        mode = stat.S_IMODE(current.st_mode)
        if kill_setid:
            mode = _without_setid(mode)
        if os.geteuid() == 0 and (mine.st_uid, mine.st_gid) != (current.st_uid, current.st_gid):
            os.fchown(fd, current.st_uid, current.st_gid)
        if stat.S_IMODE(mine.st_mode) != mode or mode & 0o6000:
            os.fchmod(fd, mode)  # after chown, which clears set-id bits
        path = f"/proc/self/fd/{dir_fd}/{os.fsdecode(name)}"
        try:
            attrs = os.listxattr(path, follow_symlinks=False)
        except OSError:
            return
        for attr in attrs:
            try:
                os.setxattr(fd, attr, os.getxattr(path, attr, follow_symlinks=False))
            except OSError as e:
                log.warning("could not carry xattr %s of %s: %s", attr, os.fsdecode(name), e.strerror)

    # -- whole-file operations on the tree -------------------------------------------------

    def remove(self, dir_fd: int, name: str | bytes, relpath: str) -> bool:
        """Unlink `name`, durably: its content kept as a backup (made durable first, so a crash
        in between loses nothing), then the directory fsynced, so that a delete that returned
        stays done after a crash of the machine. Returns whether a backup was kept."""
        with self.locks.path(relpath):
            kept = self.keep_backup(dir_fd, name, relpath)
            os.unlink(name, dir_fd=dir_fd)
            os.fsync(dir_fd)
        return kept

    def keep_backup(self, dir_fd: int, name: str | bytes, relpath: str) -> bool:
        """Keep the current regular file `name` as a backup when its rule wants backups."""
        if not self.rule(relpath).backups:
            return False
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        self.backups.keep(dir_fd, name, relpath)
        self.stats.backups_kept += 1
        self.keep_backups_in_budget()
        return True

    def keep_backups_in_budget(self) -> int:
        """Drop the oldest generations while backups take more than `backups.max_bytes`."""
        if not self.backups.over_budget():
            return 0
        try:
            with self.locks.tree(locks.BACKUPS_TRIM, wait=False):
                dropped = self.backups.trim(self.exists)
        except locks.LockBusy:
            return 0  # another host trims
        if dropped:
            log.info("dropped %d old backup generation(s) to keep backups under %d bytes", dropped,
                     self.backups.budget)
        return dropped

    def exists(self, relpath: str) -> bool:
        """Whether `relpath` names something in the tree (walked without following links)."""
        parts = components(relpath)
        if not parts:
            return True
        try:
            dfd = open_dir(self.root_fd, parts[:-1])
        except OSError:
            return False
        try:
            os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            return True
        except OSError:
            return False
        finally:
            os.close(dfd)

    def check_content(self, relpath: str, fd: int, replacing: int | None) -> str | None:
        """Why the content of `fd` may not replace a file of `replacing` bytes (None: a new
        file) at `relpath`. An empty file is valid where it replaces nothing or nothing but
        emptiness (touch, placeholders, lock files); emptying a validated file is not."""
        return self._check_content(self.rule(relpath), fd, replacing)

    @staticmethod
    def _check_content(rule: config_mod.Rule, fd: int, replacing: int | None) -> str | None:
        if rule.validate == "none":
            return None
        size = os.fstat(fd).st_size
        if size == 0:
            if replacing:
                return f"empty content may not replace the {replacing} bytes of a validated file"
            return None
        return validate.check(rule.validate, fd, rule.schema, size)

    def check_fd(self, relpath: str, fd: int) -> str | None:
        """Why the content of `fd` may not stand at `relpath` (its rule's validation and
        schema), or None."""
        rule = self.rule(relpath)
        return validate.check(rule.validate, fd, rule.schema)

    def check_generation(self, relpath: str, number: int) -> str | None:
        """Why backup generation `number` of `relpath` may not stand there today, or None."""
        fd = self.backups.open_generation(relpath, number)
        try:
            return self.check_fd(relpath, fd)
        finally:
            os.close(fd)

    def check_file(self, dir_fd: int, name: str | bytes, relpath: str, replacing: int | None = None) -> str | None:
        """Why the committed file `name` may not stand at `relpath` in place of a file of
        `replacing` bytes, or None."""
        if self.rule(relpath).validate == "none":
            return None
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return self.check_content(relpath, fd, replacing)
        finally:
            os.close(fd)

    def open_parent_creating(self, relpath: str) -> tuple[int, str]:
        """A directory fd on the parent of `relpath` (made if missing) and the final name."""
        parts = components(relpath)
        if not parts:
            raise IsADirectoryError("the tree's root is not a file")
        return open_dir(self.root_fd, parts[:-1], create=True), parts[-1]

    # -- recovery --------------------------------------------------------------------------

    def leftover_stages(self) -> list[str]:
        """The paths whose staged data is waiting in `staging/` (meaningful when no daemon
        serves the tree: a live daemon's stages belong to open files)."""
        return sorted(self._parse_stage_name(n) for n in os.listdir(self.state.staging_fd)
                      if not n.endswith(_PATH_SUFFIX) and not n.startswith(_POOL_PREFIX))

    def recover(self) -> list[tuple[str, str | None]]:
        """Move staged files left by a crash to the quarantine. Returns (path, quarantine name)
        pairs. New files exist only as staged files until their first commit, so a crash never
        leaves a trace of them in the tree."""
        found = []
        for name in sorted(os.listdir(self.state.staging_fd)):
            if name.endswith(_PATH_SUFFIX):
                continue
            if name.startswith(_POOL_PREFIX):
                os.unlink(name, dir_fd=self.state.staging_fd)  # made ahead, never used
                continue
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.state.staging_fd)
            except OSError:
                continue
            relpath = self._parse_stage_name(name)
            quarantined = self.quarantine(Stage(fd, name, relpath), relpath,
                                          "left by a write that never committed (daemon stopped)")
            found.append((relpath, quarantined))
            if quarantined is None:
                log.warning("dropped the empty staged file of %s left by a write that never committed", relpath)
            else:
                log.warning("recovered staged data of %s into the quarantine as %s", relpath, quarantined)
        for name in os.listdir(self.state.staging_fd):  # .path files whose stage is gone
            if name.endswith(_PATH_SUFFIX):
                os.unlink(name, dir_fd=self.state.staging_fd)
        return found

    def _parse_stage_name(self, name: str) -> str:
        try:
            quoted = name.split(".", 1)[1]
            if quoted == "@":
                fd = os.open(name + _PATH_SUFFIX, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.state.staging_fd)
                with open(fd, "rb") as f:
                    return os.fsdecode(f.read())
            return urllib.parse.unquote(quoted, errors="surrogateescape")
        except (IndexError, OSError):
            return "unknown"

    def quarantine_entries(self) -> list[str]:
        return sorted(n for n in os.listdir(self.state.quarantine_fd) if not n.endswith(".reason"))

"""Serving one backing tree: checks, lock, recovery, mount, the request loop, and a clean exit.

Order, as S3QL does it: check everything that can be checked before mounting (and report it
through the ready pipe so `fusestore mount` can print the reason), take the tree's lock, recover
what a previous daemon left, mount, start the FUSE loop, the control socket and the signal
watcher in one nursery, signal readiness, and unmount in `finally` whatever happened.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time

import pyfuse3
import trio

from fusestore import control
from fusestore.engine import cache as cache_mod
from fusestore.engine import config as config_mod
from fusestore.engine import locks, maintenance, paths
from fusestore.engine import state as state_mod
from fusestore.engine.cache import Cache
from fusestore.engine.errors import FusestoreError
from fusestore.engine.paths import one_line
from fusestore.engine.state import Busy
from fusestore.engine.store import Store
from fusestore.events import Event, EventHub, Note
from fusestore.fs.operations import Filesystem, Options
from fusestore.trees import mount_device

log = logging.getLogger(__name__)


# The kernel's mount flags, passed to the kernel through libfuse as mount(8) would.
KERNEL_FLAGS = {"nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "nodiratime", "sync", "dirsync"}

# What other processes may report to the daemon's event stream (control "note").
NOTED_KINDS = ("restore", "cache-insert", "cache-evict")


class MountError(FusestoreError):
    """The mount cannot start; the message says why."""


KNOWN_OPTIONS = {"xattr", "show_virtual", "allow_other", "ro", "attr_timeout", "entry_timeout", "debug", "page_cache",
                 "passthrough", "notify_watchers", "host_id"}


def parse_options(values: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            if not item:
                continue
            key, _, arg = item.partition("=")
            if key not in KNOWN_OPTIONS and item not in KERNEL_FLAGS:
                raise MountError(f"unknown mount option {key!r} (known: {', '.join(sorted(KNOWN_OPTIONS))}, "
                                 f"and the mount flags {', '.join(sorted(KERNEL_FLAGS))})")
            options[key] = arg
    return options


def switch(opts: dict[str, str], name: str, default: bool) -> bool:
    """An on/off option: `name` or `name=on` turns it on, `name=off` off."""
    if name not in opts:
        return default
    value = opts[name].lower()
    if value in ("", "on", "yes", "1", "true"):
        return True
    if value in ("off", "no", "0", "false"):
        return False
    raise MountError(f"mount option {name} takes on or off, not {opts[name]!r}")


def preflight(backing: str, mountpoint: str) -> None:
    if not os.path.isdir(backing):
        raise MountError(f"backing directory {backing} does not exist or is not a directory")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} does not exist or is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is busy: something is already mounted there")
    if os.listdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not empty")
    real_b, real_m = os.path.realpath(backing), os.path.realpath(mountpoint)
    if real_m == real_b or real_m.startswith(real_b + "/") or real_b.startswith(real_m + "/"):
        raise MountError("the mountpoint and the backing directory must not contain each other")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module or install fuse3")
    if not (hasattr(pyfuse3.EntryAttributes, "attr_ino") and hasattr(pyfuse3, "backing_open")):
        raise MountError("this pyfuse3 lacks fusestore's patch (tools/pyfuse3.patch): "
                         "run tools/install, which builds it")


class _OneLineFormatter(logging.Formatter):
    """One event per line, whatever the names in it hold (see `one_line`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class DurableLogHandler(logging.FileHandler):
    """The daemon's log file, kept for reading after a crash: each line is written at once (a
    crash of the daemon loses none), and the file is fsynced within `SYNC_SECONDS` of a line
    (a crash of the machine loses at most that much) by a thread of its own, one fsync for all
    the lines of that time, never one per line; `sync()` makes it durable at once (after the
    lines that explain a crash: mount, recovery, stop)."""

    SYNC_SECONDS = 1.0

    def __init__(self, path: str):
        super().__init__(path)
        self._sync_fd = os.dup(self.stream.fileno())  # fsynced without the handler's lock
        self._dirty = threading.Event()
        self._closing = False
        threading.Thread(target=self._sync_soon, name="fusestore-log-sync", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self._dirty.set()

    def sync(self) -> None:
        self._dirty.clear()
        try:
            os.fsync(self._sync_fd)
        except OSError:
            pass  # a log that cannot be synced must not stop the daemon

    def _sync_soon(self) -> None:
        while not self._closing:
            self._dirty.wait()
            time.sleep(self.SYNC_SECONDS)  # the lines of that second: one fsync
            if not self._closing:
                self.sync()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.sync()
            self._dirty.set()
            os.close(self._sync_fd)
        super().close()


def sync_log() -> None:
    """Make every line logged so far durable (see DurableLogHandler)."""
    for handler in logging.getLogger("fusestore").handlers:
        if isinstance(handler, DurableLogHandler):
            handler.sync()


def setup_logging(store: Store, foreground: bool, debug: str | None) -> None:
    """Log to the state directory (and stderr in the foreground). Each module logs to its own
    logger under "fusestore" (`fusestore.fs.files`, `fusestore.engine.store`, ...): `debug`
    turns on debug logging for those named (a colon-separated list, `fs` for the whole layer),
    or for all when empty."""
    root = logging.getLogger("fusestore")
    root.setLevel(logging.INFO)
    if debug is not None:
        for name in debug.split(":") if debug else [""]:
            logging.getLogger(f"fusestore.{name}".rstrip(".")).setLevel(logging.DEBUG)
    fmt = _OneLineFormatter("%(asctime)s %(levelname)s %(message)s")
    handler = DurableLogHandler(store.state.log_path)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if foreground:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(fmt)
        root.addHandler(err)


class Daemon:
    def __init__(self, store: Store, fs: Filesystem, mountpoint: str, recovered: int, notify_watchers: bool):
        self.store = store
        self.fs = fs
        self.mountpoint = mountpoint
        self.recovered = recovered
        self.notify_watchers = notify_watchers
        self.events = EventHub(store.config.mount.events_kept)
        store.emit = fs.cache_view.cache.emit = self.events.emit
        self.started = time.time()
        self.stopping = False
        self.check_report: maintenance.Report | None = None

    def status(self) -> control.Status:
        stats = self.store.stats
        files, gens, size = self.store.backups.figures()
        return control.Status(
            backing=self.store.backing, mountpoint=self.mountpoint, pid=os.getpid(), started=self.started,
            uptime_seconds=time.time() - self.started, open_staged_files=self.fs.files.open_versions(),
            open_handles=len(self.fs.handles), known_inodes=len(self.fs.inodes.by_ino),
            commits=stats.commits, rejections=stats.rejections, quarantined=stats.quarantined,
            quarantine_entries=len(self.store.quarantine_entries()), backups_kept=stats.backups_kept,
            backup_files=files, backup_generations=gens, backup_bytes=size,
            recovered_at_mount=self.recovered, recent_rejections=list(stats.recent_rejections),
            cache=self.fs.cache_view.cache.stats(),
            check=self.check_report,
            read_path=self.fs.files.read_path(),
            host=self.store.state.host,
            hosts=state_mod.hosts(self.store.state.fd),
        )

    async def stop(self) -> int:
        """Commit or quarantine what is open, then end the FUSE loop (the mount goes in finally)."""
        if self.stopping:
            return 0
        self.stopping = True
        notify_systemd("STOPPING=1")
        count = await self.fs.files.commit_all()
        self.fs.files.notifier.stop()
        log.info("unmounting %s (%d staged file(s) committed or quarantined)", self.mountpoint, count)
        pyfuse3.terminate()
        return count

    async def serve_control(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        path = self.store.state.socket_path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        async with listener:
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._answer, stream)

    async def _answer(self, stream: trio.SocketStream) -> None:
        """One request on the control socket. Nothing a client does (hang up, send garbage)
        may reach the nursery: that would end the daemon."""
        try:
            await self._serve_request(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("control client went away: %s", e)
        except Exception:
            log.exception("control request failed")

    async def _serve_request(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            with trio.move_on_after(10):
                while not data.endswith(b"\n"):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
            try:
                request = control.decode_request(data)
            except Exception as e:  # noqa: BLE001 - a bad request gets an answer, not a crash
                await stream.send_all(control.encode(control.Reply(ok=False, error=f"bad request: {e}")))
                return
            if request.cmd == "status":
                status = await trio.to_thread.run_sync(self.status)
                await stream.send_all(control.encode(control.Reply(ok=True, status=status)))
            elif request.cmd == "events":
                await self._send_events(stream, request)
            elif request.cmd == "note":
                error = self._note(request.note)
                await stream.send_all(control.encode(control.Reply(ok=error is None, error=error)))
            else:
                count = await self.stop()
                await stream.send_all(control.encode(control.Reply(ok=True, committed_at_unmount=count)))

    def _note(self, note: Note | None) -> str | None:
        if note is None or note.kind not in NOTED_KINDS:
            return f"a note is one of {', '.join(NOTED_KINDS)}"
        fields = {f: getattr(note, f) for f in ("size", "generation", "reason") if getattr(note, f) is not None}
        self.events.emit(note.kind, note.path, **fields)
        return None

    async def _send_events(self, stream: trio.SocketStream, request: control.Request) -> None:
        """Stream events to one follower from its own position in the ring; one that falls a
        whole ring behind gets a `dropped` marker and is disconnected (fusestore.events)."""
        hub = self.events
        if request.after is not None:
            seq = request.after
        elif request.since is not None:
            seq = hub.since(request.since)
        else:
            seq = hub.last_seq
        hub.followers += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_hangup, stream, nursery.cancel_scope)
                await self._stream_events(stream, request.follow, seq)
                nursery.cancel_scope.cancel()
        finally:
            hub.followers -= 1

    @staticmethod
    async def _until_hangup(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        """A follower that hangs up while no event comes is let go at once, not at the next event."""
        while await stream.receive_some(4096):
            pass
        scope.cancel()

    async def _stream_events(self, stream: trio.SocketStream, follow: bool, seq: int) -> None:
        hub = self.events
        while True:
            events, lost = hub.after(seq)
            if lost:
                marker = Event(seq + lost, time.time(), "dropped", "",
                               reason=f"{lost} event(s) missed: this follower read too slowly")
                await stream.send_all(control.encode(marker))
                return
            if events:
                await stream.send_all(b"".join(control.encode(e) for e in events))
                seq = events[-1].seq
            elif not follow:
                return
            else:
                await hub.wait_after(seq)

    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received signal %d", signum)
                await self.stop()

    async def run(self, ready) -> None:
        self.events.attach()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serve_control)
            nursery.start_soon(self.watch_signals)

            async def fuse_loop():
                try:
                    await pyfuse3.main(min_tasks=2, max_tasks=64)
                finally:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(fuse_loop)
            nursery.start_soon(self.fs.files.notifier.run)
            ready()
            nursery.start_soon(self.background_check)

    async def background_check(self) -> None:
        """The integrity check of `fusestore check`, once, after the mount is up: its findings go
        to the log and to status. It never stops the mount."""
        try:
            device = await self.fs.workers.run(_widen_readahead, self.mountpoint)
            # The mount answers (the readahead step stats it through the daemon).
            notify_systemd(f"READY=1\nSTATUS=serving {self.store.backing} on {self.mountpoint}\nMAINPID={os.getpid()}")
            if self.notify_watchers and device is not None:
                self.fs.files.notifier.start(self.mountpoint, device)
            report = await self.fs.workers.run(maintenance.check, self.store, True)
            # Count what backups take now, so that the first commit need not (their budget).
            await self.fs.workers.run(self.store.backups.usage)
        except Exception:  # noqa: BLE001 - a failed check must not end the daemon
            log.exception("the background check failed")
            return
        self.check_report = report
        for f in report.findings:
            level = logging.WARNING if f.kind in maintenance.NEEDS_REPAIR else logging.INFO
            log.log(level, "check: %s %s: %s", f.kind, f.path, f.detail)
        log.info("check: %d document(s) in %d project(s), %d problem(s) to repair", report.checked_files,
                 report.projects, len(report.unrepaired))


# Direct files and readers of committed files go through the page cache, which the kernel fills
# by readahead: at its default of 128 KiB a cold sequential read through the mount ran at 0.55x
# of the backing disk, at 1 MiB (the largest request) at 0.82x. Root only (sysfs), and only once
# the kernel has our INIT reply, which caps it at 128 KiB.
READAHEAD_KB = 1024


def _widen_readahead(mountpoint: str) -> int | None:
    """Blocking: call from a worker thread while the mount is served. Returns the mount's
    device number."""
    os.stat(mountpoint)  # answered by the daemon, so INIT is through
    device = mount_device(mountpoint)
    if device is None:
        return None
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as e:
        log.debug("readahead left at the kernel's default (%s: %s)", path, e.strerror)
    return device


def serve(backing: str, mountpoint: str, options: list[str], config_path: str | None,
          foreground: bool, ready_fd: int | None) -> int:
    """Mount and serve until unmounted. Reports readiness or the reason for failure on ready_fd."""

    def report(message: str) -> None:
        if ready_fd is None:
            # In the foreground by hand: the caller reads stderr.
            if message != "ok":
                print(f"fusestore mount: {message.removeprefix('error: ')}", file=sys.stderr)
            return
        try:
            os.write(ready_fd, message.encode() + b"\n")
            os.close(ready_fd)
        except OSError:
            pass

    try:
        opts = parse_options(options)
        backing = os.path.abspath(backing)
        mountpoint = os.path.abspath(mountpoint)
        preflight(backing, mountpoint)
        config = config_mod.load(backing, config_path)
        mount_cfg = config.mount
        attr_timeout = float(opts.get("attr_timeout") or mount_cfg.attr_timeout)
        entry_timeout = float(opts.get("entry_timeout") or mount_cfg.entry_timeout)
        page_cache = switch(opts, "page_cache", mount_cfg.page_cache)
        passthrough = switch(opts, "passthrough", mount_cfg.passthrough)
        notify_watchers = switch(opts, "notify_watchers", mount_cfg.notify_watchers) and "ro" not in opts
        store = Store(backing, config, opts.get("host_id") or None)
    except (FusestoreError, ValueError) as e:
        report(f"error: {e}")
        return 1
    except OSError as e:
        report(f"error: {e.strerror or e}: {e.filename or backing}")
        return 1
    try:
        store.state.lock()
        shared_with = _check_locks(store)
    except (Busy, MountError) as e:
        store.close()
        report(f"error: {e}")
        return 1
    except OSError as e:  # a read-only tree, a state directory we may not write
        store.close()
        report(f"error: {e.strerror or e}: {os.path.join(store.state.path, 'lock')}")
        return 1
    setup_logging(store, foreground, opts.get("debug"))
    # Modes arrive from the kernel with the caller's umask applied; ours must not mask again.
    os.umask(0)
    _raise_fd_limit()
    recovered = store.recover()
    if shared_with:
        log.info("serving the tree as host %s beside host(s) %s", store.state.host, ", ".join(shared_with))
        store.backups.recount_seconds = BACKUPS_RECOUNT_SECONDS
    try:
        cache = Cache(cache_mod.directory(backing, config.cache), config.cache, verify=True, host=store.state.host)
    except (OSError, sqlite3.Error, cache_mod.CacheError) as e:
        where = cache_mod.directory(backing, config.cache)
        report(f"error: cannot open the cache {where}: {getattr(e, 'strerror', None) or e}")
        store.close()
        return 1
    fs = Filesystem(store, Options(xattr="xattr" in opts, show_virtual="show_virtual" in opts, page_cache=page_cache,
                                   passthrough=passthrough, attr_timeout=attr_timeout, entry_timeout=entry_timeout),
                    cache)
    fuse_options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    fuse_options |= {f"fsname={backing}", "subtype=fusestore"}
    if "allow_other" in opts:
        fuse_options.add("allow_other")
    elif os.geteuid() == 0:
        # Only root can reach a mount root made without allow_other, and root passes every
        # mode check but execute's, which the kernel makes anyway (and `access` below). The
        # checks would cost a GETATTR of the directory before each create in it.
        fuse_options.discard("default_permissions")
    if "ro" in opts:
        fuse_options.add("ro")
    fuse_options |= KERNEL_FLAGS.intersection(opts)
    try:
        pyfuse3.init(fs, mountpoint, fuse_options)
    except RuntimeError as e:
        report(f"error: cannot mount on {mountpoint}: {e}")
        cache.close()
        store.close()
        return 1
    device = mount_device(mountpoint)
    if device is not None:
        store.state.announce(device)  # how `fusestore status MOUNT` finds this daemon's socket
    daemon = Daemon(store, fs, mountpoint, len(recovered), notify_watchers)
    log.info("serving %s on %s (pid %d, %d staged file(s) recovered)", backing, mountpoint, os.getpid(), len(recovered))
    sync_log()  # what a crash of the machine must not take: the mount and what it recovered
    clean = False
    try:
        trio.run(daemon.run, lambda: report("ok"))
        clean = True
    except BaseException:
        log.exception("the daemon stopped on an error")
        raise
    finally:
        fs.files.notifier.stop()
        pyfuse3.close(unmount=True)
        try:
            os.unlink(store.state.socket_path)
        except OSError:
            pass
        cache.close()
        store.close()
        log.info("stopped%s", "" if clean else " after an error")
        sync_log()
    return 0


# With other hosts serving the tree, the bytes the backups take (their budget) are counted again
# by a walk this often: the other hosts' generations come and go unseen.
BACKUPS_RECOUNT_SECONDS = 60.0


def _check_locks(store: Store) -> list[str]:
    """The other hosts that have served the tree. Serving it beside them needs byte-range locks
    that hold across hosts (engine.locks): where the filesystem refuses them, only one host may
    ever serve the tree, and a second is refused, naming the filesystem."""
    others = state_mod.other_hosts(store.backing, store.state.host)
    try:
        store.locks.probe()
    except locks.LocksUnsupported as e:
        fstype = paths.filesystem_type(store.backing)
        if others:
            raise MountError(
                f"{store.backing} is on a {fstype} filesystem without byte-range locks ({e.strerror}), which hosts "
                f"serving one tree need; it is served as host(s) {', '.join(others)} (if one is gone for good: "
                f"fusestore check --repair --host ID)") from None
        log.warning("%s is on a %s filesystem without byte-range locks (%s): one host only may serve it",
                    store.backing, fstype, e.strerror)
        store.locks.disable()
    return others


def notify_systemd(message: str) -> None:
    """sd_notify(3): tell the service manager that started us (NOTIFY_SOCKET, a Type=notify
    unit) how we are; nothing without one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("could not notify the service manager at %s: %s", os.environ["NOTIFY_SOCKET"], e)


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            if getattr(e, "errno", None) != errno.EPERM:
                log.warning("could not raise the open file limit: %s", e)

"""Telling inotify watchers about commits.

The kernel raises inotify events for what programs do through the mount: IN_MODIFY at each
write, IN_CLOSE_WRITE at close. A commit is neither: the new content replaces the old inside
the daemon, so a watcher (Node's `fs.watch`, Python's watchdog, `inotifywait -e modify`) that
reacted to the write read the old content and heard nothing more. No FUSE notification raises
an inotify event, so after each commit a small process of the daemon's, the notifier,
truncates the file through the mount to the size it has: the kernel raises IN_MODIFY for it,
and the daemon recognises the request by the notifier's pid and changes nothing
(`Filesystem.setattr`).

A process, not a thread: a thread of the daemon waiting in the kernel for its own mount would
keep a SIGKILLed daemon from ever exiting (the kernel ends the mount's requests only when the
daemon's last thread has let go of /dev/fuse, and a path lookup waits, unkillably, for a
directory lock that a request to the dead daemon holds). The notifier holds no /dev/fuse, so
when the daemon dies the mount is aborted, its request fails, and it exits at the end of its
input. The daemon writes each committed path to it without ever waiting (what a full pipe
cannot take waits in a backlog), and several commits of one file while it is busy become one
event, as inotify itself merges repeated events. It holds the mount open only while it truncates (an
open descriptor would make `umount` fail with EBUSY), and checks that the mountpoint it opened
is the mount, so that nothing mounted there later, or the directory under it once the mount is
gone, is ever truncated.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

import trio

log = logging.getLogger(__name__)


class CommitNotifier:
    """The daemon's side: one notifier process, fed through a non-blocking pipe by the trio
    thread (a record is a few dozen bytes; the pipe holds thousands); what the pipe cannot
    take at once is sent by `run` when it can."""

    # Past this many bytes waiting for the notifier, new events are dropped (it is stuck).
    MAX_WAITING = 1 << 20

    def __init__(self):
        self._mountpoint: str | None = None
        self._device = 0
        self._process: subprocess.Popen | None = None
        self._pipe: int | None = None
        self._out = bytearray()  # records not yet taken by the pipe
        self._wake = trio.Event()
        self.pid: int | None = None  # the notifier process, whose requests change nothing

    def start(self, mountpoint: str, device: int) -> None:
        """Start once the mount answers; `device`: the mount's device number."""
        self._mountpoint, self._device = mountpoint, device
        self._spawn()

    def _spawn(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "fusestore.fs.watchers", self._mountpoint, str(self._device)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        self._pipe = self._process.stdin.fileno()
        os.set_blocking(self._pipe, False)
        self.pid = self._process.pid

    def committed(self, relpath: str, size: int) -> None:
        """On the trio thread, after each commit: never waits."""
        if self._pipe is None or len(self._out) > self.MAX_WAITING:
            return
        self._out += b"%d\0%s\0" % (size, os.fsencode(relpath))
        self._send()

    def _send(self) -> None:
        try:
            del self._out[: os.write(self._pipe, self._out)]
        except BlockingIOError:
            pass
        except OSError as e:
            log.warning("the commit notifier is gone (%s); starting another", e.strerror)
            self.stop()
            self._out.clear()
            self._spawn()
        if self._out:
            self._wake.set()

    async def run(self) -> None:
        """Send what the pipe could not take at once (a task of the daemon's nursery)."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._out and self._pipe is not None:
                await trio.lowlevel.wait_writable(self._pipe)
                self._send()

    def stop(self) -> None:
        """End the notifier (events not yet given are dropped: the mount is going)."""
        if self._process is None:
            return
        if self._pipe is not None:
            try:
                trio.lowlevel.notify_closing(self._pipe)
            except RuntimeError:
                pass  # outside trio: nobody waits on it
            self._pipe = None
        # Killed, not waited for: it may be waiting for an answer from this very thread (it is
        # reaped when it has its answer, or when the mount goes).
        self._process.kill()
        self._process.stdin.close()
        self._process.poll()
        self._process = None


def _touch(mountpoint: str, device: int, relpath: bytes, size: int) -> None:
    root = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.fstat(root).st_dev != device:
            raise OSError(errno.ENOTCONN, "the mount is gone")
        os.truncate(b"/proc/self/fd/%d/%s" % (root, relpath), size)
    finally:
        os.close(root)


def main(argv: list[str]) -> int:
    """The notifier process: NUL-separated (size, path) records on stdin until it closes."""
    mountpoint, device = argv[0], int(argv[1])
    buffered = b""
    while chunk := os.read(0, 1 << 16):
        fields = (buffered + chunk).split(b"\0")
        buffered = fields.pop()  # an incomplete field: wait for the rest
        if len(fields) % 2:
            buffered = fields.pop() + b"\0" + buffered
        latest = {fields[i + 1]: int(fields[i]) for i in range(0, len(fields), 2)}
        for relpath, size in latest.items():
            try:
                _touch(mountpoint, device, relpath, size)
            except OSError:
                pass  # removed or renamed since, the mount gone: no event to give
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Processes, as /proc tells of them."""

from __future__ import annotations


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None when it does not run. A zombie
    waiting for its parent to reap it counts as gone. With the pid, it names a process uniquely
    even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] == b"Z":
        return None
    return int(fields[19])

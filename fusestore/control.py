"""The daemon's control socket, `state/control.sock`: status and unmount requests from the CLI.

One JSON request line, one JSON reply line, both msgspec Structs. The socket is reached through
`/proc/self/fd/<state dir fd>/control.sock`, so a long BACKING path never exceeds sun_path, and it
lives in the state directory (mode 0700), so only the tree's owner can talk to the daemon.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

import msgspec

from fusestore.engine.cache import CacheStats
from fusestore.engine.maintenance import Report
from fusestore.engine.store import Rejection


class Request(msgspec.Struct, frozen=True):
    cmd: Literal["status", "unmount"]


class Status(msgspec.Struct):
    backing: str
    mountpoint: str
    pid: int
    started: float
    uptime_seconds: float
    open_staged_files: int
    open_handles: int
    known_inodes: int
    commits: int
    rejections: int
    quarantined: int
    quarantine_entries: int
    backups_kept: int
    backup_files: int
    backup_generations: int
    backup_bytes: int
    recovered_at_mount: int
    recent_rejections: list[Rejection]
    cache: CacheStats | None = None
    check: Report | None = None  # the background check at mount; None while it runs
    read_path: str = ""  # how reads of committed files are served (Files.read_path)


class Reply(msgspec.Struct):
    ok: bool
    error: str | None = None
    status: Status | None = None
    committed_at_unmount: int = 0


_request_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)


def decode_request(line: bytes) -> Request:
    return _request_decoder.decode(line)


def encode(msg: msgspec.Struct) -> bytes:
    return msgspec.json.encode(msg) + b"\n"


def ask(state_path: str, cmd: str, timeout: float = 60.0) -> Reply:
    """Send one request to the daemon serving the tree whose state directory is `state_path`."""
    dfd = os.open(state_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(f"/proc/self/fd/{dfd}/control.sock")
            sock.sendall(encode(Request(cmd)))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(dfd)
    if not data:
        raise ConnectionError("the daemon closed the connection without answering")
    return _reply_decoder.decode(data)

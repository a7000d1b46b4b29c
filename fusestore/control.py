"""The daemon's control socket, `state/hosts/<host id>/control.sock`: status, unmount and event requests from the
CLI and the API.

One JSON request line, one JSON reply line (a line per event for `events`), msgspec Structs.
The socket is reached through `/proc/self/fd/<state dir fd>/control.sock`, so a long BACKING
path never exceeds sun_path, and it lives in the state directory (mode 0700), so only the
tree's owner can talk to the daemon.
"""

from __future__ import annotations

import os
import socket
from typing import Iterator, Literal

import msgspec

from fusestore.engine.cache import CacheStats
from fusestore.engine.maintenance import Report
from fusestore.engine.state import HOSTS_NAME, STATE_NAME, Host, default_host_id
from fusestore.engine.store import Rejection
from fusestore.events import Event, Note


class Request(msgspec.Struct, frozen=True, omit_defaults=True):
    """`events`: the daemon answers with one JSON line per event (`fusestore.events.Event`),
    those numbered above `after` (or since the time `since`; without either, from now on),
    and keeps the connection open for new ones when `follow`. `note`: an event another process
    made (a restore through the mount, a cache insert through the API)."""

    cmd: Literal["status", "unmount", "events", "note"]
    after: int | None = None
    since: float | None = None
    follow: bool = True
    note: Note | None = None


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
    host: str = ""  # the host id this daemon serves the tree as
    hosts: list[Host] = []  # every host of the tree (state.hosts), this one included


class Reply(msgspec.Struct):
    ok: bool
    error: str | None = None
    status: Status | None = None
    committed_at_unmount: int = 0


_request_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)
_event_decoder = msgspec.json.Decoder(Event)


def decode_request(line: bytes) -> Request:
    return _request_decoder.decode(line)


def encode(msg: msgspec.Struct) -> bytes:
    return msgspec.json.encode(msg) + b"\n"


def daemon_dir(backing: str, device: int | None = None) -> str:
    """The host directory (`state/hosts/<id>`) of the daemon this process should talk to about
    `backing`: the one serving the mount of device number `device`, when given and found;
    else this host's (FUSESTORE_HOST_ID or the hostname); else one of another host id on this
    machine (a daemon mounted with `-o host_id`)."""
    hosts_path = os.path.join(backing, STATE_NAME, HOSTS_NAME)
    own = os.path.join(hosts_path, default_host_id())
    try:
        names = sorted(os.listdir(hosts_path))
    except OSError:
        return own
    machine = socket.gethostname()
    here = []
    for name in names:
        try:
            with open(os.path.join(hosts_path, name, "lock"), "rb") as f:
                words = f.read(200).decode(errors="replace").split()
        except OSError:
            continue
        if device is not None and words[2:3] == [str(device)]:
            return os.path.join(hosts_path, name)
        if words[1:2] == [machine]:
            here.append(name)
    if os.path.exists(os.path.join(own, "control.sock")) or not here:
        return own
    return os.path.join(hosts_path, here[0])


def host_of(backing: str, device: int | None = None) -> str:
    """The host id this process acts as on `backing`: the one of the daemon it would talk to
    (`daemon_dir`), so that a command beside a mount made with `-o host_id` makes no host
    directory of its own."""
    return os.path.basename(daemon_dir(backing, device))


def _connect(state_path: str, timeout: float | None) -> socket.socket:
    dfd = os.open(state_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(f"/proc/self/fd/{dfd}/control.sock")
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(dfd)


def ask(state_path: str, cmd: str | Request, timeout: float = 60.0) -> Reply:
    """Send one request to the daemon whose host directory is `state_path` (`daemon_dir`)."""
    with _connect(state_path, timeout) as sock:
        sock.sendall(encode(cmd if isinstance(cmd, Request) else Request(cmd)))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ConnectionError("the daemon closed the connection without answering")
    return _reply_decoder.decode(data)


def events(state_path: str, after: int | None = None, since: float | None = None,
           follow: bool = True) -> Iterator[Event]:
    """The daemon's events (see `Request`), as they come."""
    with _connect(state_path, 10) as sock:
        sock.sendall(encode(Request("events", after=after, since=since, follow=follow)))
        sock.settimeout(None)
        with sock.makefile("rb") as lines:
            for line in lines:
                yield _event_decoder.decode(line)


def note(state_path: str, kind: str, path: str, **fields) -> None:
    """Tell the daemon serving the tree, if one does, of an event this process made; quietly
    nothing when none answers."""
    try:
        ask(state_path, Request("note", note=Note(kind, path, **fields)), timeout=2)
    except (OSError, ConnectionError, msgspec.DecodeError):
        pass

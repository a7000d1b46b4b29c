"""Fixtures: a real fusestore mount over a temporary backing tree, served by a daemon in its own
process (so a crash cannot hang pytest) and always unmounted in teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusestore.engine.procs import start_time
from fusestore.engine.state import default_host_id

FUSESTORE = [sys.executable, "-m", "fusestore"]


def pytest_collection_modifyitems(config, items):
    """FUSESTORE_TIMEOUT_SCALE multiplies every test's timeout: tools/vm-test sets it when the
    guest runs under software emulation, which is many times slower than the machine."""
    scale = float(os.environ.get("FUSESTORE_TIMEOUT_SCALE", "1"))
    if scale == 1:
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        seconds = float(marker.args[0] if marker and marker.args else config.getini("timeout") or 0)
        if seconds > 0:
            item.add_marker(pytest.mark.timeout(seconds * scale), append=False)


def fusestore(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([*FUSESTORE, *args], capture_output=True, text=True, timeout=60, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"fusestore {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def host_dir(backing: Path, host_id: str | None = None) -> Path:
    """The state a host keeps of its own in a tree (`.fusestore/hosts/<id>`)."""
    return Path(backing) / ".fusestore" / "hosts" / (host_id or default_host_id())


def daemon_pid(backing: Path, host_id: str | None = None) -> int:
    """The pid the daemon serving `backing` as `host_id` wrote into its lock."""
    return int((host_dir(backing, host_id) / "lock").read_text().split()[0])


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def force_unmount(path: Path) -> None:
    for flags in ("-u", "-uz"):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", flags, str(path)], capture_output=True, timeout=30)
        time.sleep(0.05)


class Mount:
    def __init__(self, backing: Path, mnt: Path, options: list[str] | None = None):
        self.backing = backing
        self.mnt = mnt
        self.options = options or []
        self.pid: int | None = None

    @property
    def state(self) -> Path:
        return self.backing / ".fusestore"

    @property
    def host(self) -> Path:
        """This host's own state: staging, quarantine, lock, log (the shared rest is `state`)."""
        return host_dir(self.backing, self.host_id)

    @property
    def host_id(self) -> str:
        ids = [o.partition("=")[2] for o in self.options if o.startswith("host_id=")]
        return ids[-1] if ids else default_host_id()

    @property
    def quarantine(self) -> list[Path]:
        return sorted(p for p in (self.host / "quarantine").iterdir() if not p.name.endswith(".reason"))

    def start(self) -> None:
        args = ["mount", str(self.backing), str(self.mnt)]
        for opt in self.options:
            args += ["-o", opt]
        fusestore(*args)
        self.pid = daemon_pid(self.backing, self.host_id)

    def stop(self) -> None:
        if is_mounted(self.mnt):
            fusestore("unmount", str(self.mnt), check=False)
        self.kill_leftovers()

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would, and clear the dead mount."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_pid_gone(self.pid)
        force_unmount(self.mnt)

    def kill_leftovers(self) -> None:
        if self.pid and start_time(self.pid) is not None:
            os.kill(self.pid, signal.SIGKILL)
            _wait_pid_gone(self.pid)
        force_unmount(self.mnt)

    def status(self) -> dict:
        return json.loads(fusestore("status", str(self.mnt), "--json").stdout)

    def __truediv__(self, rel: str) -> Path:
        return self.mnt / rel


def _wait_pid_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while start_time(pid) is not None and time.monotonic() < deadline:
        try:
            # Reap it if it is our child; otherwise just wait for /proc to let go.
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    # pytest's tmp_path is private to root; tests that act as another user need to traverse it.
    for d in (tmp_path, *tmp_path.parents):
        if d == Path("/tmp") or d == Path("/"):
            break
        os.chmod(d, os.stat(d).st_mode | 0o711)
    backing = tmp_path / "backing"
    mnt = tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    return backing, mnt


@pytest.fixture
def make_mount(tree):
    mounts: list[Mount] = []

    def make(options: list[str] | None = None, start: bool = True) -> Mount:
        m = Mount(tree[0], tree[1], options)
        mounts.append(m)
        if start:
            m.start()
        return m

    yield make
    for m in mounts:
        try:
            m.stop()
        finally:
            m.kill_leftovers()


@pytest.fixture
def mount(make_mount) -> Mount:
    return make_mount()


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """A plain directory beside the mount: the oracle its behaviour is compared with."""
    d = tmp_path / "plain"
    d.mkdir()
    return d


def errno_of(fn, *args) -> int | None:
    """The errno `fn(*args)` failed with, or None when it succeeded."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def wait_for(predicate, timeout: float = 5.0) -> bool:
    """Poll `predicate` until it holds; for effects the kernel delivers after a syscall returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Output:
    """A child's stdout (a binary pipe) read straight from the fd, so that lines taken with
    `readline()` and the rest taken by `rest()` (communicate, which reads the fd itself) add up to
    everything it printed: a buffered readline keeps read-ahead bytes communicate() never sees."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.buf = proc, b""

    def readline(self) -> str:
        while b"\n" not in self.buf:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                break
            self.buf += chunk
        line, sep, self.buf = self.buf.partition(b"\n")
        return (line + sep).decode()

    def rest(self, timeout: float) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        rest, self.buf = self.buf + (out or b""), b""
        return rest.decode()


def report(capsys, line: str) -> None:
    """Print a suite's figures past pytest's capture (tools/torture and CI show them)."""
    with capsys.disabled():
        print(f"\n{line}")


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def close_error(path: Path, data: bytes, mode: str = "wb") -> OSError | None:
    """Write `data` to `path` and return the error close() raised, if any."""
    f = open(path, mode)
    f.write(data)
    try:
        f.close()
    except OSError as e:
        return e
    return None

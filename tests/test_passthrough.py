"""FUSE passthrough: read-only opens of committed files nobody writes are served by the kernel
from the backing file, where the kernel (6.9+), the libfuse pyfuse3 links (3.17+, built by
tools/install) and root's privileges allow it; everywhere else the page cache, as before."""

from __future__ import annotations

import errno
import mmap
import os
import platform
import signal
import subprocess
import sys
import time

import pyfuse3
import pytest

from conftest import errno_of


def _kernel_has_passthrough() -> bool:
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (6, 9)


needs_passthrough = pytest.mark.skipif(
    not (pyfuse3.passthrough_supported and _kernel_has_passthrough() and os.geteuid() == 0),
    reason="FUSE passthrough needs Linux 6.9+, pyfuse3 built against libfuse 3.17+ (tools/install) and root")

_READER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
sys.stdin.readline()
data = b""
while chunk := os.read(fd, 1 << 20):
    data += chunk
print(len(data), time.monotonic(), flush=True)
"""


@needs_passthrough
def test_reads_reach_the_backing_file_without_the_daemon(mount):
    assert mount.status()["read_path"].startswith("kernel passthrough")
    data = os.urandom(4 << 20)
    (mount / "media.bin").write_bytes(data)
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(mount / "media.bin")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "open\n"
        with open(mount / "media.bin", "rb") as f, mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            os.kill(mount.pid, signal.SIGSTOP)  # no request can be answered from here on
            try:
                stopped = time.monotonic()
                reader.stdin.write("go\n")
                reader.stdin.flush()
                assert m[-4096:] == data[-4096:]  # a shared map of the file, read meanwhile
                time.sleep(0.5)
            finally:
                resumed = time.monotonic()
                os.kill(mount.pid, signal.SIGCONT)
        size, when = reader.stdout.readline().split()
        assert int(size) == len(data)
        assert stopped < float(when) < resumed, "the read waited for the stopped daemon"
    finally:
        reader.kill()
        reader.wait()


@needs_passthrough
def test_readers_keep_their_version_while_the_name_gets_others(mount, plain):
    # The oracle: a plain directory where each version replaces the last by rename.
    for root in (mount.mnt, plain):
        (root / "t.json").write_text('{"v": 1}')
    old = open(mount / "t.json", "rb")
    old_plain = open(plain / "t.json", "rb")
    try:
        (mount / "t.json").write_text('{"v": 2}')  # a writer while a passthrough reader holds v1
        tmp = plain / ".t.tmp"
        tmp.write_text('{"v": 2}')
        os.rename(tmp, plain / "t.json")
        for root in (mount.mnt, plain):
            assert (root / "t.json").read_text() == '{"v": 2}'
        assert old.read() == old_plain.read() == b'{"v": 1}'
        # Changed behind the mount while a reader holds the name's node: the next open reads
        # what the name has now (the node's readers are left their version).
        held = open(mount / "t.json", "rb")
        try:
            (mount.backing / ".t.new").write_text('{"v": 3}')
            os.rename(mount.backing / ".t.new", mount.backing / "t.json")
            assert (mount / "t.json").read_text() == '{"v": 3}'
            assert held.read() == b'{"v": 2}'
        finally:
            held.close()
    finally:
        old.close()
        old_plain.close()


@needs_passthrough
def test_every_kind_of_open_works_while_passthrough_readers_hold_the_file(mount):
    # The kernel takes no open of an inode other than one through the same backing file while
    # passthrough readers hold it (it would fail with EIO): each must still work.
    (mount / "a.txt").write_text("first")
    with open(mount / "a.txt", "rb") as r:
        with open(mount / "a.txt", "r+b") as w:  # read-write, no truncation
            w.write(b"FIRST")
        with open(mount / "a.txt", "ab") as w:
            w.write(b"!")
        os.truncate(mount / "a.txt", 3)
        assert (mount / "a.txt").read_bytes() == b"FIR"
        os.rename(mount / "a.txt", mount / "a.db")  # onto a direct file's name, read in place
        with open(mount / "a.db", "r+b") as w:
            w.write(b"D")
        assert (mount / "a.db").read_bytes() == b"DIR"
        assert r.read() == b"first"
    assert errno_of(os.stat, mount / "a.txt") == errno.ENOENT


@pytest.mark.parametrize("how", ["option", "config"])
def test_passthrough_off_reads_through_the_page_cache(make_mount, tree, how):
    if how == "config":
        (tree[0] / "fusestore.toml").write_text("[mount]\npassthrough = false\n")
    mount = make_mount(["passthrough=off"] if how == "option" else [])
    assert mount.status()["read_path"] == (
        "the kernel's page cache, filled by the daemon (no passthrough: passthrough=off)")
    (mount / "c.bin").write_bytes(b"C" * 100)
    with open(mount / "c.bin", "rb") as f, mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        assert m[:] == b"C" * 100


_DATABASE = """
import mmap, os, sys, time
fd, reader = os.open(sys.argv[1], os.O_RDWR), os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
print("open", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"page one", 0)
m[4096:4104] = b"page two"
os.pwrite(fd, b"tail", 8192)  # grows the file
seen = os.pread(reader, 8, 4096) + os.pread(reader, 8, 0)
print(seen.hex(), time.monotonic(), flush=True)
sys.stdin.readline()
m.close()
os.fsync(fd)
print("synced", flush=True)
"""


@needs_passthrough
def test_direct_files_are_read_written_and_mapped_without_the_daemon(mount, plain):
    # A database is written in place: all its handles share the backing file itself, so
    # reads, writes and shared maps need no request; fsync still reaches the daemon.
    outcome = {}
    for root in (plain, mount.mnt):
        (root / "app.db").write_bytes(b"\0" * 8192)
        child = subprocess.Popen([sys.executable, "-c", _DATABASE, str(root / "app.db")], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "open\n"
            stopped = root == mount.mnt
            if stopped:
                os.kill(mount.pid, signal.SIGSTOP)  # no request can be answered from here on
            try:
                start = time.monotonic()
                child.stdin.write("go\n")
                child.stdin.flush()
                time.sleep(0.5)
            finally:
                resumed = time.monotonic()
                if stopped:
                    os.kill(mount.pid, signal.SIGCONT)
            seen, when = child.stdout.readline().split()
            assert bytes.fromhex(seen) == b"page twopage one"
            assert start < float(when) < resumed, "the database's I/O waited for the stopped daemon"
            child.stdin.write("sync\n")
            child.stdin.flush()
            assert child.stdout.readline() == "synced\n"
            outcome[root] = (root / "app.db").stat().st_size
        finally:
            child.kill()
            child.wait()
    assert (mount.backing / "app.db").read_bytes() == (plain / "app.db").read_bytes()
    assert outcome[mount.mnt] == outcome[plain] == 8196

"""The order of the daemon's system calls during a commit, traced with strace: the rules that
crash-consistency research established for replacing a file safely."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import wait_for, write_json

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")

_CALL = re.compile(r"^(?P<pid>\d+)\s+(?P<t>\d+\.\d+)\s+(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)")


def trace_commit(mount, action):
    """Run `action` (which commits through the mount) under strace of the daemon; returns the
    daemon's completed calls as (time, name, args) and the time the action returned."""
    out = mount.backing.parent / "strace.txt"
    tracer = subprocess.Popen(["strace", "-f", "-y", "-ttt", "-qq", "-e", "trace=fsync,fdatasync,rename,renameat,"
                               "renameat2,link,linkat", "-o", str(out), "-p", str(mount.pid)],
                              stderr=subprocess.DEVNULL)
    assert wait_for(lambda: out.exists() and len(os.listdir(f"/proc/{mount.pid}/task")) > 0, timeout=10)
    time.sleep(0.5)  # strace attaches to every thread
    action()
    returned = time.time()
    time.sleep(0.2)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    calls = []
    for line in out.read_text().splitlines():
        m = _CALL.match(line)
        if m and m["ret"] != "-1":
            calls.append((float(m["t"]), m["name"], m["args"]))
    return calls, returned


def first(calls, name_re, args_re, after=0.0):
    for t, name, args in calls:
        if t >= after and re.fullmatch(name_re, name) and re.search(args_re, args):
            return t
    raise AssertionError(f"no {name_re}({args_re}) after {after} in:\n" + "\n".join(f"{c[1]}({c[2]})" for c in calls))


def test_commit_order_data_then_rename_then_directory_before_close_returns(mount):
    (mount.mnt / "docs").mkdir()
    write_json(mount / "docs/a.json", {"v": 1})
    calls, returned = trace_commit(mount, lambda: write_json(mount / "docs/a.json", {"v": 2}))
    # The old content is kept as a backup (a hard link), and the backup directory is durable...
    link = first(calls, "linkat|link", r"docs/a\.json")
    backup_dir_sync = first(calls, "fsync", r"backups/docs/a\.json>", after=link)
    # ...the staged data is durable...
    data_sync = first(calls, "fsync|fdatasync", r"staging/.*a\.json")
    # ...before the rename that publishes the new content and takes the old one's name away.
    publish = first(calls, "rename|renameat|renameat2", r'staging>, "[^"]*a\.json", \d+<[^>]*/docs>, "a\.json"')
    assert data_sync < publish and backup_dir_sync < publish
    # The directory is fsynced after the rename and before close() returned.
    dir_sync = first(calls, "fsync", r"/docs>$", after=publish)
    assert dir_sync < returned


def test_new_file_order(mount):
    calls, returned = trace_commit(mount, lambda: write_json(mount / "new.json", {"v": 1}))
    data_sync = first(calls, "fsync|fdatasync", r"staging/")
    publish = first(calls, "rename|renameat|renameat2", r'staging>, "[^"]*new\.json", \d+<[^>]*>, "new\.json"')
    dir_sync = first(calls, "fsync", rf"{re.escape(str(mount.backing))}>$", after=publish)
    assert data_sync < publish < dir_sync < returned


def test_fsync_of_a_direct_file_reaches_the_backing_file_before_it_returns(mount):
    # A database is written in place (with passthrough, by the kernel straight into the
    # backing file, no write reaching the daemon): its fsync must still make the backing file
    # durable before it returns, or an acknowledged transaction could be lost.
    (mount / "app.db").write_bytes(b"\0" * 4096)
    fd = os.open(mount / "app.db", os.O_RDWR)
    try:
        def transaction():
            os.pwrite(fd, b"committed row", 0)
            os.fsync(fd)

        calls, returned = trace_commit(mount, transaction)
    finally:
        os.close(fd)
    assert first(calls, "fsync|fdatasync", r"/app\.db>$") < returned
    assert (mount.backing / "app.db").read_bytes()[:13] == b"committed row"


def test_log_lines_reach_the_disk_within_a_second_without_an_fsync_each(mount):
    """The log says why after a crash of the machine: lines are fsynced within about a second,
    all the lines of that second by one fsync, never an fsync per line."""
    def rejections():
        for i in range(20):
            try:
                with open(mount / f"bad{i}.json", "w") as f:
                    f.write("{")
            except OSError:
                pass
        rejections.done = time.time()
        time.sleep(2.0)

    calls, _ = trace_commit(mount, rejections)
    syncs = [t for t, name, args in calls if name in ("fsync", "fdatasync") and "fusestore.log>" in args]
    assert "rejected bad19.json" in (mount.host / "fusestore.log").read_text()
    assert 1 <= len(syncs) <= 3, syncs  # 20 rejections, 20 log lines
    assert rejections.done - 1 < syncs[-1] < rejections.done + 1.6

"""Change events: inotify watchers see each commit (Node's fs.watch, inotifywait), and the
daemon's event stream (`fusestore events`) reports commits, rejections, restores, deletes,
renames and cache changes to any number of followers without ever waiting for one."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import fusestore
from fusestore import cache, control
from fusestore.events import EventHub, Note

pytestmark = pytest.mark.timeout(60)

NODE = shutil.which("node")
INOTIFYWAIT = shutil.which("inotifywait")

# What a watcher of a directory does: on each change of the file, read it; done once it reads
# the content the test expects.
WATCHER_JS = r"""
const fs = require('fs');
const [dir, name, expected] = process.argv.slice(2);
fs.watch(dir, (event, file) => {
  if (file !== name) return;
  let text;
  try { text = fs.readFileSync(dir + '/' + file, 'utf8'); } catch (e) { return; }
  if (text === expected) { console.log('read the new content after a ' + event + ' event'); process.exit(0); }
});
setTimeout(() => { console.log('never read the new content'); process.exit(1); }, 3000);
console.log('watching');
"""


def _node_watcher_reads_new_content(directory: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Rewrite an existing file while fs.watch watches its directory: does a handler read the
    new content?"""
    target = directory / "state.json"
    target.write_text('{"v": 1}')
    script = tmp_path / "watch.js"
    script.write_text(WATCHER_JS)
    new = '{"v": 2, "padding": "' + "x" * 5000 + '"}'
    proc = subprocess.Popen([NODE, str(script), str(directory), "state.json", new], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "watching"
        time.sleep(0.1)
        with open(target, "w") as f:  # two writes: the second is the one that completes it
            f.write(new[:100])
            f.flush()
            f.write(new[100:])
            f.flush()
            time.sleep(0.5)  # the handler of the last write's event has run by the close
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.skipif(NODE is None, reason="node is not installed (tools/install --test)")
def test_node_fs_watch_reads_each_commit(mount, plain, tmp_path):
    on_plain = _node_watcher_reads_new_content(plain, tmp_path)
    assert on_plain.returncode == 0, on_plain.stdout
    through = _node_watcher_reads_new_content(mount.mnt, tmp_path)
    assert through.returncode == 0, through.stdout


@pytest.mark.skipif(NODE is None, reason="node is not installed (tools/install --test)")
def test_without_the_commit_event_a_watcher_reads_old_content(make_mount, tmp_path):
    """What the event after a commit is for: without it (-o notify_watchers=off), the handler
    ran at the write, read the committed (old) content, and nothing followed."""
    m = make_mount(["notify_watchers=off"])
    result = _node_watcher_reads_new_content(m.mnt, tmp_path)
    assert result.returncode == 1, result.stdout


@pytest.mark.skipif(INOTIFYWAIT is None, reason="inotifywait is not installed (tools/install --test)")
def test_inotifywait_hears_the_commit_after_the_last_write(mount):
    target = mount / "doc.json"
    target.write_text("{}")
    waiter = subprocess.Popen([INOTIFYWAIT, "-m", "-e", "modify", "--format", "%e %f", str(mount.mnt)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Watches established" in waiter.stderr.readline() + waiter.stderr.readline()
        fd = os.open(target, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        os.write(fd, b'{"done": true}')
        assert waiter.stdout.readline().split() == ["MODIFY", "doc.json"]  # the write
        os.close(fd)  # the commit
        assert waiter.stdout.readline().split() == ["MODIFY", "doc.json"]  # its event
        assert json.loads(target.read_text()) == {"done": True}
    finally:
        waiter.kill()
        waiter.wait()


def test_commit_events_change_nothing(mount, plain):
    """The daemon's own truncate behind each event leaves content, size and times as a plain
    directory has them after the same writes."""
    for d in (mount.mnt, plain):
        with open(d / "a.txt", "w") as f:
            f.write("hello\n")
        os.utime(d / "a.txt", ns=(1_000_000_000, 2_000_000_000))
        (d / "b.txt").write_text("x" * 70000)
    time.sleep(0.3)  # the events are sent after the commits
    for name in ("a.txt", "b.txt"):
        st_m, st_p = os.stat(mount / name), os.stat(plain / name)
        assert (mount / name).read_bytes() == (plain / name).read_bytes()
        assert st_m.st_size == st_p.st_size
    assert os.stat(mount / "a.txt").st_mtime_ns == 2_000_000_000
    assert os.stat(mount.backing / "a.txt").st_mtime_ns == 2_000_000_000


def _events(m, *args: str) -> list[dict]:
    out = fusestore("events", str(m.mnt), "--json", "--no-follow", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_events_report_each_kind(mount):
    (mount / "docs").mkdir()
    (mount / "docs/a.json").write_text('{"v": 1}')
    (mount / "docs/a.json").write_text('{"v": 2}')
    with pytest.raises(OSError):
        with open(mount / "docs/a.json", "w") as f:
            f.write("{broken")
    fusestore("restore", str(mount / "docs/a.json"), "-g", "1")
    os.rename(mount / "docs/a.json", mount / "docs/b.json")
    os.unlink(mount / "docs/b.json")
    events = _events(mount)
    kinds = [(e["kind"], e["path"]) for e in events]
    assert kinds[:2] == [("commit", "docs/a.json")] * 2  # the new file, then its second content
    assert events[0]["size"] == 8 and "generation" not in events[0]
    assert events[1]["generation"] == 1
    reject = next(e for e in events if e["kind"] == "reject")
    assert reject["path"] == "docs/a.json" and "line 1" in reject["reason"]
    rename = next(e for e in events if e["kind"] == "rename")
    assert rename["path"] == "docs/b.json" and rename["source"] == "docs/a.json"
    restore = next(e for e in events if e["kind"] == "restore")
    assert restore == {**restore, "path": "docs/a.json", "generation": 1}
    assert events[events.index(restore) - 1]["kind"] == "commit"  # the commit it made
    assert events[-1]["kind"] == "delete" and events[-1]["path"] == "docs/b.json"
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert all(e["time"] <= time.time() for e in events)


def test_events_since_and_after(mount):
    (mount / "old.json").write_text("{}")
    time.sleep(0.2)
    middle = time.time()
    time.sleep(0.2)
    (mount / "new.json").write_text("{}")
    # A time, not a duration ago: the command itself may take a second to start (in an
    # emulated VM), and a duration counts from its start.
    recent = _events(mount, "--since", datetime.datetime.fromtimestamp(middle).isoformat())
    assert {e["path"] for e in recent} == {"new.json"}
    assert {"old.json", "new.json"} <= {e["path"] for e in _events(mount, "--since", "1h")}
    everything = _events(mount)
    after = _events(mount, "--after", str(everything[0]["seq"]))
    assert after == everything[1:]
    text = fusestore("events", str(mount.mnt), "--no-follow").stdout
    assert "commit" in text and "new.json" in text
    bad = fusestore("events", str(mount.mnt), "--since", "yesterday", check=False)
    assert bad.returncode == 1 and "--since wants" in bad.stderr


def test_cache_changes_are_events(make_mount, tmp_path):
    (tmp_path / "backing" / "fusestore.toml").write_text('[cache]\nmax_size = "40KiB"\n')
    m = make_mount()
    with cache.open(str(m.mnt)) as c:  # another process's inserts: noted to the daemon
        for i in range(3):
            c.put(f"https://example.com/{i}.jpg", b"x" * 16000, "media")
    events = _events(m)
    inserts = [e for e in events if e["kind"] == "cache-insert"]
    evicted = [e for e in events if e["kind"] == "cache-evict"]
    assert len(inserts) == 3 and all(e["path"].startswith(".cache/media/") for e in inserts)
    assert len(evicted) == 1 and evicted[0]["reason"] == "lru" and evicted[0]["path"] == inserts[0]["path"]


def test_followers_each_get_every_event_live(mount):
    command = [sys.executable, "-m", "fusestore", "events", str(mount.mnt), "--json", "--after", "0"]
    followers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(Path(cache.__file__).parents[1])})
                 for _ in range(3)]

    def read(p, n: int) -> list[tuple[str, str]]:
        return [(e["kind"], e["path"]) for e in (json.loads(p.stdout.readline()) for _ in range(n))]

    try:
        (mount / "f0.json").write_text("{}")
        for p in followers:  # from the ring, or live: each is connected once it has it
            assert read(p, 1) == [("commit", "f0.json")]
        for i in range(1, 5):
            (mount / f"f{i}.json").write_text(json.dumps({"i": i}))
        for p in followers:
            assert read(p, 4) == [("commit", f"f{i}.json") for i in range(1, 5)]
    finally:
        for p in followers:
            p.kill()
            p.wait()


def test_a_follower_that_does_not_read_is_dropped_with_a_marker(make_mount, tmp_path):
    (tmp_path / "backing" / "fusestore.toml").write_text("[mount]\nevents_kept = 20\n")
    m = make_mount()
    state = str(m.host)
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(str(m.host / "control.sock"))
    slow.sendall(control.encode(control.Request("events")))
    time.sleep(0.2)
    long_path = "p" * 3000
    for _ in range(400):  # far more than the socket holds, and 20 kept
        control.ask(state, control.Request("note", note=Note("cache-insert", long_path)), timeout=5)
    # The daemon did not wait for it: commits go on.
    (m / "after.json").write_text("{}")
    assert json.loads((m / "after.json").read_text()) == {}
    slow.settimeout(10)
    data = b""
    while chunk := slow.recv(1 << 20):
        data += chunk
    slow.close()
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[-1]["kind"] == "dropped" and "missed" in lines[-1]["reason"]
    assert all(e["kind"] == "cache-insert" for e in lines[:-1])


def test_notes_are_limited_to_what_other_processes_make(mount):
    reply = control.ask(str(mount.host), control.Request("note", note=Note("commit", "x.json")))
    assert not reply.ok and "restore" in reply.error
    assert not [e for e in _events(mount) if e["path"] == "x.json"]


def test_the_ring_keeps_the_newest_and_counts_what_a_follower_lost():
    hub = EventHub(keep=5)
    for i in range(8):
        hub.emit("commit", f"f{i}")
    assert [e.seq for e in hub.after(6)[0]] == [7, 8] and hub.after(6)[1] == 0
    assert [e.seq for e in hub.after(0)[0]] == [4, 5, 6, 7, 8] and hub.after(0)[1] == 3  # 1-3 are gone
    assert hub.after(8) == ([], 0)
    assert [e.path for e in hub.after(3)[0]] == ["f3", "f4", "f5", "f6", "f7"]
    assert hub.since(time.time() + 60) == 8  # the last event before that moment
    assert hub.since(0) == 3  # before all it keeps: follow from its oldest

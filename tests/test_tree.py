"""`fusestore.tree`: the mount's guarantees from Python, with and without a mount, through the one
commit path (the mount when served, the engine under the tree's lock otherwise)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import fusestore, host_dir
from fusestore import tree as fstree
from fusestore.engine import locks

pytestmark = pytest.mark.timeout(60)

SCRIPT_08 = {"version": "0.8", "topicId": "t", "title": "T", "timestamp": "2024-01-01T00:00:00Z",
             "segments": [{"id": "s", "content": "hello"}]}
SCRIPT = "public/projects/project-1-a/scripts/topic-1.json"


def _exercise(t: fstree.Tree) -> dict:
    """The same calls with or without a mount; returns what they saw."""
    t.write_json("docs/state.json", {"step": 1})
    t.write_json("docs/state.json", {"step": 2})
    t.write("notes.txt", b"plain text\n")
    with pytest.raises(fstree.Rejected) as refused:
        t.write("docs/state.json", b'{"step": 3')
    t.write_json(SCRIPT, SCRIPT_08)
    seen = {
        "state": t.read_json("docs/state.json"),
        "notes": t.read("notes.txt"),
        "refused": (refused.value.errno, refused.value.reason),
        "backups": [(g.generation, g.change) for g in t.backups("docs/state.json")],
        "diff": t.diff("docs/state.json").summary(),
        "migrated": t.read_json(SCRIPT, migrate=True)["segments"],
        "raw": t.read_json(SCRIPT)["segments"],
    }
    t.restore("docs/state.json", generation=1)
    seen["restored"] = t.read_json("docs/state.json")
    with pytest.raises(FileNotFoundError):
        t.restore("docs/state.json", generation=7)
    seen["listed"] = (t.list(), t.list("docs", ".json"))
    t.delete("notes.txt")
    seen["deleted"] = (t.exists("notes.txt"), [g.change for g in t.backups("notes.txt")])
    t.restore("notes.txt")
    seen["undeleted"] = t.read("notes.txt")
    with pytest.raises(FileNotFoundError):
        t.delete("nothing.txt")
    return seen


EXPECTED = {
    "state": {"step": 2},
    "notes": b"plain text\n",
    "backups": [(1, "1 changed: $.step")],
    "diff": "1 changed: $.step",
    "migrated": [{"id": "s", "text": "hello"}],
    "raw": [{"id": "s", "content": "hello"}],
    "restored": {"step": 1},
    "listed": (["docs", "notes.txt", "public"], ["state.json"]),
    "deleted": (False, ["then removed"]),
    "undeleted": b"plain text\n",
}


def test_without_a_mount(tree):
    backing, _ = tree
    (backing / ".fusestore").mkdir()
    with fstree.open(str(backing)) as t:
        assert not t.served
        seen = _exercise(t)
        with pytest.raises(fstree.TreeError, match="no mount serves"):
            next(t.events())
    err, reason = seen.pop("refused")
    assert err == errno.EBADMSG and "line 1" in reason
    assert seen == EXPECTED
    assert json.loads((backing / "docs/state.json").read_text()) == {"step": 1}
    assert (backing / "docs/state.json").read_text().startswith("{\n  ")  # written as the pipeline does
    quarantined = [p for p in (host_dir(backing) / "quarantine").iterdir() if not p.name.endswith(".reason")]
    assert [p.read_bytes() for p in quarantined] == [b'{"step": 3']


def test_through_a_mount(mount):
    with fstree.open(str(mount.mnt)) as t:
        assert t.served
        seen = _exercise(t)
        events = list(t.events(follow=False))
    err, reason = seen.pop("refused")
    assert err == errno.EBADMSG and "line 1" in reason  # the daemon's reason, from its status
    assert seen == EXPECTED
    kinds = [(e.kind, e.path) for e in events]
    assert ("reject", "docs/state.json") in kinds and ("restore", "docs/state.json") in kinds
    assert kinds.count(("commit", "docs/state.json")) == 3  # two writes and the restore
    assert json.loads((mount / "docs/state.json").read_text()) == {"step": 1}


def test_waits_for_a_writer_holding_the_lock(tree):
    """Another process commits directly (the lock held for a moment): the API waits its turn."""
    backing, _ = tree
    lock = host_dir(backing) / "lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import os, time
from fusestore.engine import locks
fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)
locks.lock_exclusive(fd)
print("held", flush=True)
time.sleep(0.5)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with fstree.open(str(backing)) as t:
        t.write_json("a.json", {"waited": True})
    assert time.monotonic() - start > 0.2
    holder.wait()
    assert json.loads((backing / "a.json").read_text()) == {"waited": True}
    fd = os.open(lock, os.O_RDWR)
    try:
        assert locks.lock_exclusive(fd, wait=False)  # let go after the write
    finally:
        os.close(fd)


def test_a_lock_held_too_long_is_an_error(tree):
    backing, _ = tree
    lock = host_dir(backing) / "lock"
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    done = threading.Event()
    try:
        locks.lock_exclusive(fd)
        with fstree.open(str(backing), lock_timeout=0.3) as t:
            with pytest.raises(fstree.TreeError, match="waited 0.3s"):
                t.write("a.txt", b"x")
        done.set()
    finally:
        os.close(fd)
    assert done.is_set() and not (backing / "a.txt").exists()


def test_a_tree_of_the_one_host_layout_is_adopted(tree):
    """A tree whose staging, quarantine and lock sit at the top of the state directory (made
    before hosts had directories): its staged and quarantined files move into this host's."""
    backing, _ = tree
    state = backing / ".fusestore"
    for name in ("staging", "quarantine", "backups"):
        (state / name).mkdir(parents=True)
    (state / "lock").write_text("123\n")
    (state / "staging" / "1-1-0.a.json").write_bytes(b'{"half": ')
    (state / "quarantine" / "old-entry").write_bytes(b"kept")
    with fstree.open(str(backing)) as t:
        t.write_json("b.json", {"ok": True})
    host = host_dir(backing)
    assert (host / "quarantine" / "old-entry").read_bytes() == b"kept"
    assert (host / "staging" / "1-1-0.a.json").read_bytes() == b'{"half": '  # the next mount recovers it
    assert not (state / "staging").exists() and not (state / "lock").exists()


def test_paths_stay_inside_the_tree(tree):
    backing, _ = tree
    (backing / ".fusestore").mkdir()
    with fstree.open(str(backing)) as t:
        for bad in ("../escape.json", "a/../../escape.json"):
            with pytest.raises(Exception):
                t.write(bad, b"{}")
    assert not (backing.parent / "escape.json").exists()


def test_cli_and_api_see_the_same_backups(tree):
    backing, _ = tree
    (backing / ".fusestore").mkdir()
    with fstree.open(str(backing)) as t:
        for n in range(3):
            t.write_json("d.json", {"n": n})
        api = [(g.generation, g.size, g.change) for g in t.backups("d.json")]
    cli = [(r["generation"], r["size"], r["change"]) for r in
           json.loads(fusestore("backups", str(backing / "d.json"), "--json").stdout)]
    assert api == cli and len(api) == 2

"""Faults and load: a full disk, a state directory damaged while mounted, 16 clients at once."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import threading
import time

import pytest

from conftest import Mount, fusestore, write_json


@pytest.fixture
def small_tree(tmp_path):
    """A backing tree on a 24 MiB tmpfs, so that the disk can be filled."""
    top = tmp_path / "small"
    top.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(top)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    backing, mnt = top / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    m = Mount(backing, mnt)
    try:
        yield m
    finally:
        m.stop()
        m.kill_leftovers()
        subprocess.run(["umount", "-l", str(top)])


def test_a_full_disk_fails_writes_with_enospc_and_loses_nothing(small_tree):
    m = small_tree
    m.start()
    write_json(m / "state.json", {"v": 1})
    with pytest.raises(OSError) as e:
        with open(m / "big.bin", "wb") as f:
            for _ in range(64):
                f.write(b"\0" * (1 << 20))
    assert e.value.errno == errno.ENOSPC
    assert json.loads((m / "state.json").read_text()) == {"v": 1}
    # A commit needs room for its staged copy: it fails cleanly, the old content stays.
    try:
        write_json(m / "state.json", {"v": 2, "pad": "x" * 100_000})
    except OSError as err:
        assert err.errno == errno.ENOSPC
        assert json.loads((m / "state.json").read_text()) == {"v": 1}
    assert m.status()["pid"] == m.pid  # still serving
    # Cleanup: the file, the backup its deletion keeps, and whatever the quarantine holds.
    if (m / "big.bin").exists():
        os.unlink(m / "big.bin")
    shutil.rmtree(m.state / "backups" / "big.bin", ignore_errors=True)
    for p in m.quarantine:
        p.unlink()
    write_json(m / "state.json", {"v": 3})
    assert json.loads((m / "state.json").read_text()) == {"v": 3}


def test_state_directory_damaged_while_mounted(mount):
    write_json(mount / "a.json", {"v": 1})
    shutil.rmtree(mount.state / "backups")
    shutil.rmtree(mount.host / "quarantine")
    (mount.host / "staging").chmod(0)
    errors = []
    for v in range(2, 5):
        try:
            write_json(mount / "a.json", {"v": v})
        except OSError as e:
            errors.append(e.errno)
    assert all(e in (errno.ENOENT, errno.EACCES, errno.EIO) for e in errors)
    assert json.loads((mount / "a.json").read_text())["v"] in (1, 2, 3, 4)
    assert mount.status()["pid"] == mount.pid  # the daemon survived
    (mount.host / "staging").chmod(0o700)


def _rss_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    # The staging pool holds between 0 and 16 empty files open, and the commit locks one
    # descriptor per commit that ever ran at once (engine.locks), by design: not counted.
    count = 0
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            name = os.path.basename(os.readlink(f"/proc/{pid}/fd/{n}"))
            count += not name.startswith("pool-") and name != "locks"
        except FileNotFoundError:
            pass  # closed meanwhile
    return rss, count


def test_sixteen_clients_mixing_reads_commits_and_renames(mount, capsys):
    write_json(mount / "shared.json", {"writer": -1, "n": 0})
    stop = time.monotonic() + float(os.environ.get("FUSESTORE_LOAD_SECONDS", "8"))
    last: dict[str, dict] = {}
    problems: list[str] = []
    counts = [0] * 16

    def client(k: int) -> None:
        rng = random.Random(k)
        mine = mount / f"client{k}.json"
        n = 0
        while time.monotonic() < stop:
            n += 1
            doc = {"writer": k, "n": n, "pad": "y" * rng.randrange(10, 20000)}
            action = rng.random()
            try:
                if action < 0.3:
                    write_json(mine, doc)
                    last[mine.name] = doc
                elif action < 0.45:
                    tmp = mount / f".client{k}.tmp"
                    tmp.write_text(json.dumps(doc))
                    os.rename(tmp, mine)
                    last[mine.name] = doc
                elif action < 0.6:
                    # Several writers of one file replace it whole, as programs sharing a file
                    # must on any filesystem (concurrent writers of one open file share it).
                    tmp = mount / f".shared{k}.tmp"
                    tmp.write_text(json.dumps(doc))
                    os.rename(tmp, mount / "shared.json")
                else:
                    for path in (mount / "shared.json", mine):
                        if path.exists():
                            json.loads(path.read_bytes())  # never a partial document
                counts[k] += 1
            except (ValueError, OSError) as e:
                problems.append(f"client {k}: {type(e).__name__}: {e}")
                return

    rss0, fds0 = _rss_and_fds(mount.pid)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss1, fds1 = _rss_and_fds(mount.pid)
    with capsys.disabled():
        print(f"\n16 clients, {sum(counts)} operations: daemon RSS {rss0 // 1024} -> {rss1 // 1024} MiB, "
              f"open fds {fds0} -> {fds1}")
    assert problems == []
    for name, doc in last.items():
        assert json.loads((mount / name).read_text()) == doc  # no commit lost
    assert fds1 <= fds0 + 8 and rss1 - rss0 < 64 * 1024


def test_a_read_only_backing_tree_is_refused_with_a_clear_message(tmp_path):
    """A read-only tree cannot hold staged files, backups or the lock: the mount says so and
    exits, whether the tree was used before or not. (Remounting the tree read-only under a
    running daemon is refused by the kernel itself: the daemon holds files open for writing.)"""
    real, top, mnt = tmp_path / "real", tmp_path / "top", tmp_path / "mnt"
    for d in (real, top, mnt):
        d.mkdir()
    (real / "a.json").write_text('{"v": 1}')
    if subprocess.run(["mount", "--bind", str(real), str(top)]).returncode != 0:
        pytest.skip("cannot bind-mount here")
    m = Mount(top, mnt)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(top)], check=True)
        first = fusestore("mount", str(top), str(mnt), check=False)
        assert first.returncode != 0 and "Read-only file system" in first.stderr
        subprocess.run(["mount", "-o", "remount,bind,rw", str(top)], check=True)
        m.start()  # used once: now it has a state directory
        m.stop()
        subprocess.run(["mount", "-o", "remount,bind,ro", str(top)], check=True)
        again = fusestore("mount", str(top), str(mnt), check=False)
        assert again.returncode != 0 and "Read-only file system" in again.stderr
        foreground = fusestore("mount", "--foreground", str(top), str(mnt), check=False)
        assert foreground.returncode != 0 and "Read-only file system" in foreground.stderr
        assert not subprocess.run(["mountpoint", "-q", str(mnt)]).returncode == 0
        assert json.loads((real / "a.json").read_text()) == {"v": 1}
    finally:
        m.stop()
        m.kill_leftovers()
        subprocess.run(["umount", "-l", str(top)])


def test_a_corrupted_state_directory_does_not_stop_the_next_mount(make_mount):
    m = make_mount()
    write_json(m / "a.json", {"v": 1})
    write_json(m / "a.json", {"v": 2})
    m.stop()
    state, host = m.state, m.host
    (host / "lock").write_bytes(b"\x00garbage\xff")
    (host / "staging" / "not-a-stage-name").write_bytes(b"{half")
    (host / "staging" / "123-x-y.@").write_bytes(b"orphan without its .path")
    (host / "quarantine" / "junk.reason").write_text("not json")
    (state / "backups" / "a.json" / "stray-file").write_text("not a generation")
    (state / "backups" / "%notdigits").write_text("odd")
    (host / "fusestore.log").write_bytes(b"\xff\xfe binary noise\n")
    m.start()
    assert json.loads((m / "a.json").read_text()) == {"v": 2}
    assert (m / ".backups/a.json/1").read_text() == '{"v": 1}'
    status = m.status()
    assert status["recovered_at_mount"] == 2  # the two stray staged files are in the quarantine
    write_json(m / "a.json", {"v": 3})
    assert fusestore("check", str(m.mnt), check=False).returncode in (0, 1)  # reports, never crashes


def test_backing_directory_moved_away_while_mounted(make_mount, tmp_path):
    """The daemon holds the tree by a directory fd: moving the directory (and putting another in
    its place) changes nothing for the mount, which goes on serving the tree it mounted."""
    m = make_mount()
    write_json(m / "a.json", {"v": 1})
    moved = tmp_path / "moved"
    os.rename(m.backing, moved)
    m.backing.mkdir()
    write_json(m / "a.json", {"v": 2})
    assert json.loads((moved / "a.json").read_text()) == {"v": 2}
    assert not (m.backing / "a.json").exists()
    assert json.loads((m / "a.json").read_text()) == {"v": 2}
    m.backing.rmdir()
    os.rename(moved, m.backing)  # so that the fixture finds the tree to unmount

"""SQLite through the mount, compared with a plain directory: databases and their side files are
direct files (written in place, page cache and shared maps as on the backing filesystem), so
rollback journals, WAL mode, concurrent writers and crashes behave as SQLite documents. A
database under a staged name commits at every fsync and loses nothing either."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import Output

pytestmark = pytest.mark.timeout(120)


def fill(path: Path, rows: int, journal: str = "DELETE") -> tuple:
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(rows):
        con.execute("INSERT INTO t(v) VALUES (?)", (f"row {i} " + "x" * (i % 700),))
        con.commit()
    result = (con.execute("SELECT count(*), sum(length(v)) FROM t").fetchone(),
              con.execute("PRAGMA integrity_check").fetchone()[0])
    con.close()
    return result


@pytest.mark.parametrize("journal", ["DELETE", "WAL"])
def test_a_new_database_takes_inserts_like_a_plain_one(mount, plain, journal):
    want = fill(plain / "a.db", 200, journal)
    got = fill(mount / "a.db", 200, journal)
    assert got == want
    assert got[1] == "ok"
    con = sqlite3.connect(mount.backing / "a.db")  # the backing file itself is the database
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 200
    con.close()


def test_a_database_under_a_staged_name_loses_nothing(mount, plain):
    want = fill(plain / "state.data", 40)
    assert fill(mount / "state.data", 40) == want
    assert mount.quarantine == []


INSERTER = textwrap.dedent("""
    import sqlite3, sys
    path, tag, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    con = sqlite3.connect(path, timeout=60)
    for i in range(rows):
        with con:
            con.execute("INSERT INTO t(v) VALUES (?)", (f"{tag} {i}",))
        print(tag, i, flush=True)
""")


def _two_writers(path: Path, journal: str) -> tuple:
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.commit()
    procs = [subprocess.Popen([sys.executable, "-c", INSERTER, str(path), tag, "150"], stdout=subprocess.PIPE)
             for tag in ("a", "b")]
    for p in procs:
        p.communicate(timeout=100)
        assert p.returncode == 0
    rows = con.execute("SELECT v FROM t ORDER BY v").fetchall()
    check = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    return len(rows), sorted(r[0] for r in rows) == sorted(f"{t} {i}" for t in "ab" for i in range(150)), check


@pytest.mark.parametrize("journal", ["DELETE", "WAL"])
def test_two_processes_inserting_at_once_lose_no_row(mount, plain, journal):
    assert _two_writers(mount / "two.db", journal) == _two_writers(plain / "two.db", journal) == (300, True, "ok")


def test_a_long_lived_connection_sees_another_process_commit(mount, plain):
    def work(d: Path):
        keep = sqlite3.connect(d / "l.db")
        keep.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        keep.execute("INSERT INTO t(v) VALUES ('mine 1')")
        keep.commit()
        subprocess.run([sys.executable, "-c", INSERTER, str(d / "l.db"), "other", "5"], check=True, capture_output=True)
        seen = keep.execute("SELECT count(*) FROM t").fetchone()[0]
        keep.execute("INSERT INTO t(v) VALUES ('mine 2')")
        keep.commit()
        keep.close()
        con = sqlite3.connect(d / "l.db")
        rows = [r[0] for r in con.execute("SELECT v FROM t ORDER BY id")]
        con.close()
        return seen, rows

    assert work(mount.mnt) == work(plain) == (6, ["mine 1", *(f"other {i}" for i in range(5)), "mine 2"])


def test_a_writer_killed_mid_transaction_leaves_a_consistent_database(mount):
    db = mount / "k.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.commit()
    con.close()
    slow = textwrap.dedent("""
        import sqlite3, sys, time
        con = sqlite3.connect(sys.argv[1])
        for i in range(10**6):
            con.execute("BEGIN")
            for j in range(50):
                con.execute("INSERT INTO t(v) VALUES (?)", ("y" * 2000,))
            con.execute("COMMIT")
            print(i, flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", slow, str(db)], stdout=subprocess.PIPE)
    out = Output(p)
    for _ in range(5):
        out.readline()
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    acknowledged = int(out.readline() or 0)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = con.execute("SELECT count(*) FROM t").fetchone()[0]
    con.close()
    assert rows % 50 == 0 and rows >= 5 * 50
    assert rows >= acknowledged * 50


CRASH_WRITER = textwrap.dedent("""
    import sqlite3, sys
    path, journal, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    con = sqlite3.connect(path, timeout=30)
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
    con.commit()
    print("ready", flush=True)
    i = 0
    try:
        while True:
            with con:
                con.execute("INSERT INTO t(v) VALUES (?)", (f"{tag} {i} " + "z" * 3000,))
            print(i, flush=True)
            i += 1
    except sqlite3.Error:
        sys.exit(0)
""")


@pytest.mark.parametrize("journal", ["DELETE", "WAL"])
def test_killing_the_daemon_mid_transaction_keeps_every_acknowledged_commit(make_mount, journal):
    mount = make_mount()
    for round_ in range(3):
        tag = f"r{round_}"
        p = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(mount / "crash.db"), journal, tag],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out = Output(p)
        assert out.readline().strip() == "ready"
        for _ in range(10 + round_ * 7):
            out.readline()
        mount.kill()
        acked = [int(n) for n in out.rest(timeout=30).split()]
        mount.start()
        con = sqlite3.connect(mount / "crash.db")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {int(v.split()[1]) for (v,) in con.execute("SELECT v FROM t WHERE v LIKE ?", (tag + " %",))}
        con.close()
        last = max(acked, default=9 + round_ * 7)
        assert set(range(last + 1)) <= rows, f"round {round_}: acknowledged rows lost"


def test_shared_memory_maps_of_direct_files(mount, plain):
    import mmap

    def work(d: Path):
        p = d / "shared.db"
        p.write_bytes(b"\0" * 8192)
        with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:  # MAP_SHARED, read-write
            m[0:5] = b"hello"
            m.flush()
            with open(p, "rb") as g, mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ) as r:
                seen = bytes(r[:5])  # another shared map sees the write at once
        return seen, p.read_bytes()[:5]

    assert work(mount.mnt) == work(plain) == (b"hello", b"hello")
    assert (mount.backing / "shared.db").read_bytes()[:5] == b"hello"

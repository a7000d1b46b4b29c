"""Readers and writers at once: a reader never sees a partial or uncommitted file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from conftest import write_json

WRITER = textwrap.dedent("""
    import json, os, sys, random
    path, ident, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rejected = 0
    for n in range(rounds):
        doc = {"writer": ident, "n": n, "pad": "x" * random.choice([10, 5000, 70000])}
        try:
            with open(path, "w") as f:
                json.dump(doc, f)
        except OSError as e:
            rejected += 1  # another writer truncated the shared staged file meanwhile
    print(rejected)
""")

READER = textwrap.dedent("""
    import json, sys, time
    path, seconds = sys.argv[1], float(sys.argv[2])
    end, reads = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        with open(path, "rb") as f:
            data = f.read()
        try:
            json.loads(data)
        except ValueError:
            print("INVALID", len(data), data[:80])
            sys.exit(1)
        reads += 1
    print(reads)
""")


def test_reader_sees_old_complete_content_during_a_long_write(mount):
    write_json(mount / "doc.json", {"version": 1})
    with open(mount / "doc.json", "w") as writer:
        writer.write('{"version": 2, "body": "')
        writer.flush()
        for _ in range(3):
            assert json.loads((mount / "doc.json").read_text()) == {"version": 1}
            writer.write("y" * 100_000)
            writer.flush()
        writer.write('"}')
        writer.flush()
        assert json.loads((mount / "doc.json").read_text()) == {"version": 1}
    assert json.loads((mount / "doc.json").read_text())["version"] == 2


def test_a_writer_reads_its_own_writes(mount):
    write_json(mount / "doc.json", {"version": 1})
    fd = os.open(mount / "doc.json", os.O_RDWR)
    try:
        os.pwrite(fd, b"2", 12)
        assert os.pread(fd, 14, 0) == b'{"version": 2}'
        assert (mount / "doc.json").read_bytes() == b'{"version": 1}', "others see the committed file"
    finally:
        os.close(fd)
    assert (mount / "doc.json").read_bytes() == b'{"version": 2}'


def test_reader_opened_before_a_commit_keeps_the_old_version(mount):
    big_old = {"v": "old", "pad": "a" * 300_000}
    write_json(mount / "f.json", big_old)
    reader = open(mount / "f.json", "rb")
    head = reader.read(4096)
    write_json(mount / "f.json", {"v": "new", "pad": "b" * 200_000})
    rest = reader.read()
    reader.close()
    assert json.loads(head + rest) == big_old
    assert json.loads((mount / "f.json").read_text())["v"] == "new"


def test_eight_writers_and_readers_never_expose_an_invalid_document(mount):
    write_json(mount / "shared.json", {"writer": -1})
    target = str(mount / "shared.json")
    readers = [subprocess.Popen([sys.executable, "-c", READER, target, "6"], stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
    time.sleep(0.2)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, target, str(i), "25"], stdout=subprocess.PIPE, text=True)
               for i in range(8)]
    for w in writers:
        out, _ = w.communicate(timeout=100)
        assert w.returncode == 0
    for r in readers:
        out, _ = r.communicate(timeout=100)
        assert r.returncode == 0, f"a reader saw an invalid document: {out}"
        assert int(out) > 0
    final = json.loads((mount / "shared.json").read_text())
    assert final["writer"] in range(8)
    assert mount.status()["open_staged_files"] == 0


def test_writers_of_different_files_all_commit(mount):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(mount / f"f{i}.json"), str(i), "20"],
                              stdout=subprocess.PIPE, text=True) for i in range(8)]
    for p in procs:
        out, _ = p.communicate(timeout=100)
        assert p.returncode == 0 and int(out) == 0, "no writer of its own file is ever rejected"
    for i in range(8):
        assert json.loads((mount / f"f{i}.json").read_text())["n"] == 19

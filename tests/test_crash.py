"""SIGKILL the daemon in the middle of commits; after a remount every file is a complete version
that was written, no acknowledged commit is lost, and staged data is in the quarantine."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import Output, report, wait_for

FILES = 4
ROUNDS = int(os.environ.get("FUSESTORE_CRASH_ROUNDS", "50"))
MIXED_ROUNDS = int(os.environ.get("FUSESTORE_MIXED_CRASH_ROUNDS", "50"))

# Writes version n of file i, forever, and prints "i n" once the version is acknowledged: by
# close() returning 0, or for file 2 by fsync() returning 0 (a commit point of its own; the file
# is closed after). Each round it also creates `made-n` with read-only access and prints
# "made n" once that close returned. It works relative to an fd on the mount's root: once the
# daemon is gone that fd fails, where a path would lead into the empty directory under the mount.
WRITER = textwrap.dedent("""
    import json, os, sys
    mnt, files = sys.argv[1], int(sys.argv[2])
    n = int(sys.argv[3])
    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    print("ready", flush=True)
    opener = lambda path, flags: os.open(path, flags, 0o644, dir_fd=root)
    while True:
        try:
            for i in range(files):
                doc = {"file": i, "n": n, "pad": "p" * ((n * 7919 + i * 104729) % 150000)}
                if i == 2:
                    fd = os.open(f"f{i}.json", os.O_WRONLY | os.O_TRUNC, dir_fd=root)
                    os.write(fd, json.dumps(doc).encode())
                    os.fsync(fd)
                    print(i, n, flush=True)
                    os.close(fd)
                    continue
                with open(f"f{i}.json", "w", opener=opener) as f:
                    json.dump(doc, f)
                print(i, n, flush=True)
            os.close(os.open(f"made-{n}", os.O_RDONLY | os.O_CREAT, 0o644, dir_fd=root))
            print("made", n, flush=True)
        except OSError:
            sys.exit(0)
        n += 1
""")


def _stacks(*pids: int) -> str:
    """What the given processes are blocked on, and who still holds /dev/fuse: a diagnosis for
    a writer that hangs after the daemon is gone."""
    out = []
    for pid in pids:
        tasks = sorted(os.listdir(f"/proc/{pid}/task")) if os.path.exists(f"/proc/{pid}/task") else []
        for task in tasks:
            info = []
            for item in ("stat", "wchan", "syscall", "stack"):
                try:
                    with open(f"/proc/{pid}/task/{task}/{item}") as f:
                        text = f.read()
                    info.append(text.rpartition(")")[2].split()[0] if item == "stat" else text.strip())
                except OSError as e:
                    info.append(f"({item}: {e.strerror})")
            out.append(f"{pid}/{task}: " + " | ".join(info))
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                        out.append(f"/dev/fuse held by pid {pid}: {open(f'/proc/{pid}/cmdline').read()!r}")
            except OSError:
                pass
    try:
        for conn in os.listdir("/sys/fs/fuse/connections"):
            with open(f"/sys/fs/fuse/connections/{conn}/waiting") as f:
                out.append(f"fuse connection {conn}: {f.read().strip()} waiting")
    except OSError:
        pass
    return "\n".join(out)


def version(i: int, n: int) -> bytes:
    return json.dumps({"file": i, "n": n, "pad": "p" * ((n * 7919 + i * 104729) % 150000)}).encode()


@pytest.mark.timeout(120 + 10 * ROUNDS)
def test_sigkill_during_commits_loses_nothing(make_mount, capsys):
    rng = random.Random(20261128)
    m = make_mount()
    acks = checked = quarantined_bytes = 0
    for i in range(FILES):
        (m.mnt / f"f{i}.json").write_bytes(version(i, 0))
    acked = {i: 0 for i in range(FILES)}
    made: set[int] = set()
    next_n = 1
    recovered_total = 0
    for round_no in range(ROUNDS):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.mnt), str(FILES), str(next_n)],
                                  stdout=subprocess.PIPE)
        output = Output(writer)
        # Kill only once the writer holds the mount's root: one that started late would open
        # the empty directory under a mount already gone, and write there forever.
        assert output.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        m.kill()
        try:
            out = output.rest(timeout=120)
        except subprocess.TimeoutExpired:
            writer.kill()
            pytest.fail(f"round {round_no}: the writer hung after the daemon was killed\n{_stacks(m.pid, writer.pid)}")
        for line in out.splitlines():
            what, n = line.split()
            if what == "made":
                made.add(int(n))
            else:
                acked[int(what)] = max(acked[int(what)], int(n))
            acks += 1
        quarantined_before = set(m.quarantine)
        m.start()
        status = m.status()
        recovered_total += status["recovered_at_mount"]
        max_n = next_n
        for i in range(FILES):
            data = (m.mnt / f"f{i}.json").read_bytes()
            doc = json.loads(data)  # a complete, valid document
            assert data == version(i, doc["n"]), f"round {round_no}: f{i}.json is not a version that was written"
            assert doc["n"] >= acked[i], f"round {round_no}: f{i}.json lost acknowledged version {acked[i]}"
            max_n = max(max_n, doc["n"])
            checked += 1
        for kept in set(m.quarantine) - quarantined_before:
            reason = json.loads(kept.with_name(kept.name + ".reason").read_text())
            i = int(reason["path"][1:].split(".")[0])
            data = kept.read_bytes()
            quarantined_bytes += len(data)
            # Staged data of an unfinished write: a prefix of some version of that file.
            assert any(version(i, n).startswith(data) for n in range(next_n, max_n + 50)), reason
        assert not [n for n in os.listdir(m.host / "staging") if not n.startswith("pool-")]
        lost = [n for n in made if not (m.backing / f"made-{n}").exists()]
        assert not lost, f"round {round_no}: files created read-only and closed were lost: {lost[:5]}"
        next_n = max_n + 1
    m.stop()
    report(capsys, f"commit loop: {ROUNDS} SIGKILL rounds, {acks} acknowledged commits, {checked} files checked, "
                   f"{recovered_total} staged writes recovered ({quarantined_bytes} bytes quarantined), 0 lost")
    assert recovered_total > 0, "the kills never hit a write in progress; the test proved nothing"


def _kill_while_writing(m, name: str, data: str, fsync: bool) -> None:
    """A writer leaves `data` staged in `name` and stays open; then the daemon is killed. With
    `fsync`, the writer asked for a commit of its incomplete document first, which was refused
    (EBADMSG) and left the content as the file's open version."""
    code = textwrap.dedent(f"""
        import errno, os, time
        f = open({str(m.mnt / name)!r}, "w")
        f.write({data!r})
        f.flush()
        if {fsync}:
            try:
                os.fsync(f.fileno())
            except OSError as e:
                assert e.errno == errno.EBADMSG
        print("written", flush=True)
        time.sleep(60)
    """)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"
    m.kill()
    writer.kill()
    writer.wait()


def test_crash_with_an_open_writer_keeps_its_staged_bytes(make_mount):
    m = make_mount()
    (m.mnt / "keep.json").write_text('{"v": 1}')
    _kill_while_writing(m, "keep.json", '{"v": 2, "partial": tr', fsync=True)
    m.start()
    assert json.loads((m.mnt / "keep.json").read_text()) == {"v": 1}
    assert wait_for(lambda: len(m.quarantine) == 1)
    assert m.quarantine[0].read_bytes() == b'{"v": 2, "partial": tr'
    assert m.status()["recovered_at_mount"] == 1


def test_crash_before_a_new_file_commits_leaves_no_trace_in_the_tree(make_mount):
    m = make_mount()
    _kill_while_writing(m, "fresh.json", '{"a": ', fsync=False)
    assert not (m.backing / "fresh.json").exists(), "a new file reaches the tree only by its commit"
    m.start()
    assert not (m.mnt / "fresh.json").exists()
    assert [p.read_bytes() for p in m.quarantine] == [b'{"a": ']


# Several programs at once: write-and-rename, creates and deletes, rewrites and restores, cache
# inserts. Each
# prints what it did once the call returned 0, so the checker knows what must have survived.
MIXED = textwrap.dedent("""
    import hashlib, json, os, sys
    mnt, role, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    first = n
    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    print("ready", flush=True)

    def put(path, data):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=root)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def body(name, n):
        return json.dumps({"name": name, "n": n, "pad": "q" * ((n * 7919) % 30000)}).encode()

    try:
        while True:
            n += 1
            if role == "rename":
                put(".r.tmp", body("r.json", n))
                os.rename(".r.tmp", "r.json", src_dir_fd=root, dst_dir_fd=root)
                print("r.json", n, flush=True)
            elif role == "create":
                put(f"c{n}.json", body(f"c{n}.json", n))
                print("create", n, flush=True)
                if n - 2 > first:
                    os.unlink(f"c{n - 2}.json", dir_fd=root)
                    print("delete", n - 2, flush=True)
            elif role == "restore":
                # Rewrite s.json, and every third time put generation 2 back the way a user
                # would (through the mount: an ordinary commit of an older, complete version).
                if n % 3:
                    put("s.json", body("s.json", n))
                    print("s.json", n, flush=True)
                else:
                    import subprocess
                    r = subprocess.run([sys.executable, "-m", "fusestore", "restore", "-g", "2", mnt + "/s.json"],
                                       capture_output=True)
                    if r.returncode != 0 and b"no backup generation" not in r.stderr:
                        sys.exit(0)
            elif role == "cache":
                key = hashlib.md5(json.dumps({"url": f"https://k/{n % 5}"}, separators=(",", ":")).encode()).hexdigest()
                try:
                    os.mkdir(f".cache/media/{key}", dir_fd=root)
                except FileExistsError:
                    pass
                put(f".cache/media/{key}/data.bin", body(key, n))
                print("cache", key, n, flush=True)
    except OSError:
        sys.exit(0)
""")


def mixed_body(name: str, n: int) -> bytes:
    return json.dumps({"name": name, "n": n, "pad": "q" * ((n * 7919) % 30000)}).encode()


@pytest.mark.timeout(120 + 12 * MIXED_ROUNDS)
def test_sigkill_under_mixed_concurrent_load(make_mount, capsys):
    from fusestore.engine.cache import Cache

    rng = random.Random(6)
    m = make_mount()
    rounds = MIXED_ROUNDS
    acked_r, created, deleted, cached = 0, set(), set(), {}
    start = {"rename": 0, "create": 0, "cache": 0, "restore": 0}
    written_s, uncertain = set(), set()
    checked = cache_inserts = 0
    for round_no in range(rounds):
        workers = {role: subprocess.Popen([sys.executable, "-c", MIXED, str(m.mnt), role, str(start[role])],
                                          stdout=subprocess.PIPE) for role in start}
        outputs = {role: Output(proc) for role, proc in workers.items()}
        for output in outputs.values():  # see test_sigkill_during_commits_loses_nothing
            assert output.readline().strip() == "ready"
        # Every program has done something (in an emulated VM, starting takes most of a second).
        first = {role: output.readline() for role, output in outputs.items()}
        time.sleep(rng.uniform(0.1, 0.6))
        m.kill()
        for role, proc in workers.items():
            try:
                out = first[role] + outputs[role].rest(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"round {round_no}: {role} hung after the kill\n{_stacks(m.pid, proc.pid)}")
            lines = out.splitlines()
            if role == "create" and lines and lines[-1].startswith("create "):
                # The delete that followed was in flight when the daemon died: it may or may not
                # have happened.
                uncertain.add(int(lines[-1].split()[1]) - 2)
            for line in lines:
                what, *rest = line.split()
                if what == "r.json":
                    acked_r = max(acked_r, int(rest[0]))
                elif what == "create":
                    created.add(int(rest[0]))
                elif what == "delete":
                    deleted.add(int(rest[0]))
                elif what == "cache":
                    cached[rest[0]] = max(cached.get(rest[0], 0), int(rest[1]))
                    cache_inserts += 1
                elif what == "s.json":
                    written_s.add(int(rest[0]))
        m.start()
        # Every close() and rename() that returned 0 survived, whole.
        if acked_r:
            doc = json.loads((m.mnt / "r.json").read_bytes())
            assert doc["n"] >= acked_r and (m.mnt / "r.json").read_bytes() == mixed_body("r.json", doc["n"])
        for n in created - deleted - uncertain:
            path = m.mnt / f"c{n}.json"
            assert path.read_bytes() == mixed_body(path.name, n), f"round {round_no}: c{n}.json lost"
            checked += 1
        for n in deleted:
            assert not (m.mnt / f"c{n}.json").exists(), f"round {round_no}: deleted c{n}.json is back"
        with Cache(str(m.state / "cache")) as c:
            entries = {e.key: e for e in c.entries()}
            assert set(entries) == set(os.listdir(m.state / "cache/media"))
            for key, n in cached.items():
                data = (m.mnt / f".cache/media/{key}/data.bin").read_bytes()
                assert json.loads(data)["n"] >= n and data == mixed_body(key, json.loads(data)["n"])
                checked += 1
        if (m.mnt / "s.json").exists():  # written and restored: always some complete version
            doc = json.loads((m.mnt / "s.json").read_bytes())
            assert (m.mnt / "s.json").read_bytes() == mixed_body("s.json", doc["n"])
        assert not [n for n in os.listdir(m.host / "staging") if not n.startswith("pool-")]
        # The next round goes on from the highest number seen, whatever survived.
        start["rename"] = max(start["rename"], acked_r) + 1000
        start["create"] = max([start["create"], *created]) + 1000
        start["cache"] = max([start["cache"], *cached.values()]) + 1000
        start["restore"] = max([start["restore"], *written_s]) + 1000
    m.stop()
    report(capsys, f"mixed load: {rounds} SIGKILL rounds, {len(created)} creates, {len(deleted)} deletes, "
                   f"{cache_inserts} cache inserts, {len(written_s)} rewrites, last rename {acked_r}, "
                   f"{checked} files checked, 0 lost")
    # Every program got work done (an emulated VM does about one operation per program per round).
    assert acked_r and len(created) >= rounds and deleted and cached and written_s, "the load did too little"

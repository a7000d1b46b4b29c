"""Power cuts, replayed: does everything acknowledged survive a crash of the machine, directory
entries included? (`tools/power-cut N`)

The backing tree lives on ext4 on a loop device whose file is served by `tools/blocklog.py`,
which logs every write and every flush the disk receives. A workload commits through a
fusestore mount (new files, rewrites with backups, renames onto validated names, deletes,
commits made by fsync, `.cache` inserts, a SQLite database in direct mode, and a file left
open mid-write) and notes, for each acknowledged operation (close, fsync, rename, unlink or
COMMIT returned), how many flushes the disk had received by then. The daemon is then killed.

Every flush is a moment at which the power may go out with all the data written before it on
the disk (what the filesystem made durable) and any part of what was written after it (a disk
with a volatile cache keeps some of that, in no particular order). For N of them, spread over
the run, the disk is rebuilt as it was then, with a random half of those later writes, mounted
(ext4 replays its journal), and checked:
every file holds a complete version that was written, every operation acknowledged before that
flush is in effect, the database passes its integrity check and has every acknowledged row,
the cache serves every acknowledged entry whole; then fusestore mounts the tree (staged data
of unfinished writes goes to the quarantine), and `fusestore check` finds nothing to repair
and nothing left in the staging directory.

This is log-replay, as device-mapper's log-writes target does it (this machine's kernel has no
device-mapper, and its KVM cannot boot a guest kernel, so a virtual machine here runs under
software emulation, tens of times slower): one run yields every crash state, where cutting a
virtual machine's power yields one per boot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blocklog  # noqa: E402

from fusestore.engine.state import default_host_id  # noqa: E402

FUSESTORE = [sys.executable, "-m", "fusestore"]
IMAGE_MIB = 96


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def host_dir(tree: Path) -> Path:
    return tree / ".fusestore" / "hosts" / default_host_id()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class Journal:
    """What the workload wrote and what was acknowledged, with the flush count at each ack."""

    def __init__(self, flushes_path: str):
        self.flushes_path = flushes_path
        self.written: dict[str, set[str]] = {}  # path -> digests of every version written
        self.acks: list[tuple[int, str, str | None]] = []  # (flushes, path, digest or None: gone)
        self.rows: list[tuple[int, int]] = []  # (flushes, row id) of acknowledged transactions
        self.cached: list[tuple[int, str, str]] = []  # (flushes, url, digest)
        self.open_files: list = []  # handles the workload leaves open until the crash
        self.deleting: set[str] = set()  # paths the workload set out to delete (maybe not acknowledged)

    def flushes(self) -> int:
        return blocklog.read_flushes(self.flushes_path)

    def wrote(self, path: str, data: bytes) -> None:
        self.written.setdefault(path, set()).add(digest(data))

    def ack(self, path: str, data: bytes | None) -> None:
        self.acks.append((self.flushes(), path, None if data is None else digest(data)))


def doc(name: str, n: int, rng: random.Random) -> bytes:
    return json.dumps({"name": name, "n": n, "pad": "x" * rng.randrange(0, 20000)}, indent=2).encode()


def workload(mnt: Path, journal: Journal, ops: int, seed: int) -> None:
    rng = random.Random(seed)
    (mnt / "docs").mkdir()
    db = sqlite3.connect(mnt / "state.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    long_lived = open(mnt / "docs/fsynced.json", "wb")  # commits by fsync, closed at the end
    live = [f"docs/new{i}.json" for i in range(3)]
    for n in range(ops):
        op = rng.choice(["new", "rewrite", "rewrite", "rename", "delete", "fsync", "cache", "sql"])
        if op == "new" or (op == "delete" and not live):
            path = f"docs/new{n}.json"
            data = doc(path, n, rng)
            journal.wrote(path, data)
            (mnt / path).write_bytes(data)
            journal.ack(path, data)
            live.append(path)
        elif op == "rewrite":
            path = f"docs/r{rng.randrange(4)}.json"
            data = doc(path, n, rng)
            journal.wrote(path, data)
            (mnt / path).write_bytes(data)
            journal.ack(path, data)
        elif op == "rename":
            path = f"docs/v{rng.randrange(3)}.json"
            data = doc(path, n, rng)
            journal.wrote(path, data)
            (mnt / "docs/next.tmp").write_bytes(data)
            os.rename(mnt / "docs/next.tmp", mnt / path)
            journal.ack(path, data)
        elif op == "delete":
            path = live.pop(rng.randrange(len(live)))
            if (mnt / path).exists():
                journal.deleting.add(path)
                os.unlink(mnt / path)
                journal.ack(path, None)
        elif op == "fsync":
            data = doc("docs/fsynced.json", n, rng)
            journal.wrote("docs/fsynced.json", data)
            long_lived.seek(0)
            long_lived.truncate()
            long_lived.write(data)
            long_lived.flush()
            os.fsync(long_lived.fileno())
            journal.ack("docs/fsynced.json", data)
        elif op == "cache":
            url = f"https://media.example/{n}.jpg"
            key = hashlib.md5(json.dumps({"url": url}, separators=(",", ":")).encode()).hexdigest()
            data = os.urandom(rng.randrange(1, 30000))
            (mnt / f".cache/media/{key}").mkdir()
            (mnt / f".cache/media/{key}/data.bin").write_bytes(data)
            (mnt / f".cache/media/{key}/metadata.json").write_text(json.dumps({"url": url}))
            journal.cached.append((journal.flushes(), url, digest(data)))
        else:
            db.execute("INSERT INTO t(id, v) VALUES(?, ?)", (n, "v" * rng.randrange(1, 3000)))
            journal.rows.append((journal.flushes(), n))
    # A write under way at the cut: staged, never committed.
    unfinished = open(mnt / "docs/unfinished.json", "wb")
    unfinished.write(b'{"half": ')
    unfinished.flush()
    journal.wrote("docs/unfinished.json", b"")
    db.close()
    journal.open_files = [long_lived, unfinished]  # open until the daemon is killed


def check_state(root: Path, journal: Journal, number: int) -> list[str]:
    """Problems of the tree `root` as a power cut after flush `number` left it."""
    problems = []
    expected: dict[str, str | None] = {}
    for flushes, path, dig in journal.acks:
        if flushes <= number:
            expected[path] = dig
    for path, versions in journal.written.items():
        file = root / path
        if not file.exists():
            # Gone is fine after a delete, even one not yet acknowledged (the disk may have
            # kept its writes); not otherwise.
            if expected.get(path) is not None and path not in journal.deleting:
                problems.append(f"{path}: acknowledged version {expected[path]} lost (file missing)")
            continue
        dig = digest(file.read_bytes())
        if dig not in versions and not (path == "docs/unfinished.json" and file.stat().st_size == 0):
            problems.append(f"{path}: holds {dig}, a version never written (torn)")
        elif path in expected and expected[path] is None:
            later = [d for f, p, d in journal.acks if p == path and f > number]
            if not later:
                problems.append(f"{path}: acknowledged delete undone")
        elif path in expected and dig != expected[path]:
            # Newer versions (acknowledged later or never) may be there; an older one may not.
            order = [d for _, p, d in journal.acks if p == path]
            if dig in order and order.index(dig) < order.index(expected[path]):
                problems.append(f"{path}: holds an older version than the acknowledged {expected[path]}")
    db_path = root / "state.db"
    if db_path.exists():
        db = sqlite3.connect(db_path)  # read-write: a hot journal is rolled back, as after any crash
        try:
            if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                problems.append("state.db: integrity_check failed")
            have = {r[0] for r in db.execute("SELECT id FROM t")}
        except sqlite3.DatabaseError as e:
            problems.append(f"state.db: {e}")
            have = set()
        finally:
            db.close()
    else:
        have = set()
    lost_rows = [row for flushes, row in journal.rows if flushes <= number and row not in have]
    if lost_rows:
        problems.append(f"state.db: acknowledged rows lost: {lost_rows[:5]}")
    return problems


def check_cache(root: Path, journal: Journal, number: int) -> list[str]:
    from fusestore import cache

    problems = []
    with cache.open(str(root)) as c:
        for flushes, url, dig in journal.cached:
            if flushes > number:
                continue
            entry = c.get(url)
            if entry is None:
                problems.append(f"cache entry of {url} lost")
            elif digest(Path(entry.path).read_bytes()) != dig:
                problems.append(f"cache entry of {url} holds other data")
    return problems


def retry(*cmd: str, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while run(*cmd, check=False).returncode != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def teardown(daemon_pid, mnt: Path, fs_dir: Path, loop: str | None, disk_dir: Path, server) -> None:
    """After the crash: nothing of the run may stay mounted or attached."""
    if daemon_pid:
        try:
            os.kill(daemon_pid, 9)
        except ProcessLookupError:
            pass
        for _ in range(300):
            try:
                if Path(f"/proc/{daemon_pid}/stat").read_text().split()[2] == "Z":
                    break  # dead, its descriptors closed
            except FileNotFoundError:
                break
            time.sleep(0.05)
    run("fusermount3", "-uz", str(mnt), check=False)
    if not retry("umount", str(fs_dir)):
        print(f"umount {fs_dir}: {run('fuser', '-vm', str(fs_dir), check=False).stderr}", file=sys.stderr)
        run("umount", "-l", str(fs_dir), check=False)
    if loop:
        run("losetup", "-d", loop, check=False)
        for _ in range(300):
            if loop not in run("losetup", "-a", check=False).stdout:
                break
            time.sleep(0.05)
    if not retry("fusermount3", "-u", str(disk_dir)):
        run("fusermount3", "-uz", str(disk_dir), check=False)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("states", type=int, nargs="?", default=100, help="crash states to check (default 100)")
    parser.add_argument("--ops", type=int, default=300, help="operations of the workload (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("tools/power-cut needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fusestore-power-cut-"))
    base, disk_dir, log, flushes = work / "base.img", work / "disk", work / "log", work / "flushes"
    fs_dir, mnt, replay_img, replay_dir = work / "fs", work / "mnt", work / "replay.img", work / "replay"
    for d in (disk_dir, fs_dir, mnt, replay_dir):
        d.mkdir()
    run("truncate", "-s", f"{IMAGE_MIB}M", str(base))
    run("mkfs.ext4", "-q", "-F", "-b", "4096", str(base))
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("blocklog.py")), str(base),
                               str(disk_dir), str(log), str(flushes)])
    loop = daemon_pid = None
    try:
        for _ in range(200):
            if (disk_dir / "disk.img").exists():
                break
            time.sleep(0.05)
        loop = run("losetup", "--find", "--show", str(disk_dir / "disk.img")).stdout.strip()
        run("mount", "-t", "ext4", loop, str(fs_dir))
        (fs_dir / "tree").mkdir()
        run(*FUSESTORE, "mount", str(fs_dir / "tree"), str(mnt))
        daemon_pid = int((host_dir(fs_dir / "tree") / "lock").read_text().split()[0])
        journal = Journal(str(flushes))
        workload(mnt, journal, args.ops, args.seed)
        total = journal.flushes()
        os.kill(daemon_pid, 9)  # the crash (the disk keeps only what was flushed: see replay)
        for f in journal.open_files:
            try:
                f.close()
            except OSError:
                pass  # the mount is gone with its daemon
    finally:
        teardown(daemon_pid, mnt, fs_dir, loop, disk_dir, server)
    commits = len(journal.acks)
    print(f"workload: {args.ops} operations, {commits} acknowledged file operations, {len(journal.rows)} "
          f"transactions, {len(journal.cached)} cache inserts, {total} flushes of the disk "
          f"({time.monotonic() - started:.0f}s)")
    chosen = set(range(1, total + 1)) if args.states >= total else \
        {round(1 + i * (total - 1) / (args.states - 1)) for i in range(args.states)}
    failures = checked = quarantined = kept_after = 0
    rng = random.Random(args.seed)
    for number, image, after in blocklog.replay(str(base), str(log)):
        if number not in chosen:
            continue
        # The disk as the flush left it, plus a random part of what was written after it and
        # not yet flushed (a disk with a volatile cache may have kept any of it, in any order).
        replay_img.write_bytes(image)
        kept = [w for w in after if rng.random() < 0.5]
        with open(replay_img, "r+b") as f:
            for off, data in kept:
                f.seek(off)
                f.write(data)
        kept_after += len(kept)
        rloop = run("losetup", "--find", "--show", str(replay_img)).stdout.strip()
        try:
            run("mount", "-t", "ext4", rloop, str(replay_dir))
            try:
                tree = replay_dir / "tree"
                problems = check_state(tree, journal, number) if tree.exists() else []
                if tree.exists():
                    run(*FUSESTORE, "mount", str(tree), str(mnt))
                    run(*FUSESTORE, "unmount", str(mnt))
                    problems += check_cache(tree, journal, number)
                    report = json.loads(run(*FUSESTORE, "check", str(tree), "--json", check=False).stdout)
                    if not report["ok"]:
                        problems.append(f"fusestore check: {report['findings']}")
                    left = os.listdir(host_dir(tree) / "staging")
                    if left:
                        problems.append(f"staged data left outside the quarantine: {left}")
                    quarantined += len([n for n in os.listdir(host_dir(tree) / "quarantine")
                                        if not n.endswith(".reason")])
                elif any(f <= number for f, _, _ in journal.acks):
                    problems.append("the tree itself is missing")
            finally:
                run("umount", str(replay_dir))
        except RuntimeError as e:
            problems = [str(e)]
        finally:
            run("losetup", "-d", rloop, check=False)
        checked += 1
        if problems:
            failures += 1
            print(f"after flush {number}: " + "; ".join(problems[:5]))
    print(f"power cuts: {checked} crash states of {total} flushes checked ({kept_after} unflushed writes kept), "
          f"{commits} acknowledged file operations, {quarantined} staged files quarantined in all, "
          f"{failures} state(s) with a problem")
    subprocess.run(["rm", "-rf", str(work)])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

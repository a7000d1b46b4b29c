"""fusestore benchmark: the same workloads on the plain backing directory and through a mount,
in one run, reported as ratios (rate through the mount / rate on the plain directory).

Usage: tools/bench [--quick] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from fusestore.engine import validate
from fusestore.engine.cache import Cache
from fusestore.engine.config import Cache as CacheConfig
from fusestore.engine.jskey import cache_key
from fusestore.engine.state import default_host_id

DOC = json.dumps({"title": "x" * 3900, "segments": [1, 2, 3]}).encode()  # about 4 KiB


def drop_cache(path: str) -> None:
    """Drop one file's pages from the page cache, so the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seq_write(root: str, size: int) -> float:
    path = os.path.join(root, "seq.bin")
    block = os.urandom(1 << 20)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(size >> 20):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t


def seq_read(root: str, cold: tuple[str, ...] = ()) -> float:
    """Read seq.bin whole; cold when `cold` names the files whose pages to drop first (the
    backing file, and through a mount the mount's own page cache of it too)."""
    path = os.path.join(root, "seq.bin")
    for name in cold:
        drop_cache(name)
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    while os.read(fd, 1 << 20):
        pass
    os.close(fd)
    return time.perf_counter() - t


_runs = iter(range(1_000_000))


def naive_json(root: str, n: int, fresh: bool = True) -> float:
    """Open, write, close: n new files (a fresh directory), or n rewrites of existing ones."""
    d = os.path.join(root, f"naive{next(_runs)}" if fresh else "naive-rewrite")
    os.makedirs(d, exist_ok=True)
    t = time.perf_counter()
    for i in range(n):
        with open(os.path.join(d, f"{i}.json"), "wb") as f:
            f.write(DOC)
    return time.perf_counter() - t


def safe_json(root: str, n: int) -> float:
    """Temp file, write, fsync, rename, fsync the directory: n new files in a fresh directory."""
    d = os.path.join(root, f"safe{next(_runs)}")
    os.makedirs(d, exist_ok=True)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    t = time.perf_counter()
    for i in range(n):
        tmp = os.path.join(d, f".{i}.json.tmp")
        with open(tmp, "wb") as f:
            f.write(DOC)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(d, f"{i}.json"))
        os.fsync(dfd)
    elapsed = time.perf_counter() - t
    os.close(dfd)
    return elapsed


def sqlite_inserts(root: str, n: int) -> float:
    """n inserts into a new SQLite database, each its own transaction (rollback journal)."""
    import sqlite3

    path = os.path.join(root, "bench.db")
    if os.path.exists(path):
        os.unlink(path)
    t = time.perf_counter()
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(n):
        with con:
            con.execute("INSERT INTO t(v) VALUES (?)", (f"row {i}",))
    con.close()
    return time.perf_counter() - t


def sparse_write(root: str) -> float:
    """Open a 1 GiB sparse file for writing, write 6 bytes in its middle, close (a commit)."""
    path = os.path.join(root, "sparse.img")
    with open(path, "wb") as f:
        f.truncate(1 << 30)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"hello!", 1 << 29)
    os.close(fd)
    elapsed = time.perf_counter() - t
    os.unlink(path)
    return elapsed


def make_files(backing: str, n: int) -> None:
    for sub in range(n // 1000):
        d = os.path.join(backing, "many", f"d{sub}")
        os.makedirs(d, exist_ok=True)
        for i in range(1000):
            os.close(os.open(os.path.join(d, f"f{i}.txt"), os.O_CREAT | os.O_WRONLY, 0o644))


def stat_all(root: str, n: int) -> float:
    paths = [os.path.join(root, "many", f"d{sub}", f"f{i}.txt") for sub in range(n // 1000) for i in range(1000)]
    for p in paths:  # warm
        os.stat(p)
    t = time.perf_counter()
    for p in paths:
        os.stat(p)
    return time.perf_counter() - t


def list_recursive(root: str) -> float:
    t = time.perf_counter()
    subprocess.run(["ls", "-lR", os.path.join(root, "many")], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def mount(backing: str, mnt: str) -> None:
    subprocess.run([sys.executable, "-m", "fusestore", "mount", backing, mnt], check=True)


def unmount(mnt: str) -> None:
    subprocess.run([sys.executable, "-m", "fusestore", "unmount", mnt], check=True)


def _write_files(args: tuple[str, int, bool]) -> None:
    """One writer process: n 4 KiB JSON files into its own directory, naively or safely."""
    d, n, safe = args
    os.makedirs(d, exist_ok=True)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(n):
        final = os.path.join(d, f"{i}.json")
        path = os.path.join(d, f".{i}.json.tmp") if safe else final
        with open(path, "wb") as f:
            f.write(DOC)
            if safe:
                f.flush()
                os.fsync(f.fileno())
        if safe:
            os.rename(path, final)
            os.fsync(dfd)
    os.close(dfd)


def concurrent_writers(pool, root: str, writers: int, n: int, safe: bool) -> float:
    base = os.path.join(root, f"conc{next(_runs)}")
    t = time.perf_counter()
    pool.map(_write_files, [(os.path.join(base, f"w{k}"), n, safe) for k in range(writers)])
    return time.perf_counter() - t


def create_files(root: str, n: int, durable: bool = False) -> float:
    """open(O_CREAT) and close n empty files in a fresh directory; `durable`: fsync the
    directory after each, which makes each create durable as fusestore's commit at close does."""
    d = os.path.join(root, f"create{next(_runs)}")
    os.makedirs(d)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    t = time.perf_counter()
    for i in range(n):
        os.close(os.open(os.path.join(d, f"f{i}.dat"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        if durable:
            os.fsync(dfd)
    elapsed = time.perf_counter() - t
    os.close(dfd)
    return elapsed


def json_document(size: int) -> bytes:
    """A JSON array of records of about `size` bytes, the shape of a long timeline."""
    record = json.dumps({"id": "seg-0000", "text": "Octopuses have nine brains and blue blood. " * 3,
                         "start": 12.5, "end": 17.25, "tags": ["ocean", "science"]}).encode()
    count = max(1, size // (len(record) + 1))
    return b"[" + b",".join([record] * count) + b"]"


def validation_rate(size: int) -> float:
    """GB/s of the engine's JSON validation on an in-memory document."""
    data = json_document(size)
    validate.json_error(data)  # warm
    t = time.perf_counter()
    assert validate.json_error(data) is None
    return len(data) / (time.perf_counter() - t) / 1e9


def proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_pid(backing: str) -> int:
    with open(os.path.join(backing, ".fusestore", "hosts", default_host_id(), "lock")) as f:
        return int(f.read().split()[0])


def big_json_commit(mnt: str, pid: int, size: int) -> tuple[float, float]:
    """Write a `size` JSON document through the mount; returns (seconds, the daemon's peak
    anonymous memory above what it held before, in MiB). Anonymous memory is what the daemon
    itself holds: the pages of the memory map it validates from are the page cache, shared and
    reclaimable, and are left out."""
    before = proc_status(pid, "RssAnon")
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc_status(pid, "RssAnon"))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    chunk = json_document(8 << 20)[1:-1]
    t = time.perf_counter()
    try:
        with open(os.path.join(mnt, "big.json"), "wb") as f:
            f.write(b"[")
            written = 0
            while written < size:
                if written:
                    f.write(b",")
                f.write(chunk)
                written += len(chunk) + 1
            f.write(b"]")
        elapsed = time.perf_counter() - t
    finally:
        done.set()
        watcher.join()
    os.unlink(os.path.join(mnt, "big.json"))
    return elapsed, (peak[0] - before) / (1 << 20)


def many_commits(mnt: str, pid: int, n: int) -> tuple[float, int, int, int]:
    """n commits (100 files rewritten in turn); returns (daemon CPU seconds per commit, resident
    memory after the first 1,000 commits, after all n, and the daemon's open fds at the end)."""
    d = os.path.join(mnt, "churn")
    os.makedirs(d, exist_ok=True)
    cpu0 = proc_cpu(pid)
    early = 0
    for i in range(n):
        with open(os.path.join(d, f"{i % 100}.json"), "wb") as f:
            f.write(DOC)
        if i == 999:
            early = proc_status(pid, "VmRSS")
    cpu = (proc_cpu(pid) - cpu0) / n
    return cpu, early, proc_status(pid, "VmRSS"), len(os.listdir(f"/proc/{pid}/fd"))


def clone_cost(work: str, fs_type: str, size: int) -> float | None:
    """Seconds to open a `size` file for writing without O_TRUNC, write one byte and close,
    through a mount whose backing tree is on a loop-mounted `fs_type` image (None if that
    filesystem cannot be made here)."""
    mkfs = shutil.which(f"mkfs.{fs_type}")
    if mkfs is None or os.geteuid() != 0:
        return None
    image, top = os.path.join(work, f"{fs_type}.img"), os.path.join(work, f"{fs_type}-fs")
    os.makedirs(top)
    with open(image, "wb") as f:
        f.truncate(max(3 * size, 1 << 30))
    if subprocess.run([mkfs, "-q", image], capture_output=True).returncode != 0:
        return None
    if subprocess.run(["mount", "-o", "loop", image, top], capture_output=True).returncode != 0:
        return None
    backing, mnt = os.path.join(top, "backing"), os.path.join(work, f"{fs_type}-mnt")
    try:
        os.makedirs(backing)
        os.makedirs(mnt)
        with open(os.path.join(backing, "video.mp4"), "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())  # on disk already, as a file a pipeline edits would be
        mount(backing, mnt)
        try:
            t = time.perf_counter()
            fd = os.open(os.path.join(mnt, "video.mp4"), os.O_WRONLY)
            os.pwrite(fd, b"x", 0)
            os.close(fd)
            return time.perf_counter() - t
        finally:
            unmount(mnt)
    finally:
        subprocess.run(["umount", top], capture_output=True)


def fill_cache(root: str, n: int) -> list[str]:
    """n entries written straight into the spec's layout (as an existing cache would be), then
    indexed by opening it; returns their URLs."""
    urls = [f"https://cdn.example.com/{i}.jpg" for i in range(n)]
    for url in urls:
        d = os.path.join(root, "media", cache_key(url))
        os.makedirs(d)
        with open(os.path.join(d, "image.jpg"), "wb") as f:
            f.write(b"x" * 512)
        with open(os.path.join(d, "metadata.json"), "w") as f:
            json.dump({"url": url, "tags": [], "cachedAt": "2026-01-01T00:00:00.000Z",
                       "expiresAt": "2099-01-01T00:00:00.000Z"}, f)
    Cache(root).close()
    return urls


def spec_get(root: str, url: str) -> str | None:
    """The spec's CacheManager.get on the plain directory: metadata exists? read it, check
    expiry, find the data file."""
    d = os.path.join(root, "media", cache_key(url))
    meta = os.path.join(d, "metadata.json")
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        json.load(f)
    return next((os.path.join(d, n) for n in os.listdir(d) if n != "metadata.json"), None)


def per_op(fn, items) -> float:
    t = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - t) / len(items) * 1e6


def cache_rows(work: str, sizes: list[int], probes: int) -> list[dict]:
    """Lookups by URL at each cache size (API hit and miss, the spec's file lookup, and a stat
    through the mount), and inserts under eviction pressure."""
    rows = []
    for n in sizes:
        backing, mnt = os.path.join(work, f"cache{n}"), os.path.join(work, f"cache{n}-mnt")
        os.makedirs(mnt)
        root = os.path.join(backing, ".fusestore", "cache")
        urls = fill_cache(root, n)
        sample = random.Random(n).sample(urls, min(probes, n))
        misses = [f"https://cdn.example.com/missing/{i}" for i in range(len(sample))]
        with Cache(root) as c:
            hit = per_op(lambda u: c.get(u), sample)
            miss = per_op(lambda u: c.get(u), misses)
        spec = per_op(lambda u: spec_get(root, u), sample)
        mount(backing, mnt)
        try:
            through = per_op(lambda u: os.stat(os.path.join(mnt, ".cache/media", cache_key(u), "image.jpg")), sample)
        finally:
            unmount(mnt)
        rows.append({"entries": n, "api_hit_us": hit, "api_miss_us": miss, "spec_lookup_us": spec,
                     "mount_stat_us": through})
    # Inserts that each evict: the limit holds about 200 entries of 16 KiB.
    root = os.path.join(work, "evict-cache")
    with Cache(root, CacheConfig(max_size=200 * 17 * 1024)) as c:
        body = b"y" * 16384
        for i in range(250):
            c.put(f"https://warm/{i}", body, "media")
        count = 300 if probes < 1000 else 1000
        t = time.perf_counter()
        for i in range(count):
            c.put(f"https://evict/{i}", body, "media")
        rate = count / (time.perf_counter() - t)
        evictions = c.stats().types["media"].evictions
    rows.append({"inserts_per_s": rate, "evictions": evictions, "inserted": count})
    return rows


def interleaved(fns, repeats: int) -> list[float]:
    """Median time of each function, run in turns (a, b, a, b, ...) so that drift in the
    machine's disk and CPU weighs on all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            times[i].append(fn())
    return [statistics.median(t) for t in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one repeat (a smoke test)")
    parser.add_argument("--dir", default=None, help="where to put the trees (default: a temp dir under /var/tmp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = (32 if args.quick else 256) << 20
    small = 200 if args.quick else 2000
    many = 1000 if args.quick else 10_000
    repeats = 1 if args.quick else 3
    small_repeats = 1 if args.quick else 5

    work = tempfile.mkdtemp(prefix="fusestore-bench-", dir=args.dir or "/var/tmp")
    plain = os.path.join(work, "plain")
    backing = os.path.join(work, "backing")
    mnt = os.path.join(work, "mnt")
    for d in (plain, backing, mnt):
        os.mkdir(d)
    rows = []
    figures: dict = {}
    try:
        make_files(plain, many)
        make_files(backing, many)
        mount(backing, mnt)
        try:
            def pair(name, fn_plain, fn_mount, target=None, against=None):
                p, f = interleaved([fn_plain, fn_mount], repeats)
                rows.append({"workload": name, "plain_s": p, "fusestore_s": f, "ratio": p / f,
                             "target": target, "against": against})

            pair(f"sequential write {size >> 20} MiB + fsync", lambda: seq_write(plain, size),
                 lambda: seq_write(mnt, size), target=0.85)
            pair(f"sequential read {size >> 20} MiB, cold", lambda: seq_read(plain, (os.path.join(plain, "seq.bin"),)),
                 lambda: seq_read(mnt, (os.path.join(backing, "seq.bin"), os.path.join(mnt, "seq.bin"))), target=0.9)
            pair(f"sequential read {size >> 20} MiB, warm", lambda: seq_read(plain), lambda: seq_read(mnt))
            os.unlink(os.path.join(plain, "seq.bin"))
            os.unlink(os.path.join(mnt, "seq.bin"))
            naive_json(mnt, small, fresh=False)
            safe_plain, naive_plain, naive_mount, safe_mount, rewrite_mount = interleaved([
                lambda: safe_json(plain, small),
                lambda: naive_json(plain, small),
                lambda: naive_json(mnt, small),
                lambda: safe_json(mnt, small),
                lambda: naive_json(mnt, small, fresh=False),
            ], small_repeats)
            rows.append({"workload": f"{small} x 4 KiB JSON: naive through mount vs safe on plain",
                         "plain_s": safe_plain, "fusestore_s": naive_mount, "ratio": safe_plain / naive_mount,
                         "target": 0.5, "against": "safe pattern on plain"})
            rows.append({"workload": f"{small} x 4 KiB JSON rewritten (with backups) vs safe on plain",
                         "plain_s": safe_plain, "fusestore_s": rewrite_mount, "ratio": safe_plain / rewrite_mount,
                         "target": None, "against": "safe pattern on plain"})
            rows.append({"workload": f"{small} x 4 KiB JSON: naive (not durable on plain)", "plain_s": naive_plain,
                         "fusestore_s": naive_mount, "ratio": naive_plain / naive_mount, "target": None,
                         "against": None})
            rows.append({"workload": f"{small} x 4 KiB JSON: safe pattern, both", "plain_s": safe_plain,
                         "fusestore_s": safe_mount, "ratio": safe_plain / safe_mount, "target": None, "against": None})
            per_writer = small // 8
            with multiprocessing.get_context("fork").Pool(8) as pool:
                pair(f"8 writers x {per_writer} x 4 KiB JSON: naive through mount vs safe on plain",
                     lambda: concurrent_writers(pool, plain, 8, per_writer, True),
                     lambda: concurrent_writers(pool, mnt, 8, per_writer, False), target=0.5)
            pair(f"stat {many} files, warm", lambda: stat_all(plain, many), lambda: stat_all(mnt, many), target=0.8)
            pair(f"ls -lR of {many} files", lambda: list_recursive(plain), lambda: list_recursive(mnt), target=0.5)
            # Not like with like (a commit is durable, a plain create is not): no target; the
            # durable create below has one.
            pair(f"create {many} empty files", lambda: create_files(plain, many), lambda: create_files(mnt, many))
            few = many // 5
            pair(f"create {few} empty files vs plain create + directory fsync",
                 lambda: create_files(plain, few, durable=True), lambda: create_files(mnt, few), target=0.5,
                 against="plain create + directory fsync")
            inserts = 100 if args.quick else 1000
            pair(f"SQLite: {inserts} inserts, a transaction each", lambda: sqlite_inserts(plain, inserts),
                 lambda: sqlite_inserts(mnt, inserts))
            pair("6 bytes written into a 1 GiB sparse file", lambda: sparse_write(plain), lambda: sparse_write(mnt))
            pid = daemon_pid(backing)
            figures["validation_gb_s"] = validation_rate((64 if args.quick else 512) << 20)
            figures["big_json_size_mib"] = (128 if args.quick else 1024)
            figures["big_json_s"], figures["big_json_peak_mib"] = big_json_commit(
                mnt, pid, figures["big_json_size_mib"] << 20)
            commits = 5000 if args.quick else 100_000
            figures["commits"] = commits
            (figures["cpu_per_commit_ms"], figures["rss_after_1000"], figures["rss_after_all"],
             figures["fds_after_all"]) = many_commits(mnt, pid, commits)
            figures["cpu_per_commit_ms"] *= 1000
            with open(os.path.join(backing, "video.mp4"), "wb") as f:
                for _ in range(size >> 20):
                    f.write(b"v" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
            t = time.perf_counter()
            fd = os.open(os.path.join(mnt, "video.mp4"), os.O_WRONLY)
            os.pwrite(fd, b"x", 0)
            os.close(fd)
            figures["clone_ext4_s"] = time.perf_counter() - t
        finally:
            unmount(mnt)
        for fs_type in ("btrfs", "xfs"):
            figures[f"clone_{fs_type}_s"] = clone_cost(work, fs_type, size)
        cache = cache_rows(work, [1000, 10_000] if args.quick else [1000, 100_000], 200 if args.quick else 2000)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps({"rows": rows, "figures": figures, "cache": cache}, indent=2))
        return 0
    when = datetime.date.today().isoformat()
    print(f"fusestore bench, {when}, {platform.node() and 'this machine'}: {os.cpu_count()} cores, "
          f"Linux {platform.release()}, Python {platform.python_version()}"
          + (", quick" if args.quick
             else f", median of {repeats} ({small_repeats} for the JSON rows), runs interleaved"))
    print()
    print(f"| {'workload':58} | {'plain':>9} | {'fusestore':>9} | {'ratio':>6} | {'target':>6} | met |")
    print(f"|{'-' * 60}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 8}|-----|")
    for r in rows:
        target = f"{r['target']:.2f}x" if r["target"] else ""
        met = ("yes" if r["ratio"] >= r["target"] else "NO") if r["target"] else ""
        print(f"| {r['workload']:58} | {r['plain_s']:8.3f}s | {r['fusestore_s']:8.3f}s | {r['ratio']:5.2f}x "
              f"| {target:>6} | {met:3} |")
    f = figures
    mib = 1 << 20

    def clone(key: str) -> str:
        return "not available here" if f.get(key) is None else f"{f[key]:.3f}s"

    print()
    met = "yes" if f["validation_gb_s"] >= 1 else "NO"
    print(f"- JSON validation: {f['validation_gb_s']:.2f} GB/s (target 1.0: {met})")
    print(f"- committing a {f['big_json_size_mib']} MiB JSON document: {f['big_json_s']:.1f}s, daemon peak anonymous "
          f"memory +{f['big_json_peak_mib']:.0f} MiB "
          f"(target < 64 MiB: {'yes' if f['big_json_peak_mib'] < 64 else 'NO'})")
    print(f"- daemon CPU per commit: {f['cpu_per_commit_ms']:.2f} ms; resident memory after 1,000 commits "
          f"{f['rss_after_1000'] / mib:.1f} MiB, after {f['commits']:,} commits {f['rss_after_all'] / mib:.1f} MiB; "
          f"{f['fds_after_all']} open fds")
    print(f"- open for writing without O_TRUNC, 1-byte write and close of a {size >> 20} MiB file: "
          f"ext4 (copied) {clone('clone_ext4_s')}, btrfs (reflinked) {clone('clone_btrfs_s')}, "
          f"xfs (reflinked) {clone('clone_xfs_s')}")
    print()
    print("Cache lookups by URL, microseconds per lookup (the spec's lookup reads metadata.json and lists the entry")
    print("on the plain directory; the API counts every hit as a use, a write to the index):")
    print()
    print(f"| {'entries':>8} | {'API hit':>8} | {'API miss':>8} | {'spec lookup, plain':>18} "
          f"| {'stat through mount':>18} |")
    print(f"|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 20}|{'-' * 20}|")
    for r in cache[:-1]:
        print(f"| {r['entries']:>8} | {r['api_hit_us']:6.0f}us | {r['api_miss_us']:6.0f}us | "
              f"{r['spec_lookup_us']:16.0f}us | {r['mount_stat_us']:16.0f}us |")
    last = cache[-1]
    print()
    print(f"Inserts of 16 KiB entries into a full cache (each evicts the least recently used): "
          f"{last['inserts_per_s']:.0f}/s, {last['evictions']} evictions for {last['inserted']} inserts.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

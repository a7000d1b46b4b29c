"""fusestore benchmark: the same workloads on the plain backing directory and through a mount,
in one run, reported as ratios (rate through the mount / rate on the plain directory).

Usage: tools/bench [--quick] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

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


def seq_read(root: str, backing_path: str) -> float:
    drop_cache(backing_path)
    path = os.path.join(root, "seq.bin")
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
    try:
        make_files(plain, many)
        make_files(backing, many)
        mount(backing, mnt)
        try:
            def pair(name, fn_plain, fn_mount, target=None, against=None):
                p, f = interleaved([fn_plain, fn_mount], repeats)
                rows.append({"workload": name, "plain_s": p, "fusestore_s": f, "ratio": p / f,
                             "target": target, "against": against})

            pair(f"sequential write {size >> 20} MiB + fsync", lambda: seq_write(plain, size), lambda: seq_write(mnt, size))
            pair(f"sequential read {size >> 20} MiB, cold", lambda: seq_read(plain, os.path.join(plain, "seq.bin")),
                 lambda: seq_read(mnt, os.path.join(backing, "seq.bin")))
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
                         "target": 0.4, "against": "safe pattern on plain"})
            rows.append({"workload": f"{small} x 4 KiB JSON rewritten (with backups) vs safe on plain",
                         "plain_s": safe_plain, "fusestore_s": rewrite_mount, "ratio": safe_plain / rewrite_mount,
                         "target": None, "against": "safe pattern on plain"})
            rows.append({"workload": f"{small} x 4 KiB JSON: naive (not durable on plain)", "plain_s": naive_plain,
                         "fusestore_s": naive_mount, "ratio": naive_plain / naive_mount, "target": None, "against": None})
            rows.append({"workload": f"{small} x 4 KiB JSON: safe pattern, both", "plain_s": safe_plain,
                         "fusestore_s": safe_mount, "ratio": safe_plain / safe_mount, "target": None, "against": None})
            pair(f"stat {many} files, warm", lambda: stat_all(plain, many), lambda: stat_all(mnt, many), target=0.5)
            pair(f"ls -lR of {many} files", lambda: list_recursive(plain), lambda: list_recursive(mnt))
        finally:
            unmount(mnt)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    when = datetime.date.today().isoformat()
    print(f"fusestore bench, {when}, {platform.node() and 'this machine'}: {os.cpu_count()} cores, "
          f"Linux {platform.release()}, Python {platform.python_version()}"
          f"{', quick' if args.quick else f', median of {repeats} ({small_repeats} for the JSON rows), runs interleaved'}")
    print()
    print(f"| {'workload':58} | {'plain':>9} | {'fusestore':>9} | {'ratio':>6} | {'target':>6} | met |")
    print(f"|{'-' * 60}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 8}|-----|")
    for r in rows:
        target = f"{r['target']:.2f}x" if r["target"] else ""
        met = ("yes" if r["ratio"] >= r["target"] else "NO") if r["target"] else ""
        print(f"| {r['workload']:58} | {r['plain_s']:8.3f}s | {r['fusestore_s']:8.3f}s | {r['ratio']:5.2f}x | {target:>6} | {met:3} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

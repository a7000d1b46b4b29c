"""The `fusestore` command line. Every command prints a one-line error and exits non-zero on
failure; commands that report take `--json`."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import subprocess
import sys
import time

import msgspec

from fusestore import cache, control, projects
from fusestore import events as events_mod
from fusestore.engine import config as config_mod
from fusestore.engine import diffs, maintenance, procs, schemas
from fusestore.engine import state as state_mod
from fusestore.engine.cache import iso
from fusestore.engine.errors import FusestoreError
from fusestore.engine.jskey import cache_key
from fusestore.engine.paths import one_line
from fusestore.engine.state import STATE_NAME
from fusestore.engine.store import Rejected, Store
from fusestore.trees import TreeWriter, find_tree, fusestore_mounts, mount_device, mount_of, tree_above


class CommandError(FusestoreError):
    """A failure to report as one line on stderr."""


# -- finding trees and mounts ------------------------------------------------------------------


def locate(path: str) -> tuple[str, str, str | None]:
    """For a PATH in a mount or a backing tree: (backing, path relative to it, mountpoint or None)."""
    absolute = os.path.abspath(path)
    parent = os.path.realpath(os.path.dirname(absolute))
    full = os.path.join(parent, os.path.basename(absolute))
    found = mount_of(parent)
    if found:
        mountpoint, backing = found
        rel = os.path.relpath(full, mountpoint)
        if rel == "." or rel.startswith(".backups/") or rel.startswith(STATE_NAME):
            raise CommandError(f"{path} is not a file of the tree")
        return backing, rel, mountpoint
    tree = tree_above(parent)
    if tree is None:
        raise CommandError(f"{path} is not in a fusestore mount or backing tree")
    served = [m for m, b in fusestore_mounts() if b == tree]
    return tree, os.path.relpath(full, tree), served[0] if served else None


def find_mount(mountpoint: str | None, root: str | None) -> tuple[str, str]:
    """(mountpoint, backing) for status and unmount: the given mountpoint, the mount serving
    --root, or the mount that holds the current directory."""
    if mountpoint:
        real = os.path.realpath(mountpoint)
        for m, b in fusestore_mounts():
            if m == real:
                return m, b
        raise CommandError(f"{mountpoint} is not a fusestore mount")
    start = root or os.getcwd()
    found = mount_of(start)
    if found:
        return found
    real = os.path.realpath(start)
    for m, b in fusestore_mounts():
        if real == b or real.startswith(b + "/"):
            return m, b
    raise CommandError(f"no fusestore mount found for {start}")


# -- commands ---------------------------------------------------------------------------------


def cmd_mount(args) -> int:
    from fusestore import daemon

    if args.foreground:
        return daemon.serve(args.backing, args.mountpoint, args.o, args.config, True, args.ready_fd)
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "fusestore", "mount", "--foreground", "--ready-fd", str(write_end),
           args.backing, args.mountpoint]
    if args.config:
        cmd += ["--config", os.path.abspath(args.config)]
    for opt in args.o:
        cmd += ["-o", opt]
    # A service manager's notification socket is for the process it started (run the daemon
    # with --foreground under a Type=notify unit), not for this one's child.
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = subprocess.Popen(cmd, pass_fds=(write_end,), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        message = ready.readline().decode(errors="replace").strip()
    if message != "ok":
        proc.wait(timeout=30)
        raise CommandError(message.removeprefix("error: ") or f"the daemon exited with status {proc.returncode}")
    # The mount answers once a stat of its root is served by the daemon.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.stat(args.mountpoint)
            if os.path.ismount(args.mountpoint):
                return 0
        except OSError:
            pass
        if proc.poll() is not None:
            raise CommandError(f"the daemon exited with status {proc.returncode} before the mount answered")
        time.sleep(0.02)
    raise CommandError("the mount did not answer within 30 seconds")


def process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its parent to reap it counts as gone."""
    return procs.start_time(pid) is not None


def _wait_gone(pid: int, mountpoint: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = pid > 0 and process_alive(pid)
        if not alive and not any(m == mountpoint for m, _ in fusestore_mounts()):
            return True
        time.sleep(0.05)
    return False


def cmd_unmount(args) -> int:
    mountpoint, backing = find_mount(args.mountpoint, None)
    state = control.daemon_dir(backing, mount_device(mountpoint))
    pid = -1
    try:
        reply = control.ask(state, "status", timeout=10)
        pid = reply.status.pid if reply.status else -1
        reply = control.ask(state, "unmount")
        if not reply.ok:
            raise CommandError(reply.error or "the daemon refused to unmount")
    except (OSError, ConnectionError, msgspec.DecodeError):
        # No daemon answers (it was killed): remove the dead mount.
        for flags in (["-u"], ["-uz"]):
            if subprocess.run(["fusermount3", *flags, mountpoint], capture_output=True).returncode == 0:
                break
        else:
            raise CommandError(f"cannot unmount {mountpoint}: no daemon answers and fusermount3 failed")
    if not _wait_gone(pid, mountpoint):
        raise CommandError(f"the daemon serving {mountpoint} did not exit")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def cmd_status(args) -> int:
    mountpoint, backing = find_mount(args.mountpoint, args.root)
    try:
        reply = control.ask(control.daemon_dir(backing, mount_device(mountpoint)), "status", timeout=30)
    except (OSError, ConnectionError) as e:
        raise CommandError(f"the daemon serving {mountpoint} does not answer ({e})") from None
    s = reply.status
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(s) + b"\n")
        return 0
    lines = [
        f"mount:        {s.mountpoint}",
        f"backing:      {s.backing}",
        f"pid:          {s.pid}, up {datetime.timedelta(seconds=int(s.uptime_seconds))} (since {_when(s.started)})",
        f"open staged:  {s.open_staged_files} file(s), {s.open_handles} open handle(s)",
        f"commits:      {s.commits}",
        f"rejections:   {s.rejections}",
        f"quarantine:   {s.quarantine_entries} entr{'y' if s.quarantine_entries == 1 else 'ies'}"
        f" ({s.quarantined} this run, {s.recovered_at_mount} recovered at mount)",
        f"backups:      {s.backup_files} file(s), {s.backup_generations} generation(s), {_size(s.backup_bytes)}",
        f"reads:        {s.read_path}",
        f"hosts:        {_hosts_line(s)}",
    ]
    if s.cache is not None:
        c = s.cache
        hits = sum(t.hits for t in c.types.values())
        misses = sum(t.misses for t in c.types.values())
        lines.append(f"cache:        {' + '.join(f'{t.entries} {k}' for k, t in c.types.items())} entries, "
                     f"{_size(c.total_bytes)} of {_size(c.max_bytes)}; {hits} hits, {misses} misses")
    if s.check is None:
        lines.append("check:        running")
    else:
        problems = [f for f in s.check.findings if f.kind in maintenance.NEEDS_REPAIR]
        lines.append(f"check:        {s.check.checked_files} document(s), {len(problems)} problem(s)"
                     + (" (see fusestore check)" if problems else ""))
        for f in problems[:5]:
            lines.append(f"  {f.kind} {one_line(f.path)}: {one_line(f.detail)}")
    for r in s.recent_rejections[-5:]:
        lines.append(f"  rejected {_when(r.time)} {one_line(r.path)}: {one_line(r.reason)}")
    print("\n".join(lines))
    return 0


def _hosts_line(s: control.Status) -> str:
    """The hosts serving the tree (several share a tree on a network filesystem), this one first."""
    parts = []
    for h in sorted(s.hosts, key=lambda h: h.id != s.host):
        if h.id == s.host:
            parts.append(f"{h.id} (this daemon, pid {s.pid})")
        elif h.serving:
            parts.append(f"{h.id} (serving, pid {h.pid} on {h.machine})")
        else:
            parts.append(f"{h.id} ({'retired' if h.retired else 'not serving'})")
    return ", ".join(parts) or s.host


def _parse_since(value: str) -> float:
    """--since: an ISO 8601 time (local unless it says) or a duration ago (90s, 5m, 2h, 1d)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise CommandError(f"--since wants a time (2026-12-02T14:30) or a duration ago (90s, 5m, 2h, 1d), "
                           f"not {value!r}") from None


def _describe(e: events_mod.Event) -> str:
    when = datetime.datetime.fromtimestamp(e.time).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    parts = [when, f"{e.kind:12}", one_line(e.path)]
    if e.source is not None:
        parts.append(f"(from {one_line(e.source)})")
    if e.size is not None:
        parts.append(_size(e.size))
    if e.generation is not None:
        parts.append(f"generation {e.generation}")
    if e.reason is not None:
        parts.append(f"- {one_line(e.reason)}")
    if e.quarantined is not None:
        parts.append(f"(kept in the quarantine as {e.quarantined})")
    return " ".join(parts)


def cmd_events(args) -> int:
    mountpoint, backing = find_mount(args.mountpoint, args.root)
    since = _parse_since(args.since) if args.since else None
    after = 0 if args.no_follow and since is None and args.after is None else args.after  # all it keeps
    out = sys.stdout.buffer
    try:
        for event in control.events(control.daemon_dir(backing, mount_device(mountpoint)), after, since,
                                    not args.no_follow):
            out.write(msgspec.json.encode(event) + b"\n" if args.json else _describe(event).encode() + b"\n")
            out.flush()
    except (OSError, ConnectionError) as e:
        if isinstance(e, BrokenPipeError):
            return 0
        raise CommandError(f"the daemon serving {mountpoint} does not answer ({e})") from None
    return 0


class GenerationReport(msgspec.Struct):
    generation: int
    superseded: str
    size: int
    valid: bool
    problem: str | None
    change: str  # what the version that replaced it changed (`fusestore diff -g N` for the whole)


def _generation_reports(store: Store, relpath: str) -> list[GenerationReport]:
    reports = []
    for gen in store.backups.generations(relpath):
        problem = store.check_generation(relpath, gen.number)
        when = datetime.datetime.fromtimestamp(gen.superseded_ns / 1e9).isoformat(timespec="seconds")
        reports.append(GenerationReport(gen.number, when, gen.size, problem is None, problem,
                                        diffs.change_summary(store, relpath, gen.number)))
    return reports


def _open_store(backing: str) -> Store:
    return Store(backing, config_mod.load(backing), control.host_of(backing))


def cmd_backups(args) -> int:
    backing, relpath, _ = locate(args.path)
    store = _open_store(backing)
    try:
        reports = _generation_reports(store, relpath)
    finally:
        store.close()
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(reports) + b"\n")
        return 0
    if not reports:
        raise CommandError(f"no backups of {relpath}")
    print(f"{'gen':>3}  {'superseded':19}  {'size':>10}  {'valid':5}  then changed")
    for r in reports:
        valid = "yes" if r.valid else "no"
        print(f"{r.generation:>3}  {r.superseded:19}  {r.size:>10}  {valid:5}  {one_line(r.change)}")
        if r.problem:
            print(f"{'':>3}  invalid: {one_line(r.problem)}")
    return 0


def cmd_diff(args) -> int:
    """Exit status as diff(1): 0 the same, 1 different, 2 trouble (raised as CommandError)."""
    backing, relpath, _ = locate(args.path)
    store = _open_store(backing)
    try:
        if args.generation not in [g.number for g in store.backups.generations(relpath)]:
            raise CommandError(f"no backup generation {args.generation} of {relpath} (fusestore backups lists them)")
        if not store.exists(relpath):
            raise CommandError(f"{relpath} does not exist now (fusestore restore -g {args.generation} puts it back)")
        result = diffs.compare(store, relpath, args.generation, 0)
    except diffs.TooLarge as e:
        raise CommandError(str(e)) from None
    finally:
        store.close()
    if args.json:
        _print_json({"path": relpath, "generation": args.generation, **msgspec.to_builtins(result)})
    elif result.same:
        pass
    elif result.kind == "json":
        print(f"--- {diffs.label(relpath, args.generation)}\n+++ {diffs.label(relpath, 0)}")
        for c in result.changes:
            old = "" if c.old is msgspec.UNSET else _short_json(c.old)
            new = "" if c.new is msgspec.UNSET else _short_json(c.new)
            print({"added": f"+ {c.path}: {new}", "removed": f"- {c.path}: {old}",
                   "changed": f"~ {c.path}: {old} -> {new}"}[c.op])
        if not result.changes:
            print("(the same JSON value; only the formatting changed)")
    elif result.kind == "text":
        print("\n".join(result.unified))
    else:
        print(f"binary files differ: generation {args.generation}: {result.old_size} bytes, "
              f"sha256 {result.old_sha256}; now: {result.new_size} bytes, sha256 {result.new_sha256}")
    return 0 if result.same else 1


def _short_json(value, limit: int = 200) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd_restore(args) -> int:
    backing, relpath, _ = locate(args.path)
    with _writer(backing) as writer:
        try:
            writer.restore(relpath, args.generation)
        except FileNotFoundError:
            raise CommandError(f"no backup generation {args.generation} of {relpath}") from None
        except Rejected as e:
            raise CommandError(f"generation {args.generation} of {relpath} was rejected: {e.reason}") from None
    print(f"restored {one_line(relpath)} from generation {args.generation}")
    return 0


# -- the cache --------------------------------------------------------------------------------


def _params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise CommandError(f"--param wants NAME=VALUE, not {pair!r}")
        params[name] = value
    return params


def _open_cache(args):
    return cache.open(args.root)


def _print_json(value) -> None:
    sys.stdout.buffer.write(msgspec.json.encode(value) + b"\n")


def cmd_cache_key(args) -> int:
    print(cache_key(args.url, _params(args.param)))
    return 0


def cmd_cache_get(args) -> int:
    with _open_cache(args) as c:
        entry = c.get(args.url, _params(args.param), args.type)
        if entry is None:
            return 1
    _print_entry(entry, args.json)
    return 0


def _print_entry(entry, as_json: bool) -> None:
    if as_json:
        _print_json(entry.to_json())
    else:
        print(entry.path)


def cmd_cache_put(args) -> int:
    if not os.path.isfile(args.file):
        raise CommandError(f"{args.file} is not a file")
    with _open_cache(args) as c:
        entry = c.put(args.url, args.file, args.type, params=_params(args.param), tags=args.tag,
                            file=args.name)
    _print_entry(entry, args.json)
    return 0


def cmd_cache_ls(args) -> int:
    with _open_cache(args) as c:
        entries = list(c.entries(args.type))
    if args.json:
        _print_json([e.to_json() for e in entries])
        return 0
    for e in entries:
        print(f"{e.type:5} {e.key}  {_size(e.size):>10}  used {e.usage_count:>4}x  "
              f"expires {iso(e.expires_at)[:10]}  {e.metadata.get('url') or ''}")
    return 0


def cmd_cache_stats(args) -> int:
    with _open_cache(args) as c:
        stats = c.stats()
    if args.json:
        _print_json(stats)
        return 0
    print(f"cache:   {stats.dir}")
    print(f"size:    {_size(stats.total_bytes)} of {_size(stats.max_bytes)}")
    for kind, t in stats.types.items():
        print(f"{kind + ':':8} {t.entries} entries, {_size(t.bytes)}; {t.hits} hits, {t.misses} misses, "
              f"{t.inserts} inserts, {t.evictions} evicted, {t.expired} expired")
    return 0


def cmd_cache_clear(args) -> int:
    with _open_cache(args) as c:
        count = c.clear(args.type)
    print(f"removed {count} entr{'y' if count == 1 else 'ies'}")
    return 0


def cmd_cache_acquire(args) -> int:
    with _open_cache(args) as c:
        while True:
            slot = c.acquire(args.provider, args.limit, args.per)
            if slot.allowed or not args.wait:
                break
            time.sleep(min(slot.wait, 60) + 0.01)
    if args.json:
        _print_json({"allowed": slot.allowed, "wait": slot.wait, "used": slot.used, "limit": slot.limit})
    elif not slot.allowed:
        print(f"{args.provider}: limit of {args.limit} per {args.per:g}s reached; next slot in {slot.wait:.1f}s")
    return 0 if slot.allowed else 1


def _tree_arg(path: str) -> str:
    """BACKING as the commands take it: a backing tree or a mount of one."""
    if not os.path.isdir(path):
        raise CommandError(f"{path} is not a directory")
    return find_tree(path)


def _writer(backing: str):
    return TreeWriter(backing)


def cmd_gc(args) -> int:
    store = _open_store(_tree_arg(args.backing))
    try:
        report = maintenance.gc(store)
    finally:
        store.close()
    if args.json:
        _print_json(report)
    else:
        over = f", {report.backups_over_budget} of them to stay under {store.config.backups.max_bytes}" \
            if report.backups_over_budget else ""
        print(f"backups: removed {report.backups_removed} generation(s) older than "
              f"{store.config.backups.max_age_days:g} days or past the size budget{over}; "
              f"{report.backup_bytes} bytes left")
        print(f"cache: removed {report.cache_expired} expired entr{'y' if report.cache_expired == 1 else 'ies'}")
    return 0


def _progress(label: str):
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int | None = None) -> None:
        print(f"\r{label} {done}" + (f"/{total}" if total else ""), end="", file=sys.stderr, flush=True)

    return show


def cmd_check(args) -> int:
    backing = _tree_arg(args.backing)
    if args.host is not None:
        if not args.repair:
            raise CommandError("--host names a host to recover: use it with --repair")
        return _recover_host(backing, args.host)
    served = any(os.path.realpath(b) == backing for _m, b in fusestore_mounts())
    writer = _writer(backing) if args.repair else None
    store = writer.store if writer else _open_store(backing)
    try:
        report = maintenance.check(store, served, _progress("checked"))
        if _progress("x"):
            print(file=sys.stderr)
        if writer is not None:
            report = maintenance.repair(report, writer, store)
    finally:
        (writer or store).close()
    left = report.unrepaired
    if args.json:
        _print_json({"ok": not left, "checked_files": report.checked_files, "projects": report.projects,
                     "findings": report.findings})
        return 1 if left else 0
    for f in report.findings:
        mark = "repaired" if f.repaired else ("NEEDS REPAIR" if f.kind in maintenance.NEEDS_REPAIR else "note")
        print(f"{mark:12} {f.kind:14} {one_line(f.path)}: {one_line(f.detail)}")
    print(f"{report.checked_files} document(s) in {report.projects} project(s) checked; "
          + (f"{len(left)} problem(s) left{'' if args.repair else ' (fusestore check --repair restores from backups)'}"
             if left else "nothing to repair"))
    return 1 if left else 0


def _recover_host(backing: str, host: str) -> int:
    """`check --repair --host ID`: what a host that died left (its staged files, its work on the
    cache) is recovered from here, as its next daemon would; the host is then marked retired, so
    that it no longer counts as one of the tree's hosts (a daemon started for it again clears that)."""
    if not os.path.isdir(os.path.join(backing, STATE_NAME, state_mod.HOSTS_NAME, host)):
        raise CommandError(f"{backing} has no host {host!r} (see fusestore status)")
    config = config_mod.load(backing)
    store = Store(backing, config, host)
    try:
        try:
            store.state.lock()
        except state_mod.Busy:
            raise CommandError(f"host {host} serves {backing} now: only a host that is gone can be recovered") from None
        recovered = store.recover()
        with cache.Cache(cache.directory(backing, config.cache), config.cache, host=control.host_of(backing)) as c:
            finished = c.recover(dead_hosts=frozenset({host}))
        store.state.retire()
    finally:
        store.close()
    print(f"host {host}: {len(recovered)} staged file(s) moved to its quarantine "
          f"({os.path.join(STATE_NAME, state_mod.HOSTS_NAME, host, 'quarantine')}), "
          f"{finished} cache change(s) finished; the host is retired")
    return 0


def cmd_migrate(args) -> int:
    backing = _tree_arg(args.backing)
    writer = None if args.dry_run else _writer(backing)
    store = writer.store if writer else _open_store(backing)
    try:
        results = maintenance.migrate(store, writer, args.dry_run, _progress("migrating"))
    finally:
        (writer or store).close()
    if _progress("x") and results:
        print(file=sys.stderr)
    failed = [r for r in results if r.error]
    if args.json:
        _print_json({"dry_run": args.dry_run, "migrated": [r for r in results if not r.error], "failed": failed})
    else:
        for r in results:
            verb = "would migrate" if args.dry_run else "migrated"
            print(f"{verb if not r.error else 'CANNOT migrate'} {one_line(r.path)} ({r.type}) {r.source} -> {r.target}"
                  + (f": {r.error}" if r.error else ""))
        print(f"{len(results) - len(failed)} document(s) {'to migrate' if args.dry_run else 'migrated'}, "
              f"{len(failed)} left unchanged")
    return 1 if failed else 0


def cmd_new_project(args) -> int:
    backing = _tree_arg(args.backing)
    project_id = projects.new_project(backing, name=args.name, parent=args.parent)
    print(project_id)
    return 0


def cmd_schema_export(args) -> int:
    for path in schemas.export(args.dir):
        print(path)
    return 0

# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusestore",
        description="A FUSE filesystem that stages, validates, backs up and atomically commits every write.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("mount", help="mount BACKING on MOUNTPOINT")
    p.add_argument("backing", metavar="BACKING")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground, log to stderr")
    p.add_argument("--config", metavar="FILE", help="configuration file (default: BACKING/fusestore.toml)")
    p.add_argument("-o", action="append", default=[], metavar="OPT,...",
                   help="mount options: xattr, show_virtual, allow_other, ro, attr_timeout=S, entry_timeout=S, "
                        "page_cache=on|off, passthrough=on|off, debug[=NAME:NAME]")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("unmount", help="commit or quarantine open files, unmount, wait for the daemon")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_unmount)

    p = sub.add_parser("status", help="what a mount is doing")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--root", metavar="DIR", help="a backing tree or a mount of one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("events", help="follow commits, rejections, restores, deletes and cache changes")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--root", metavar="DIR", help="a backing tree or a mount of one")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--since", metavar="WHEN", help="start with the kept events since WHEN (a time, or 90s, 5m, 2h, 1d)")
    p.add_argument("--after", type=int, metavar="SEQ", help="start after the event numbered SEQ (its seq field)")
    p.add_argument("--no-follow", action="store_true", help="print the kept events and exit")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("backups", help="the backup generations of a file")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backups)

    p = sub.add_parser("diff", help="what changed since a backup generation (exit 1 when something did)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--generation", "-g", type=int, default=1, metavar="N",
                   help="the backup generation to compare the current content with (default 1, the last)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("restore", help="put a backup generation back as a new commit")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--generation", "-g", type=int, default=1, metavar="N")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("gc", help="drop backups past their age and expired cache entries")
    p.add_argument("backing", metavar="BACKING")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("check", help="integrity report of a tree; --repair restores from backups")
    p.add_argument("backing", metavar="BACKING")
    p.add_argument("--repair", action="store_true")
    p.add_argument("--host", metavar="ID", help="with --repair: recover what the host ID, gone, left")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("migrate", help="bring versioned documents to the current schema version")
    p.add_argument("backing", metavar="BACKING")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("new-project", help="create a project skeleton; prints its id")
    p.add_argument("backing", metavar="BACKING")
    p.add_argument("--name", metavar="NAME")
    p.add_argument("--parent", default="public/projects", metavar="DIR",
                   help="where projects live in the tree (default: public/projects)")
    p.set_defaults(func=cmd_new_project)

    schema = sub.add_parser("schema", help="document schemas").add_subparsers(
        dest="schema_command", required=True, metavar="SCHEMA_COMMAND")
    p = schema.add_parser("export", help="write a JSON Schema file per document type")
    p.add_argument("--dir", default="schemas", metavar="DIR")
    p.set_defaults(func=cmd_schema_export)

    cache = sub.add_parser("cache", help="the media and TTS cache").add_subparsers(
        dest="cache_command", required=True, metavar="CACHE_COMMAND")

    def cache_cmd(name: str, func, help: str, url: bool = False, json: bool = True) -> argparse.ArgumentParser:
        p = cache.add_parser(name, help=help)
        p.add_argument("--root", metavar="DIR", help="a backing tree or a mount of one (default: from the cwd)")
        if url:
            p.add_argument("url", metavar="URL")
            p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                           help="a request parameter that is part of the key (string value)")
        if json:
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        return p

    p = cache_cmd("key", cmd_cache_key, "the cache key of URL and params (md5, as the TypeScript pipeline computes it)",
                  url=True, json=False)
    p = cache_cmd("get", cmd_cache_get, "print the data path of a cached entry; exit 1 on a miss", url=True)
    p.add_argument("--type", choices=("media", "tts"), default="media")
    p = cache_cmd("put", cmd_cache_put, "cache FILE as the entry of URL; print its data path", url=True)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--type", choices=("media", "tts"), required=True)
    p.add_argument("--tag", action="append", default=[], metavar="TAG")
    p.add_argument("--name", metavar="NAME",
                   help="the data file's name in the entry (default: data + FILE's extension)")
    p = cache_cmd("ls", cmd_cache_ls, "list live entries")
    p.add_argument("--type", choices=("media", "tts"))
    cache_cmd("stats", cmd_cache_stats, "entries, bytes, hits, misses, evictions per type")
    p = cache_cmd("clear", cmd_cache_clear, "remove every entry (of one type)", json=False)
    p.add_argument("--type", choices=("media", "tts"))
    p = cache_cmd("acquire", cmd_cache_acquire,
                  "take a slot of a sliding-window rate limit; exit 1 (and say when) if none is free")
    p.add_argument("provider", metavar="PROVIDER")
    p.add_argument("--limit", type=int, required=True, metavar="N", help="calls allowed per window")
    p.add_argument("--per", type=float, required=True, metavar="SECONDS", help="the window")
    p.add_argument("--wait", action="store_true", help="wait for a free slot instead of failing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "mount":
        # Commands report for themselves; the engine's log lines belong to the daemon's log.
        logging.getLogger("fusestore").addHandler(logging.NullHandler())
    try:
        return args.func(args)
    except FusestoreError as e:
        name = args.command + (f" {args.cache_command}" if args.command == "cache" else "")
        name += f" {args.schema_command}" if args.command == "schema" else ""
        print(f"fusestore {name}: {e}", file=sys.stderr)
        return 2 if args.command == "diff" else 1  # diff's 1 says "different", as diff(1)'s does
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"fusestore {args.command}: {e.strerror or e}{where}", file=sys.stderr)
        return 2 if args.command == "diff" else 1
    except KeyboardInterrupt:
        return 130



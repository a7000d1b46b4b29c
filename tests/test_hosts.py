"""Several hosts, one tree: two daemons with separate host ids, each in a mount namespace of its
own, serve one backing directory, as two machines serve a tree on NFSv4 or CephFS (fcntl locks
on a local filesystem behave as those filesystems' cluster-wide ones). Programs of each host run
in its namespace and see only its mount.

What must hold: commits of one file from both hosts are serialized (every acknowledged version is
the file's content or one of its backup generations: history never forks), nothing
acknowledged is lost or torn, a host's SIGKILL leaves the other serving, the next daemon of the
dead host recovers its staged data, and the cache index equals its entries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import FUSESTORE, daemon_pid, host_dir

pytestmark = pytest.mark.timeout(240)


class Host:
    """A daemon serving `backing` on `mnt` as host `host_id`, in a mount namespace of its own
    kept by a sleeping process; `run` starts a program in that namespace."""

    def __init__(self, backing: Path, mnt: Path, host_id: str):
        self.backing, self.mnt, self.id = backing, mnt, host_id
        self.keeper: subprocess.Popen | None = None
        self.pid: int | None = None

    def start(self) -> None:
        if os.geteuid() != 0:
            pytest.skip("mount namespaces need root")
        self.mnt.mkdir(exist_ok=True)
        mount = " ".join([*FUSESTORE, "mount", str(self.backing), str(self.mnt), "-o", f"host_id={self.id}"])
        self.keeper = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mount} && echo mounted && exec sleep 3600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.keeper.stdout.readline().strip()
        if line != "mounted":
            self.keeper.wait(timeout=30)
            pytest.fail(f"host {self.id} did not mount: {self.keeper.stderr.read()}")
        self.pid = daemon_pid(self.backing, self.id)

    def run(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", f"--mount=/proc/{self.keeper.pid}/ns/mnt", *cmd], **kw)

    def call(self, *cmd: str) -> subprocess.CompletedProcess:
        proc = self.run(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        _wait_gone(self.pid)
        self._drop_namespace()

    def stop(self) -> None:
        if self.keeper is None:
            return
        if self.keeper.poll() is None and self.pid is not None and _alive(self.pid):
            self.call(*FUSESTORE, "unmount", str(self.mnt))
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            _wait_gone(self.pid)
        self._drop_namespace()

    def _drop_namespace(self) -> None:
        """The namespace, and a dead daemon's mount in it, go with their last process."""
        if self.keeper is not None and self.keeper.poll() is None:
            self.keeper.kill()
            self.keeper.wait(timeout=10)
        self.keeper = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] != "Z"


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def hosts(tmp_path):
    # tools/vm-test --hosts puts the tree on a real NFSv4 mount.
    shared = os.environ.get("FUSESTORE_SHARED_DIR")
    backing = Path(shared) / f"{tmp_path.name}-{os.getpid()}" if shared else tmp_path / "backing"
    backing.mkdir()
    # Every version stays in the backups, so that each acknowledged one can be found again.
    (backing / "fusestore.toml").write_text("[backups]\nkeep = 100000\nmax_bytes = \"1GiB\"\n")
    made = [Host(backing, tmp_path / f"mnt-{name}", name) for name in ("alpha", "beta")]
    try:
        for h in made:
            h.start()
        yield made
    finally:
        for h in made:
            h.stop()


# A program of one host. Role "shared" rewrites the shared files (in place and by rename); role
# "own" creates and deletes files of its own and inserts cache entries; both read the shared
# files. One "shared" program per host: two programs of one host writing one file in place share
# its open version (as on any filesystem, the file then holds a mix of their writes), while each
# host has a version of its own. Prints each operation once the call returned 0 ("ack PATH N",
# "gone PATH", "cache KEY N"), "torn PATH" for a read that was not a whole document, and stops at
# the first error (its daemon was killed) or when time is up.
WRITER = textwrap.dedent("""
    import hashlib, json, os, random, sys, time
    mnt, host, role, seconds, seed = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    rng = random.Random(seed)
    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    stop = time.monotonic() + seconds
    print("ready", flush=True)

    def body(name, n):
        return json.dumps({"name": name, "host": host, "n": n, "pad": "h" * rng.randrange(0, 20000)}).encode()

    def put(path, data):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=root)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    n = 0
    mine = []
    try:
        while time.monotonic() < stop:
            n += 1
            action = rng.random() * 0.5 + (0.5 if role == "own" else 0)
            shared = f"s{rng.randrange(4)}.json"
            if action < 0.2:
                put(shared, body(shared, n))
                print("ack", shared, n, flush=True)
            elif action < 0.4:
                tmp = f".{host}.tmp"
                put(tmp, body(shared, n))
                os.rename(tmp, shared, src_dir_fd=root, dst_dir_fd=root)
                print("ack", shared, n, flush=True)
            elif action < 0.75:
                name = f"{host}-{role}-{n}.json"
                put(name, body(name, n))
                mine.append(name)
                print("ack", name, n, flush=True)
                if len(mine) > 5:
                    old = mine.pop(0)
                    print("unlinking", old, flush=True)  # done or not if the daemon dies now
                    os.unlink(old, dir_fd=root)
                    print("gone", old, flush=True)
            elif action < 0.9:
                key = hashlib.md5(json.dumps({"url": f"https://k/{n % 6}"}, separators=(",", ":")).encode()).hexdigest()
                try:
                    os.mkdir(f".cache/media/{key}", dir_fd=root)
                except FileExistsError:
                    pass
                put(f".cache/media/{key}/data.bin", body(key, n))
                print("cache", key, n, flush=True)
            else:
                try:
                    fd = os.open(shared, os.O_RDONLY, dir_fd=root)
                except FileNotFoundError:
                    continue
                with os.fdopen(fd, "rb") as f:
                    data = f.read()
                try:
                    json.loads(data)
                except ValueError:
                    print("torn", shared, len(data), flush=True)
    except OSError as e:
        print("stopped", e.errno, flush=True)
""")


def _versions(backing: Path, name: str) -> list[dict]:
    """The file's content and every backup generation of it, decoded."""
    found = [json.loads((backing / name).read_bytes())]
    gens = backing / ".fusestore" / "backups" / name
    if gens.is_dir():
        found += [json.loads(p.read_bytes()) for p in gens.iterdir() if p.name.startswith("%")]
    return found


def _check_tree(backing: Path, acks: dict[str, list[tuple[str, int]]], gone: dict[str, bool]) -> int:
    """Every acknowledged version of a file is its content or a backup generation of it; every
    acknowledged delete (`gone[name]` true) is in effect. Returns how many versions were checked."""
    checked = 0
    for name, written in acks.items():
        if name in gone:
            assert not gone[name] or not (backing / name).exists(), f"{name} was deleted and is back"
            continue
        seen = {(v["host"], v["n"]) for v in _versions(backing, name)}
        for version in written:
            assert version in seen, f"{name}: the acknowledged version {version} is neither its content nor a backup"
            checked += 1
    return checked


def _collect(lines: list[str], host: str, acks, gone, cached, torn) -> None:
    for line in lines:
        what, *rest = line.split()
        if what == "ack":
            acks.setdefault(rest[0], []).append((host, int(rest[1])))
        elif what == "unlinking":
            gone.setdefault(rest[0], False)  # in flight when the daemon died: done or not
        elif what == "gone":
            gone[rest[0]] = True
        elif what == "cache":
            cached[rest[0]] = (host, int(rest[1]))
        elif what == "torn":
            torn.append(f"{host}: {line}")


def test_two_hosts_write_the_same_files_and_one_is_killed(hosts, capsys):
    from fusestore.engine.cache import Cache

    alpha, beta = hosts
    backing = alpha.backing
    procs = {}
    for seed, (h, seconds) in enumerate(((alpha, "6"), (beta, "60"))):
        for k, role in enumerate(("shared", "own")):
            procs[(h.id, k)] = h.run(sys.executable, "-c", WRITER, str(h.mnt), h.id, role, seconds, str(seed * 10 + k),
                                     stdout=subprocess.PIPE, text=True)
    for proc in procs.values():
        assert proc.stdout.readline().strip() == "ready"
    time.sleep(3)
    beta.kill()  # under load; alpha goes on for the rest of its 6 seconds
    acks, gone, cached, torn = {}, {}, {}, []
    for (host, _), proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        _collect(out.splitlines(), host, acks, gone, cached, torn)
    assert torn == []
    alpha_after = [v for versions in acks.values() for v in versions if v[0] == "alpha"]
    assert alpha_after, "alpha's writers got nothing done"
    # Alpha serves on: its writes commit while beta is dead, and it reads everything whole.
    assert alpha.call(sys.executable, "-c", f"import json; open('{alpha.mnt}/after.json', 'w').write('{{}}')"
                      ).returncode == 0
    checked = _check_tree(backing, acks, gone)
    # Beta's staged data waits in its own directory: alpha never touched it.
    beta_staged = [n for n in os.listdir(host_dir(backing, "beta") / "staging") if not n.startswith("pool-")]
    beta.start()  # the dead host's next daemon recovers what it left
    status = json.loads(beta.call(*FUSESTORE, "status", str(beta.mnt), "--json").stdout)
    assert status["host"] == "beta" and status["recovered_at_mount"] == len(beta_staged)
    assert {h["id"]: h["serving"] for h in status["hosts"]} == {"alpha": True, "beta": True}
    assert not [n for n in os.listdir(host_dir(backing, "beta") / "staging") if not n.startswith("pool-")]
    for name in acks:
        if name not in gone:  # both hosts read the same, whole content
            a = alpha.call("cat", str(alpha.mnt / name)).stdout
            b = beta.call("cat", str(beta.mnt / name)).stdout
            assert a == b and json.loads(a)["name"] == name
    for h in hosts:
        check = h.call(*FUSESTORE, "check", str(h.mnt), "--json")
        assert json.loads(check.stdout)["ok"], check.stdout
    with Cache(str(backing / ".fusestore" / "cache"), host="alpha") as c:
        entries = {e.key for e in c.entries()}
    assert entries == set(os.listdir(backing / ".fusestore" / "cache" / "media"))
    for key in cached:
        data = alpha.call("cat", str(alpha.mnt / f".cache/media/{key}/data.bin")).stdout
        assert json.loads(data)["name"] == key
    with capsys.disabled():
        print(f"\ntwo hosts: {sum(len(v) for v in acks.values())} acknowledged writes "
              f"({len(alpha_after)} by alpha), beta killed under load with {len(beta_staged)} staged, "
              f"{checked} versions found, {len(cached)} cache keys, 0 lost")


def test_a_host_reads_the_other_hosts_commit_at_its_next_open(hosts):
    alpha, beta = hosts
    script = textwrap.dedent("""
        import json, sys, time
        path, me = sys.argv[1], sys.argv[2]
        for n in range(int(sys.argv[3])):
            line = sys.stdin.readline()
            if not line:
                break
            want = int(line)
            if want >= 0:  # the other host committed n: it must be what an open reads now
                got = json.loads(open(path, "rb").read())["n"]
                print("read", got, flush=True)
            else:
                open(path, "w").write(json.dumps({"n": n, "by": me}))
                print("wrote", n, flush=True)
    """)
    rounds = 40
    a = alpha.run(sys.executable, "-c", script, str(alpha.mnt / "f.json"), "alpha", str(rounds),
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    b = beta.run(sys.executable, "-c", script, str(beta.mnt / "f.json"), "beta", str(rounds),
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for n in range(rounds):
        writer, reader = (a, b) if n % 2 == 0 else (b, a)
        for p in (writer, reader):
            p.stdin.write("-1\n" if p is writer else "0\n")
            p.stdin.flush()
            if p is writer:
                assert p.stdout.readline().split() == ["wrote", str(n)]
            else:
                assert p.stdout.readline().split() == ["read", str(n)], f"round {n}: the other host's commit unseen"
    for p in (a, b):
        p.stdin.close()
        p.wait(timeout=30)
    # stat: within the attribute timeout (1 s by default) at the latest.
    alpha.call(sys.executable, "-c", f"open('{alpha.mnt}/g.json', 'w').write('[' + '1,' * 999 + '1]')")
    size = (alpha.backing / "g.json").stat().st_size
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = beta.call("stat", "-c", "%s", str(beta.mnt / "g.json")).stdout.strip()
        if seen == str(size):
            break
        time.sleep(0.2)
    assert seen == str(size)


def test_one_daemon_per_host_id(hosts, tmp_path):
    alpha, _ = hosts
    again = Host(alpha.backing, tmp_path / "mnt-again", "alpha")
    with pytest.raises(pytest.fail.Exception, match="already served by another fusestore on host alpha"):
        again.start()
    again.stop()
    status = json.loads(alpha.call(*FUSESTORE, "status", str(alpha.mnt), "--json").stdout)
    assert status["host"] == "alpha" and [h["id"] for h in status["hosts"] if h["serving"]] == ["alpha", "beta"]
    text = alpha.call(*FUSESTORE, "status", str(alpha.mnt)).stdout
    assert "alpha (this daemon" in text and "beta" in text


def test_a_dead_host_is_recovered_from_another(hosts):
    """`check --repair --host beta`, run on alpha: beta's staged data (a writer had a file open
    when beta died) goes to beta's quarantine; beta is then retired, and a live host cannot be
    recovered."""
    alpha, beta = hosts
    writer = beta.run(sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        f = open("{beta.mnt}/open.json", "w")
        f.write('{{"half": ')
        f.flush()
        print("open", flush=True)
        time.sleep(60)
    """), stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "open"
    beta.kill()
    writer.kill()
    writer.wait()
    backing = str(alpha.backing)
    refused = alpha.call(*FUSESTORE, "check", "--repair", "--host", "alpha", backing)
    assert refused.returncode != 0 and "serves" in refused.stderr
    done = alpha.call(*FUSESTORE, "check", "--repair", "--host", "beta", backing)
    assert done.returncode == 0, done.stderr
    assert "1 staged file(s) moved" in done.stdout
    quarantine = host_dir(alpha.backing, "beta") / "quarantine"
    kept = [p for p in quarantine.iterdir() if not p.name.endswith(".reason")]
    assert [p.read_bytes() for p in kept] == [b'{"half": ']
    assert not (alpha.backing / "open.json").exists()
    status = json.loads(alpha.call(*FUSESTORE, "status", str(alpha.mnt), "--json").stdout)
    assert {h["id"]: (h["serving"], h["retired"]) for h in status["hosts"]} == {
        "alpha": (True, False), "beta": (False, True)}
    beta.start()  # a daemon started for it again: no longer retired
    status = json.loads(alpha.call(*FUSESTORE, "status", str(alpha.mnt), "--json").stdout)
    assert {h["id"]: (h["serving"], h["retired"]) for h in status["hosts"]} == {
        "alpha": (True, False), "beta": (True, False)}


def test_a_second_host_needs_byte_range_locks(tmp_path, monkeypatch):
    """On a filesystem that refuses fcntl locks (an NFS mount with nolock, some FUSE
    filesystems), one host may serve the tree; a second is refused, naming the filesystem."""
    import errno

    from fusestore import daemon
    from fusestore.engine import config, locks
    from fusestore.engine.store import Store

    def refuse(self):
        raise locks.LocksUnsupported(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.TreeLocks, "probe", refuse)
    backing = tmp_path / "tree"
    backing.mkdir()
    first = Store(str(backing), config.Config(), "alpha")
    try:
        first.state.lock()
        assert daemon._check_locks(first) == []  # alone: served without cross-host locks
        with first.locks.path("a.json"):
            pass
    finally:
        first.close()
    second = Store(str(backing), config.Config(), "beta")
    try:
        with pytest.raises(daemon.MountError, match=r"on a \w+ filesystem without byte-range locks .*host\(s\) alpha"):
            daemon._check_locks(second)
    finally:
        second.close()


def test_a_database_is_open_on_one_host_at_a_time(hosts):
    """SQLite's locks on a file in place stay in the kernel of the host that takes them (FUSE
    forwards none), so they cannot keep another host's programs out: while one host has the
    database open, an open on another host fails (EBUSY) instead of corrupting it."""
    alpha, beta = hosts
    holder = alpha.run(sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, time
        db = sqlite3.connect("{alpha.mnt}/state.db")
        db.execute("create table t(x)")
        db.execute("insert into t values (1)")
        db.commit()
        print("open", flush=True)
        input()
        db.close()
    """), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "open"
    query = (f"import sqlite3; db = sqlite3.connect('{beta.mnt}/state.db'); "
             "print(db.execute('select count(*) from t').fetchone()[0])")
    busy = beta.call(sys.executable, "-c", query)
    assert busy.returncode != 0 and "unable to open database file" in busy.stderr
    holder.communicate("\n", timeout=30)
    assert beta.call(sys.executable, "-c", query).stdout.strip() == "1"


def test_a_machine_whose_name_was_never_set(tree):
    """A machine that never set its hostname (a minimal VM's init, some containers) is named
    "(none)", which is no valid host id: the default is then "none", and the mount works."""
    if os.geteuid() != 0:
        pytest.skip("unshare -u needs root")
    backing, mnt = tree
    fs = " ".join(FUSESTORE)
    script = f"""
        {sys.executable} -c "import socket; socket.sethostname('(none)')" || exit 9
        {fs} mount {backing} {mnt} || exit 10
        echo '{{"a": 1}}' > {mnt}/a.json
        {fs} status {mnt} --json
        {fs} unmount {mnt} || exit 11
    """
    result = subprocess.run(["unshare", "-u", "sh", "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["host"] == "none"
    assert json.loads((backing / "a.json").read_text()) == {"a": 1}
    assert (host_dir(backing, "none") / "lock").exists()

"""POSIX permissions as another user: with -o allow_other, an unprivileged uid gets the same
errors through the mount as on a plain directory (the kernel checks, default_permissions)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

USER, OTHER = 1234, 1235

# Run as USER: each operation's outcome, as the errno name or "ok".
PROBE = r"""
import errno, json, os, sys
root = sys.argv[1]
def p(*parts): return os.path.join(root, *parts)
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def write(path, data=b"x", flags=os.O_WRONLY | os.O_TRUNC):
    fd = os.open(path, flags | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.close(fd)
results = {
    "write root file 0644": attempt(lambda: write(p("root644.txt"))),
    "write root file 0666": attempt(lambda: write(p("root666.txt"))),
    "read root file 0600": attempt(lambda: open(p("root600.txt"), "rb").read()),
    "read file 0000": attempt(lambda: open(p("none.txt"), "rb").read()),
    "write file 0000": attempt(lambda: write(p("none.txt"))),
    "create in root dir 0755": attempt(lambda: write(p("rootdir", "new.txt"))),
    "create in open dir 0777": attempt(lambda: write(p("open", "mine.txt"))),
    "unlink other's file in sticky dir": attempt(lambda: os.unlink(p("sticky", "others.txt"))),
    "rename other's file in sticky dir": attempt(lambda: os.rename(p("sticky", "others.txt"), p("sticky", "x.txt"))),
    "unlink own file in sticky dir": attempt(
        lambda: (write(p("sticky", "own.txt")), os.unlink(p("sticky", "own.txt")))),
    "chown own file to root": attempt(lambda: (write(p("open", "c.txt")), os.chown(p("open", "c.txt"), 0, 0))),
    "chmod root file": attempt(lambda: os.chmod(p("root666.txt"), 0o777)),
    "utime root file to a time": attempt(lambda: os.utime(p("root666.txt"), (1, 1))),
    "utime root file to now": attempt(lambda: os.utime(p("root666.txt"))),
    "mkdir in root dir": attempt(lambda: os.mkdir(p("rootdir", "d"))),
    "rmdir root dir": attempt(lambda: os.rmdir(p("open", "rootsub"))),
    "write setuid file": attempt(lambda: write(p("setuid.bin"), b"new")),
    "truncate root file 0644": attempt(lambda: os.truncate(p("root644.txt"), 0)),
    "traverse dir 0700": attempt(lambda: os.stat(p("private", "f.txt"))),
}
results["setuid bits after write"] = oct(os.stat(p("setuid.bin")).st_mode & 0o7777)
print(json.dumps(results))
"""


def prepare(root: str) -> None:
    def put(rel: str, mode: int, uid: int = 0, data: bytes = b"{}") -> None:
        path = os.path.join(root, rel)
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, uid, uid)
        os.chmod(path, mode)

    for rel, mode in (("rootdir", 0o755), ("open", 0o777), ("sticky", 0o1777), ("private", 0o700)):
        os.mkdir(os.path.join(root, rel))
        os.chmod(os.path.join(root, rel), mode)
    os.mkdir(os.path.join(root, "open", "rootsub"))
    os.chmod(os.path.join(root, "open"), 0o777)
    put("root644.txt", 0o644)
    put("root666.txt", 0o666)
    put("root600.txt", 0o600)
    put("none.txt", 0o000, USER)
    put("sticky/others.txt", 0o666, OTHER)
    put("private/f.txt", 0o644)
    put("setuid.bin", 0o6777, 0, b"old")


def probe(root: str) -> dict:
    r = subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", sys.executable, "-c",
                        PROBE, root], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_unprivileged_user_gets_the_same_errors_as_on_a_plain_directory(make_mount, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    os.chmod(plain, 0o755)
    prepare(str(plain))
    m = make_mount(start=False)
    os.chmod(m.backing, 0o755)
    prepare(str(m.backing))
    m.options = ["allow_other"]
    m.start()
    expected, got = probe(str(plain)), probe(str(m.mnt))
    assert got == expected
    assert expected["write root file 0644"] == "EACCES" and expected["unlink other's file in sticky dir"] == "EPERM"
    assert int(got["setuid bits after write"], 8) & 0o6000 == 0  # a write by another user clears them


def test_new_entries_belong_to_the_caller(make_mount):
    m = make_mount(start=False)
    os.chmod(m.backing, 0o777)
    m.options = ["allow_other"]
    m.start()
    script = ("import os, sys; r = sys.argv[1]; open(os.path.join(r, 'a.json'), 'w').write('{}'); "
              "os.mkdir(os.path.join(r, 'd')); os.symlink('a.json', os.path.join(r, 'l'))")
    subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", sys.executable, "-c",
                    script, str(m.mnt)], check=True, timeout=60)
    for name in ("a.json", "d", "l"):
        st = os.lstat(m.backing / name)
        assert (st.st_uid, st.st_gid) == (USER, USER), name
    assert stat.S_IMODE(os.stat(m.backing / "a.json").st_mode) == 0o644 & ~0o022

"""Fitting the system: mount(8) and /etc/fstab through `mount.fusestore`, `umount`, and the
service manager's readiness protocol (NOTIFY_SOCKET) with a clean stop on SIGTERM.

mount(8) runs in a private mount namespace (`unshare -m`) with an fstab file of the test's own
(`mount -T`), so the machine's fstab and mount table are never touched; there this checkout's
helper is bound over /sbin/mount.fusestore, which tools/install links."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import FUSESTORE, host_dir, is_mounted
from fusestore import mount_helper

pytestmark = pytest.mark.timeout(90)

HELPER = Path("/sbin/mount.fusestore")
CHECKOUT = Path(mount_helper.__file__).parents[1]


def in_namespace(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a private mount namespace where mount(8) finds this checkout's helper."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mount(8) and unshare -m need root")
    if not HELPER.exists():
        pytest.fail(f"{HELPER} is missing: tools/install links it (as root)")
    wrapper = tmp_path / "mount.fusestore"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={CHECKOUT} exec {sys.executable} -m fusestore.mount_helper "$@"\n')
    wrapper.chmod(0o755)
    full = f"set -u\nmount --bind {wrapper} {HELPER}\n" + textwrap.dedent(script)
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", full],
                          capture_output=True, text=True, timeout=80)


def test_fstab_line_mount_and_umount(tree, tmp_path):
    backing, mnt = tree
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a pipeline's tree\n{backing}  {mnt}  fusestore  "
                     "defaults,noauto,nofail,_netdev,x-systemd.requires=network-online.target,nosuid,noexec,"
                     "attr_timeout=2  0  0\n")
    result = in_namespace(tmp_path, f"""
        mount -T {fstab} {mnt} || exit 10
        grep " {mnt} " /proc/self/mountinfo
        echo '{{"from": "fstab"}}' > {mnt}/doc.json || exit 11
        pid=$(cut -d' ' -f1 {host_dir(backing)}/lock)
        umount {mnt} || exit 12
        for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
        kill -0 $pid 2>/dev/null && exit 13
        grep -q " {mnt} " /proc/self/mountinfo && exit 14
        echo done
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if f" {mnt} " in x)
    assert "fuse.fusestore" in line and "nosuid" in line and "noexec" in line
    assert json.loads((backing / "doc.json").read_text()) == {"from": "fstab"}
    log = (host_dir(backing) / "fusestore.log").read_text()
    assert log.rstrip().endswith("INFO stopped")
    assert not is_mounted(mnt)


def test_mount_t_fusestore_with_options(tree, tmp_path):
    backing, mnt = tree
    (backing / "a.json").write_text("{}")
    result = in_namespace(tmp_path, f"""
        mount -t fusestore -o bogus {backing} {mnt} && exit 10
        mount -t fusestore -o ro,attr_timeout=1 {backing} {mnt} || exit 11
        grep " {mnt} " /proc/self/mountinfo
        cat {mnt}/a.json
        echo '{{}}' > {mnt}/b.json 2>/dev/null && exit 12
        umount {mnt} || exit 13
        mount -t fusestore -s -o bogus {backing} {mnt} || exit 14
        umount {mnt} || exit 15
        echo done
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unknown mount option 'bogus'" in result.stderr
    assert " ro," in next(x for x in result.stdout.splitlines() if f" {mnt} " in x)
    assert not (backing / "b.json").exists()


def test_lazy_umount_commits_what_a_writer_still_holds(tree, tmp_path):
    """`umount -l` while a program writes: the program finishes, its close commits, and the
    daemon ends with the last open file."""
    backing, mnt = tree
    writer = tmp_path / "writer.py"
    writer.write_text(textwrap.dedent(f"""
        import os, sys, time
        fd = os.open("{mnt}/late.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b'{{"half": ')
        print("open", flush=True)
        time.sleep(1.5)
        os.write(fd, b'"done"}}')
        os.close(fd)
    """))
    result = in_namespace(tmp_path, f"""
        mount -t fusestore {backing} {mnt} || exit 10
        pid=$(cut -d' ' -f1 {host_dir(backing)}/lock)
        {sys.executable} {writer} > {tmp_path}/writer.out &
        while ! grep -q open {tmp_path}/writer.out 2>/dev/null; do sleep 0.05; done
        umount {mnt} 2>/dev/null && exit 11   # busy, as any filesystem with an open file
        umount -l {mnt} || exit 12
        wait
        for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
        kill -0 $pid 2>/dev/null && exit 13
        echo done
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((backing / "late.json").read_text()) == {"half": "done"}
    assert not list((host_dir(backing) / "quarantine").iterdir())


def test_helper_arguments():
    parse = mount_helper.parse
    assert parse(["/b", "/m", "-o", "rw,defaults,xattr,x-systemd.automount,comment=x,config=f.toml"]) == (
        "/b", "/m", ["xattr"], "f.toml", False)
    assert parse(["/b", "/m", "-snv", "-o", "nosuid,whatever", "-t", "fusestore"]) == ("/b", "/m", ["nosuid"], None,
                                                                                    False)
    assert parse(["/b", "/m", "-f"])[4] is True
    for bad in (["/b"], ["/b", "/m", "-o", "whatever"], ["/b", "/m", "-N", "/proc/1/ns/mnt"], ["/b", "/m", "-q"]):
        with pytest.raises(mount_helper.UsageError):
            parse(bad)


def _notify_socket(tmp_path: Path, abstract: bool) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"fusestore-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(30)
    return sock, address


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_notify_ready_then_stop_on_sigterm(tree, tmp_path, abstract):
    backing, mnt = tree
    sock, address = _notify_socket(tmp_path, abstract)
    daemon = subprocess.Popen([*FUSESTORE, "mount", "--foreground", str(backing), str(mnt)],
                              env={**os.environ, "NOTIFY_SOCKET": address}, stderr=subprocess.PIPE, text=True)
    try:
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready.splitlines() and f"MAINPID={daemon.pid}" in ready
        assert is_mounted(mnt) and os.listdir(mnt) == []  # it answers when it says so
        # A writer holds a file at SIGTERM: the daemon commits it before it goes.
        fd = os.open(mnt / "open.json", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b'{"at": "sigterm"}')
        daemon.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        try:
            os.close(fd)
        except OSError:
            pass  # the mount may be gone already
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        sock.close()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    assert not is_mounted(mnt)
    assert json.loads((backing / "open.json").read_text()) == {"at": "sigterm"}


def test_background_mount_keeps_the_notify_socket_to_itself(tree, tmp_path):
    """`fusestore mount` (not --foreground) under a service manager: the daemon it starts is not
    the process the manager watches, so it must not report for it."""
    backing, mnt = tree
    sock, address = _notify_socket(tmp_path, abstract=False)
    sock.settimeout(2)
    subprocess.run([*FUSESTORE, "mount", str(backing), str(mnt)], env={**os.environ, "NOTIFY_SOCKET": address},
                   check=True, timeout=60)
    try:
        with pytest.raises(TimeoutError):
            sock.recv(4096)
    finally:
        subprocess.run([*FUSESTORE, "unmount", str(mnt)], timeout=60)
        sock.close()


NODE_REJECTION_JS = r"""
const fs = require('fs');
const mnt = process.argv[2], fusestore = JSON.parse(process.argv[3]);  // the README's, with our command
try { fs.writeFileSync(mnt + '/p1/scripts/t1.json', '{"title": '); }
catch (e) {
  if (e.errno === -74) {  // EBADMSG: fusestore refused the content
    const out = require('child_process').execFileSync(fusestore[0], [...fusestore.slice(1), 'status', mnt, '--json']);
    const why = JSON.parse(out).recent_rejections.filter(r => r.path === 'p1/scripts/t1.json').pop();
    console.log(String(e));
    console.log('rejected:', why && why.reason);
  } else throw e;
}
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (tools/install --test)")
def test_a_rejection_seen_from_node_as_the_readme_shows(mount, tmp_path):
    (mount / "p1/scripts").mkdir(parents=True)
    script = tmp_path / "reject.js"
    script.write_text(NODE_REJECTION_JS)
    out = subprocess.run(["node", str(script), str(mount.mnt), json.dumps(FUSESTORE)], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(CHECKOUT)})
    assert out.returncode == 0, out.stderr
    shown, reason = out.stdout.splitlines()
    # Node's wording of an errno libuv has no name for depends on its version (the README says both).
    assert shown in ("Error: Unknown system error -74: Unknown system error -74, close",  # Node 20 and later
                     "Error: UNKNOWN: unknown error, close")  # Node 18 (Debian 12)
    assert reason == "rejected: line 1, column 11: unexpected end of document (truncated)"
    assert not (mount.backing / "p1/scripts/t1.json").exists()

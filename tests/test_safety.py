"""The state directory is out of reach, virtual directories are read-only and cannot be escaped,
and the daemon never follows a symlink out of the backing tree."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from conftest import errno_of, write_json


def test_state_directory_is_invisible_and_unreachable(mount):
    write_json(mount / "a.json", {"v": 1})
    write_json(mount / "a.json", {"v": 2})
    assert (mount.backing / ".fusestore").is_dir()
    assert ".fusestore" not in os.listdir(mount.mnt)
    assert errno_of(os.stat, mount / ".fusestore") == errno.ENOENT
    assert errno_of(os.listdir, mount / ".fusestore/backups") == errno.ENOENT
    assert errno_of(os.mkdir, mount / ".fusestore") == errno.EPERM
    assert errno_of(os.rename, mount / "a.json", mount / ".fusestore") == errno.EPERM
    assert errno_of(os.symlink, "x", mount / ".fusestore") == errno.EPERM


def test_virtual_dirs_are_hidden_from_listings_but_reachable(mount):
    write_json(mount / "a.json", {"v": 1})
    write_json(mount / "a.json", {"v": 2})
    assert os.listdir(mount.mnt) == ["a.json"]
    assert os.listdir(mount / ".backups") == ["a.json"]
    assert os.listdir(mount / ".backups/a.json") == ["1"]
    r = subprocess.run(["find", str(mount.mnt)], capture_output=True, text=True)
    assert ".backups" not in r.stdout


def test_show_virtual_lists_them(make_mount):
    m = make_mount(["show_virtual"])
    assert ".backups" in os.listdir(m.mnt)


def test_backups_are_read_only(mount):
    write_json(mount / "a.json", {"v": 1})
    write_json(mount / "a.json", {"v": 2})
    gen = mount / ".backups/a.json/1"
    assert json.loads(gen.read_text()) == {"v": 1}
    assert gen.stat().st_mode & 0o222 == 0
    assert errno_of(open, gen, "w") == errno.EROFS
    assert errno_of(open, gen, "a") == errno.EROFS
    assert errno_of(os.unlink, gen) == errno.EROFS
    assert errno_of(os.mkdir, mount / ".backups/new") == errno.EROFS
    assert errno_of(open, mount / ".backups/a.json/9", "w") == errno.EROFS
    assert errno_of(os.rename, gen, mount / "stolen.json") == errno.EROFS
    assert errno_of(os.rename, mount / "a.json", mount / ".backups/a.json/5") == errno.EROFS
    assert errno_of(os.chmod, gen, 0o666) == errno.EROFS
    assert json.loads((mount / "a.json").read_text()) == {"v": 2}


def test_dotdot_inside_backups_does_not_escape(mount, tmp_path):
    (mount / "d").mkdir()
    write_json(mount / "d/a.json", {"v": 1})
    write_json(mount / "d/a.json", {"v": 2})
    # The kernel resolves .. itself; whatever the name, nothing outside the backups appears.
    assert os.path.realpath(mount / ".backups/d/../..") == str(mount.mnt)
    assert errno_of(os.stat, mount / ".backups/d/a.json/1/..") == errno.ENOTDIR
    assert errno_of(os.stat, mount / ".backups/..fusestore") == errno.ENOENT
    assert errno_of(os.stat, mount / ".backups/d/0") == errno.ENOENT
    assert errno_of(os.stat, mount / ".backups/d/a.json/4") == errno.ENOENT


def test_symlink_pointing_outside_is_shown_not_followed_by_the_daemon(mount, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.json"
    secret.write_text('{"secret": true}')
    os.symlink(outside, mount.backing / "escape")
    os.symlink(secret, mount.backing / "link.json")
    assert os.readlink(mount / "escape") == str(outside)
    assert os.path.islink(mount / "link.json")
    # Renaming over the link, unlinking it, chmod-ing it: the daemon acts on the link itself.
    write_json(mount / "new.json", {"mine": 1})
    os.rename(mount / "new.json", mount / "link.json")
    assert json.loads(secret.read_text()) == {"secret": True}
    assert not (mount.backing / "link.json").is_symlink()
    assert not (mount.backing / ".fusestore/backups/link.json").exists(), "a link has no content to keep"
    os.symlink(secret, mount.backing / "l2")
    os.unlink(mount / "l2")
    assert secret.exists()
    # restore never writes through a link either.
    write_json(mount / "r.json", {"r": 1})
    write_json(mount / "r.json", {"r": 2})
    os.unlink(mount.backing / "r.json")
    os.symlink(secret, mount.backing / "r.json")
    r = subprocess.run([sys.executable, "-m", "fusestore", "restore", str(mount / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert json.loads(secret.read_text()) == {"secret": True}


def test_symlinked_directory_in_backing_is_not_traversed_by_the_daemon(mount, tmp_path):
    outside = tmp_path / "outside2"
    outside.mkdir()
    os.symlink(outside, mount.backing / "dirlink")
    st = os.lstat(mount / "dirlink")
    assert os.path.islink(mount / "dirlink") and st.st_mode
    # mkdir below the link name through the mount happens in the caller's kernel resolution,
    # which goes outside the mount; the daemon itself only ever sees the link.
    assert errno_of(os.rmdir, mount / "dirlink") == errno.ENOTDIR


def test_names_with_dotdot_components_cannot_be_made(mount):
    # The kernel rejects such names before the daemon sees them; the engine refuses them too.
    from fusestore.engine.paths import components

    with pytest.raises(OSError):
        components("a/../../etc")
    with pytest.raises(OSError):
        components("/etc/passwd")


def test_reserved_names_at_the_root(mount):
    assert errno_of(os.mkdir, mount / ".backups") == errno.EEXIST
    assert errno_of(os.mkdir, mount / ".cache") == errno.EEXIST
    assert errno_of(open, mount / ".fusestore", "w") == errno.EPERM
    # Deeper down they are ordinary names.
    (mount / "sub").mkdir()
    (mount / "sub/.backups").mkdir()
    write_json(mount / "sub/.fusestore", {"fine": True})
    assert sorted(os.listdir(mount / "sub")) == [".backups", ".fusestore"]


def test_other_users_are_kept_out_without_allow_other(mount):
    write_json(mount / "a.json", {"v": 1})
    r = subprocess.run(["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups", "ls", str(mount.mnt)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_real_virtual_names_in_the_backing_tree_are_reported_not_lost(tree):
    from conftest import Mount, fusestore, wait_for

    backing, mnt = tree
    (backing / ".backups").mkdir()
    (backing / ".backups/mine.json").write_text('{"mine": 1}')
    (backing / ".cache").write_text("a file, not a directory")
    m = Mount(backing, mnt)
    m.start()
    try:
        assert errno_of(os.stat, mnt / ".backups/mine.json") == errno.ENOENT  # the virtual one shows
        assert wait_for(lambda: m.status()["check"] is not None, 30)
        shadowed = sorted(f["path"] for f in m.status()["check"]["findings"] if f["kind"] == "shadowed")
        assert shadowed == [".backups", ".cache"]
        assert "2 problem(s)" in fusestore("status", str(mnt)).stdout
        r = fusestore("check", str(mnt), check=False)
        assert r.returncode == 1 and "shadowed       .backups: is in the backing tree" in r.stdout
        assert "shadowed .backups" in (m.host / "fusestore.log").read_text()
    finally:
        m.stop()
    assert (backing / ".backups/mine.json").read_text() == '{"mine": 1}'


def test_long_names_and_control_characters_in_names(mount):
    plain = mount.backing.parent / "plain"
    plain.mkdir()
    longest = "n" * 250 + ".json"
    for base in (mount.mnt, plain):
        write_json(base / longest, {"v": 1})
        write_json(base / longest, {"v": 2})
        assert errno_of(open, base / ("x" + longest), "w") == errno.ENAMETOOLONG
    assert json.loads((mount / ".backups" / longest / "1").read_text()) == {"v": 1}
    forged = "bad\n2026-01-01 00:00:00,000 INFO all is well\x1b[2J.json"
    with pytest.raises(OSError) as e:
        with open(mount / forged, "w") as f:
            f.write("[1,")
    assert e.value.errno == errno.EBADMSG
    write_json(mount / "tab\there.json", {"ok": True})
    assert sorted(os.listdir(mount.mnt)) == sorted([longest, "tab\there.json"])
    assert sorted(os.listdir(mount / ".backups")) == [longest]
    # One event per line: the name cannot forge a line of the log or of status.
    log = (mount.host / "fusestore.log").read_text()
    assert "INFO all is well" not in [line.split(" ", 2)[-1] for line in log.splitlines()]
    assert "rejected bad\\n2026-01-01 00:00:00,000 INFO all is well\\x1b[2J.json: line 1" in log
    status = subprocess.run([sys.executable, "-m", "fusestore", "status", str(mount.mnt)],
                            capture_output=True, text=True, check=True).stdout
    assert "\x1b" not in status and "rejected" in status and "bad\\n2026" in status
    assert mount.status()["recent_rejections"][-1]["path"] == forged  # JSON keeps the real name


SWAPPER_CLIENT = r"""
import json, os, sys
d = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
for i in range(int(sys.argv[2])):
    name = f"f{i % 7}.json"
    fd = os.open(".w.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=d)
    os.write(fd, json.dumps({"i": i}).encode())
    os.close(fd)
    os.rename(".w.tmp", name, src_dir_fd=d, dst_dir_fd=d)
    fd = os.open(name, os.O_RDONLY, dir_fd=d)
    json.loads(os.read(fd, 1 << 16))
    os.close(fd)
    if i % 5 == 0:
        os.unlink(name, dir_fd=d)
print("ok")
"""


def test_symlinks_swapped_into_the_backing_tree_during_operations(mount, tmp_path):
    # Another program keeps replacing the backing directory `d` by a symlink to a directory
    # outside while a client works in d through the mount (holding d open, as a program in it
    # would) and restores and checks run: the daemon works on the directory it holds, refuses
    # paths that now cross a link, and never writes outside.
    import threading

    outside = tmp_path / "outside"
    outside.mkdir()
    (mount / "d").mkdir()
    write_json(mount / "d/r.json", {"r": 1})
    write_json(mount / "d/r.json", {"r": 2})
    d, real = mount.backing / "d", mount.backing / "d.real"
    stop = threading.Event()
    swaps = 0

    def swapper():
        nonlocal swaps
        while not stop.is_set():
            os.rename(d, real)
            os.symlink(outside, d)
            os.unlink(d)
            os.rename(real, d)
            swaps += 1

    thread = threading.Thread(target=swapper)
    client = subprocess.Popen([sys.executable, "-c", SWAPPER_CLIENT, str(mount / "d"), "400"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread.start()
    try:
        for _ in range(10):
            subprocess.run([sys.executable, "-m", "fusestore", "restore", str(mount / "d/r.json")],
                           capture_output=True, timeout=60)
            subprocess.run([sys.executable, "-m", "fusestore", "check", str(mount.mnt)],
                           capture_output=True, timeout=60)
        out, err = client.communicate(timeout=120)
    finally:
        stop.set()
        thread.join()
    assert swaps > 10
    assert client.returncode == 0 and out.strip() == "ok", err
    assert list(outside.iterdir()) == [], "something was written through the swapped-in link"
    for p in (mount / "d").iterdir():
        json.loads(p.read_bytes())  # every file in d a complete document
    assert mount.status()["pid"]  # the daemon is still serving


def test_a_link_replaced_behind_the_mount_by_a_directory_is_looked_up_afresh(mount):
    # The kernel still holds `l` as a link when a program walks through it: the daemon answers
    # ESTALE (not readlink's EINVAL), so the kernel looks the name up again and finds the
    # directory, as on a plain directory. (A regression: the swap test above failed this way.)
    (mount.backing / "t").mkdir()
    os.symlink("t", mount.backing / "l")
    assert os.path.islink(mount / "l")
    os.unlink(mount.backing / "l")
    (mount.backing / "l").mkdir()
    (mount.backing / "l/x").write_text("1")
    assert os.listdir(mount / "l") == ["x"]
    assert not os.path.islink(mount / "l")

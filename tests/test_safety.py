"""The state directory is out of reach, virtual directories are read-only and cannot be escaped,
and the daemon never follows a symlink out of the backing tree."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from conftest import write_json


def errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


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
    r = subprocess.run([sys.executable, "-m", "fusestore", "restore", str(mount / "r.json")], capture_output=True, text=True)
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

"""Everything else behaves like the backing filesystem."""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from conftest import errno_of, write_json


def test_inode_number_is_stable_across_commits(mount):
    write_json(mount / "a.json", {"v": 1})
    ino = os.stat(mount / "a.json").st_ino
    backing_ino = os.stat(mount.backing / "a.json").st_ino
    write_json(mount / "a.json", {"v": 2})
    assert os.stat(mount.backing / "a.json").st_ino != backing_ino, "the commit renamed a new file in"
    assert os.stat(mount / "a.json").st_ino == ino


def test_mkdir_rmdir_and_modes(mount):
    os.mkdir(mount / "d", 0o750)
    assert stat.S_IMODE(os.stat(mount / "d").st_mode) == 0o750 & ~_umask()
    assert stat.S_ISDIR(os.stat(mount.backing / "d").st_mode)
    assert errno_of(os.rmdir, mount / "nope") == errno.ENOENT
    (mount / "d/f").write_text("x")
    assert errno_of(os.rmdir, mount / "d") == errno.ENOTEMPTY
    os.unlink(mount / "d/f")
    os.rmdir(mount / "d")
    assert not (mount.backing / "d").exists()


def test_new_file_gets_requested_mode(mount):
    fd = os.open(mount / "m.txt", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"x")
    os.close(fd)
    assert stat.S_IMODE(os.stat(mount / "m.txt").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(mount.backing / "m.txt").st_mode) == 0o600


def test_new_files_belong_to_the_caller(make_mount):
    mount = make_mount(["allow_other"])
    (mount / "shared").mkdir()
    os.chmod(mount / "shared", 0o777)
    r = subprocess.run(["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups",
                        "bash", "-c", f"echo hi > {mount / 'shared/u.txt'} && mkdir {mount / 'shared/ud'}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("u.txt", "ud"):
        st = os.stat(mount.backing / "shared" / name)
        assert (st.st_uid, st.st_gid) == (1234, 1234)
    # A commit keeps the owner.
    r = subprocess.run(["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups",
                        "bash", "-c", f"echo again > {mount / 'shared/u.txt'}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.stat(mount.backing / "shared/u.txt").st_uid == 1234


def test_rename_flags(mount):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def renameat2(a, b, flags):
        if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), flags) != 0:
            return ctypes.get_errno()
        return 0

    (mount / "a").write_text("A")
    (mount / "b").write_text("B")
    assert renameat2(mount / "a", mount / "b", 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert renameat2(mount / "a", mount / "c", 1) == 0
    assert renameat2(mount / "c", mount / "b", 2) == 0  # RENAME_EXCHANGE
    assert (mount / "b").read_text() == "A" and (mount / "c").read_text() == "B"
    assert (mount.backing / "b").read_text() == "A"


def test_rename_exchange_validates_both_directions(mount):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    write_json(mount / "good.json", {"g": 1})
    (mount / "bad.txt").write_text("{nope")
    rc = libc.renameat2(-100, os.fsencode(mount / "good.json"), -100, os.fsencode(mount / "bad.txt"), 2)
    assert rc != 0 and ctypes.get_errno() == errno.EBADMSG
    assert (mount / "bad.txt").read_text() == "{nope"


def test_directory_rename_keeps_children_reachable(mount):
    (mount / "p/q").mkdir(parents=True)
    write_json(mount / "p/q/x.json", {"x": 1})
    os.rename(mount / "p", mount / "r")
    write_json(mount / "r/q/x.json", {"x": 2})
    assert (mount.backing / "r/q/x.json").read_text() == '{"x": 2}'
    assert sorted(os.listdir(mount / ".backups")) == ["r"]


def test_unlink_keeps_a_restorable_backup(mount):
    write_json(mount / "gone.json", {"last": True})
    os.unlink(mount / "gone.json")
    assert not (mount / "gone.json").exists()
    assert (mount / ".backups/gone.json/1").read_text() == '{"last": true}'


def test_fifo_via_mknod(mount):
    os.mkfifo(mount / "pipe")
    assert stat.S_ISFIFO(os.stat(mount / "pipe").st_mode)
    assert stat.S_ISFIFO(os.stat(mount.backing / "pipe").st_mode)


def test_statfs_matches_backing(mount):
    a, b = os.statvfs(mount.mnt), os.statvfs(mount.backing)
    assert (a.f_bsize, a.f_blocks) == (b.f_bsize, b.f_blocks)


def test_readdir_of_a_large_directory_is_complete_and_stable(mount):
    (mount / "many").mkdir()
    for i in range(1500):
        os.close(os.open(mount.backing / "many" / f"f{i:04d}.txt", os.O_CREAT | os.O_WRONLY, 0o644))
    names = os.listdir(mount / "many")
    assert sorted(names) == [f"f{i:04d}.txt" for i in range(1500)]
    # Remove entries while reading: nothing is returned twice.
    with os.scandir(mount / "many") as it:
        seen = []
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n == 10:
                for i in range(100, 200):
                    os.unlink(mount / "many" / f"f{i:04d}.txt")
    assert len(seen) == len(set(seen))


def test_changes_behind_the_mounts_back_are_picked_up(make_mount):
    mount = make_mount(["attr_timeout=0.5,entry_timeout=0.5"])
    write_json(mount / "b.json", {"v": 1})
    (mount.backing / "b.json").write_text('{"v": "backing"}')
    (mount.backing / "new.txt").write_text("n")
    os.rename(mount.backing / "b.json", mount.backing / "c.json")
    import time

    time.sleep(0.7)  # the entry and attribute timeouts
    assert not (mount / "b.json").exists()
    assert (mount / "c.json").read_text() == '{"v": "backing"}'
    assert (mount / "new.txt").read_text() == "n"


def test_xattrs_only_with_the_option(make_mount):
    m = make_mount(["xattr"])
    (m.mnt / "x.txt").write_text("1")
    os.setxattr(m.mnt / "x.txt", "user.tag", b"blue")
    assert os.getxattr(m.mnt / "x.txt", "user.tag") == b"blue"
    (m.mnt / "x.txt").write_text("2")
    assert os.getxattr(m.mnt / "x.txt", "user.tag") == b"blue", "xattrs carry over a commit"
    assert "user.tag" in os.listxattr(m.mnt / "x.txt")
    os.removexattr(m.mnt / "x.txt", "user.tag")
    assert errno_of(os.getxattr, m.mnt / "x.txt", "user.tag") == errno.ENODATA


def test_xattrs_are_carried_over_commits_without_the_option(mount):
    (mount / "x.txt").write_text("1")
    os.setxattr(mount.backing / "x.txt", "user.tag", b"red")
    (mount / "x.txt").write_text("2")
    assert os.getxattr(mount.backing / "x.txt", "user.tag") == b"red"
    assert errno_of(os.getxattr, mount / "x.txt", "user.tag") in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODATA)


def test_o_direct_and_bad_offsets_get_errors_not_a_dead_daemon(mount):
    (mount / "f.txt").write_text("abc")
    assert errno_of(os.open, mount / "f.txt", os.O_RDONLY | os.O_DIRECT) == errno.EINVAL
    fd = os.open(mount / "f.txt", os.O_RDWR)
    try:
        assert os.pread(fd, 10, 1 << 62) == b""
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", (1 << 63) - 1)
    finally:
        os.close(fd)
    assert (mount / "f.txt").read_text() == "abc"


def test_fsync_commits_the_open_version(mount):
    (mount / "f.txt").write_text("old")
    fd = os.open(mount / "f.txt", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.fsync(fd)
    # Durable and in place before close(): POSIX promises it at fsync, databases rely on it.
    assert (mount.backing / "f.txt").read_text() == "new"
    assert (mount / "f.txt").read_text() == "new"
    assert [n for n in os.listdir(mount.host / "staging") if not n.startswith("pool-")] == []
    os.write(fd, b" and more")  # onto what it committed
    os.close(fd)
    assert (mount / "f.txt").read_text() == "new and more"
    assert (mount / ".backups/f.txt/1").read_text() == "old"


def test_unmount_commits_files_still_open(make_mount):
    m = make_mount()
    f = open(m.mnt / "open.json", "w")
    f.write('{"ok": true}')
    f.flush()
    from conftest import fusestore

    fusestore("unmount", str(m.mnt))
    assert (m.backing / "open.json").read_text() == '{"ok": true}'
    try:
        f.close()
    except OSError:
        pass


def test_unmount_quarantines_invalid_files_still_open(make_mount):
    m = make_mount()
    (m.mnt / "half.json").write_text('{"v": 1}')
    f = open(m.mnt / "half.json", "w")
    f.write('{"v": 2, "unfinished')
    f.flush()
    from conftest import fusestore

    fusestore("unmount", str(m.mnt))
    assert (m.backing / "half.json").read_text() == '{"v": 1}'
    assert [p.read_bytes() for p in m.quarantine] == [b'{"v": 2, "unfinished']
    try:
        f.close()
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_inodes_the_kernel_forgets_are_freed(mount):
    (mount / "many").mkdir()
    for i in range(300):
        (mount.backing / "many" / f"{i}.txt").write_text("x")
    for i in range(300):
        os.stat(mount / "many" / f"{i}.txt")
    before = mount.status()["known_inodes"]
    assert before >= 300
    from conftest import wait_for

    def dropped() -> bool:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        return mount.status()["known_inodes"] < before - 250

    assert wait_for(dropped, timeout=10), "forget must free the nodes the kernel let go"
    # And they come back on demand with working content.
    assert (mount / "many/7.txt").read_text() == "x"


def test_mknod_makes_empty_files_of_every_name(mount):
    # An empty new file is valid everywhere (placeholders, lock files).
    os.mknod(mount / "n.json", 0o644 | stat.S_IFREG)
    os.mknod(mount / "n.txt", 0o644 | stat.S_IFREG)
    assert (mount.backing / "n.json").read_bytes() == b"" and (mount.backing / "n.txt").exists()


def test_private_mappings_see_each_committed_version(mount):
    import mmap

    (mount / "m.bin").write_bytes(b"A" * 8192)
    with open(mount / "m.bin", "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
        assert m[:4] == b"AAAA"
    (mount / "m.bin").write_bytes(b"B" * 4096)
    with open(mount / "m.bin", "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
        assert len(m) == 4096 and m[:4] == b"BBBB"


def test_read_only_shared_maps_keep_their_version_while_the_file_is_rewritten(mount):
    import mmap

    # Python's mmap default (MAP_SHARED). A reader of a committed file that nobody writes reads
    # through the page cache; a writer that comes then gets the name on a new kernel inode that
    # shows the same inode number, and the map keeps the version it mapped, as the README's
    # model promises for every read-only handle (no SIGBUS past a shorter new version).
    p = mount / "s.bin"
    p.write_bytes(b"A" * 8192)
    ino = os.stat(p).st_ino
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        with open(p, "rb") as g, mmap.mmap(g.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m2:
            assert m[:4] == m2[-4:] == b"AAAA"
        p.write_bytes(b"B" * 100)  # O_TRUNC rewrite, shorter
        assert p.read_bytes() == b"B" * 100
        assert len(m) == 8192 and m[8000:8004] == b"AAAA" and m[:1] == b"A"
        assert os.fstat(f.fileno()).st_size == 8192 and os.fstat(f.fileno()).st_ino == ino
        with open(p, "rb") as h, mmap.mmap(h.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as m3:
            assert m3[:] == b"B" * 100
        os.truncate(p, 10)  # truncate(2) of the path while the old version is mapped
        assert p.read_bytes() == b"B" * 10
        with open(p, "r+b") as w:  # an in-place writer
            w.seek(0, os.SEEK_END)
            w.write(b"C")
        assert p.read_bytes() == b"B" * 10 + b"C" and m[:4] == b"AAAA"
    assert os.stat(p).st_ino == ino
    assert [e.inode() for e in os.scandir(mount.mnt) if e.name == "s.bin"] == [ino]


@pytest.mark.parametrize("how", ["option", "config"])
def test_without_the_page_cache_shared_maps_of_committed_files_are_refused(make_mount, tree, how):
    import mmap

    if how == "config":
        (tree[0] / "fusestore.toml").write_text("[mount]\npage_cache = false\n")
    mount = make_mount(["page_cache=off"] if how == "option" else [])
    (mount / "c.bin").write_bytes(b"C" * 100)
    with open(mount / "c.bin", "rb") as f:
        assert errno_of(mmap.mmap, f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) == errno.ENODEV
        assert f.read() == b"C" * 100


def test_shared_maps_of_files_being_written_are_refused(mount):
    import mmap

    # The README's limit: while a file has an open version, its writers and the readers that
    # come meanwhile share one kernel inode whose size is the open version's, so shared maps
    # fail with ENODEV there. Private maps work; direct files (databases) have shared maps.
    (mount / "s.bin").write_bytes(b"A" * 8192)
    with open(mount / "s.bin", "r+b") as w:
        assert errno_of(mmap.mmap, w.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) == errno.ENODEV
        with open(mount / "s.bin", "rb") as f:
            assert errno_of(mmap.mmap, f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) == errno.ENODEV
            with mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
                assert m[:4] == b"AAAA"


def test_a_file_removed_while_written_is_a_temporary_file(mount):
    import tempfile

    # Python's TemporaryFile falls back to create + unlink on FUSE (no O_TMPFILE).
    with tempfile.TemporaryFile(dir=mount.mnt) as f:
        f.write(b"scratch" * 1000)
        f.flush()
        f.seek(0)
        assert f.read(7) == b"scratch"
    assert os.listdir(mount.mnt) == []
    assert mount.quarantine == []
    assert mount.status()["open_staged_files"] == 0


def test_programs_in_the_mount_can_be_executed_after_a_commit(mount):
    import shutil

    shutil.copy("/bin/echo", mount / "prog")
    os.chmod(mount / "prog", 0o755)
    assert subprocess.run([str(mount / "prog"), "hi"], capture_output=True, text=True).stdout == "hi\n"
    shutil.copy("/bin/true", mount / "prog")  # a commit replaces the binary
    r = subprocess.run([str(mount / "prog"), "hi"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == ""


def test_tree_changed_behind_the_mounts_back_never_breaks_the_daemon(make_mount):
    import shutil
    import time

    mount = make_mount(["attr_timeout=0.2,entry_timeout=0.2"])
    (mount / "d/e").mkdir(parents=True)
    write_json(mount / "d/e/f.json", {"v": 1})
    os.listdir(mount / "d/e")
    shutil.rmtree(mount.backing / "d")  # the directory the daemon holds open goes away
    (mount.backing / "d").write_text("now a file")  # and its name becomes a file
    time.sleep(0.4)
    assert errno_of(os.listdir, mount / "d/e") == errno.ENOTDIR
    assert (mount / "d").read_text() == "now a file"
    os.unlink(mount.backing / "d")
    os.mkdir(mount.backing / "d")  # and a directory again
    time.sleep(0.4)
    write_json(mount / "d/g.json", {"ok": True})
    assert (mount.backing / "d/g.json").read_text() == '{"ok": true}'
    assert mount.status()["pid"] == mount.pid


def test_a_backup_generation_shows_when_it_was_superseded(mount):
    import time

    write_json(mount / "t.json", {"v": 1})
    os.utime(mount / "t.json", (1_000_000_000, 1_000_000_000))  # written long ago
    before = time.time()
    write_json(mount / "t.json", {"v": 2})
    gen = os.stat(mount / ".backups/t.json/1")
    assert before - 1 <= gen.st_mtime <= time.time() + 1


def test_a_file_just_written_can_be_mapped_shared_at_once(mount):
    import mmap

    # No stat between the commit and the map: the commit dropped the kernel's attributes, so
    # the reader's open gets the page cache, and the map sees the whole new version.
    for size in (100, 9000, 50):
        with open(mount / "n.bin", "wb") as f:
            f.write(b"Q" * size)
        with open(mount / "n.bin", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert m[:] == b"Q" * size


def test_a_reader_of_an_older_version_leaves_the_size_page_cache_readers_read_to(mount):
    import mmap

    path = mount / "s.bin"
    path.write_bytes(b"a" * 100)
    writer = os.open(path, os.O_WRONLY)
    old = os.open(path, os.O_RDONLY)  # opened while written: reads version 1 through the daemon
    os.pwrite(writer, b"b" * 9000, 0)
    os.close(writer)  # version 2 committed
    try:
        assert os.stat(path).st_size == 9000
        assert os.pread(old, 65536, 0) == b"a" * 100  # a short read, of another version
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert f.read() == b"b" * 9000 and m[:] == b"b" * 9000
    finally:
        os.close(old)


def test_access_and_exec_answer_as_on_a_plain_directory(mount, plain):
    # A mount made by root without allow_other leaves mode checks to root's rules: the daemon
    # answers access(2), and the kernel refuses to execute a file without an execute bit.
    results = []
    for root in (mount.mnt, plain):
        (root / "d").mkdir(mode=0o500)
        (root / "plain.txt").write_text("x")
        (root / "ro.txt").write_text("x")
        (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
        os.chmod(root / "ro.txt", 0o444)
        os.chmod(root / "run.sh", 0o700)
        answers = [os.access(root / n, m) for n in ("d", "plain.txt", "ro.txt", "run.sh", "missing")
                   for m in (os.R_OK, os.W_OK, os.X_OK, os.F_OK)]
        ran = subprocess.run([root / "run.sh"], capture_output=True, text=True).stdout
        denied = errno_of(os.execv, str(root / "plain.txt"), ["plain.txt"])
        results.append((answers, ran, denied))
    assert results[0] == results[1]
    assert results[0][1] == "ran\n" and results[0][2] == errno.EACCES


def test_a_file_removed_behind_the_mount_and_written_at_once_is_created(mount):
    # The kernel still holds the name (entry timeout) and opens the node the daemon knew: the
    # daemon answers ESTALE, the kernel looks the name up again and creates the file. Before,
    # the write went to a node without a name and was dropped although close() returned 0.
    for i in range(5):
        p = mount / f"gone{i}.json"
        p.write_text('{"v": 1}')
        assert p.stat().st_size == 8
        os.unlink(mount.backing / p.name)
        p.write_text('{"v": 2}')
        assert (mount.backing / p.name).read_text() == '{"v": 2}'
        with open(p, "r+") as f:  # and a writer without O_CREAT finds it
            f.write('{"v": 3}')
        assert (mount.backing / p.name).read_text() == '{"v": 3}'

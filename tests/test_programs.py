"""Programs that hold several descriptors of a file, through a real mount, each compared with the
same work on a plain directory (the oracle): shells whose children inherit and close the
descriptor, `dup`, seeking to the end, read-write handles across another handle's commit,
fsync as a commit point, files created read-only, empty new files, tar and unzip, flock.
SQLite and git have their own modules (test_sqlite.py, test_tools.py)."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import errno_of, wait_for

pytestmark = pytest.mark.timeout(120)


def same(mount, plain: Path, work):
    """Run `work(directory)` on the plain directory and through the mount; both must agree."""
    want = work(plain)
    got = work(mount.mnt)
    assert got == want, f"mount gave {got!r}, a plain directory {want!r}"
    return got


def sh(script: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, **kw)


def test_a_child_closing_an_inherited_descriptor_does_not_decide_the_file(mount, plain):
    def work(d: Path):
        p = d / "f.json"
        sh(f"echo '{{\"old\": 1}}' > {p}; {{ printf '{{\"new\":'; /bin/true; printf ' 2}}\\n'; }} > {p}")
        return p.read_bytes()

    assert same(mount, plain, work) == b'{"new": 2}\n'
    assert (mount.backing / "f.json").read_bytes() == b'{"new": 2}\n'
    assert mount.quarantine == []


def test_a_subprocess_in_the_middle_of_a_write_changes_nothing(mount, plain):
    def work(d: Path):
        with open(d / "doc.json", "w") as f:
            f.write('{"half": ')
            f.flush()
            subprocess.run(["true"], check=True)
            subprocess.run(["true"], check=True, pass_fds=(f.fileno(),))
            f.write('"done"}')
        return (d / "doc.json").read_text()

    same(mount, plain, work)
    assert mount.quarantine == []


def test_writes_after_seeking_to_the_end_append_and_fstat_sees_them(mount, plain):
    def work(d: Path):
        fd = os.open(d / "a.txt", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, b"0123456789\n")
        sizes = [os.fstat(fd).st_size]
        for line in (b"X\n", b"Y\n"):
            sizes.append(os.lseek(fd, 0, os.SEEK_END))
            os.write(fd, line)
        sizes.append(os.fstat(fd).st_size)
        sizes.append(os.stat(d / "a.txt").st_size)  # the name shows the open version too
        os.close(fd)
        return (d / "a.txt").read_bytes(), sizes

    same(mount, plain, work)


def test_a_writer_reads_its_own_writes_after_closing_a_dup(mount, plain):
    def work(d: Path):
        (d / "d.txt").write_bytes(b"old content\n")
        fd = os.open(d / "d.txt", os.O_RDWR)
        os.pwrite(fd, b"NEW", 0)
        os.close(os.dup(fd))  # a commit point; the handle goes on
        os.pwrite(fd, b"!", 11)
        got = os.pread(fd, 100, 0)
        os.close(fd)
        return got, (d / "d.txt").read_bytes()

    same(mount, plain, work)


def test_read_write_handles_see_another_handles_commit(mount, plain):
    def work(d: Path):
        (d / "s.txt").write_bytes(b"first version\n")
        keep = os.open(d / "s.txt", os.O_RDWR)
        before = os.pread(keep, 100, 0)
        (d / "s.txt").write_bytes(b"second\n")  # another open, write, close: committed
        after = os.pread(keep, 100, 0), os.fstat(keep).st_size
        os.pwrite(keep, b"S", 0)  # onto what is there now, not onto the old version
        os.close(keep)
        return before, after, (d / "s.txt").read_bytes()

    same(mount, plain, work)


def test_a_new_file_being_written_is_readable_through_another_open(mount, plain):
    # git's index-pack writes a pack and reads it back through a second, read-only open.
    def work(d: Path):
        w = os.open(d / "pack", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o444)
        os.write(w, b"PACK" + bytes(range(256)) * 64)
        r = os.open(d / "pack", os.O_RDONLY)
        head = os.read(r, 8), os.fstat(r).st_size
        os.write(w, b"tail")
        tail = os.pread(r, 4, 4 + 256 * 64)
        os.close(r)
        os.close(w)
        return head, tail, (d / "pack").stat().st_size

    same(mount, plain, work)


def test_fsync_commits_and_a_refused_fsync_keeps_the_open_version(mount, plain):
    def work(d: Path):
        fd = os.open(d / "j.json", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, b'{"a": ')
        try:
            os.fsync(fd)
            first = 0
        except OSError as e:
            first = e.errno
        os.write(fd, b"1}")
        os.fsync(fd)
        durable = (mount.backing / "j.json").read_bytes() if d == mount.mnt else b'{"a": 1}'
        os.close(fd)
        return first, durable, (d / "j.json").read_bytes()

    first, durable, _ = work(mount.mnt)
    assert first == errno.EBADMSG  # half a document is not committed...
    assert durable == b'{"a": 1}'  # ...the whole one is, before close()
    assert work(plain)[2] == b'{"a": 1}'
    assert mount.quarantine == []
    # The refused fsync is recorded like a refused close: path, time and line and column.
    [refusal] = mount.status()["recent_rejections"]
    assert refusal["path"] == "j.json" and "line 1, column" in refusal["reason"]


def test_a_refusal_at_close_leaves_the_content_to_a_writer_still_open(mount):
    (mount / "p.json").write_text('{"v": 0}')
    fd = os.open(mount / "p.json", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b'{"v": ')
    dup = os.dup(fd)
    with pytest.raises(OSError) as e:
        os.close(dup)
    assert e.value.errno == errno.EBADMSG
    assert (mount.backing / "p.json").read_text() == '{"v": 0}'
    os.write(fd, b"1}")
    os.close(fd)
    assert (mount / "p.json").read_text() == '{"v": 1}'
    assert mount.quarantine == []
    status = mount.status()
    assert status["rejections"] == 1, "one refused content, recorded once"


def test_content_still_refused_at_the_last_release_goes_to_the_quarantine(mount):
    (mount / "q.json").write_text('{"v": 0}')
    fd = os.open(mount / "q.json", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b'{"v": ')
    with pytest.raises(OSError) as e:
        os.close(fd)
    assert e.value.errno == errno.EBADMSG
    assert wait_for(lambda: len(mount.quarantine) == 1)
    assert mount.quarantine[0].read_bytes() == b'{"v": '
    assert (mount / "q.json").read_text() == '{"v": 0}'
    assert wait_for(lambda: mount.status()["recent_rejections"][-1]["quarantined"] == mount.quarantine[0].name)
    assert mount.status()["rejections"] == 1


def test_one_backup_generation_per_session_of_writers(mount):
    (mount / "b.txt").write_text("original\n")
    fd = os.open(mount / "b.txt", os.O_WRONLY | os.O_TRUNC)
    for i in range(5):
        os.write(fd, f"step {i}\n".encode())
        os.fsync(fd)  # five commits of intermediate states
    os.close(fd)
    assert (mount / ".backups/b.txt/1").read_text() == "original\n"
    assert not (mount / ".backups/b.txt/2").exists()
    (mount / "b.txt").write_text("next session\n")
    assert (mount / ".backups/b.txt/1").read_text().startswith("step 0\n")
    assert (mount / ".backups/b.txt/2").read_text() == "original\n"


def test_touch_and_empty_placeholders_of_json_files(mount, plain):
    def work(d: Path):
        r = sh(f"cd {d} && touch new.json && : > empty.json && mknod node.json p 2>/dev/null; mknod reg.json p; ls")
        return r.returncode, sorted(r.stdout.split()), (d / "new.json").stat().st_size

    same(mount, plain, work)
    assert (mount.backing / "new.json").exists()


def test_emptying_a_validated_file_is_still_refused(mount):
    (mount / "e.json").write_text('{"keep": true}')
    with pytest.raises(OSError) as e:
        os.truncate(mount / "e.json", 0)
    assert e.value.errno == errno.EBADMSG
    assert (mount / "e.json").read_text() == '{"keep": true}'
    (mount / "empty.txt").write_text("")
    (mount / "full.json").write_text("[1]")
    with pytest.raises(OSError) as e:
        os.rename(mount / "empty.txt", mount / "full.json")
    assert e.value.errno == errno.EBADMSG
    assert (mount / "full.json").read_text() == "[1]"


@pytest.mark.parametrize("flags", [os.O_RDONLY | os.O_CREAT, os.O_WRONLY | os.O_CREAT], ids=["read-only", "write-only"])
def test_a_file_being_created_is_a_real_file(mount, plain, flags):
    def work(d: Path):
        (d / "locks").mkdir()
        fd = os.open(d / "locks/job.lock", flags, 0o644)
        rmdir = errno_of(os.rmdir, d / "locks")  # not empty: it holds the new file
        os.close(fd)
        os.link(d / "locks/job.lock", d / "locks/again.lock")
        return rmdir, sorted(os.listdir(d / "locks"))

    assert same(mount, plain, work)[0] == errno.ENOTEMPTY
    assert (mount.backing / "locks/job.lock").exists()  # exists once its creating handle closed


def test_flock_with_a_lock_file(mount, plain):
    def work(d: Path):
        r = sh(f"flock {d}/run.lock sh -c 'echo locked > {d}/out.txt' && flock -n {d}/run.lock true; echo $?")
        return r.stdout, (d / "out.txt").read_text(), (d / "run.lock").exists()

    same(mount, plain, work)
    assert (mount.backing / "run.lock").exists()


def test_new_and_truncated_files_get_the_time_of_now(mount):
    (mount / "old.txt").write_text("x" * 10)
    os.utime(mount / "old.txt", (1_000_000_000, 1_000_000_000))
    time.sleep(0.01)
    before = time.time() - 1
    (mount / "fresh.txt").write_text("new")
    with open(mount / "old.txt", "w"):
        pass  # O_TRUNC
    for name in ("fresh.txt", "old.txt"):
        st = os.stat(mount / name)
        assert st.st_mtime >= before, name
        assert os.stat(mount.backing / name).st_mtime >= before, name


def test_times_set_before_close_survive_the_commit(mount, plain):
    def work(d: Path):
        (d / "src.txt").write_text("content\n")
        os.utime(d / "src.txt", (1_500_000_000, 1_500_000_000))
        (d / "dst.txt").write_text("old\n")
        r = sh(f"cp -p {d}/src.txt {d}/dst.txt")
        return r.returncode, os.stat(d / "dst.txt").st_mtime

    same(mount, plain, work)


def test_tar_and_unzip_keep_symlinks_and_sparse_files(mount, plain, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "real.json").write_text('{"a": 1}')
    os.symlink("real.json", src / "link.json")
    os.symlink("missing.json", src / "dangling.json")
    with open(src / "sparse.bin", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data")
    (src / "empty.json").write_text("")
    subprocess.run(["tar", "-C", str(src), "--sparse", "-cf", str(tmp_path / "a.tar"), "."], check=True)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.write(src / "real.json", "real.json")
        info = zipfile.ZipInfo("link.txt")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "real.json")

    def work(d: Path):
        (d / "t").mkdir()
        (d / "z").mkdir()
        t = subprocess.run(["tar", "-C", str(d / "t"), "-xf", str(tmp_path / "a.tar")], capture_output=True)
        z = subprocess.run(["unzip", "-q", str(tmp_path / "a.zip"), "-d", str(d / "z")], capture_output=True)
        listing = []
        for root, dirs, files in os.walk(d):
            for name in sorted(files):
                p = Path(root) / name
                if p.is_symlink():
                    kind = "link:" + os.readlink(p)
                else:
                    kind = p.read_bytes()[-16:] if name != "sparse.bin" else p.stat().st_size
                listing.append((str(p.relative_to(d)), kind))
        return t.returncode, z.returncode, sorted(listing)

    same(mount, plain, work)
    sparse = os.stat(mount.backing / "t/sparse.bin")
    assert sparse.st_blocks * 512 < (8 << 20), "the extracted sparse file kept its holes"


def test_a_small_write_into_a_large_sparse_file_stays_small(mount):
    with open(mount / "big.img", "wb") as f:
        f.truncate(2 << 30)
    start = time.monotonic()
    fd = os.open(mount / "big.img", os.O_WRONLY)
    os.pwrite(fd, b"hello!", 1 << 30)
    os.close(fd)
    elapsed = time.monotonic() - start
    st = os.stat(mount.backing / "big.img")
    assert st.st_size == 2 << 30
    assert st.st_blocks * 512 < (1 << 20), f"{st.st_blocks * 512} bytes allocated for 6 bytes of data"
    with open(mount / "big.img", "rb") as f:
        f.seek(1 << 30)
        assert f.read(6) == b"hello!"
    assert elapsed < 30  # a copy that filled the holes took far longer; not a speed test


def test_setid_bits_are_cleared_by_another_users_write_on_a_first_commit(make_mount, plain):
    mount = make_mount(["allow_other"])

    def work(d: Path):
        os.chmod(d, 0o777)
        code = (f"import os; fd = os.open({str(d / 'tool')!r}, os.O_CREAT | os.O_WRONLY, 0o6755); "
                f"os.write(fd, b'#!/bin/sh'); os.close(fd)")
        subprocess.run(["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups", sys.executable, "-c", code],
                       check=True)
        return oct(stat.S_IMODE(os.stat(d / "tool").st_mode))

    same(mount, plain, work)


def test_a_refused_rename_is_recorded(mount):
    (mount / "project-1/logs").mkdir(parents=True)
    (mount / "project-1/draft.txt").write_text("{not json")
    with pytest.raises(OSError) as e:
        os.rename(mount / "project-1/draft.txt", mount / "project-1/final.json")
    assert e.value.errno == errno.EBADMSG
    status = mount.status()
    assert status["rejections"] == 1
    assert status["recent_rejections"][-1]["path"] == "project-1/final.json"
    lines = (mount.backing / "project-1/logs/errors.log").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "rejected"


def test_python_tempfile_survives_a_subprocess(mount, plain):
    import tempfile

    def work(d: Path):
        with tempfile.TemporaryFile(dir=d) as f:
            f.write(b"scratch data")
            f.flush()
            subprocess.run(["true"], check=True)
            f.seek(0)
            return f.read(), os.listdir(d)

    same(mount, plain, work)
    assert mount.quarantine == []


def test_unzip_cannot_place_a_symlink_named_like_a_validated_file(mount, tmp_path):
    # Documented limit: unzip writes a symlink's target as the content of a placeholder file of
    # the link's name and replaces it at the end; that content is never a JSON document.
    with zipfile.ZipFile(tmp_path / "l.zip", "w") as z:
        info = zipfile.ZipInfo("link.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "real.json")
    r = subprocess.run(["unzip", "-q", str(tmp_path / "l.zip"), "-d", str(mount / "z")], capture_output=True, text=True)
    assert "deferred symlink" in r.stdout + r.stderr
    assert not os.path.lexists(mount / "z/link.json")
    assert mount.status()["recent_rejections"][-1]["path"] == "z/link.json"


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 16


def test_fallocate_in_every_mode_on_the_open_version(mount, plain):
    from fusestore.engine.paths import fallocate

    def work(d: Path):
        (d / "f.bin").write_bytes(b"x" * 10000)
        fd = os.open(d / "f.bin", os.O_RDWR)
        out = []
        for mode, off, length in ((0, 0, 20000), (FALLOC_FL_KEEP_SIZE, 0, 40000),
                                  (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 5000),
                                  (FALLOC_FL_ZERO_RANGE, 9000, 2000)):
            fallocate(fd, mode, off, length)
            out.append((os.fstat(fd).st_size, os.pread(fd, 8, 96), os.lseek(fd, 0, os.SEEK_END)))
        os.close(fd)
        data = (d / "f.bin").read_bytes()
        return out, len(data), data.count(b"x")

    same(mount, plain, work)
    assert (mount.backing / "f.bin").stat().st_size == 20000


def test_posix_fallocate_of_a_new_file(mount, plain):
    def work(d: Path):
        fd = os.open(d / "pre.json", os.O_CREAT | os.O_WRONLY, 0o644)
        os.posix_fallocate(fd, 0, 4096)
        os.ftruncate(fd, 0)
        os.write(fd, b"[1]")
        os.close(fd)
        return (d / "pre.json").read_bytes()

    assert same(mount, plain, work) == b"[1]"

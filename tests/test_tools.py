"""Unmodified programs writing through a real mount: the content and the backups they leave."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

from conftest import write_json


def sh(cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, **kw)


def backups_of(m, rel: str) -> list[bytes]:
    d = m.mnt / ".backups" / rel
    return [(d / str(n)).read_bytes() for n in range(1, 10) if (d / str(n)).exists()]


def test_shell_redirection_commits_and_keeps_the_old_content_as_generation_1(mount):
    assert sh(f"echo '{{\"v\": 1}}' > {mount / 'a.json'}").returncode == 0
    assert sh(f"echo '{{\"v\": 2}}' > {mount / 'a.json'}").returncode == 0
    assert json.loads((mount / "a.json").read_text()) == {"v": 2}
    assert json.loads((mount.backing / "a.json").read_text()) == {"v": 2}
    assert backups_of(mount, "a.json") == [b'{"v": 1}\n']


def test_shell_append_to_plain_file_is_staged_and_committed(mount):
    sh(f"echo one > {mount / 'notes.txt'}")
    sh(f"echo two >> {mount / 'notes.txt'}")
    assert (mount / "notes.txt").read_text() == "one\ntwo\n"
    assert backups_of(mount, "notes.txt") == [b"one\n"]


def test_log_files_are_appended_through_without_backups(mount):
    (mount / "logs").mkdir()
    for line in ("a", "b", "c"):
        sh(f"echo {line} >> {mount / 'logs/pipeline.log'}")
    assert (mount / "logs/pipeline.log").read_text() == "a\nb\nc\n"
    assert backups_of(mount, "logs/pipeline.log") == []


def test_cp_mv_and_backups_of_replaced_targets(mount, tmp_path):
    src = tmp_path / "src.json"
    src.write_text('{"x": 1}')
    assert sh(f"cp {src} {mount / 'c.json'}").returncode == 0
    src.write_text('{"x": 2}')
    assert sh(f"cp {src} {mount / 'c.json'}").returncode == 0
    assert (mount / "c.json").read_text() == '{"x": 2}'
    assert backups_of(mount, "c.json") == [b'{"x": 1}']
    write_json(mount / "d.json", {"d": True})
    assert sh(f"mv {mount / 'd.json'} {mount / 'c.json'}").returncode == 0
    assert json.loads((mount / "c.json").read_text()) == {"d": True}
    assert not (mount / "d.json").exists()
    assert backups_of(mount, "c.json")[0] == b'{"x": 2}'


def test_sed_in_place_keeps_a_backup(mount):
    write_json(mount / "s.json", {"title": "old"})
    assert sh(f"sed -i 's/old/new/' {mount / 's.json'}").returncode == 0
    assert json.loads((mount / "s.json").read_text()) == {"title": "new"}
    assert json.loads(backups_of(mount, "s.json")[0]) == {"title": "old"}


def test_python_json_dump_rotates_three_generations(mount):
    for v in range(6):
        write_json(mount / "doc.json", {"v": v})
    assert json.loads((mount / "doc.json").read_text()) == {"v": 5}
    assert [json.loads(b)["v"] for b in backups_of(mount, "doc.json")] == [4, 3, 2]


def test_python_client_json_dump_in_subprocess(mount):
    code = f"import json; json.dump({{'ok': 1}}, open({str(mount / 'p.json')!r}, 'w'))"
    assert subprocess.run(["python3", "-c", code], timeout=30).returncode == 0
    assert json.loads((mount / "p.json").read_text()) == {"ok": 1}


def test_rsync_into_and_out_of_the_mount(mount, tmp_path):
    src = tmp_path / "src"
    (src / "topics").mkdir(parents=True)
    write_json(src / "metadata.json", {"projectId": "p"})
    write_json(src / "topics/discovered.json", [1, 2, 3])
    (src / "video.bin").write_bytes(os.urandom(300_000))
    r = sh(f"rsync -a {src}/ {mount.mnt}/proj/")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = sh(f"rsync -a {mount.mnt}/proj/ {out}/")
    assert r.returncode == 0, r.stderr
    for rel in ("metadata.json", "topics/discovered.json", "video.bin"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    # A second rsync of changed content replaces through rename and keeps a backup.
    write_json(src / "metadata.json", {"projectId": "p", "status": "done"})
    assert sh(f"rsync -a {src}/ {mount.mnt}/proj/").returncode == 0
    assert json.loads(backups_of(mount, "proj/metadata.json")[0]) == {"projectId": "p"}


def test_tar_extracts_into_the_mount(mount, tmp_path):
    src = tmp_path / "t"
    (src / "scripts").mkdir(parents=True)
    write_json(src / "scripts/s1.json", {"segments": []})
    (src / "scripts/readme.txt").write_text("hello")
    os.chmod(src / "scripts/readme.txt", 0o640)
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="proj")
    r = sh(f"tar -xf {archive} -C {mount.mnt}")
    assert r.returncode == 0, r.stderr
    assert json.loads((mount / "proj/scripts/s1.json").read_text()) == {"segments": []}
    assert (mount / "proj/scripts/readme.txt").read_text() == "hello"
    assert oct((mount / "proj/scripts/readme.txt").stat().st_mode & 0o777) == oct(0o640)


def test_dd_writes_in_place_without_truncating(mount):
    (mount / "blob.bin").write_bytes(b"A" * 10000)
    r = sh(f"dd if=/dev/zero of={mount / 'blob.bin'} bs=100 count=1 seek=5 conv=notrunc status=none")
    assert r.returncode == 0, r.stderr
    data = (mount / "blob.bin").read_bytes()
    assert data == b"A" * 500 + b"\0" * 100 + b"A" * 9400
    assert backups_of(mount, "blob.bin") == [b"A" * 10000]


def test_truncate_commits_and_refuses_to_empty_a_json_file(mount):
    (mount / "t.bin").write_bytes(b"x" * 1000)
    assert sh(f"truncate -s 10 {mount / 't.bin'}").returncode == 0
    assert (mount / "t.bin").read_bytes() == b"x" * 10
    assert sh(f"truncate -s 20 {mount / 't.bin'}").returncode == 0
    assert (mount / "t.bin").read_bytes() == b"x" * 10 + b"\0" * 10
    write_json(mount / "keep.json", {"k": 1})
    r = sh(f"truncate -s 0 {mount / 'keep.json'}")
    assert r.returncode != 0 and "Bad message" in r.stderr
    assert json.loads((mount / "keep.json").read_text()) == {"k": 1}


def test_ln_hard_and_symbolic(mount):
    write_json(mount / "orig.json", {"o": 1})
    assert sh(f"ln {mount / 'orig.json'} {mount / 'hard.json'}").returncode == 0
    assert (mount / "hard.json").stat().st_nlink == 2
    assert (mount / "orig.json").stat().st_nlink == 2
    assert sh(f"ln -s orig.json {mount / 'soft.json'}").returncode == 0
    assert os.readlink(mount / "soft.json") == "orig.json"
    assert json.loads((mount / "soft.json").read_text()) == {"o": 1}
    # ln a b; rm a; the other name still works (how git and some tools rename).
    assert sh(f"rm {mount / 'orig.json'}").returncode == 0
    assert json.loads((mount / "hard.json").read_text()) == {"o": 1}
    assert (mount / "hard.json").stat().st_nlink == 1


def test_commit_replaces_only_the_name_written_through(mount):
    (mount / "a.txt").write_text("old")
    ino = os.stat(mount / "a.txt").st_ino
    os.link(mount / "a.txt", mount / "b.txt")
    # Every name of one file shows one inode number (git's local clone, tar, rsync -H and du
    # tell hard links by it), and the name linked from keeps the number it had.
    assert os.stat(mount / "a.txt").st_ino == os.stat(mount / "b.txt").st_ino == ino
    os.link(mount / "b.txt", mount / "c.txt")
    assert {e.inode() for e in os.scandir(mount.mnt)} == {ino}
    with open(mount / "a.txt", "r+") as f:
        f.write("new")
        f.flush()
        os.fsync(f.fileno())  # the commit: a.txt is a file of its own now, with its own number
        assert os.fstat(f.fileno()).st_ino == os.stat(mount / "a.txt").st_ino != ino
    assert (mount / "a.txt").read_text() == "new"
    assert (mount / "b.txt").read_text() == (mount / "c.txt").read_text() == "old"
    assert os.stat(mount / "b.txt").st_ino == os.stat(mount / "c.txt").st_ino == ino
    assert [os.stat(mount / n).st_nlink for n in ("a.txt", "b.txt", "c.txt")] == [1, 2, 2]


def test_tar_and_cp_keep_hard_links_through_the_mount(mount, plain):
    for root in (mount.mnt, plain):
        (root / "src").mkdir()
        (root / "src/a.bin").write_bytes(b"x" * 5000)
        os.link(root / "src/a.bin", root / "src/b.bin")
        r = sh(f"cd {root} && tar cf t.tar src && mkdir out && tar xf t.tar -C out && cp -a src copy"
               f" && tar tvf t.tar | grep -c 'link to' && du -s --apparent-size -B1 src | cut -f1")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["1", str(5000 + os.stat(root / "src").st_size)]
        for d in ("out/src", "copy"):
            assert os.stat(root / d / "a.bin").st_ino == os.stat(root / d / "b.bin").st_ino
            assert os.stat(root / d / "a.bin").st_nlink == 2


def test_every_name_of_a_hard_linked_file_sees_a_change_made_through_another(mount):
    # Each name is its own inode through the mount, so the kernel caches each one's attributes
    # apart; a change through one name must not leave the others stale (found by tools/torture).
    (mount / "a.txt").write_text("x")
    assert sh(f"ln {mount / 'a.txt'} {mount / 'b.txt'} && ln {mount / 'b.txt'} {mount / 'c.txt'}").returncode == 0
    names = [mount / n for n in ("a.txt", "b.txt", "c.txt")]
    assert [p.stat().st_nlink for p in names] == [3, 3, 3]
    assert sh(f"chmod 700 {mount / 'c.txt'} && touch -d '2021-05-06 07:08:09' {mount / 'b.txt'}").returncode == 0
    modes_and_times = {(p.stat().st_mode & 0o777, int(p.stat().st_mtime)) for p in names}
    assert modes_and_times == {(0o700, int(names[1].stat().st_mtime))}
    assert sh(f"rm {mount / 'a.txt'}").returncode == 0
    assert [p.stat().st_nlink for p in names[1:]] == [2, 2]
    (mount / "other.txt").write_text("y")
    assert sh(f"mv {mount / 'other.txt'} {mount / 'b.txt'}").returncode == 0  # b's old file loses a name
    assert (mount / "c.txt").stat().st_nlink == 1
    assert (mount / "c.txt").read_text() == "x"
    os.link(mount / "c.txt", mount / "d.txt")
    (mount / "d.txt").write_text("z")  # a commit: d.txt gets a new inode, c.txt keeps the old one
    assert [(mount / n).stat().st_nlink for n in ("c.txt", "d.txt")] == [1, 1]
    # A symlink can have hard links too (seed 102 of tools/torture found it).
    os.symlink("c.txt", mount / "s1")
    os.link(mount / "s1", mount / "s2", follow_symlinks=False)
    assert os.lstat(mount / "s1").st_nlink == 2
    os.unlink(mount / "s2")
    assert os.lstat(mount / "s1").st_nlink == 1


def test_chmod_touch_find(mount):
    (mount / "d/e").mkdir(parents=True)
    write_json(mount / "d/e/f.json", {})
    assert sh(f"chmod 600 {mount / 'd/e/f.json'}").returncode == 0
    assert (mount / "d/e/f.json").stat().st_mode & 0o777 == 0o600
    write_json(mount / "d/e/f.json", {"again": 1})
    assert (mount / "d/e/f.json").stat().st_mode & 0o777 == 0o600, "mode carries over a commit"
    assert sh(f"touch -d '2020-01-02 03:04:05' {mount / 'd/e/f.json'}").returncode == 0
    assert int((mount / "d/e/f.json").stat().st_mtime) == int((mount.backing / "d/e/f.json").stat().st_mtime)
    assert sh(f"touch {mount / 'd/new.txt'}").returncode == 0
    r = sh(f"cd {mount.mnt} && find . | sort")
    assert r.stdout.split() == [".", "./d", "./d/e", "./d/e/f.json", "./d/new.txt"]


def test_touch_of_a_new_json_file_makes_an_empty_file(mount):
    assert sh(f"touch {mount / 'empty.json'}").returncode == 0
    assert (mount.backing / "empty.json").read_bytes() == b""  # committed at touch's close
    assert mount.status()["recent_rejections"] == []


def test_git_works_in_the_mount(mount):
    git = "git -c user.name=t -c user.email=t@example.invalid"
    r = sh(f"cd {mount.mnt} && git init -q repo && cd repo && echo '{{\"a\": 1}}' > a.json && git add a.json"
           f" && {git} commit -qm one && echo '{{\"a\": 2}}' > a.json && {git} commit -qam two"
           f" && git gc -q && git fsck && git log --format=%s")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["two", "one"]
    assert mount.status()["rejections"] == 0


def _git_history(tmp_path, where) -> tuple:
    """Clone a repository into `where`, commit there, push to a bare repository in `where`,
    clone that back: git's own pack writing and reading through several descriptors."""
    git = "git -c user.name=t -c user.email=t@example.invalid -c init.defaultBranch=main -c protocol.file.allow=always"
    src = tmp_path / "src"
    if not src.exists():
        r = sh(f"{git} init -q {src} && cd {src} && for i in 1 2 3; do echo \"{{\\\"n\\\": $i}}\" > f$i.json;"
               f" head -c 200000 /dev/urandom > blob$i.bin; git add .; {git} commit -qm c$i; done")
        assert r.returncode == 0, r.stderr
    r = sh(f"cd {where} && {git} clone -q file://{src} work && {git} init -q --bare bare.git"
           f" && cd work && echo '{{\"n\": 4}}' > f4.json && git add f4.json && {git} commit -qm c4"
           f" && {git} push -q ../bare.git HEAD:main && cd .. && {git} clone -q file://{where}/bare.git again"
           f" && {git} clone -q work local && cd again && git fsck --strict && git log --format=%s")
    return r.returncode, r.stderr.strip()[-300:], r.stdout.split()


def test_git_clone_fetch_and_push_in_the_mount(mount, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    want = _git_history(tmp_path, plain)
    assert want[0] == 0, want
    assert _git_history(tmp_path, mount.mnt) == want
    assert (mount / "again/f4.json").read_text() == '{"n": 4}\n'
    assert mount.status()["rejections"] == 0

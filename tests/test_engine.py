"""The engine without FUSE: validation, backups and the commit protocol."""

from __future__ import annotations

import json
import os

import pytest

from fusestore import config
from fusestore.engine import validate
from fusestore.engine.store import Rejected, Store


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path), config.Config())
    yield s
    s.close()


def commit_bytes(store: Store, relpath: str, data: bytes) -> None:
    stage = store.new_stage(relpath)
    os.write(stage.fd, data)
    dir_fd, name = store.open_parent_creating(relpath)
    try:
        store.commit(stage, dir_fd, name, relpath)
    finally:
        os.close(dir_fd)


@pytest.mark.parametrize("data,expected", [
    (b'{"a": 1}', None),
    (b"  [1, 2]\n", None),
    (b'"\xc3\xa9"', None),
    (b"", "empty file"),
    (b"{", "truncated"),
    (b'{"a": 1}}', "line 1, column 9: trailing characters"),
    (b'["\xff"]', "line 1, column 3: invalid UTF-8"),
    (b'"ok"\n  "\xc3', "line 2, column 3"),
    (b"[Infinity]", "line 1, column 2"),
])
def test_json_validation_names_line_and_column(data, expected):
    reason = validate.json_error(data)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_utf8_errors_are_found_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(validate, "_UTF8_CHUNK", 4)
    assert validate.json_error('"aéé"'.encode()) is None
    assert "line 1, column 5: invalid UTF-8" in validate.json_error(b'"abc\xff"')


def test_commit_keeps_rotating_generations_without_copying(store, tmp_path):
    for v in range(5):
        commit_bytes(store, "d/a.json", json.dumps({"v": v}).encode())
    assert json.loads((tmp_path / "d/a.json").read_text()) == {"v": 4}
    gens = store.backups.generations("d/a.json")
    assert [g.number for g in gens] == [1, 2, 3]
    contents = []
    for g in gens:
        fd = store.backups.open_generation("d/a.json", g.number)
        contents.append(json.loads(os.read(fd, 100)))
        # Kept by hard link: the generation is the very inode that was replaced.
        assert os.fstat(fd).st_nlink == 1
        os.close(fd)
    assert contents == [{"v": 3}, {"v": 2}, {"v": 1}]


def test_rejected_commit_leaves_target_and_quarantines(store, tmp_path):
    commit_bytes(store, "a.json", b"[1]")
    with pytest.raises(Rejected) as info:
        commit_bytes(store, "a.json", b"[1,")
    assert "truncated" in info.value.reason
    assert (tmp_path / "a.json").read_bytes() == b"[1]"
    [entry] = store.quarantine_entries()
    assert (tmp_path / ".fusestore/quarantine" / entry).read_bytes() == b"[1,"
    assert store.stats.rejections == 1


def test_names_starting_with_percent_cannot_be_taken_for_generations(store):
    commit_bytes(store, "%1/x.txt", b"a")
    commit_bytes(store, "%1/x.txt", b"b")
    assert [g.number for g in store.backups.generations("%1/x.txt")] == [1]
    assert store.backups.listing("")[0] == ["%1"]


def test_metadata_carries_over(store, tmp_path):
    commit_bytes(store, "m.txt", b"1")
    os.chmod(tmp_path / "m.txt", 0o640)
    os.setxattr(tmp_path / "m.txt", "user.k", b"v")
    commit_bytes(store, "m.txt", b"2")
    assert os.stat(tmp_path / "m.txt").st_mode & 0o777 == 0o640
    assert os.getxattr(tmp_path / "m.txt", "user.k") == b"v"


def test_recovery_quarantines_staged_files_with_their_path(store, tmp_path):
    stage = store.new_stage("dir/new.json")
    os.write(stage.fd, b'{"half": ')
    long_rel = "/".join(["x" * 100] * 3)
    long_stage = store.new_stage(long_rel)
    os.write(long_stage.fd, b"long")
    empty = store.new_stage("nothing.txt")
    found = dict(store.recover())
    assert set(found) == {"dir/new.json", long_rel, "nothing.txt"}
    assert found["nothing.txt"] is None, "an empty staged file holds nothing worth keeping"
    assert os.listdir(tmp_path / ".fusestore/staging") == []
    assert (tmp_path / ".fusestore/quarantine" / found["dir/new.json"]).read_bytes() == b'{"half": '
    assert (tmp_path / ".fusestore/quarantine" / found[long_rel]).read_bytes() == b"long"
    for s in (stage, long_stage, empty):
        os.close(s.fd)


def test_restore_is_a_commit(tmp_path):
    from fusestore.trees import TreeWriter

    with TreeWriter(str(tmp_path)) as writer:  # no daemon: commits through the engine, locked
        commit_bytes(writer.store, "r.json", b"[1]")
        commit_bytes(writer.store, "r.json", b"[2]")
        src = writer.store.backups.open_generation("r.json", 1)
        writer.write("r.json", src)
        os.close(src)
        assert (tmp_path / "r.json").read_bytes() == b"[1]"
        fd = writer.store.backups.open_generation("r.json", 1)
        assert os.read(fd, 10) == b"[2]"
        os.close(fd)


def test_config_rules_match_globs():
    cfg = config.Config(rules=(config.Rule(glob="projects/*/raw/*", validate="none"),))
    assert cfg.rule_for("projects/p1/raw/a.json").validate == "none"
    assert cfg.rule_for("projects/p1/a.json").validate == "json"
    assert cfg.rule_for("p/logs/errors.log").mode == "append"
    assert cfg.rule_for("video.mp4").validate == "none"

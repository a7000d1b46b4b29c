"""The engine without FUSE: validation, backups and the commit protocol."""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import random

import pytest

from conftest import host_dir
from fusestore.engine import config, validate
from fusestore.engine.backups import Backups
from fusestore.engine.store import Invalid, Rejected, Store


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
        store.commit_once(stage, dir_fd, name, relpath)
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


@pytest.mark.parametrize("data,expected", [
    (b'{"id": 1,\n "id": 2}', 'line 2, column 2: duplicate key "id"'),
    (b'{"a": 1, "\\u0061": 2}', 'line 1, column 10: duplicate key "a"'),
    (b'{"\\ud83d\\ude00": 1, "\xf0\x9f\x98\x80": 2}', 'column 21: duplicate key "\\ud83d\\ude00"'),
    (b'{"q\\"": 1, "q\\u0022": 2}', 'column 12: duplicate key "q\\""'),
    (b'{"a\\\\": {"a\\\\": 1}, "b": [{"x": 1}, {"x": 2}], "a\\\\": 0}', 'column 48: duplicate key "a\\\\"'),
    (b'{"a": 1, "b": {"a": 2}, "c": [{"a": 3}, {"a": 4}]}', None),
    (b'{"a\\n": 1, "a\\\\n": 2, "a\\/": 3, "a/": 4}', 'column 33: duplicate key "a/"'),
    (b'[{"k": "\\"k\\": 1, "}, {"k": "k"}]', None),
    (b'{"k": {"k": {"k": {}}}, "j": "k"}', None),
])
def test_duplicate_keys_are_the_same_decoded_string_in_one_object(data, expected):
    reason = validate.json_error(data)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, reason


def _random_json(rng: random.Random, depth: int = 0):
    keys = ["a", "b", "\\u0061", "\\\"", "\\u0022", "\\\\", "\\/", "/", "\\n", "\xc3\xa9", "\\u00e9", "\\ud83d\\ude00"]

    def value(d):
        roll = rng.random()
        if d > 3 or roll < 0.3:
            return rng.choice(["1", "-2.5e3", "true", "null", '"a"', '"\\"a\\":"', '"{\\\\"'])
        if roll < 0.5:
            return "[" + ", ".join(value(d + 1) for _ in range(rng.randint(0, 3))) + "]"
        members = [f'"{rng.choice(keys)}{rng.choice(["", "", "x"])}": {value(d + 1)}' for _ in range(rng.randint(0, 4))]
        return "{" + ",".join(members) + "}"

    return value(depth).encode()


def test_duplicate_key_scan_agrees_with_pythons_json_on_random_documents():
    def pairs(items):
        if len({k for k, _ in items}) != len(items):
            raise KeyError("duplicate")
        return {}

    rng = random.Random(7)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        doc = _random_json(rng)
        try:
            json.loads(doc, object_pairs_hook=pairs)
            expected = False
        except KeyError:
            expected = True
        seen[expected] += 1
        assert (validate._dupkeys.find(doc) >= 0) == expected, doc
    assert min(seen.values()) > 300  # both answers were tried


def test_duplicate_keys_are_found_in_documents_of_any_size(tmp_path):
    # Past 1 MiB the document is read through a memory map and scanned beside msgspec.
    body = b'{"records": [' + b",".join(b'{"id": %d, "text": "%s"}' % (i, b"x" * 50) for i in range(40_000))
    path = tmp_path / "big.json"
    path.write_bytes(body + b'], "records": []}')
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size > 2 << 20
        reason = validate.check("json", fd)
    finally:
        os.close(fd)
    assert reason == f'line 1, column {len(body) + 4}: duplicate key "records" in an object'
    path.write_bytes(body + b'], "more": []}')
    fd = os.open(path, os.O_RDONLY)
    try:
        assert validate.check("json", fd) is None
    finally:
        os.close(fd)


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
    assert (host_dir(tmp_path) / "quarantine" / entry).read_bytes() == b"[1,"
    assert store.stats.rejections == 1


def test_a_refused_commit_leaves_the_stage_to_its_caller(store, tmp_path):
    commit_bytes(store, "b.json", b"[1]")
    stage = store.new_stage("b.json")
    os.write(stage.fd, b"[2,")
    dir_fd, name = store.open_parent_creating("b.json")
    try:
        with pytest.raises(Invalid):
            store.commit(stage, dir_fd, name, "b.json")
        assert store.stats.rejections == 0 and store.quarantine_entries() == []
        os.write(stage.fd, b"3]")  # the writer goes on with the same open version
        store.commit(stage, dir_fd, name, "b.json")
        os.close(stage.fd)
    finally:
        os.close(dir_fd)
    assert (tmp_path / "b.json").read_bytes() == b"[2,3]"


def test_empty_content_may_be_new_but_may_not_empty_a_validated_file(store, tmp_path):
    commit_bytes(store, "new.json", b"")
    assert (tmp_path / "new.json").read_bytes() == b""
    commit_bytes(store, "new.json", b"[1]")
    with pytest.raises(Rejected) as info:
        commit_bytes(store, "new.json", b"")
    assert "empty content" in info.value.reason
    commit_bytes(store, "notes.txt", b"text")
    commit_bytes(store, "notes.txt", b"")  # unvalidated paths take anything


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
    assert os.listdir(host_dir(tmp_path) / "staging") == []
    assert (host_dir(tmp_path) / "quarantine" / found["dir/new.json"]).read_bytes() == b'{"half": '
    assert (host_dir(tmp_path) / "quarantine" / found[long_rel]).read_bytes() == b"long"
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


def _fnmatch_rule(rules, relpath):
    """The rule semantics spelled with fnmatch, one rule at a time: the oracle for the one
    compiled expression that `rule_for` uses."""
    parts = relpath.split("/")
    for rule in rules:
        if rule.glob.startswith("**/"):
            tail = rule.glob[3:].split("/")
            hit = len(parts) >= len(tail) and all(
                fnmatch.fnmatchcase(p, t) for p, t in zip(parts[len(parts) - len(tail):], tail))
        elif "/" in rule.glob:
            hit = fnmatch.fnmatchcase(relpath, rule.glob)
        else:
            hit = fnmatch.fnmatchcase(parts[-1], rule.glob)
        if hit:
            return rule
    return config.DEFAULT_RULES[-1]


def test_rule_for_agrees_with_fnmatch_on_random_globs_and_paths():
    rng = random.Random(5)
    atoms = ["a", "b", "x.json", "*", "?", "[ab]", "[!a]", "[a-c]", "[]]", "[", ".", "-", "\n", "*.json", "project-*"]

    def glob(with_slash):
        parts = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        text = "/".join(parts) if with_slash else parts[0]
        return ("**/" + text) if with_slash and rng.random() < 0.5 else text

    names = ["a", "b", "ab", "x.json", "project-1", "c]", "[", "a\nb", "-", ".", "ba.json", "a.json"]
    for _ in range(60):
        rules = tuple(config.Rule(glob=glob(rng.random() < 0.6)) for _ in range(rng.randint(1, 5)))
        cfg = config.Config(rules=rules)
        for _ in range(40):
            relpath = "/".join(rng.choice(names) for _ in range(rng.randint(1, 4)))
            assert cfg.rule_for(relpath) is _fnmatch_rule(rules + config.DEFAULT_RULES, relpath), (rules, relpath)


def test_backups_stay_within_their_byte_budget_oldest_first(tmp_path):
    budget = 1 << 20
    s = Store(str(tmp_path), config.Config(backups=config.Backups(keep=10, max_bytes=budget)))
    try:
        blob = os.urandom(100_000)
        for round_ in range(8):
            for name in ("a.bin", "b.bin", "c.bin"):
                commit_bytes(s, name, blob + bytes([round_]))
        commit_bytes(s, "gone.bin", blob)
        commit_bytes(s, "gone.bin", blob + b"!")
        dir_fd, name = s.open_parent_creating("gone.bin")
        try:
            s.keep_backup(dir_fd, name, "gone.bin")  # as a delete through the mount does
            os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        assert s.backups.usage() <= budget
        walked = Backups(s.state.backups_fd, 10).usage()  # a fresh count agrees with the running one
        assert walked == s.backups.usage()
        for name in ("a.bin", "b.bin", "c.bin"):
            gens = s.backups.generations(name)
            assert gens and gens[0].number == 1  # generation 1 of a live file always stays
            assert len(gens) < 7  # older ones went
        # Oldest first across files: the files written in turn keep as many generations each
        # (give or take the one being written), and the deleted file's newest ones all stay.
        counts = [len(s.backups.generations(n)) for n in ("a.bin", "b.bin", "c.bin")]
        assert max(counts) - min(counts) <= 1, counts
        assert len(s.backups.generations("gone.bin")) == 2
    finally:
        s.close()


def test_the_budget_never_drops_generation_1_of_a_live_file(tmp_path):
    s = Store(str(tmp_path), config.Config(backups=config.Backups(max_bytes=1000)))
    try:
        commit_bytes(s, "big.bin", os.urandom(50_000))
        commit_bytes(s, "big.bin", os.urandom(50_000))
        assert [g.number for g in s.backups.generations("big.bin")] == [1]
        assert s.backups.usage() > 1000  # over budget, but that generation is the one kept
    finally:
        s.close()


def test_publish_syncs_renames_and_names_the_step_that_failed(tmp_path):
    from fusestore.engine import _publish

    (tmp_path / "staging").mkdir()
    (tmp_path / "docs").mkdir()
    src_dir = os.open(tmp_path / "staging", os.O_RDONLY | os.O_DIRECTORY)
    dst_dir = os.open(tmp_path / "docs", os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(tmp_path / "staging" / "s1", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"new")
        (tmp_path / "docs" / "a.json").write_bytes(b"old")
        _publish.publish(fd, src_dir, b"s1", dst_dir, b"a.json")
        assert (tmp_path / "docs" / "a.json").read_bytes() == b"new"
        assert not (tmp_path / "staging" / "s1").exists()
        with pytest.raises(OSError) as failed:  # the staged name is gone now
            _publish.publish(-1, src_dir, b"s1", dst_dir, b"a.json")
        assert failed.value.errno == errno.ENOENT and not failed.value.renamed
        assert failed.value.strerror.startswith("rename over the target")
        with pytest.raises(OSError) as failed:
            _publish.publish(10_000, src_dir, b"s1", dst_dir, b"a.json")
        assert failed.value.errno == errno.EBADF and "fsync of the staged file" in failed.value.strerror
    finally:
        for f in (fd, src_dir, dst_dir):
            os.close(f)


@pytest.fixture
def no_rename_flags(monkeypatch):
    """A filesystem whose renameat2 takes no flags (NFS, CephFS: EINVAL), as the engine meets it."""
    import ctypes

    from fusestore.engine import paths

    real = paths._renameat2

    def renameat2(src_dir, src, dst_dir, dst, flags):
        if flags:
            ctypes.set_errno(errno.EINVAL)
            return -1
        return real(src_dir, src, dst_dir, dst, flags)

    monkeypatch.setattr(paths, "_renameat2", renameat2)


def test_commits_backups_quarantine_and_cache_where_rename_takes_no_flags(tmp_path, no_rename_flags):
    from fusestore.engine.cache import Cache

    store = Store(str(tmp_path), config.Config())
    try:
        for n in range(3):  # staged from the pool (renamed without replacing), backups kept
            dir_fd, name = store.open_parent_creating("d/a.json")
            try:
                stage = store.new_stage("d/a.json")
                os.write(stage.fd, json.dumps({"n": n}).encode())
                store.commit_once(stage, dir_fd, name, "d/a.json")
            finally:
                os.close(dir_fd)
            store.refill_pool()
        assert json.loads((tmp_path / "d/a.json").read_text()) == {"n": 2}
        assert [g.number for g in store.backups.generations("d/a.json")] == [1, 2]
        dir_fd, name = store.open_parent_creating("d/a.json")
        try:
            stage = store.new_stage("d/a.json")
            os.write(stage.fd, b"{broken")
            with pytest.raises(Rejected):
                store.commit_once(stage, dir_fd, name, "d/a.json")
        finally:
            os.close(dir_fd)
        quarantine = host_dir(tmp_path) / "quarantine"
        assert [(quarantine / q).read_bytes() for q in store.quarantine_entries()] == [b"{broken"]
        assert not [n for n in os.listdir(host_dir(tmp_path) / "staging") if not n.startswith("pool-")]
    finally:
        store.close()
    with Cache(str(tmp_path / "cache")) as c:
        c.put("https://x/1", b"one", "media")
        c.put("https://x/1", b"two", "media")  # replaces the entry: exchanged by two renames
        entry = c.get("https://x/1")
        assert open(entry.path, "rb").read() == b"two"
        assert [e.key for e in c.entries()] == [entry.key]
        assert os.listdir(tmp_path / "cache" / ".tmp") == []

"""What changed: `fusestore diff` against backup generations (structural for JSON, unified for
text, sizes and digests for binaries) and the one-line summaries of `fusestore backups`."""

from __future__ import annotations

import hashlib
import json
import random

import msgspec
import pytest

from conftest import fusestore
from fusestore.engine.diffs import Change, diff, json_changes

pytestmark = pytest.mark.timeout(60)


def test_json_changes_by_path():
    old = {"title": "a", "scenes": [{"text": "one"}, {"text": "two"}], "n": 1, "gone": None, "odd key": 1}
    new = {"title": "b", "scenes": [{"text": "zero"}, {"text": "one"}, {"text": "two!"}], "n": 1.0, "odd key": [1]}
    assert json_changes(old, new) == [
        Change("changed", "$.title", "a", "b"),
        Change("added", "$.scenes[0]", new={"text": "zero"}),  # aligned: one insertion, not three changes
        Change("changed", "$.scenes[2].text", "two", "two!"),
        Change("changed", "$.n", 1, 1.0),  # 1 and 1.0 are different JSON
        Change("removed", "$.gone", old=None),  # a null value is a value
        Change("changed", '$["odd key"]', 1, [1]),
    ]
    assert json_changes([1, 2, 3, 4], [1, 4]) == [Change("removed", "$[1]", old=2), Change("removed", "$[2]", old=3)]
    assert json_changes(True, 1) == [Change("changed", "$", True, 1)]


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randrange(-3, 4)
    if kind == 2:
        return rng.choice([0.5, 1.0, -2.25])
    if kind in (3, 4):
        return rng.choice(["", "a", "b", "é", "a b"])
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice("abcd"): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_no_changes_exactly_when_the_json_texts_are_equal():
    """Oracle: two documents are the same JSON value when their canonical encodings are equal."""
    rng = random.Random(5)
    for _ in range(3000):
        a, b = _random_json(rng), _random_json(rng)
        if rng.random() < 0.3:
            b = json.loads(json.dumps(a))
        same = msgspec.json.encode(a, order="sorted") == msgspec.json.encode(b, order="sorted")
        assert (json_changes(a, b) == []) == same, (a, b)


def test_text_and_binary_diffs():
    d = diff(b"hello\nworld\n", b"hello\nthere\nworld\n", "a", "b")
    assert d.kind == "text" and d.unified == ["--- a", "+++ b", "@@ -1,2 +1,3 @@", " hello", "+there", " world"]
    assert d.summary() == "+1 -0 lines"
    d = diff(b"\x00\x01", b"\xff\xfe\x00")
    assert d.kind == "binary" and d.summary() == "binary, 2 -> 3 bytes"
    assert d.new_sha256 == hashlib.sha256(b"\xff\xfe\x00").hexdigest()
    assert diff(b'{"a": 1}', b'{"a":1}').summary() == "same JSON value (formatting only)"
    assert diff(b"x", b"x").same and diff(b"x", b"x").summary() == "no change"


def test_diff_command_through_the_mount(mount):
    doc = mount / "script.json"
    doc.write_text(json.dumps({"title": "draft", "scenes": [{"text": "one"}]}))
    doc.write_text(json.dumps({"title": "final", "scenes": [{"text": "one"}, {"text": "two"}]}))
    r = fusestore("diff", str(doc), check=False)
    assert r.returncode == 1  # as diff(1): they differ
    assert r.stdout.splitlines() == ["--- script.json (generation 1)", "+++ script.json (now)",
                                     '~ $.title: "draft" -> "final"', '+ $.scenes[1]: {"text":"two"}']
    as_json = json.loads(fusestore("diff", str(doc), "--json", check=False).stdout)
    assert as_json["kind"] == "json" and as_json["generation"] == 1
    assert as_json["changes"] == [{"op": "changed", "path": "$.title", "old": "draft", "new": "final"},
                                  {"op": "added", "path": "$.scenes[1]", "new": {"text": "two"}}]
    fusestore("restore", str(doc), "-g", "1")
    assert fusestore("diff", str(doc), "-g", "2", check=False).returncode == 0  # restored: the same again
    missing = fusestore("diff", str(doc), "-g", "9", check=False)
    assert missing.returncode == 2 and "no backup generation 9" in missing.stderr


def test_diff_of_text_binary_and_removed_files(mount, plain):
    (mount / "notes.txt").write_text("a\nb\n")
    (mount / "notes.txt").write_text("a\nc\n")
    r = fusestore("diff", str(mount / "notes.txt"), check=False)
    assert r.stdout.splitlines()[2:] == ["@@ -1,2 +1,2 @@", " a", "-b", "+c"]
    (mount / "blob.bin").write_bytes(b"\x00" * 10)
    (mount / "blob.bin").write_bytes(b"\x00" * 12)
    r = fusestore("diff", str(mount / "blob.bin"), check=False)
    assert r.returncode == 1 and "10 bytes" in r.stdout and "12 bytes" in r.stdout
    assert hashlib.sha256(b"\x00" * 12).hexdigest() in r.stdout
    (mount / "notes.txt").unlink()
    r = fusestore("diff", str(mount / "notes.txt"), check=False)
    assert r.returncode == 2 and "does not exist now" in r.stderr


def test_backups_say_what_each_generation_then_changed(mount):
    doc = mount / "state.json"
    for version in ({"step": 1}, {"step": 2}, {"step": 2, "done": True}):
        doc.write_text(json.dumps(version))
    table = fusestore("backups", str(doc)).stdout.splitlines()
    assert table[0].split()[-2:] == ["then", "changed"]
    assert table[1].endswith("1 added: $.done")
    assert table[2].endswith("1 changed: $.step")
    reports = json.loads(fusestore("backups", str(doc), "--json").stdout)
    assert [r["change"] for r in reports] == ["1 added: $.done", "1 changed: $.step"]
    doc.unlink()
    assert json.loads(fusestore("backups", str(doc), "--json").stdout)[0]["change"] == "then removed"

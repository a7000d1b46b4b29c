"""Bad content: close() or rename() fails with EBADMSG, the committed file is unchanged, the bytes
are in the quarantine and the log names line and column."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from conftest import close_error, wait_for, write_json

BAD = {
    "invalid": (b'{"a": [1, 2,, 3]}', "line 1, column 13"),
    "truncated": (b'{"title": "half', "truncated"),
    "trailing-garbage": (b'{"a": 1}\n{"b": 2}\n', "line 2, column 1: trailing characters"),
    "invalid-utf8": (b'{"name": "caf\xe9"}', "line 1, column 14: invalid UTF-8"),
    "multiline": (b'{\n  "a": 1,\n  "b": ]\n}', "line 3, column 8"),
    "bom": (b'\xef\xbb\xbf{"a": 1}', "byte order mark"),
    "nan": (b'{"a": NaN}', "line 1, column 7"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "nesting too deep"),
    "infinity": (b'[1, -Infinity]', "line 1, column 6"),
    "lone-surrogate": (b'{"name": "\\ud800 broken"}', "line 1, column 11: lone UTF-16 surrogate escape"),
    "duplicate-keys": (b'{"id": 1,\n "id": 2}', "line 2, column 2: duplicate key \"id\""),
    "not-json": (b"title: yaml is not json\n", "invalid character"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_json_is_rejected_with_ebadmsg_and_quarantined(mount, case):
    data, where = BAD[case]
    write_json(mount / "doc.json", {"good": True})
    err = close_error(mount / "doc.json", data)
    assert err is not None and err.errno == errno.EBADMSG
    assert json.loads((mount / "doc.json").read_text()) == {"good": True}
    assert json.loads((mount.backing / "doc.json").read_text()) == {"good": True}
    # Refused at close; the bytes go to the quarantine at the release that follows it.
    assert wait_for(lambda: len(mount.quarantine) == 1)
    [kept] = mount.quarantine
    assert kept.read_bytes() == data
    reason = json.loads(kept.with_name(kept.name + ".reason").read_text())
    assert reason["path"] == "doc.json" and where in reason["reason"]
    log = (mount.host / "fusestore.log").read_text()
    assert "rejected doc.json" in log and where in log
    status = mount.status()
    assert status["rejections"] == 1 and status["recent_rejections"][0]["path"] == "doc.json"


def test_rejected_new_file_does_not_appear(mount):
    err = close_error(mount / "new.json", b"{oops")
    assert err is not None and err.errno == errno.EBADMSG
    assert wait_for(lambda: not (mount / "new.json").exists())
    assert not (mount.backing / "new.json").exists()
    assert wait_for(lambda: [p.read_bytes() for p in mount.quarantine] == [b"{oops"])


def test_huge_valid_json_is_committed(mount):
    doc = {"items": [{"id": i, "text": "x" * 100} for i in range(100_000)]}
    write_json(mount / "big.json", doc)
    assert json.loads((mount / "big.json").read_text()) == doc


def test_sed_that_breaks_json_fails_and_leaves_the_file(mount):
    write_json(mount / "s.json", {"k": "v"})
    r = subprocess.run(["sed", "-i", 's/"v"/"v/', str(mount / "s.json")], capture_output=True, text=True)
    assert r.returncode != 0 and "Bad message" in r.stderr
    assert json.loads((mount / "s.json").read_text()) == {"k": "v"}


def test_rename_of_invalid_content_onto_a_json_name_fails(mount):
    (mount / "draft.txt").write_text("{not json")
    write_json(mount / "final.json", [1])
    with pytest.raises(OSError) as info:
        os.rename(mount / "draft.txt", mount / "final.json")
    assert info.value.errno == errno.EBADMSG
    assert json.loads((mount / "final.json").read_text()) == [1]
    assert (mount / "draft.txt").read_text() == "{not json", "the source stays where it was"


def test_cp_reports_bad_message(mount, tmp_path):
    src = tmp_path / "bad.json"
    src.write_bytes(b"[1, 2")
    r = subprocess.run(["cp", str(src), str(mount / "c.json")], capture_output=True, text=True)
    assert r.returncode != 0 and "Bad message" in r.stderr


def test_shell_redirection_of_bad_json_is_visible_in_status(mount):
    write_json(mount / "x.json", {"ok": 1})
    # The shell ignores close errors; the rejection must show in status and the log.
    subprocess.run(["bash", "-c", f"echo '{{broken' > {mount / 'x.json'}"])
    assert json.loads((mount / "x.json").read_text()) == {"ok": 1}
    assert mount.status()["rejections"] == 1


def test_a_new_file_rejected_again_and_again_gets_ebadmsg_each_time(mount):
    # The kernel must forget a refused new file's name before close() returns; otherwise the
    # next open of the same name reached the old, nameless node and write() failed with EIO.
    for _ in range(30):
        err = close_error(mount / "fresh.json", b"{not json")
        assert err is not None and err.errno == errno.EBADMSG
    assert wait_for(lambda: not (mount / "fresh.json").exists())
    write_json(mount / "fresh.json", {"finally": "valid"})
    assert json.loads((mount / "fresh.json").read_text()) == {"finally": "valid"}


def test_a_2_gib_invalid_document_is_rejected_without_harm(mount):
    write_json(mount / "huge.json", {"small": True})
    chunk = b'{"segment": "' + b"x" * (1 << 20) + b'"},'
    with pytest.raises(OSError) as e:
        with open(mount / "huge.json", "wb") as f:
            f.write(b"[")
            for _ in range(2048):
                f.write(chunk)
            f.write(b'{"last": tru')  # cut off: 2 GiB and a truncated end
    assert e.value.errno == errno.EBADMSG
    assert json.loads((mount / "huge.json").read_text()) == {"small": True}
    assert wait_for(lambda: len(mount.quarantine) == 1, timeout=60)
    [kept] = mount.quarantine
    assert kept.stat().st_size > 2 << 30
    assert "truncated" in mount.status()["recent_rejections"][0]["reason"]
    kept.unlink()
    write_json(mount / "after.json", {"daemon": "fine"})  # still serving

"""Versioned documents: schemas, migrations, projects, check and repair, gc, project logs."""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from conftest import close_error, fusestore, wait_for, write_json
from fusestore import projects
from fusestore.engine import config, layout, schemas

SCRIPT = {"version": "1.0", "topicId": "topic-1", "title": "Octopuses",
          "segments": [{"id": "s1", "text": "Nine brains.", "duration": 2.5}]}


def project_dir(root: Path, name: str = "project-1700000000000-abcdef12") -> Path:
    d = root / "public/projects" / name
    for sub in layout.DIRS:
        (d / sub).mkdir(parents=True, exist_ok=True)
    return d


# -- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc_type,doc,expected", [
    ("script", SCRIPT, None),
    ("script", {**SCRIPT, "extra": {"kept": True}}, None),
    ("script", {k: v for k, v in SCRIPT.items() if k != "version"}, "missing required field `version`"),
    ("script", {**SCRIPT, "segments": [{"id": "s1", "text": 3}]}, "`$.segments[0].text`"),
    ("script", {**SCRIPT, "segments": [{"id": "s1"}]}, "missing required field `text` - at `$.segments[0]`"),
    ("script", {**SCRIPT, "version": "2.0"}, "version 2.0 is newer"),
    ("script", {**SCRIPT, "version": "1.10"}, "version 1.10 is newer"),
    ("script", {**SCRIPT, "version": 1}, "`version` must be a string"),
    ("script", {**SCRIPT, "version": "0.5"}, "no migration of a script document from version 0.5"),
    ("timestamps", {"version": "1.0", "words": [{"word": "a", "start": 0, "end": "x"}]}, "`$.words[0].end`"),
    ("project", {"version": "1.0", "projectId": "p", "createdAt": "t"}, "missing required field `status`"),
    ("script-tags", {"version": "1.0", "tags": {"s1": ["a", "b"]}}, None),
    ("timeline", [1, 2], "Expected `object`, got `array`"),
])
def test_schema_reasons_name_the_field(doc_type, doc, expected):
    reason = schemas.check(doc_type, json.dumps(doc).encode())
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_versions_compare_numerically():
    assert schemas.version_key("1.10") > schemas.version_key("1.9") > schemas.version_key("1.0")
    with pytest.raises(ValueError):
        schemas.version_key("1.x")


def test_a_three_step_migration_chain():
    registry = schemas.Registry(current="1.10")

    @registry.register("script", "1.8", "1.9")
    def rename_title(d):
        d["title"] = d.pop("name")
        return d

    @registry.register("script", "1.9", "1.10")
    def add_segments(d):
        d.setdefault("segments", [])
        return d

    @registry.register("script", "1.7", "1.8")
    def add_topic(d):
        d["topicId"] = d.get("topicId", "unknown")
        return d

    old = {"version": "1.7", "name": "Old", "custom": 1}
    assert [step[:2] for step in registry.path("script", "1.7")] == [("1.7", "1.8"), ("1.8", "1.9"), ("1.9", "1.10")]
    new = registry.migrate("script", old)
    assert new == {"version": "1.10", "title": "Old", "topicId": "unknown", "segments": [], "custom": 1}
    assert old["version"] == "1.7"  # the input is not changed
    assert schemas.check("script", json.dumps(old).encode(), registry) is None
    assert "newer" in schemas.check("script", json.dumps({**old, "version": "1.11"}).encode(), registry)
    with pytest.raises(ValueError, match="from version 1.6"):
        registry.path("script", "1.6")


def test_the_shipped_script_migration_from_0_8():
    old = {"version": "0.8", "topicId": "t", "title": "T", "timestamp": "2024-01-01T00:00:00Z",
           "segments": [{"id": "s", "content": "hello"}]}
    new = schemas.MIGRATIONS.migrate("script", old)
    assert new["version"] == "1.0" and new["segments"] == [{"id": "s", "text": "hello"}]
    assert new["createdAt"] == "2024-01-01T00:00:00Z" and new["metadata"] == {} and "timestamp" not in new


def test_schema_export_writes_json_schemas(tmp_path):
    out = fusestore("schema", "export", "--dir", str(tmp_path / "s")).stdout.split()
    assert len(out) == len(schemas.TYPES)
    script = json.loads((tmp_path / "s/script.schema.json").read_text())
    defs = script["$defs"]
    assert "segments" in defs["Script"]["properties"] and "version" in defs["Script"]["required"]


def test_rules_bind_schemas_only_inside_projects(tmp_path):
    cfg = config.Config()
    assert cfg.rule_for("public/projects/project-1-a/scripts/x.json").schema == "script"
    assert cfg.rule_for("project-1-a/scripts/tags.json").schema == "script-tags"
    assert cfg.rule_for("a/b/project-1-a/assets/images/ff.metadata.json").schema == "asset"
    assert cfg.rule_for("project-1-a/assets/images/deep/ff.metadata.json").schema is None
    assert cfg.rule_for("notes/scripts/x.json").schema is None
    assert cfg.rule_for("project-1-a/notes.json").validate == "json"
    (tmp_path / "fusestore.toml").write_text('[[rule]]\nglob = "*.doc.json"\nschema = "nope"\n')
    with pytest.raises(config.ConfigError, match="unknown schema 'nope'"):
        config.load(str(tmp_path))


# -- through the mount ----------------------------------------------------------------------------

def test_schema_rejections_through_the_mount(mount):
    d = project_dir(mount.mnt)
    write_json(d / "scripts/topic-1.json", SCRIPT)
    bad = {**SCRIPT, "segments": [{"id": "s1", "text": None}]}
    err = close_error(d / "scripts/topic-1.json", json.dumps(bad).encode())
    assert err is not None and err.errno == errno.EBADMSG
    future = {**SCRIPT, "version": "9.0"}
    assert close_error(d / "scripts/topic-1.json", json.dumps(future).encode()).errno == errno.EBADMSG
    assert json.loads((d / "scripts/topic-1.json").read_text()) == SCRIPT
    reasons = [r["reason"] for r in mount.status()["recent_rejections"]]
    assert any("`$.segments[0].text`" in r for r in reasons) and any("9.0 is newer" in r for r in reasons)
    # fusestore's own events land in the project's errors.log, one JSON object per line.
    events = [json.loads(line) for line in (d / "logs/errors.log").read_text().splitlines()]
    assert [e["event"] for e in events] == ["rejected", "rejected"]
    assert events[0]["path"] == "scripts/topic-1.json" and "$.segments[0].text" in events[0]["reason"]
    # Outside a project directory the same names are ordinary JSON.
    (mount.mnt / "notes/scripts").mkdir(parents=True)
    write_json(mount.mnt / "notes/scripts/x.json", [1, 2])


def test_project_logs_stay_line_intact_with_a_pipeline_appending(mount):
    d = project_dir(mount.mnt)
    stop = time.monotonic() + 2

    def pipeline():
        with open(d / "logs/errors.log", "a") as log:
            n = 0
            while time.monotonic() < stop:
                log.write(json.dumps({"source": "pipeline", "n": n, "pad": "x" * 200}) + "\n")
                log.flush()
                n += 1

    t = threading.Thread(target=pipeline)
    t.start()
    rejected = 0
    while time.monotonic() < stop:
        if close_error(d / "timeline.json", b'{"version": "1.0", "tracks": 5}') is not None:
            rejected += 1
    t.join()
    lines = (d / "logs/errors.log").read_text().splitlines()
    sources = [json.loads(line)["source"] for line in lines]  # every line parses
    assert sources.count("fusestore") == rejected and sources.count("pipeline") > 10


def test_migrate_commits_each_document_and_keeps_the_old_version(mount):
    d = project_dir(mount.mnt)
    old_script = {"version": "0.8", "topicId": "t", "title": "T", "segments": [{"id": "s", "content": "hi"}]}
    write_json(d / "scripts/t.json", old_script)  # an old but migratable version is accepted
    write_json(d / "metadata.json", {"version": "0.9", "projectId": d.name, "timestamp": "2024-01-01T00:00:00Z"})
    write_json(d / "timeline.json", {"version": "1.0", "tracks": []})
    dry = json.loads(fusestore("migrate", str(mount.mnt), "--dry-run", "--json").stdout)
    assert sorted(m["path"].rsplit("/", 1)[1] for m in dry["migrated"]) == ["metadata.json", "t.json"]
    assert json.loads((d / "scripts/t.json").read_text()) == old_script
    out = fusestore("migrate", str(mount.backing)).stdout
    assert "2 document(s) migrated" in out
    assert json.loads((d / "scripts/t.json").read_text())["segments"] == [{"id": "s", "text": "hi"}]
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["version"] == "1.0" and meta["createdAt"] == "2024-01-01T00:00:00Z" and meta["status"] == "initialized"
    assert json.loads((mount.mnt / f".backups/public/projects/{d.name}/scripts/t.json/1").read_text()) == old_script
    assert "0 document(s) migrated" in fusestore("migrate", str(mount.mnt)).stdout
    loaded = projects.load(str(d / "scripts/t.json"), as_struct=True)
    assert isinstance(loaded, schemas.Script) and loaded.segments[0].text == "hi"


def test_load_migrates_in_memory_only(tmp_path):
    d = project_dir(tmp_path)
    (tmp_path / ".fusestore").mkdir()
    old = {"version": "0.9", "topicId": "t", "title": "T", "segments": [], "timestamp": "2020-01-01T00:00:00Z", "x": 1}
    write_json(d / "scripts/a.json", old)
    doc = projects.load(str(d / "scripts/a.json"))
    assert doc["version"] == "1.0" and doc["createdAt"] == "2020-01-01T00:00:00Z" and doc["x"] == 1
    assert json.loads((d / "scripts/a.json").read_text()) == old
    write_json(d / "scripts/b.json", {"version": "3.0"})
    with pytest.raises(ValueError, match="newer"):
        projects.load(str(d / "scripts/b.json"))


@pytest.mark.parametrize("mounted", [True, False])
def test_new_project_passes_check(make_mount, mounted):
    m = make_mount(start=mounted)
    target = m.mnt if mounted else m.backing
    project_id = fusestore("new-project", str(target), "--name", "Octopus").stdout.strip()
    assert re.fullmatch(r"project-\d{13}-[0-9a-f]{8}", project_id)
    d = m.backing / "public/projects" / project_id
    meta = json.loads((d / "metadata.json").read_text())
    assert meta == {"projectId": project_id, "createdAt": meta["createdAt"], "version": "1.0",
                    "status": "initialized", "name": "Octopus"}
    for rel in (*layout.REQUIRED_FILES, "logs/pipeline.log", "assets/music"):
        assert (d / rel).exists(), rel
    result = fusestore("check", str(target), "--json")
    assert json.loads(result.stdout)["ok"] is True


def test_check_repair_on_a_tree_damaged_behind_the_daemons_back(make_mount):
    m = make_mount()
    project_id = fusestore("new-project", str(m.mnt)).stdout.strip()
    d = m.mnt / "public/projects" / project_id
    write_json(d / "topics/discovered.json", {"version": "1.0", "topics": [{"id": "t1", "title": "Octopus"}]})
    write_json(d / "scripts/t1.json", SCRIPT)
    write_json(d / "scripts/t1.json", {**SCRIPT, "title": "v2"})
    b = m.backing / "public/projects" / project_id
    # Damage in the backing tree, not through the mount.
    with open(b / "scripts/t1.json", "r+b") as f:
        f.truncate(20)
    (b / "metadata.json").unlink()  # never backed up: cannot be repaired
    (b / "topics/selected.json").unlink()
    report = fusestore("check", str(m.mnt), check=False)
    assert report.returncode == 1
    assert "invalid" in report.stdout and "metadata.json: required project file is missing" in report.stdout
    repaired = json.loads(fusestore("check", str(m.mnt), "--repair", "--json", check=False).stdout)
    assert repaired["ok"] is False
    by_path = {f["path"].rsplit(project_id + "/", 1)[1]: f for f in repaired["findings"] if project_id in f["path"]}
    assert by_path["scripts/t1.json"]["repaired"] and "restored generation 1" in by_path["scripts/t1.json"]["detail"]
    assert by_path["topics/selected.json"]["repaired"], by_path["topics/selected.json"]["detail"]
    assert not by_path["metadata.json"]["repaired"] and "no valid backup" in by_path["metadata.json"]["detail"]
    assert json.loads((d / "scripts/t1.json").read_text()) == SCRIPT  # the newest valid generation
    assert json.loads((d / "topics/selected.json").read_text()) == {"version": "1.0", "topics": []}
    warnings = [json.loads(line) for line in (d / "logs/warnings.log").read_text().splitlines()]
    assert {w["path"] for w in warnings if w["event"] == "repaired"} == {"scripts/t1.json", "topics/selected.json"}
    # What is left: the missing metadata.json; a new commit of it clears the check. (The kernel
    # may still hold the name it had before the file was removed behind the mount's back; the
    # first access finds it gone and makes the kernel forget it.)
    assert not (d / "metadata.json").exists()

    def recreate() -> bool:
        try:
            write_json(d / "metadata.json", {"projectId": project_id, "createdAt": "2026-01-01T00:00:00Z",
                                             "version": "1.0", "status": "initialized"})
            return True
        except FileNotFoundError:
            return False

    assert wait_for(recreate, timeout=8)
    r = fusestore("check", str(m.mnt), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_on_an_unmounted_tree_reports_and_quarantines_leftover_stages(make_mount):
    m = make_mount()
    project_id = fusestore("new-project", str(m.mnt)).stdout.strip()
    m.stop()
    staged = m.host / "staging" / f"{time.time_ns()}-1-0.public%2Fprojects%2F{project_id}%2Fscripts%2Fx.json"
    staged.write_text('{"half": ')
    report = json.loads(fusestore("check", str(m.backing), "--json", check=False).stdout)
    assert report["ok"] is False
    found = [f["path"] for f in report["findings"] if f["kind"] == "staged"]
    assert found == [f"public/projects/{project_id}/scripts/x.json"]
    repaired = fusestore("check", str(m.backing), "--repair")
    assert "moved to the quarantine" in repaired.stdout
    assert not staged.exists() and len(m.quarantine) == 1
    assert fusestore("check", str(m.backing)).returncode == 0


def test_the_mount_runs_the_check_in_the_background(make_mount):
    m = make_mount(start=False)
    d = project_dir(m.backing)
    write_json(d / "timeline.json", {"version": "1.0", "tracks": "broken"})
    m.start()
    deadline = time.monotonic() + 20
    while (status := m.status())["check"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    kinds = {(f["kind"], f["path"].rsplit("/", 1)[1]) for f in status["check"]["findings"]}
    assert ("invalid", "timeline.json") in kinds and ("missing", "metadata.json") in kinds
    assert "check:" in (m.host / "fusestore.log").read_text()


def test_gc_drops_old_backups_but_keeps_the_newest_of_live_files(make_mount):
    m = make_mount(start=False)
    (m.backing / "fusestore.toml").write_text("[backups]\nmax_age_days = 0.00002\n")  # about 1.7 s
    m.start()
    for v in range(3):
        write_json(m / "live.json", {"v": v})
        write_json(m / "gone.json", {"v": v})
    os.unlink(m / "gone.json")
    time.sleep(2)
    write_json(m / "fresh.json", {"v": 0})
    write_json(m / "fresh.json", {"v": 1})
    out = json.loads(fusestore("gc", str(m.mnt), "--json").stdout)
    assert out["backups_removed"] == 1 + 3  # live.json's generation 2; all of gone.json's
    assert sorted(os.listdir(m / ".backups/live.json")) == ["1"]
    assert not (m / ".backups/gone.json/1").exists()
    assert sorted(os.listdir(m / ".backups/fresh.json")) == ["1"]


def test_backups_stay_under_their_byte_budget_through_the_mount(make_mount):
    m = make_mount(start=False)
    (m.backing / "fusestore.toml").write_text('[backups]\nkeep = 10\nmax_bytes = "200KiB"\n')
    m.start()
    for v in range(12):
        for name in ("a.bin", "b.bin"):
            (m / name).write_bytes(os.urandom(40_000) + bytes([v]))
    on_disk = sum(p.stat().st_blocks * 512 for p in (m.state / "backups").rglob("%*"))
    assert on_disk <= 200 << 10
    assert len(os.listdir(m / ".backups/a.bin")) < 10  # the oldest went before rotation did
    assert sorted(os.listdir(m / ".backups/b.bin"))[0] == "1"  # generation 1 of a live file stays
    out = json.loads(fusestore("gc", str(m.mnt), "--json").stdout)
    assert out["backup_bytes"] == on_disk and out["backups_over_budget"] == 0
    status = m.status()
    assert 0 < status["backup_bytes"] <= on_disk  # the generations' sizes, as status shows them


def test_a_document_that_cannot_be_migrated_is_reported_and_left_unchanged(tmp_path):
    d = project_dir(tmp_path)
    stuck = {"version": "0.9", "topicId": "t", "segments": []}  # no title: invalid once migrated
    write_json(d / "scripts/stuck.json", stuck)
    write_json(d / "scripts/fine.json", {**stuck, "title": "T"})
    result = fusestore("migrate", str(tmp_path), "--json", check=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [m["path"].rsplit("/", 1)[1] for m in report["migrated"]] == ["fine.json"]
    assert "missing required field `title`" in report["failed"][0]["error"]
    assert json.loads((d / "scripts/stuck.json").read_text()) == stuck
    assert json.loads((d / "scripts/fine.json").read_text())["version"] == "1.0"

"""The command line as a user types it."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FUSESTORE, fusestore, is_mounted, wait_for, write_json


@pytest.mark.parametrize("command", ["", "mount", "unmount", "status", "backups", "restore"])
def test_help_works_everywhere(command):
    r = fusestore(*([command] if command else []), "--help")
    assert "usage: fusestore" in r.stdout


def test_mount_refuses_a_missing_backing_dir(tree):
    backing, mnt = tree
    r = fusestore("mount", str(backing / "nope"), str(mnt), check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not is_mounted(mnt)


@pytest.mark.parametrize(("option", "said"), [("nosuch", "unknown mount option 'nosuch'"),
                                             ("page_cache=maybe", "takes on or off")])
def test_mount_refuses_a_bad_option_in_one_line(tree, option, said):
    backing, mnt = tree
    r = fusestore("mount", str(backing), str(mnt), "-o", option, check=False)
    assert r.returncode != 0 and said in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not is_mounted(mnt)


def test_mount_refuses_a_non_empty_mountpoint(tree):
    backing, mnt = tree
    (mnt / "junk").write_text("x")
    r = fusestore("mount", str(backing), str(mnt), check=False)
    assert r.returncode != 0 and "not empty" in r.stderr


def test_mount_refuses_a_busy_mountpoint_and_a_tree_already_served(make_mount, tmp_path):
    m = make_mount()
    other = tmp_path / "other"
    other.mkdir()
    r = fusestore("mount", str(other), str(m.mnt), check=False)
    assert r.returncode != 0 and "busy" in r.stderr
    second = tmp_path / "mnt2"
    second.mkdir()
    r = fusestore("mount", str(m.backing), str(second), check=False)
    assert r.returncode != 0 and "already served by another fusestore" in r.stderr
    assert str(m.pid) in r.stderr
    assert not is_mounted(second)


def test_mount_refuses_a_bad_config_naming_the_key(tree):
    backing, mnt = tree
    (backing / "fusestore.toml").write_text('[[rule]]\nglob = "*.json"\nvalidat = "json"\n')
    r = fusestore("mount", str(backing), str(mnt), check=False)
    assert r.returncode != 0 and "validat" in r.stderr
    (backing / "fusestore.toml").write_text('[backups]\nkeep = "three"\n')
    r = fusestore("mount", str(backing), str(mnt), check=False)
    assert r.returncode != 0 and "backups.keep" in r.stderr


@pytest.mark.parametrize("command", [["new-project"], ["check"], ["gc"], ["migrate"], ["cache", "ls"],
                                     ["restore", "x.json"], ["backups", "x.json"]])
def test_every_command_reports_a_bad_config_in_one_line(tree, command):
    # One error hierarchy, caught once in cli.main: no command shows a traceback.
    backing, _ = tree
    (backing / ".fusestore").mkdir()  # a tree that was mounted once, so paths in it are found
    (backing / "fusestore.toml").write_text("[backups]\nkeep = 0\n")
    args = [*command]
    if command[0] in ("restore", "backups"):
        args[-1] = str(backing / args[-1])
    elif command[0] == "cache":
        args += ["--root", str(backing)]
    else:
        args.append(str(backing))
    r = fusestore(*args, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "backups.keep must be at least 1" in r.stderr


def test_config_rules_turn_validation_and_backups(make_mount):
    m = make_mount(start=False)
    (m.backing / "fusestore.toml").write_text(
        '[backups]\nkeep = 2\n\n'
        '[[rule]]\nglob = "raw/*.json"\nvalidate = "none"\n\n'
        '[[rule]]\nglob = "*.tmp"\nbackups = false\n'
    )
    m.start()
    (m.mnt / "raw").mkdir()
    (m.mnt / "raw/x.json").write_text("not json")  # no validation here
    for v in range(4):
        write_json(m.mnt / "doc.json", {"v": v})
    assert sorted(os.listdir(m.mnt / ".backups/doc.json")) == ["1", "2"]
    (m.mnt / "a.tmp").write_text("1")
    (m.mnt / "a.tmp").write_text("2")
    assert not (m.mnt / ".backups/a.tmp").exists()


def test_status_reports_the_mount(mount):
    write_json(mount / "a.json", {"v": 1})
    write_json(mount / "a.json", {"v": 2})
    s = mount.status()
    assert s["backing"] == str(mount.backing) and s["mountpoint"] == str(mount.mnt)
    assert s["pid"] == mount.pid and s["commits"] >= 2 and s["backup_generations"] == 1
    text = fusestore("status", str(mount.mnt)).stdout
    assert "commits:" in text and str(mount.backing) in text
    # Without a path: found from the current directory, as git finds its repository.
    (mount.mnt / "sub").mkdir()
    r = subprocess.run([*FUSESTORE, "status", "--json"], cwd=mount.mnt / "sub", capture_output=True, text=True)
    assert json.loads(r.stdout)["pid"] == mount.pid
    r = subprocess.run([*FUSESTORE, "status", "--root", str(mount.backing), "--json"], capture_output=True, text=True)
    assert json.loads(r.stdout)["pid"] == mount.pid


def test_status_of_something_that_is_not_a_mount(tmp_path):
    r = fusestore("status", str(tmp_path), check=False)
    assert r.returncode == 1 and "not a fusestore mount" in r.stderr


def test_backups_lists_generations_with_validity(mount):
    for v in range(3):
        write_json(mount / "a.json", {"v": v})
    # Damage generation 2 behind the daemon's back: it is reported invalid.
    gens = sorted(os.listdir(mount.state / "backups/a.json"), reverse=True)
    (mount.state / "backups/a.json" / gens[1]).write_text("{broken")
    r = fusestore("backups", str(mount / "a.json"), "--json")
    report = json.loads(r.stdout)
    assert [g["generation"] for g in report] == [1, 2]
    assert report[0]["valid"] and not report[1]["valid"]
    lines = fusestore("backups", str(mount.backing / "a.json")).stdout.splitlines()
    assert lines[0].split() == ["gen", "superseded", "size", "valid", "then", "changed"]
    assert lines[1].split()[3:] == ["yes", "1", "changed:", "$.v"]
    assert lines[2].split()[3:5] == ["no", "+1"]  # {broken is text, then {"v": 1} replaced it
    assert lines[3].strip().startswith("invalid: line 1, column 2")
    r = fusestore("backups", str(mount / "never.json"), check=False)
    assert r.returncode == 1 and "no backups" in r.stderr


def test_restore_through_the_mount_is_an_ordinary_commit(mount):
    for v in range(3):
        write_json(mount / "a.json", {"v": v})
    fusestore("restore", str(mount / "a.json"), "--generation", "2")
    assert json.loads((mount / "a.json").read_text()) == {"v": 0}
    # What it replaced is now generation 1: the restore can be undone.
    assert json.loads((mount / ".backups/a.json/1").read_text()) == {"v": 2}
    fusestore("restore", str(mount / "a.json"))
    assert json.loads((mount / "a.json").read_text()) == {"v": 2}


def test_restore_a_deleted_file(mount):
    write_json(mount / "gone.json", {"keep": "me"})
    os.unlink(mount / "gone.json")
    fusestore("restore", str(mount / "gone.json"))
    assert json.loads((mount / "gone.json").read_text()) == {"keep": "me"}


def test_restore_on_an_unmounted_tree(make_mount):
    m = make_mount()
    for v in range(2):
        write_json(m.mnt / "a.json", {"v": v})
    m.stop()
    fusestore("restore", str(m.backing / "a.json"))
    assert json.loads((m.backing / "a.json").read_text()) == {"v": 0}
    assert not [n for n in os.listdir(m.host / "staging") if not n.startswith("pool-")]
    r = fusestore("restore", str(m.backing / "a.json"), "--generation", "7", check=False)
    assert r.returncode == 1 and "no backup generation 7" in r.stderr


def test_a_writer_whose_mount_dies_never_writes_under_the_mountpoint(make_mount):
    # A restore (or migrate, or new-project) that found the tree mounted and then lost the mount
    # (the daemon killed and the dead mount cleared) used to create its file in the bare
    # mountpoint directory, where the next mount refuses to start. It holds the mount's root by fd.
    from fusestore.trees import TreeWriter

    m = make_mount()
    (m.mnt / "sub").mkdir()
    with TreeWriter(str(m.backing)) as writer:
        assert writer.mountpoint == str(m.mnt)
        writer.write("sub/a.json", b"[1]")
        m.kill()
        with pytest.raises(OSError) as e:
            writer.write("sub/a.json", b"[2]")
        assert e.value.errno == errno.ENOTCONN
        with pytest.raises(OSError):
            writer.makedirs("new/dir")
    assert os.listdir(m.mnt) == []
    assert (m.backing / "sub/a.json").read_bytes() == b"[1]"
    m.start()
    assert (m.mnt / "sub/a.json").read_bytes() == b"[1]"


def test_restore_of_an_invalid_generation_is_refused(mount):
    write_json(mount / "a.json", {"v": 1})
    write_json(mount / "a.json", {"v": 2})
    [gen] = os.listdir(mount.state / "backups/a.json")
    (mount.state / "backups/a.json" / gen).write_text("{broken")
    r = fusestore("restore", str(mount / "a.json"), check=False)
    assert r.returncode == 1 and "rejected" in r.stderr
    assert json.loads((mount / "a.json").read_text()) == {"v": 2}


def test_foreground_mount_unmounts_cleanly_on_sigterm_and_sigint(tree):
    backing, mnt = tree
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([*FUSESTORE, "mount", "--foreground", str(backing), str(mnt)],
                                stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: is_mounted(mnt), timeout=15)
            f = open(mnt / "pending.txt", "w")
            f.write(f"written before {sig.name}")
            f.flush()
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == 0
            assert not is_mounted(mnt)
            assert (backing / "pending.txt").read_text() == f"written before {sig.name}"
            try:
                f.close()
            except OSError:
                pass
        finally:
            if proc.poll() is None:
                proc.kill()
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def test_unmount_of_a_crashed_daemon_clears_the_dead_mount(make_mount):
    m = make_mount()
    os.kill(m.pid, signal.SIGKILL)
    time.sleep(0.2)
    fusestore("unmount", str(m.mnt))
    assert not is_mounted(m.mnt)
    m.start()  # and the tree can be served again
    assert is_mounted(m.mnt)


def test_python_m_fusestore_works():
    r = subprocess.run([sys.executable, "-m", "fusestore", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "mount" in r.stdout


def test_mount_reasons_for_a_missing_mountpoint_and_a_missing_dev_fuse(tree, monkeypatch):
    from fusestore import daemon

    backing, mnt = tree
    r = fusestore("mount", str(backing), str(mnt / "nope"), check=False)
    assert r.returncode != 0 and "mountpoint" in r.stderr and "does not exist" in r.stderr
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if p == "/dev/fuse" else real_exists(p))
    with pytest.raises(daemon.MountError, match="/dev/fuse"):
        daemon.preflight(str(backing), str(mnt))


def test_control_socket_survives_bad_clients(mount):
    import socket as socket_mod

    state_fd = os.open(mount.host, os.O_PATH)
    path = f"/proc/self/fd/{state_fd}/control.sock"
    try:
        for payload in (b"", b"garbage\n", b'{"cmd": "nope"}\n', b'{"cmd": "status"}\n'):
            with socket_mod.socket(socket_mod.AF_UNIX) as s:
                s.connect(path)
                s.sendall(payload)
                # Hang up without reading the answer.
    finally:
        os.close(state_fd)
    time.sleep(0.3)
    assert mount.status()["pid"] == mount.pid
    assert (mount.mnt / ".backups").exists()

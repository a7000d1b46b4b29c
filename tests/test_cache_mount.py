"""The cache through a real mount (`.cache`) and through the `fusestore cache` commands."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import close_error, fusestore, wait_for
from fusestore.engine.cache import Cache
from fusestore.engine.jskey import cache_key


def entry_dir(mount, url: str, kind: str = "media") -> Path:
    return mount / f".cache/{kind}/{cache_key(url)}"


def write_entry(mount, url: str, data: bytes, name: str = "image.jpg", kind: str = "media", tags=("t",)) -> Path:
    d = entry_dir(mount, url, kind)
    d.mkdir()
    (d / "metadata.json").write_text(json.dumps({"url": url, "tags": list(tags), "source": "test"}))
    (d / name).write_bytes(data)
    return d


def test_cache_tree_layout_and_generated_files(mount):
    assert sorted(os.listdir(mount / ".cache")) == ["media", "rate-limits.json", "tts"]
    assert ".cache" not in os.listdir(mount.mnt)  # hidden from listings, like .backups
    index = json.loads((mount / ".cache/media/index.json").read_text())
    assert index == {"type": "media", "entries": {}}
    for path in (".cache/media/index.json", ".cache/rate-limits.json"):
        with pytest.raises(OSError) as e:
            (mount / path).write_text("{}")
        assert e.value.errno == errno.EROFS


def test_write_an_entry_through_the_mount_and_read_it_back(mount):
    data = os.urandom(200_000)
    d = write_entry(mount, "https://img/cat.jpg", data)
    assert sorted(os.listdir(d)) == ["image.jpg", "metadata.json"]
    assert (d / "image.jpg").read_bytes() == data
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["url"] == "https://img/cat.jpg" and meta["tags"] == ["t"] and meta["source"] == "test"
    assert meta["expiresAt"] > meta["cachedAt"] and meta["usageCount"] == 1  # the read above
    index = json.loads((mount / ".cache/media/index.json").read_text())
    assert index["entries"][cache_key("https://img/cat.jpg")]["file"] == "image.jpg"
    # The same entry through the API and the CLI, without the mount.
    got = fusestore("cache", "get", "https://img/cat.jpg", "--root", str(mount.backing)).stdout.strip()
    assert Path(got).read_bytes() == data
    assert mount.status()["cache"]["types"]["media"]["entries"] == 1


def test_data_written_before_metadata_and_replaced_later(mount):
    d = entry_dir(mount, "https://a/v.mp4")
    d.mkdir()
    (d / "video.mp4").write_bytes(b"first")
    assert json.loads((d / "metadata.json").read_text())["url"] is None
    (d / "metadata.json").write_text(json.dumps({"url": "https://a/v.mp4", "tags": ["x"]}))
    (d / "video.mp4").write_bytes(b"second version")
    assert (d / "video.mp4").read_bytes() == b"second version"
    assert json.loads((d / "metadata.json").read_text())["tags"] == ["x"]
    with open(d / "video.mp4", "ab") as f:  # modify in place: staged from the current content
        f.write(b"!")
    assert (d / "video.mp4").read_bytes() == b"second version!"


def test_tools_copy_entries_in(mount, tmp_path):
    src = tmp_path / "src.mp3"
    src.write_bytes(os.urandom(50_000))
    d = entry_dir(mount, "https://tts/hello", "tts")
    d.mkdir()
    subprocess.run(["cp", str(src), str(d / "audio.mp3")], check=True)
    subprocess.run(["dd", f"if={src}", f"of={d / 'audio.mp3'}", "bs=4096", "status=none"], check=True)
    assert (d / "audio.mp3").read_bytes() == src.read_bytes()
    with Cache(str(mount.state / "cache")) as c:
        assert c.lookup("tts", d.name, use=False).file == "audio.mp3"


def test_bad_writes_are_refused(mount):
    d = write_entry(mount, "https://img/a.jpg", b"jpeg")
    before = (d / "metadata.json").read_bytes()
    err = close_error(d / "metadata.json", b'{"url": "https://img/a.jpg", ')
    assert err is not None and err.errno == errno.EBADMSG
    err = close_error(d / "metadata.json", b'["not", "an", "object"]')
    assert err is not None and err.errno == errno.EBADMSG
    assert json.loads((d / "metadata.json").read_bytes())["url"] == json.loads(before)["url"]
    assert any(".cache/media" in r["path"] for r in mount.status()["recent_rejections"])
    with pytest.raises(OSError) as e:
        (mount / ".cache/media/not-a-key").mkdir()
    assert e.value.errno == errno.EINVAL
    for action in (lambda: (d / "image.jpg").unlink(), lambda: os.rename(d / "image.jpg", d / "x.jpg"),
                   lambda: os.chmod(d / "image.jpg", 0o600), lambda: (mount / ".cache/x").mkdir(),
                   lambda: os.rmdir(d)):
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno in (errno.EROFS, errno.EPERM)
    for name in ("..", "../../etc"):
        assert not (mount / ".cache/media" / name / "passwd").exists()
    assert (d / "image.jpg").read_bytes() == b"jpeg"


def test_expired_entries_are_invisible_through_the_mount(mount):
    past = time.time() - 31 * 86400
    with Cache(str(mount.state / "cache"), clock=lambda: past) as c:
        old = c.put("https://old/a.jpg", b"old", "media")
        kept = c.put("https://old/b.mp3", b"speech", "tts")  # tts lives 90 days
    assert not (mount / f".cache/media/{old.key}").exists()
    assert old.key not in os.listdir(mount / ".cache/media")
    assert (mount / f".cache/tts/{kept.key}/data.mp3").read_bytes() == b"speech"
    assert wait_for(lambda: not Path(old.path).exists())


def test_reading_counts_a_use_and_lru_evicts_under_the_limit(make_mount):
    m = make_mount(start=False)
    (m.backing / "fusestore.toml").write_text('[cache]\nmax_size = "10KiB"\n')
    m.start()
    urls = [f"https://x/{i}" for i in range(4)]
    for url in urls[:3]:
        write_entry(m, url, b"x" * 3000, tags=())
        time.sleep(0.01)
    (entry_dir(m, urls[0]) / "image.jpg").read_bytes()  # entry 0 is now the most recently used
    write_entry(m, urls[3], b"x" * 3000, tags=())
    left = set(os.listdir(m / ".cache/media")) - {"index.json"}
    assert left == {cache_key(u) for u in (urls[0], urls[2], urls[3])}
    stats = m.status()["cache"]
    assert stats["total_bytes"] <= 10 * 1024 and stats["types"]["media"]["evictions"] == 1


def test_a_reader_keeps_reading_an_entry_that_is_cleared(mount):
    data = os.urandom(1 << 20)
    d = write_entry(mount, "https://v/long.mp4", data, name="v.mp4")
    with open(d / "v.mp4", "rb") as f:
        head = f.read(1000)
        fusestore("cache", "clear", "--root", str(mount.mnt))
        assert not d.exists()
        assert head + f.read() == data


def test_concurrent_writers_of_the_same_and_different_keys(mount):
    errors = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(15):
                url = f"https://c/{rng.randrange(4)}"
                d = entry_dir(mount, url)
                try:
                    d.mkdir()
                except FileExistsError:
                    pass
                body = f"{seed}:{i}|".encode() * rng.randint(100, 2000)
                with open(d / "data.bin", "wb") as f:
                    f.write(body)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name in set(os.listdir(mount / ".cache/media")) - {"index.json"}:
        data = (mount / f".cache/media/{name}/data.bin").read_bytes()
        unit = data[: data.index(b"|") + 1]
        assert data == unit * (len(data) // len(unit))
    with Cache(str(mount.state / "cache")) as c:
        assert {e.key for e in c.entries()} == set(os.listdir(mount.state / "cache/media"))


def test_sigkill_of_the_daemon_during_inserts(make_mount):
    m = make_mount()
    script = r"""
import os, sys, hashlib, json
mnt = sys.argv[1]
i = 0
while True:
    url = f"https://k/{i % 7}"
    key = hashlib.md5(json.dumps({"url": url}, separators=(",", ":")).encode()).hexdigest()
    d = os.path.join(mnt, ".cache/media", key)
    try:
        os.mkdir(d)
    except FileExistsError:
        pass
    except OSError:
        break
    try:
        with open(os.path.join(d, "data.bin"), "wb") as f:
            f.write((f"{i}|".encode()) * 3000)
    except OSError:
        break
    i += 1
"""
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script, str(m.mnt)], stderr=subprocess.DEVNULL)
        time.sleep(0.3 + random.random() * 0.4)
        m.kill()
        proc.wait(timeout=30)
        m.start()
        with Cache(str(m.state / "cache")) as c:
            entries = list(c.entries())
            assert {e.key for e in entries} == set(os.listdir(m.state / "cache/media"))
            for e in entries:
                data = Path(e.path).read_bytes()
                unit = data[: data.index(b"|") + 1]
                assert data == unit * 3000
        assert list((m.state / "cache/.tmp").iterdir()) == []


def test_an_existing_cache_directory_is_adopted(make_mount, tmp_path):
    shared = tmp_path / "shared-cache"
    key = cache_key("https://img/dog.jpg")
    (shared / "media" / key).mkdir(parents=True)
    (shared / "media" / key / "image.jpg").write_bytes(b"DOG")
    (shared / "media" / key / "metadata.json").write_text(json.dumps(
        {"url": "https://img/dog.jpg", "tags": ["dog"], "cachedAt": "2026-11-01T00:00:00.000Z",
         "expiresAt": "2099-01-01T00:00:00.000Z", "usageCount": 2}))
    m = make_mount(start=False)
    (m.backing / "fusestore.toml").write_text(f'[cache]\ndir = "{shared}"\n')
    m.start()
    assert (m / f".cache/media/{key}/image.jpg").read_bytes() == b"DOG"
    meta = json.loads((m / f".cache/media/{key}/metadata.json").read_text())
    assert meta["tags"] == ["dog"] and meta["usageCount"] == 3


def test_cli_commands(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    src = tmp_path / "a.png"
    src.write_bytes(b"PNG")
    r = "--root", str(root)
    assert fusestore("cache", "key", "https://x/a.png", "--param", "w=64").stdout.strip() == \
        cache_key("https://x/a.png", {"w": "64"})
    assert fusestore("cache", "get", "https://x/a.png", *r, check=False).returncode == 1
    path = fusestore("cache", "put", "https://x/a.png", str(src), "--type", "media", "--tag", "logo", *r).stdout.strip()
    assert path.endswith("/data.png") and Path(path).read_bytes() == b"PNG"
    assert fusestore("cache", "get", "https://x/a.png", *r).stdout.strip() == path
    listing = json.loads(fusestore("cache", "ls", "--json", *r).stdout)
    assert [e["tags"] for e in listing] == [["logo"]]
    stats = json.loads(fusestore("cache", "stats", "--json", *r).stdout)
    assert stats["types"]["media"]["hits"] == 1 and stats["types"]["media"]["misses"] == 1
    assert fusestore("cache", "acquire", "api", "--limit", "1", "--per", "60", *r).returncode == 0
    second = fusestore("cache", "acquire", "api", "--limit", "1", "--per", "60", *r, check=False)
    assert second.returncode == 1 and "next slot" in second.stdout
    assert "removed 1" in fusestore("cache", "clear", *r).stdout
    assert "expired" in fusestore("gc", str(root)).stdout
    bad = fusestore("cache", "put", "https://x", str(src), "--type", "video", *r, check=False)
    assert bad.returncode != 0
    lost = fusestore("cache", "ls", cwd="/", check=False)
    assert lost.returncode == 1 and "no fusestore tree" in lost.stderr

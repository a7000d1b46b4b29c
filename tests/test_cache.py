"""The cache engine without FUSE: keys, expiry, LRU, usage, index recovery, concurrency, crashes
and rate limits. Time is a fake clock wherever expiry or order matters."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import report
from fusestore.engine.cache import Cache, CacheError
from fusestore.engine.config import Cache as CacheConfig
from fusestore.engine.jskey import cache_key

DAY = 86400.0


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(tmp_path, clock):
    c = Cache(str(tmp_path / "cache"), CacheConfig(), clock=clock)
    yield c
    c.close()


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


# -- keys -----------------------------------------------------------------------------------

# The JSON text JavaScript's JSON.stringify({url, ...params}) produces, written out by hand.
KEY_CASES = [
    ("https://cdn.example.com/a.jpg", None, '{"url":"https://cdn.example.com/a.jpg"}'),
    ("https://x/v.mp4", {"w": 1920, "h": 1080, "q": "hd"}, '{"url":"https://x/v.mp4","w":1920,"h":1080,"q":"hd"}'),
    ("u", {"b": 1, "10": "x", "2": True, "a": None}, '{"2":true,"10":"x","url":"u","b":1,"a":null}'),
    ("u", {"url": "override", "z": 0}, '{"url":"override","z":0}'),
    ("u", {"f": 1.0, "g": 0.5, "e": 1e21, "s": 1e-7, "big": 1e20},
     '{"url":"u","f":1,"g":0.5,"e":1e+21,"s":1e-7,"big":100000000000000000000}'),
    ("u", {"voice": "nova", "text": "Hé \"quoted\"\n\ttab é😀"},
     '{"url":"u","voice":"nova","text":"Hé \\"quoted\\"\\n\\ttab é😀"}'),
    ("u", {"nested": {"b": [1, 2, {"1": "x", "a": []}], "a": {}}},
     '{"url":"u","nested":{"b":[1,2,{"1":"x","a":[]}],"a":{}}}'),
    ("u", {"ctl": "\x01\x1f\x7f"}, '{"url":"u","ctl":"\\u0001\\u001f\x7f"}'),
]


@pytest.mark.parametrize("url,params,js", KEY_CASES)
def test_keys_match_the_typescript_formula(url, params, js):
    assert cache_key(url, params) == md5(js)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_keys_match_node_itself():
    script = ("const c=require('crypto');const cases=JSON.parse(require('fs').readFileSync(0,'utf8'));"
              "for(const [url,params] of cases){console.log(c.createHash('md5')"
              ".update(JSON.stringify({url,...params})).digest('hex'))}")
    rng = random.Random(7)
    cases = [(url, params or {}) for url, params, _ in KEY_CASES]
    for i in range(200):
        params = {rng.choice(["w", "h", "0", "7", "url", "voice", "ß"]): rng.choice(
            [rng.randint(-10**9, 10**9), rng.random() * 10 ** rng.randint(-30, 30), "ä\u2028x", None, True,
             [1.5, {"k": "v"}]])
            for _ in range(rng.randint(0, 5))}
        cases.append((f"https://example.com/{i}?q=é", params))
    out = subprocess.run(["node", "-e", script], input=json.dumps(cases), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [cache_key(url, params) for url, params in cases]


# -- entries --------------------------------------------------------------------------------

def test_put_then_get_returns_the_same_bytes_and_metadata(cache, clock):
    data = os.urandom(10_000)
    put = cache.put("https://x/a.jpg", data, "media", params={"w": 640}, tags=["cat", "cute"])
    got = cache.get("https://x/a.jpg", {"w": 640}, "media")
    assert got is not None and got.path == put.path
    assert Path(got.path).read_bytes() == data
    assert got.file == "data.jpg"
    meta = got.metadata
    assert meta["url"] == "https://x/a.jpg" and meta["tags"] == ["cat", "cute"] and meta["params"] == {"w": 640}
    assert meta["cachedAt"].endswith("Z") and meta["usageCount"] == 1
    on_disk = json.loads((Path(got.path).parent / "metadata.json").read_text())
    assert on_disk["url"] == "https://x/a.jpg" and on_disk["expiresAt"] == meta["expiresAt"]
    assert cache.get("https://x/a.jpg", {"w": 641}) is None
    assert cache.get("https://x/a.jpg", {"w": 640}, "tts") is None


def test_reading_counts_a_use(cache, clock):
    cache.put("https://x/a", b"a", "media")
    for n in (1, 2, 3):
        clock.advance(10)
        entry = cache.get("https://x/a")
        assert entry.usage_count == n and entry.last_used_at == clock.t
    stats = cache.stats().types["media"]
    assert (stats.hits, stats.misses, stats.inserts) == (3, 0, 1)
    cache.get("https://x/none")
    assert cache.stats().types["media"].misses == 1


def test_expired_entries_are_never_served_and_are_removed(cache, clock):
    media = cache.put("https://x/m", b"m", "media")
    tts = cache.put("https://x/t", b"t", "tts")
    clock.advance(29 * DAY)
    assert cache.get("https://x/m") is not None
    clock.advance(2 * DAY)
    assert cache.get("https://x/m") is None
    assert not Path(media.path).exists()
    assert cache.get("https://x/t", type="tts") is not None  # tts lives 90 days
    clock.advance(60 * DAY)
    assert [e.key for e in cache.entries()] == []
    assert cache.gc() == 1
    assert not Path(tts.path).exists()
    assert cache.stats().types["tts"].expired == 1


def test_expiry_days_are_configurable(tmp_path, clock):
    with Cache(str(tmp_path / "c"), CacheConfig(media_days=1, tts_days=2), clock=clock) as c:
        c.put("https://x/m", b"m", "media")
        c.put("https://x/t", b"t", "tts")
        clock.advance(1.5 * DAY)
        assert c.get("https://x/m") is None and c.get("https://x/t", type="tts") is not None


def test_lru_eviction_keeps_the_total_under_the_limit(tmp_path, clock):
    with Cache(str(tmp_path / "c"), CacheConfig(max_size=5000), clock=clock) as c:
        for name in "abcd":
            clock.advance(1)
            c.put(f"https://x/{name}", b"x" * 1000, "media")
        clock.advance(1)
        c.get("https://x/a")  # a is now the most recently used
        clock.advance(1)
        c.put("https://x/e", b"x" * 1000, "tts")  # both types share the limit
        assert c.total_bytes() <= 5000
        assert c.get("https://x/b") is None  # least recently used: evicted first
        assert c.get("https://x/a") is not None
        clock.advance(1)
        c.put("https://x/f", b"x" * 1000, "media")
        assert c.get("https://x/c") is None
        assert {e.metadata["url"] for e in c.entries()} == {"https://x/a", "https://x/d", "https://x/e", "https://x/f"}
        assert c.total_bytes() <= 5000
        assert c.stats().types["media"].evictions == 2
        on_disk = {p.name for p in (tmp_path / "c" / "media").iterdir()}
        assert on_disk == {e.key for e in c.entries("media")}


def test_an_evicted_entry_is_not_brought_back_before_its_directory_goes(tmp_path, clock, monkeypatch):
    # Between the commit that evicts an entry and the removal of its directory, another process
    # may look the key up. It must see a miss, not index the directory again (the removal then
    # left a row without an entry: found by 300 rounds of the SIGKILL test).
    root = str(tmp_path / "c")
    with Cache(root, CacheConfig(max_size=2500), clock=clock) as evictor, Cache(root, clock=clock) as other:
        evictor.put("https://x/a", b"a" * 1000, "media")
        clock.advance(1)
        evictor.put("https://x/b", b"b" * 1000, "media")
        finish = evictor._finish_removals
        monkeypatch.setattr(evictor, "_finish_removals", lambda: None)
        clock.advance(1)
        evictor.put("https://x/c", b"c" * 1000, "media")  # evicts a; its directory still there
        assert other.get("https://x/a") is None
        finish()
        on_disk = {p.name for p in (tmp_path / "c" / "media").iterdir()}
        assert on_disk == {e.key for e in other.entries()} == {cache_key("https://x/b"), cache_key("https://x/c")}


def test_a_new_entry_is_never_removed_for_an_older_one_with_the_same_inode(tmp_path, clock, monkeypatch):
    # Inode numbers are reused: the pending removal of a retired directory must not take a newer
    # entry of the same key that got the retired one's number.
    root = tmp_path / "c"
    with Cache(str(root), clock=clock) as c:
        c.put("https://x/a", b"old", "media")
        finish = c._finish_removals
        monkeypatch.setattr(c, "_finish_removals", lambda: None)
        c.clear()  # retired; its directory's removal pending
        key = cache_key("https://x/a")
        shutil.rmtree(root / "media" / key)  # the old directory gone, its inode number free
        entry = c.put("https://x/a", b"new", "media")
        # The new directory got the old number (simulated: the pending removal names it).
        with c._write() as db:
            db.execute("UPDATE intents SET ino=? WHERE op='remove'", (os.stat(root / "media" / key).st_ino,))
        finish()
        assert Path(entry.path).read_bytes() == b"new"
        assert c.get("https://x/a") is not None


def test_an_entry_larger_than_the_limit_is_refused(tmp_path, clock):
    with Cache(str(tmp_path / "c"), CacheConfig(max_size=2000), clock=clock) as c:
        c.put("https://x/a", b"a" * 500, "media")
        with pytest.raises(CacheError, match="cannot fit"):
            c.put("https://x/big", b"b" * 5000, "media")
        assert [e.metadata["url"] for e in c.entries()] == ["https://x/a"]
        assert list((tmp_path / "c" / ".tmp").iterdir()) == []


def test_a_reader_keeps_reading_an_evicted_entry(cache):
    data = os.urandom(300_000)
    entry = cache.put("https://x/v", data, "media")
    fd = cache.open_data(cache.get("https://x/v"))
    try:
        first = os.pread(fd, 1000, 0)
        cache.clear()
        assert not Path(entry.path).exists()
        assert first + os.pread(fd, len(data), 1000) == data
    finally:
        os.close(fd)


def test_replacing_an_entry_is_atomic_and_keeps_no_old_files(cache):
    cache.put("https://x/a", b"old", "media", file="a.bin")
    entry = cache.put("https://x/a", b"new", "media", file="b.bin")
    folder = Path(entry.path).parent
    assert sorted(p.name for p in folder.iterdir()) == ["b.bin", "metadata.json"]
    assert cache.get("https://x/a").file == "b.bin"
    assert list((Path(cache.dir) / ".tmp").iterdir()) == []


def test_metadata_can_be_updated_without_copying_the_data(cache):
    entry = cache.put("https://x/a", b"data", "media")
    ino = os.stat(entry.path).st_ino
    updated = cache.put_metadata("media", entry.key, {"url": "https://x/a", "tags": ["new"], "cachedAt": "ignored"})
    assert updated.metadata["tags"] == ["new"] and updated.cached_at == entry.cached_at
    assert os.stat(updated.path).st_ino == ino


# -- the index --------------------------------------------------------------------------------

def test_index_is_rebuilt_when_missing_or_damaged(tmp_path, clock):
    root = tmp_path / "c"
    with Cache(str(root), clock=clock) as c:
        keys = {c.put(f"https://x/{i}", b"x" * i, "media").key for i in range(1, 6)}
        c.get("https://x/3")
    (root / "index.sqlite").unlink()
    for extra in ("index.sqlite-journal", "index.sqlite-wal", "index.sqlite-shm"):
        (root / extra).unlink(missing_ok=True)
    with Cache(str(root), clock=clock) as c:
        assert {e.key for e in c.entries()} == keys
    (root / "index.sqlite").write_bytes(b"this is not a database" * 100)
    with Cache(str(root), clock=clock, verify=True) as c:
        assert {e.key for e in c.entries()} == keys
        assert c.get("https://x/4") is not None


def test_a_corrupt_metadata_file_does_not_break_other_entries(tmp_path, clock):
    root = tmp_path / "c"
    with Cache(str(root), clock=clock) as c:
        good = c.put("https://x/good", b"good", "media")
        bad = c.put("https://x/bad", b"bad", "media")
    (Path(bad.path).parent / "metadata.json").write_text('{"url": "https://x/bad", "cachedAt": ')
    (root / "index.sqlite").unlink()
    with Cache(str(root), clock=clock) as c:
        assert c.get("https://x/good").path == good.path
        assert c.get("https://x/bad") is None
        assert [e.key for e in c.entries()] == [good.key]


def test_an_existing_cache_of_the_spec_layout_is_adopted(tmp_path, clock):
    root = tmp_path / "cache"
    key = cache_key("https://img/cat.jpg")
    entry = root / "media" / key
    entry.mkdir(parents=True)
    (entry / "image.jpg").write_bytes(b"JPEG")
    (entry / "metadata.json").write_text(json.dumps({
        "url": "https://img/cat.jpg", "tags": ["cat"], "cachedAt": "2027-01-01T00:00:00.000Z",
        "expiresAt": "2027-01-31T00:00:00.000Z", "usageCount": 4}))
    (root / "media" / "index.json").write_text("{}")  # the spec's own index file is left alone
    clock.t = 1_798_000_000.0  # 2026-12-23
    with Cache(str(root), clock=clock) as c:
        got = c.get("https://img/cat.jpg")
        assert got is not None and got.file == "image.jpg" and got.usage_count == 5
        assert got.metadata["tags"] == ["cat"]


def test_an_entry_written_behind_the_index_is_found(cache):
    entry = cache.put("https://x/a", b"a", "media")
    folder = Path(entry.path).parent
    twin = folder.parent / cache_key("https://x/b")
    shutil.copytree(folder, twin)
    meta = json.loads((twin / "metadata.json").read_text())
    (twin / "metadata.json").write_text(json.dumps(meta | {"url": "https://x/b"}))
    assert cache.get("https://x/b") is not None


# -- several processes ----------------------------------------------------------------------------

WRITER = r"""
import os, sys, random
from fusestore.engine.cache import Cache, CacheError
from fusestore.engine.config import Cache as CacheConfig
root, seed, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
with Cache(root, CacheConfig(max_size=limit)) as c:
    print("ready", flush=True)
    for i in range(count):
        url = f"https://x/{rng.randrange(12)}"
        body = f"{url}|{seed}|{i}|".encode() * rng.randint(10, 300)
        c.put(url, body, rng.choice(["media", "tts"]))
        if i % 3 == 0:
            c.get(url)
    print("done", flush=True)
"""


def _check_consistent(root: Path, limit: int | None = None) -> int:
    with Cache(str(root), CacheConfig(max_size=limit or "10GiB")) as c:
        entries = list(c.entries())
        for e in entries:
            data = Path(e.path).read_bytes()
            unit = data[: data.index(b"|", data.index(b"|", data.index(b"|") + 1) + 1) + 1]
            assert data == unit * (len(data) // len(unit)), "an entry holds a partial or mixed file"
            assert data.startswith(e.metadata["url"].encode() + b"|")
            assert e.size == len(data) + (Path(e.path).parent / "metadata.json").stat().st_size
        on_disk = {(t, p.name) for t in ("media", "tts") for p in (root / t).iterdir()}
        assert on_disk == {(e.type, e.key) for e in entries}
        assert list((root / ".tmp").iterdir()) == []
        if limit is not None:
            assert c.total_bytes() <= limit
        return len(entries)


def test_concurrent_writers_of_same_and_different_keys(tmp_path):
    root = tmp_path / "c"
    Cache(str(root)).close()
    limit = 40_000
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(seed), "25", str(limit)],
                              stdout=subprocess.PIPE, text=True) for seed in range(6)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "done" in out
    _check_consistent(root, limit)


CACHE_CRASH_ROUNDS = int(os.environ.get("FUSESTORE_CACHE_CRASH_ROUNDS", "12"))


@pytest.mark.timeout(120 + 5 * CACHE_CRASH_ROUNDS)
def test_sigkill_during_inserts_leaves_no_partial_entry_and_a_correct_index(tmp_path, capsys):
    root = tmp_path / "c"
    Cache(str(root)).close()
    checked = 0
    rng = random.Random(11)
    rounds = CACHE_CRASH_ROUNDS
    for r in range(rounds):
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(100 * r + k), "1000", "30000"],
                                  stdout=subprocess.PIPE, text=True) for k in range(2)]
        for p in procs:  # kill them at work, not while Python starts (slow in an emulated VM)
            assert p.stdout.readline().strip() == "ready"
        time.sleep(0.1 + rng.random() * 0.6)
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.communicate()
        checked += _check_consistent(root, 30000)  # opening the cache finishes what the dead writers left
    report(capsys, f"cache writers: {rounds} SIGKILL rounds of 2 writers, {checked} entries checked, 0 partial")
    assert checked > rounds, "the writers hardly wrote before they were killed; the test proved little"


# -- rate limits ------------------------------------------------------------------------------

def test_rate_limit_is_a_sliding_window(cache, clock):
    results = []
    for _ in range(4):
        results.append(cache.acquire("pexels", 3, 60))
        clock.advance(10)
    assert [s.allowed for s in results] == [True, True, True, False]
    assert results[3].wait == pytest.approx(60 - 30)
    clock.advance(21)  # the first call left the window
    assert cache.acquire("pexels", 3, 60).allowed
    assert not cache.acquire("pexels", 3, 60).allowed
    assert cache.acquire("openai", 1, 1).allowed  # providers are independent
    state = json.loads((Path(cache.dir) / "rate-limits.json").read_text())
    assert set(state["providers"]) == {"pexels", "openai"}


ACQUIRER = r"""
import sys
from fusestore.engine.cache import Cache, CacheError
with Cache(sys.argv[1]) as c:
    print(sum(c.acquire("api", 25, 3600).allowed for _ in range(10)))
"""


def test_rate_limit_holds_across_processes(tmp_path):
    root = tmp_path / "c"
    Cache(str(root)).close()
    procs = [subprocess.Popen([sys.executable, "-c", ACQUIRER, str(root)], stdout=subprocess.PIPE, text=True)
             for _ in range(5)]
    allowed = sum(int(p.communicate(timeout=120)[0]) for p in procs)
    assert allowed == 25


def test_an_index_several_hosts_may_use_keeps_out_of_wal_mode(tmp_path, clock):
    """On a network filesystem the index takes SQLite's rollback journal (WAL needs memory that
    every user shares); while a process holds it in WAL mode, such a cache refuses to open."""
    root = tmp_path / "c"
    with Cache(str(root), clock=clock) as local:  # a local filesystem: WAL
        assert local.journal_mode == "wal"
        local.put("https://x/1", b"one", "media")
        with pytest.raises(CacheError, match="WAL mode"):
            Cache(str(root), clock=clock, shared=True)
    with Cache(str(root), clock=clock, shared=True) as shared:
        assert shared.journal_mode == "persist"
        assert shared.get("https://x/1") is not None
        shared.put("https://x/2", b"two", "media")
    assert (root / "index.sqlite-journal").exists() and not (root / "index.sqlite-wal").exists()

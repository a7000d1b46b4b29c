"""The FUSE layer's request handlers called directly (pytest-trio), without a kernel: the open
version, commit points, refusal and the page-cache rules in milliseconds. What needs a kernel
(its caches, its retries on ESTALE, several processes) is tested through real mounts elsewhere."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import types

import pyfuse3
import pytest
import trio

from fusestore.engine import cache as cache_mod
from fusestore.engine import config
from fusestore.engine.store import Store
from fusestore.fs.nodes import ROOT_INODE
from fusestore.fs.operations import Filesystem, Options

CTX = types.SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
W, R, RW = os.O_WRONLY, os.O_RDONLY, os.O_RDWR


@pytest.fixture
def fs(tmp_path, monkeypatch):
    # Without a kernel there is nobody to tell about cached attributes and names: record them.
    told = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only=False: told.append(("inode", ino)))
    monkeypatch.setattr(pyfuse3, "invalidate_entry_async",
                        lambda parent, name, ignore_enoent=False: told.append(("entry", parent, name)))
    store = Store(str(tmp_path), config.Config())
    cache = cache_mod.Cache(cache_mod.directory(str(tmp_path), config.Config().cache), config.Config().cache)
    f = Filesystem(store, Options(page_cache=True), cache)
    f.cache = cache
    f.told = told
    f.backing = tmp_path
    yield f
    cache.close()
    store.close()


async def create(fs, name: bytes, flags=W):
    info, entry = await fs.create(ROOT_INODE, name, 0o644, flags | os.O_CREAT, CTX)
    return info.fh, entry.st_ino


async def errno_of(coro) -> int | None:
    try:
        await coro
    except pyfuse3.FUSEError as e:
        return e.errno
    return None


async def test_a_new_file_exists_only_as_its_open_version_until_its_first_close(fs):
    fh, ino = await create(fs, b"a.json")
    assert await fs.write(fh, 0, b'{"a": 1}') == 8
    assert not (fs.backing / "a.json").exists()
    assert (await fs.getattr(ino, CTX)).st_size == 8
    await fs.flush(fh)
    assert (fs.backing / "a.json").read_bytes() == b'{"a": 1}'
    assert ("inode", ino) in fs.told  # the kernel's cached size of the file is dropped
    await fs.release(fh)


async def test_writers_share_one_open_version_and_a_refused_close_keeps_it(fs):
    fh, ino = await create(fs, b"d.json")
    await fs.write(fh, 0, b'{"x": 1}')
    await fs.flush(fh)
    one = (await fs.open(ino, W | os.O_TRUNC, CTX)).fh
    two = (await fs.open(ino, RW, CTX)).fh
    await fs.write(one, 0, b'{"y": ')
    assert await fs.read(two, 0, 100) == b'{"y": '  # the other writer reads the open version
    assert await errno_of(fs.flush(one)) == errno.EBADMSG  # a writer still holds it: kept open
    await fs.write(two, 6, b"2}")
    await fs.flush(two)
    assert (fs.backing / "d.json").read_bytes() == b'{"y": 2}'
    for fh_ in (fh, one, two):
        await fs.release(fh_)
    assert fs.store.stats.rejections == 1


async def test_a_reader_keeps_its_version_and_reads_through_the_page_cache(fs):
    fh, ino = await create(fs, b"v.txt")
    await fs.write(fh, 0, b"old content")
    await fs.flush(fh)
    await fs.release(fh)
    await fs.getattr(ino, CTX)  # what the kernel was told
    reader = await fs.open(ino, R, CTX)
    assert not reader.direct_io  # nobody writes it: page cache, shared maps
    # A writer now gets ESTALE and the name a new node showing the same number; the kernel
    # then looks the name up again and opens that node.
    assert await errno_of(fs.open(ino, W | os.O_TRUNC, CTX)) == errno.ESTALE
    heir = await fs.lookup(ROOT_INODE, b"v.txt", CTX)
    assert heir.st_ino != ino and heir.attr_ino == (await fs.getattr(ino, CTX)).attr_ino
    w = (await fs.open(heir.st_ino, W | os.O_TRUNC, CTX)).fh
    await fs.write(w, 0, b"new")
    await fs.flush(w)
    assert await fs.read(reader.fh, 0, 100) == b"old content"
    assert (await fs.getattr(ino, CTX)).st_size == 11  # the reader's node keeps its version
    await fs.release(w)
    await fs.release(reader.fh)


async def test_a_reader_of_another_version_than_the_page_cache_reads_through_the_daemon(fs):
    fh, ino = await create(fs, b"r.txt")
    await fs.write(fh, 0, b"first")
    await fs.release(fh)
    await fs.getattr(ino, CTX)
    cached = await fs.open(ino, R, CTX)
    assert not cached.direct_io
    # The name changes behind the mount: a reader now gets that version without the page
    # cache (never ESTALE: the kernel retries only once, a busy tree could fail it twice),
    # and the size given for the node stays the page cache's.
    (fs.backing / "r.tmp").write_bytes(b"second, longer")
    os.replace(fs.backing / "r.tmp", fs.backing / "r.txt")
    other = await fs.open(ino, R, CTX)
    assert other.direct_io
    assert await fs.read(other.fh, 0, 100) == b"second, longer"
    assert await fs.read(cached.fh, 0, 100) == b"first"
    assert (await fs.getattr(ino, CTX)).st_size == 5
    # A lookup gives the name a new node for the new version.
    assert (await fs.lookup(ROOT_INODE, b"r.txt", CTX)).st_ino != ino
    await fs.release(other.fh)
    await fs.release(cached.fh)


async def test_an_open_while_its_name_is_renamed_over_reads_through_the_daemon(fs, monkeypatch):
    for name, content in ((b"a.txt", b"the old one"), (b"b.txt", b"new")):
        fh, ino = await create(fs, name)
        await fs.write(fh, 0, content)
        await fs.release(fh)
    a = (await fs.lookup(ROOT_INODE, b"a.txt", CTX)).st_ino
    # The rename is done in a worker; until it returns, the node of a.txt still has the name
    # in the daemon, but the backing name holds b's content. The kernel may have looked the
    # path up before, and its reply about the node's size may lose to the rename's.
    renamed, go_on = threading.Event(), threading.Event()
    rename = fs._rename

    def slow_rename(*args):
        rename(*args)
        renamed.set()
        go_on.wait(10)

    monkeypatch.setattr(fs, "_rename", slow_rename)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.rename, ROOT_INODE, b"b.txt", ROOT_INODE, b"a.txt", 0, CTX)
        await trio.to_thread.run_sync(renamed.wait, 10)
        assert (await fs.getattr(a, CTX)).st_size == 3  # a reply the kernel may drop
        during = await fs.open(a, R, CTX)
        go_on.set()
    assert during.direct_io
    assert await fs.read(during.fh, 0, 100) == b"new"
    await fs.release(during.fh)
    after = await fs.lookup(ROOT_INODE, b"a.txt", CTX)
    reader = await fs.open(after.st_ino, R, CTX)
    assert not reader.direct_io
    await fs.release(reader.fh)


async def test_a_write_open_of_a_node_whose_name_went_answers_estale(fs):
    fh, ino = await create(fs, b"gone.txt")
    await fs.write(fh, 0, b"x")
    await fs.release(fh)
    await fs.unlink(ROOT_INODE, b"gone.txt", CTX)
    assert await errno_of(fs.open(ino, W, CTX)) == errno.ESTALE


async def test_hard_links_show_one_number_until_a_commit_parts_them(fs):
    fh, ino = await create(fs, b"a.txt")
    await fs.write(fh, 0, b"old")
    await fs.release(fh)
    linked = await fs.link(ino, ROOT_INODE, b"b.txt", CTX)
    assert linked.st_ino != ino and linked.attr_ino == (await fs.getattr(ino, CTX)).attr_ino
    w = (await fs.open(ino, W | os.O_TRUNC, CTX)).fh
    await fs.write(w, 0, b"new")
    await fs.release(w)
    assert (await fs.getattr(ino, CTX)).attr_ino != (await fs.getattr(linked.st_ino, CTX)).attr_ino
    assert (fs.backing / "b.txt").read_bytes() == b"old"


async def test_access_refuses_execute_without_an_execute_bit(fs):
    fh, ino = await create(fs, b"s.sh")
    await fs.release(fh)
    assert await fs.access(ino, os.R_OK | os.W_OK, CTX)
    assert await errno_of(fs.access(ino, os.X_OK, CTX)) == errno.EACCES
    assert await fs.access(ROOT_INODE, os.X_OK, CTX)


async def test_reading_a_cache_entry_costs_one_index_lookup_and_counts_one_use(fs, monkeypatch):
    entry = fs.cache.put("https://example.com/a.mp3", b"audio bytes", file="data.mp3")
    reads = []
    select = fs.cache._select_row
    monkeypatch.setattr(fs.cache, "_select_row", lambda *a: reads.append(a) or select(*a))
    # What the kernel sends for `cat .cache/media/KEY/data.mp3`: a lookup per component (the
    # entry's get attribute timeout 0, as entries come and go), the open, getattrs, the reads.
    ino = ROOT_INODE
    for name in (b".cache", b"media", entry.key.encode(), b"data.mp3"):
        ino = (await fs.lookup(ino, name, CTX)).st_ino
    fh = (await fs.open(ino, R, CTX)).fh
    assert (await fs.getattr(ino, CTX)).st_size == 11
    assert await fs.read(fh, 0, 100) == b"audio bytes"
    await fs.release(fh)
    assert len(reads) == 1
    assert fs.cache.lookup(entry.type, entry.key, use=False).usage_count == 1
    # A change to the index (here by the engine, as another process would) is seen at once.
    fs.cache.put("https://example.com/a.mp3", b"other", file="data.mp3")
    assert (await fs.getattr(ino, CTX)).st_size == 5
    # So is an entry removed on disk behind the index, and an entry's expiry.
    shutil.rmtree(os.path.join(fs.cache.dir, entry.type, entry.key))
    assert await errno_of(fs.getattr(ino, CTX)) == errno.ENOENT
    fs.cache.put("https://example.com/a.mp3", b"again", file="data.mp3")
    assert (await fs.getattr(ino, CTX)).st_size == 5
    now = fs.cache.clock()
    monkeypatch.setattr(fs.cache, "clock", lambda: now + 366 * 86400)
    assert await errno_of(fs.getattr(ino, CTX)) == errno.ENOENT


async def test_backing_ids_are_shared_per_node_and_dropped_with_the_last_handle(fs, monkeypatch):
    # As the kernel would answer: backing ids handed out and dropped, one per registration.
    ids, dropped = iter(range(1, 100)), []
    monkeypatch.setattr(pyfuse3, "passthrough_enabled", lambda: True)
    monkeypatch.setattr(pyfuse3, "backing_open", lambda fd: next(ids))
    monkeypatch.setattr(pyfuse3, "backing_close", dropped.append)
    fh, ino = await create(fs, b"p.txt")
    await fs.write(fh, 0, b"content")
    await fs.flush(fh)
    await fs.release(fh)
    await fs.getattr(ino, CTX)
    first, second = await fs.open(ino, R, CTX), await fs.open(ino, R, CTX)
    assert first.backing_id == second.backing_id == 1 and not first.direct_io and not first.keep_cache
    created, entry = await fs.create(ROOT_INODE, b"app.db", 0o644, RW | os.O_CREAT, CTX)
    assert created.backing_id == 2  # a direct file is made in the tree at once
    await fs.release(created.fh)
    assert dropped == [2]
    a, b = await fs.open(entry.st_ino, RW, CTX), await fs.open(entry.st_ino, R, CTX)
    assert a.backing_id == b.backing_id == 3  # one backing file, read-write, for every handle
    await fs.release(first.fh)
    assert dropped == [2]
    await fs.release(second.fh)
    await fs.release(a.fh)
    assert dropped == [2, 1]
    await fs.release(b.fh)
    assert dropped == [2, 1, 3]


async def test_a_refused_backing_file_leaves_reads_to_the_page_cache(fs, monkeypatch):
    def refuse(fd):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(pyfuse3, "passthrough_enabled", lambda: True)
    monkeypatch.setattr(pyfuse3, "passthrough_supported", True)
    monkeypatch.setattr(pyfuse3, "backing_open", refuse)
    fh, ino = await create(fs, b"q.txt")
    await fs.write(fh, 0, b"content")
    await fs.flush(fh)
    await fs.release(fh)
    await fs.getattr(ino, CTX)
    reader = await fs.open(ino, R, CTX)
    assert reader.backing_id == 0 and not reader.direct_io  # the page cache, as without passthrough
    assert await fs.read(reader.fh, 0, 100) == b"content"
    await fs.release(reader.fh)
    assert fs.files.read_path() == ("the kernel's page cache, filled by the daemon (no passthrough: the kernel "
                                    "refused a backing file: Operation not permitted)")

"""The life of an open regular file: its one open version, the handles that share it, and its
commit points. The request handlers (`operations`) call in here for every regular-file open,
read, write, truncate, flush, fsync and release.

What it guarantees (the contract's "Through the mount", 1 to 3):

- **One open version.** While a file is being written its next content is the node's `stage`,
  shared by every write-capable handle: opened for writing, or with O_CREAT or O_TRUNC in any
  access mode (`Handle.holds`), across processes, `dup` and `fork`. Those handles read, fstat and
  seek within it, and so does a `stat` of the name. Read-only handles of a committed file read,
  from their own fd, the version committed when they opened; of a new file, the open version.
- **Commit points.** The close (FUSE flush) of a write-capable handle, `fsync` on one, and the
  last release. A commit renames the stage over the name; handles still open go on from what
  they wrote (their next write stages a copy of the committed content), so history never forks.
  A flush from a handle that wrote nothing since the last commit (a shell's `>` closing its
  duplicate before the command writes) commits only content that passes, and otherwise leaves
  it to the writer that is still coming.
- **Refusal.** Content its rule refuses fails that close or fsync with EBADMSG and stays the open
  version while any write-capable handle is open: a child closing an inherited descriptor does
  not decide the parent's file. The last release sends still-refused content to the quarantine.
  Each refused content is recorded once, however many closes met it.
- **One backup per session.** From the first stage until the last write-capable handle is
  released, only the first commit keeps the content it replaces as a backup generation; later
  commits replace the session's own intermediate states (a child's close, each fsync of a
  database), which would otherwise rotate the real previous versions out.
- **Direct files** (rule `mode = "direct"`, and `append`) are never staged: each handle holds an
  fd on the backing file itself, and reads, writes, truncation and fsync go straight to it.

Locking: `node.commit_lock()` serializes everything that touches a node's stage (reads through
it included, since a commit closes the stage's fd). It is held across the worker calls that copy
and commit the stage; no other lock is taken while it is held.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import pyfuse3
import trio

from fusestore.engine.locks import LockBusy
from fusestore.engine.paths import fallocate
from fusestore.engine.store import Invalid, Rejected, Stage, Store
from fusestore.fs.nodes import InodeTable, Node
from fusestore.fs.virtual import Attrs
from fusestore.fs.watchers import CommitNotifier
from fusestore.fs.workers import Workers

log = logging.getLogger(__name__)

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_PASS_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC


class Handle:
    """One open file description of a regular file (one FUSE `fh`, shared by `dup` and `fork`)."""

    __slots__ = ("node", "flags", "fd", "writer", "holds", "direct", "wrote", "version", "claim")

    def __init__(self, node: Node, flags: int, created: bool):
        self.node = node
        self.flags = flags
        # Read-only handles of a committed file: their own fd on that version. Direct handles:
        # the fd on the backing file. Handles of the open version: None.
        self.fd: int | None = None
        self.writer = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.holds = self.writer or created or bool(flags & os.O_TRUNC)  # shares the open version
        self.direct = False
        self.wrote = False  # wrote since the last commit
        self.version = node.commits  # a read-only handle reads the version committed at its open
        self.claim: str | None = None  # the path of a direct file this handle claims (Files._claim)


def version_key(st: os.stat_result) -> tuple[int, int, int]:
    """What tells one committed version of a file from another: a commit gives the name a new
    backing inode; a change behind the mount, new times or size."""
    return st.st_ino, st.st_size, st.st_mtime_ns


def readable_location(node: Node) -> tuple[Node, bytes]:
    """Where to read the node's content: its name, or, when a rename or commit just took the
    name away, the name's new content (the kernel resolved the path just before)."""
    if node.parent is not None:
        return node.parent, node.name
    if node.former is not None and node.former[0].fd is not None:
        return node.former
    raise FileNotFoundError(errno.ENOENT, "the file has no name any more")


class Files:
    def __init__(self, store: Store, inodes: InodeTable, workers: Workers, invalidate_attrs, drop_other_names,
                 page_cache: bool = True, passthrough: bool = True):
        self.store = store
        self.inodes = inodes
        self.workers = workers
        self._invalidate_attrs = invalidate_attrs  # (ino) -> None, blocking: call in a worker
        self._drop_other_names = drop_other_names  # async (stat of the file a commit replaced, node)
        self._refilling = False
        # Read-only opens of committed files through the page cache (`_read_through_page_cache`;
        # `-o page_cache=off` turns it off): shared maps work.
        self.page_cache = page_cache
        # Those readers, and every handle of a direct file, served by the kernel from the
        # backing file (`_register_backing`), when the kernel agreed to passthrough at mount;
        # off for good after a refusal.
        self.passthrough = passthrough
        self.passthrough_refused: str | None = None
        self._committing = 0  # commits under way in workers
        self._written: set[Node] = set()  # nodes with write-capable handles
        # Direct files open on this host: path -> (descriptor holding the claim, handles).
        self._claims: dict[str, tuple[int | None, int]] = {}
        self._commit_seconds = 0.0  # how long commits take, a moving average
        self.notifier = CommitNotifier()  # started by the daemon once the mount answers

    # -- opening ---------------------------------------------------------------------------

    def mode(self, node: Node) -> str:
        """How `node` is written: "staged", or straight to the backing file ("direct",
        "append"). A new file is staged until its first commit, whatever its rule."""
        return "staged" if node.pending else self.store.rule(node.relpath()).mode

    async def open(self, node: Node, flags: int, ctx, created: bool = False) -> tuple[Handle, pyfuse3.FileInfo]:
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if node.pending and node.stage is None:
            # A new file whose content was refused: it never existed, but the kernel had not
            # yet forgotten its name. ESTALE makes the kernel look the name up again (and
            # create the file anew for O_CREAT).
            raise pyfuse3.FUSEError(errno.ESTALE)
        handle = Handle(node, flags, created)
        info = pyfuse3.FileInfo()
        mode = self.mode(node)
        if node.backing:
            # Handles of this node are served through a backing file, and the kernel takes no
            # other kind of open: a direct file's backing serves direct opens, a reader's
            # backing staged ones. Any other (the name was renamed from one kind to the other,
            # or to an appended file's) goes to a new node.
            fits = bool(node.through) if mode == "direct" else mode == "staged" and not node.through
            if not fits:
                self._supersede(node)
        if mode != "staged":
            parent, name = node.location
            if mode == "direct":
                self._claim(handle, node.relpath())
            try:
                handle.fd = os.open(name, (flags & _PASS_FLAGS) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
            except BaseException:
                self._unclaim(handle)
                raise
            handle.direct = True
            # Direct files have one version, so they get the page cache and shared maps, or
            # better, passthrough (`_write_through_backing`). Not kept across opens: a change
            # made in the backing tree shows at the next open. Appended files stay direct I/O:
            # fusestore itself appends to project logs in the backing tree, behind the
            # kernel's cached size.
            info.direct_io = mode != "direct"
            info.keep_cache = False
            if mode == "direct" and (node.through or node.handles == 0) and self._passthrough_on():
                self._write_through_backing(node, handle, info, parent, name)
        else:
            # Direct I/O for the open version and whoever reads along with its writers: the
            # kernel keeps one size and one page cache per inode, while a reader that opened
            # before a commit reads the version it opened, from its own fd.
            info.direct_io = True
            if handle.holds:
                if node.parent is None and not node.writers:
                    # The name went (removed or replaced behind the mount, or just now) after
                    # the kernel looked it up: writing here would write nowhere. ESTALE makes
                    # the kernel look the name up again (and create it anew for O_CREAT).
                    raise pyfuse3.FUSEError(errno.ESTALE)
                if node.cached:
                    self._supersede(node)
                node.cache_key = None
                node.awaited = False
                # Joined before anything is awaited: a last release that is committing
                # meanwhile then knows the file has a writer again.
                truncate = flags & os.O_TRUNC and not (node.pending and not node.writers)
                node.writers.add(handle)
                self._written.add(node)
                if ctx.uid != 0 and handle.writer:
                    node.kill_setid = True  # see Store.commit
                if truncate:
                    try:
                        async with node.commit_lock():
                            if node.stage is None:
                                node.stage = self.new_stage(node.relpath())
                            else:
                                os.ftruncate(node.stage.fd, 0)
                    except BaseException:
                        node.writers.discard(handle)
                        if not node.writers:
                            self._written.discard(node)
                        raise
                    node.refusal_recorded = False
            elif not node.pending:
                parent, name = readable_location(node)
                handle.fd = os.open(name, READ_FLAGS, dir_fd=parent.fd)
                if node.backing:
                    self._join_backing(node, handle, info)
                elif (self.page_cache and not node.writers and node.stage is None and not node.moving
                        and (node.parent is not None or node.cached)):
                    self._read_through_page_cache(node, handle, info)
                node.readers.add(handle)
        node.handles += 1
        return handle, info

    def _claim(self, handle: Handle, relpath: str) -> None:
        """A direct file (a database) is open on one host at a time (engine.locks `claim`):
        EBUSY when another host has it open."""
        fd, count = self._claims.get(relpath, (None, 0))
        if count == 0:
            try:
                fd = self.store.locks.claim(relpath)
            except LockBusy:
                log.warning("%s is open on another host: refused here (EBUSY)", relpath)
                raise pyfuse3.FUSEError(errno.EBUSY) from None
        self._claims[relpath] = (fd, count + 1)
        handle.claim = relpath

    def _unclaim(self, handle: Handle) -> None:
        if handle.claim is None:
            return
        fd, count = self._claims.pop(handle.claim)
        if count > 1:
            self._claims[handle.claim] = (fd, count - 1)
        elif fd is not None:
            os.close(fd)
        handle.claim = None

    def _read_through_page_cache(self, node: Node, handle: Handle, info: pyfuse3.FileInfo) -> None:
        """A read-only open of a committed file nobody writes reads through the kernel's page
        cache, so it can be mapped shared (Python's mmap, numpy.memmap). The node's page cache
        then holds that one version: when the name gets another (a writer opens it, a truncate,
        a change behind the mount), `_supersede` leaves this node to its readers."""
        st = os.fstat(handle.fd)
        key = version_key(st)
        if node.awaited or (node.cached and key != node.cache_key):
            # A writer was sent to look this node up again, or other readers hold another
            # version in its page cache (a rename onto the name is under way, or a change
            # behind the mount): this reader reads its version through the daemon.
            return
        if key != node.known:
            # The kernel may hold another version's size for the node (the name changed
            # behind the mount), and page-cache reads stop at that size. Invalidating the
            # attributes would not do: the kernel drops a reply about a node whose attributes
            # changed meanwhile (an unlink, a rename onto its name), and reads on.
            return
        if node.handles == 0 and self._passthrough_on():
            node.backing = info.backing_id = self._register_backing(handle.fd)
        info.direct_io = False
        # The pages the kernel kept are of this version (none are kept for passthrough).
        info.keep_cache = not node.backing and key == node.cache_key
        node.cache_key = key
        node.cached.add(handle)

    def _write_through_backing(self, node: Node, handle: Handle, info: pyfuse3.FileInfo, parent: Node,
                               name: bytes) -> None:
        """Every handle of a direct file (a database) is served by the kernel from the backing
        file itself, reads, writes and maps alike: one backing file, open for reading and
        writing, for all of them while any is open. Only open, flush, fsync, fallocate and
        release reach the daemon."""
        if not node.through:
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
            except OSError:
                return  # a read-only tree: the page cache, as without passthrough
            try:
                node.backing = self._register_backing(fd)
            finally:
                os.close(fd)
            if not node.backing:
                return
        info.backing_id = node.backing
        node.through.add(handle)

    def _register_backing(self, fd: int) -> int:
        """A backing id for the open file `fd`, or 0 when the kernel refuses it: passthrough is
        then off for good (the refusal is a matter of privilege or of the backing filesystem)."""
        try:
            return pyfuse3.backing_open(fd)
        except OSError as e:
            self.passthrough_refused = f"the kernel refused a backing file: {e.strerror}"
            log.warning("reads go through the page cache from now on: %s", self.passthrough_refused)
            return 0

    def _passthrough_on(self) -> bool:
        return self.passthrough and self.passthrough_refused is None and pyfuse3.passthrough_enabled()

    def _join_backing(self, node: Node, handle: Handle, info: pyfuse3.FileInfo) -> None:
        """A read-only open of a node whose readers the kernel serves from a backing file: the
        kernel takes no other kind of open of that inode (it fails them with EIO), so the
        reader joins them when it reads that version, and is otherwise sent to look the name
        up again, where a new node has taken it (as for a writer in `_supersede`)."""
        if version_key(os.fstat(handle.fd)) == node.cache_key:
            info.direct_io = False
            info.keep_cache = False
            info.backing_id = node.backing
            node.cached.add(handle)
            return
        os.close(handle.fd)
        handle.fd = None
        if node.parent is not None:
            parent, name = node.location
            self.inodes.succeed(node)
            pyfuse3.invalidate_entry_async(parent.ino, name, ignore_enoent=True)
        raise pyfuse3.FUSEError(errno.ESTALE)

    def read_path(self) -> str:
        """How read-only opens of committed files nobody writes are served, for `status`."""
        if not self.page_cache:
            return "the daemon, every read (page_cache=off)"
        if not self.passthrough:
            why = "passthrough=off"
        elif self.passthrough_refused is not None:
            why = self.passthrough_refused
        elif not pyfuse3.passthrough_supported:
            why = "pyfuse3 is built against a libfuse older than 3.17 (see tools/install)"
        elif not pyfuse3.passthrough_enabled():
            why = "the kernel did not agree to FUSE passthrough (it needs Linux 6.9 or later)"
        else:
            return "kernel passthrough from the backing files (FUSE passthrough)"
        return f"the kernel's page cache, filled by the daemon (no passthrough: {why})"

    def _supersede(self, node: Node) -> None:
        """The name of `node`, whose version readers hold in the page cache (maybe mapped), is
        to get another version: a new node takes the name, showing the same inode number, and
        this one stays with its readers, as if the file had been replaced by rename. ESTALE
        makes the kernel look the name up again and retry the open or truncate on the new node."""
        if node.parent is not None:
            parent, name = node.location
            # Kept for the writer: a reader opening it first would take its page cache, and
            # the writer, sent back a second time, would see ESTALE itself.
            self.inodes.succeed(node).awaited = True
            # Queued: the kernel may hold the directory's lock for the request that got here.
            pyfuse3.invalidate_entry_async(parent.ino, name, ignore_enoent=True)
        raise pyfuse3.FUSEError(errno.ESTALE)

    # -- the open version ------------------------------------------------------------------

    def new_stage(self, relpath: str, mode: int = 0o600, owner: tuple[int, int] | None = None) -> Stage:
        """An empty staged file, taken from the store's pool, which is then topped up."""
        stage = self.store.new_stage(relpath, mode, owner)
        self._keep_pool_filled()
        return stage

    def _keep_pool_filled(self) -> None:
        if self._refilling or not self.store.pool_low():
            return
        self._refilling = True

        async def refill():
            try:
                await self.workers.run(self.store.refill_pool)
            except Exception:  # noqa: BLE001 - without a pool, new_stage creates files itself
                log.exception("could not make staged files ahead")
            finally:
                self._refilling = False

        trio.lowlevel.spawn_system_task(refill)

    async def _ensure_stage(self, node: Node) -> Stage:
        """The node's open version, staged from the committed content on first need. Call
        with the node's commit lock held."""
        if node.stage is not None:
            return node.stage
        parent, name = node.location
        src = os.open(name, READ_FLAGS, dir_fd=parent.fd)
        try:
            node.stage = await self.workers.run(self.store.stage_copy, src, node.relpath())
        finally:
            os.close(src)
        self._keep_pool_filled()
        return node.stage

    async def keep_open_version(self, node: Node) -> None:
        """The name is about to go (unlink, renamed over) while handles still write the file:
        they go on with its content, as on any filesystem, so it is staged first."""
        if node.writers and node.parent is not None and not node.pending:
            async with node.commit_lock():
                await self._ensure_stage(node)

    async def read(self, handle: Handle, off: int, size: int) -> bytes:
        node = handle.node
        if handle.fd is not None:
            # A short read here, of another version than the kernel holds the size of, does
            # not cut that size: the kernel does so only for reads through the page cache.
            return os.pread(handle.fd, size, off)
        async with node.commit_lock():
            if node.stage is not None:
                return os.pread(node.stage.fd, size, off)
            if node.pending or node.parent is None:
                return b""  # a new file whose content was refused, or one removed unwritten
            parent, name = node.location
            fd = os.open(name, READ_FLAGS, dir_fd=parent.fd)
        try:
            return os.pread(fd, size, off)
        finally:
            os.close(fd)

    async def write(self, handle: Handle, off: int, buf: bytes) -> int:
        if not handle.writer:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.direct:
            if handle.flags & os.O_APPEND:
                return os.write(handle.fd, buf)
            return os.pwrite(handle.fd, buf, off)
        node = handle.node
        async with node.commit_lock():
            stage = await self._ensure_stage(node)
            if handle.flags & os.O_APPEND:
                off = os.fstat(stage.fd).st_size
            written = os.pwrite(stage.fd, buf, off)
        handle.wrote = True
        node.refusal_recorded = False
        return written

    async def fallocate(self, handle: Handle, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the handle's version: the backing file of a direct handle, else
        the open version (all modes: plain, keep-size, punch-hole, zero-range)."""
        if not handle.writer:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.direct:
            await self.workers.run(fallocate, handle.fd, mode, offset, length)
            return
        node = handle.node
        async with node.commit_lock():
            stage = await self._ensure_stage(node)
            await self.workers.run(fallocate, stage.fd, mode, offset, length)
        handle.wrote = True
        node.refusal_recorded = False

    async def truncate(self, node: Node, size: int, handle: Handle | None) -> None:
        if self.mode(node) != "staged":
            parent, name = node.location
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            return
        if node.cached and handle is None:
            self._supersede(node)  # truncate(2) of a path: retried on the name's new node
        async with node.commit_lock():
            if node.stage is None and size == 0:
                node.stage = self.new_stage(node.relpath())
            else:
                os.ftruncate((await self._ensure_stage(node)).fd, size)
        node.refusal_recorded = False
        if handle is not None and handle.holds:
            handle.wrote = True
        elif not node.writers:
            # truncate(2) of a path, or ftruncate of a file nobody writes: a commit of its own.
            await self.commit(node, final=True)

    def stat(self, node: Node, committed):
        """The attributes of a file with an open version: the size and times of that version,
        the rest (mode, owner, links) of the file it will replace, `committed()` (a stat)."""
        own = os.fstat(node.stage.fd)
        base = own
        if not node.pending and node.parent is not None:
            try:
                base = committed()
            except FileNotFoundError:
                pass  # removed while open: what is left is the open version
        attrs = Attrs(base.st_mode, 1 if base is own else base.st_nlink, base.st_uid, base.st_gid, own.st_size,
                      own.st_atime_ns, own.st_mtime_ns, own.st_ctime_ns)
        attrs.st_blocks = own.st_blocks
        attrs.st_dev, attrs.st_ino = base.st_dev, base.st_ino
        return attrs

    # -- commit points ---------------------------------------------------------------------

    async def flush(self, handle: Handle) -> None:
        if handle.holds and not handle.direct and handle.node.stage is not None:
            await self.commit(handle.node, quiet=not handle.wrote)

    async def fsync(self, handle: Handle) -> None:
        if handle.direct:
            await self.workers.run(os.fsync, handle.fd)
        elif handle.holds and handle.node.stage is not None:
            await self.commit(handle.node)
        # A read-only handle's version is committed, and so durable already.

    async def release(self, handle: Handle) -> None:
        node = handle.node
        if handle.fd is not None:
            os.close(handle.fd)
        self._unclaim(handle)
        node.readers.discard(handle)
        node.cached.discard(handle)
        node.through.discard(handle)
        if node.backing and not node.cached and not node.through:
            backing, node.backing = node.backing, 0
            try:
                pyfuse3.backing_close(backing)
            except OSError as e:
                log.warning("could not drop backing file %d of %s: %s", backing, node.relpath(), e.strerror)
        try:
            if handle in node.writers:
                node.writers.discard(handle)
                if not node.writers:
                    self._written.discard(node)
                    try:
                        # Nobody waits for this answer: what fails is logged, never dropped.
                        await self.commit(node, final=True)
                    except Rejected:
                        pass  # recorded, and the content is in the quarantine
                    except (OSError, pyfuse3.FUSEError) as e:
                        log.warning("%s was not committed when its last writer closed it: %s", node.relpath(), e)
                    node.backed_up = node.kill_setid = node.refusal_recorded = False
        finally:
            node.handles -= 1
            self.inodes.maybe_free(node)

    async def commit(self, node: Node, quiet: bool = False, final: bool = False) -> None:
        """Commit the node's open version. `quiet`: content that does not pass stays open,
        unrecorded. `final` (the last release, unmount): content that does not pass, or cannot
        be committed, goes to the quarantine and the stage is gone either way."""
        async with node.commit_lock():
            stage = node.stage
            if stage is None:
                return
            if node.parent is None:
                # Removed while open (an anonymous temporary file, a name renamed over): its
                # data lives as long as its handles, as on any filesystem.
                if final:
                    node.stage = None
                    await self.workers.run(self.store.discard, stage)
                return
            parent, name = node.location
            relpath = node.relpath()
            try:
                replaced = await self._run_commit(node.ino, stage, parent.fd, name, relpath,
                                                  not node.backed_up, node.kill_setid)
            except Invalid as e:
                if quiet and not final:
                    return
                await self._refuse(node, stage, relpath, e.reason, final)
            except OSError as e:
                if final:
                    node.stage = None
                    self._forget_new_file(node)
                    await self.workers.run(self.store.quarantine, stage, relpath,
                                           f"commit failed: {e.strerror or e}")
                raise
            # The stage's fd stayed open through the commit (now on the committed file), so a
            # getattr meanwhile could fstat it; it closes here, on the trio thread.
            node.stage = None
            # The kernel followed the open version's size through the writes and truncations
            # it passed on: it holds the committed size.
            st = os.fstat(stage.fd)
            node.known = version_key(st)
            os.close(stage.fd)
            self.notifier.committed(relpath, st.st_size)
            node.commits += 1
            node.backed_up = True
            node.refusal_recorded = False
            for writer in node.writers:
                writer.wrote = False
            self.inodes.committed(node)
            if replaced is not None:  # the name has a new inode; the file it left has one name fewer
                await self._drop_other_names(replaced, node)

    # A commit of a small file runs on the trio thread while one file at a time is written and
    # commits take little time: the hop to a worker and back costs more than such a commit
    # (about 0.3 ms of the 1.3 ms of daemon CPU a small file costs). Others run in workers, so
    # that concurrent writers' fsyncs overlap and a slow disk never holds up every request.
    INLINE_BYTES = 64 << 10
    INLINE_SECONDS = 0.002

    async def _run_commit(self, ino: int, stage: Stage, *args) -> os.stat_result | None:
        """`_commit_and_invalidate(ino, stage, *args)`, inline or in a worker."""
        args = (ino, stage, *args)
        inline = (len(self._written) <= 1 and self._committing == 0 and self._commit_seconds < self.INLINE_SECONDS
                  and os.fstat(stage.fd).st_size <= self.INLINE_BYTES)
        if inline:
            try:
                replaced, seconds = self._timed_commit(*args, wait=False)
            except LockBusy:  # another host commits the file: wait in a worker
                inline = False
        if not inline:
            self._committing += 1
            try:
                replaced, seconds = await self.workers.run(self._timed_commit, *args)
            finally:
                self._committing -= 1
        self._commit_seconds = 0.8 * self._commit_seconds + 0.2 * seconds
        return replaced

    def _timed_commit(self, *args, wait: bool = True) -> tuple[os.stat_result | None, float]:
        start = time.perf_counter()
        replaced = self._commit_and_invalidate(*args, wait=wait)
        return replaced, time.perf_counter() - start

    def _commit_and_invalidate(self, ino: int, stage: Stage, dir_fd: int, name: bytes, relpath: str, backup: bool,
                               kill_setid: bool, wait: bool = True) -> os.stat_result | None:
        """The commit, then the kernel's cached attributes of the file are dropped before the
        writer's close() returns, so the next stat sees the new size. (Attributes only: that
        takes no lock in the kernel and cannot block without writeback caching, so it may run
        on the trio thread.) Pages need no invalidation: the page cache of a node is only ever
        filled by readers of a version nobody writes (`_read_through_page_cache`). Returns the
        stat of the file the name had before, when that file has other hard links."""
        before = self.store.commit(stage, dir_fd, name, relpath, backup, kill_setid, wait)
        self._invalidate_attrs(ino)
        return before if before is not None and before.st_nlink > 1 else None

    async def _refuse(self, node: Node, stage: Stage, relpath: str, reason: str, final: bool):
        """Record a refusal (once per content) and raise it; at the last release the content
        goes to the quarantine, and a new file whose first content is refused never existed."""
        if not final:
            if node.refusal_recorded:
                raise Rejected(relpath, reason, None)
            node.refusal_recorded = True
            raise self.store.rejected(relpath, reason, None)
        recorded = node.refusal_recorded
        node.stage = None
        self._forget_new_file(node)  # at once: an open meanwhile must not find a dying file
        quarantined = await self.workers.run(self.store.quarantine, stage, relpath, reason, recorded)
        if recorded:
            self.store.quarantined_after_refusal(relpath, quarantined)
            raise Rejected(relpath, reason, quarantined)
        raise self.store.rejected(relpath, reason, quarantined)

    def _forget_new_file(self, node: Node) -> None:
        if node.pending and node.parent is not None and node.writers:
            # Someone opened the name while its refused content went to the quarantine: for
            # them the file is new and empty, as if created now.
            node.stage = self.new_stage(node.relpath())
            node.refusal_recorded = False
        elif node.pending and node.parent is not None:
            # The kernel must forget the name, or the next open of it would reach this node
            # instead of creating the file anew. Queued: the kernel may hold the directory's
            # lock for the very request that brought us here.
            parent, name = node.location
            self.inodes.unplace(node)
            pyfuse3.invalidate_entry_async(parent.ino, name, ignore_enoent=True)

    async def commit_all(self) -> int:
        """Commit (or quarantine) every open version; used when unmounting. Returns how many."""
        count = 0
        for node in list(self.inodes.nodes()):
            if node.stage is not None:
                count += 1
                try:
                    await self.commit(node, final=True)
                except Exception as e:  # noqa: BLE001 - a refusal is already quarantined and logged
                    log.warning("at unmount, %s was not committed: %s", node.relpath(), e)
        return count

    def open_versions(self) -> int:
        return sum(1 for node in self.inodes.nodes() if node.stage is not None)

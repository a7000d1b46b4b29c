"""The FUSE request handlers: translate each request into operations on the backing tree and
the store, and nothing else.

Every handler goes through `_errors`: an OSError becomes its errno, a rejection becomes EBADMSG,
anything unexpected becomes EIO with a logged traceback, so no exception ever ends the daemon.

Every open file gets direct I/O. The kernel keeps one size and one page cache per inode, while
fusestore serves several versions of a file at once (the writer's staged copy, the committed
file, and the old file a reader opened before a commit). With direct I/O each handle reads its
own version from its own fd and uncommitted bytes never enter the page cache; a commit then
invalidates the kernel's cached attributes. Shared mmap is therefore not available (ENODEV);
private mappings and exec work (the kernel drops a direct-I/O file's pages when it is mapped).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from typing import Awaitable, Callable, TypeVar

import pyfuse3
import trio

from fusestore.engine.cache import Cache, CacheError
from fusestore.engine.paths import DIR_FLAGS, RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from fusestore.engine.state import STATE_NAME
from fusestore.engine.store import Rejected, Stage, Store
from fusestore.fs.nodes import ROOT_INODE, InodeTable, Node, VirtualNode
from fusestore.fs.cacheview import CacheReader, CacheView, CacheWriter
from fusestore.fs.virtual import BACKUPS_NAME, CACHE_NAME, Attrs, BackupsView, GenerationReader
from fusestore.fs.workers import Workers

log = logging.getLogger("fusestore")
T = TypeVar("T")

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_RESERVED = {STATE_NAME.encode(), BACKUPS_NAME.encode(), CACHE_NAME.encode()}
_VIRTUAL_NAMES = (BACKUPS_NAME.encode(), CACHE_NAME.encode())


def _errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Rejected:
            raise pyfuse3.FUSEError(errno.EBADMSG) from None
        except CacheError as e:
            log.warning("%s refused: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except BaseException:
            log.exception("unexpected error in %s%r", fn.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Handle:
    __slots__ = ("node", "flags", "fd", "writer", "append", "dirty")

    def __init__(self, node: Node, flags: int):
        self.node = node
        self.flags = flags
        self.fd: int | None = None  # read fd on the committed file, or the append-through fd
        self.writer = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.append = False  # append-through: writes go straight to the backing file
        self.dirty = False


class DirHandle:
    __slots__ = ("node", "entries")

    def __init__(self, node: Node | VirtualNode):
        self.node = node
        self.entries: list | None = None


VirtualHandle = GenerationReader | CacheReader | CacheWriter


class Options:
    def __init__(self, xattr: bool = False, show_virtual: bool = False,
                 attr_timeout: float = 5.0, entry_timeout: float = 5.0):
        self.xattr = xattr
        self.show_virtual = show_virtual
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout


class Filesystem(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, store: Store, options: Options, cache: Cache):
        super().__init__()
        self.store = store
        self.options = options
        self.inodes = InodeTable(os.open(".", DIR_FLAGS, dir_fd=store.root_fd))
        self.handles: dict[int, Handle | DirHandle | VirtualHandle] = {}
        self._next_fh = 1
        self.uid = os.geteuid()
        self._refilling = False
        self.workers = Workers()
        self.backups_view = BackupsView(store.backups)
        self.cache_view = CacheView(cache, store, self.workers)
        # Our inodes of files with several hard links, by backing (st_dev, st_ino). Each name is
        # its own inode here, so the kernel caches each name's attributes apart: a change made
        # through one name (chmod, link, unlink, a commit) drops the others' cached attributes.
        self._linked: dict[tuple[int, int], set[int]] = {}
        self._linked_key: dict[int, tuple[int, int]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _fh(self, handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return fh

    def _node(self, ino: int) -> Node:
        node = self.inodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if isinstance(node, VirtualNode):
            raise pyfuse3.FUSEError(errno.EROFS)
        return node

    def _dir(self, ino: int) -> Node:
        node = self._node(ino)
        if not node.is_dir or node.fd is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _entry(self, ino: int, st) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        node = self.inodes.get(ino)
        if isinstance(node, VirtualNode) and not node.view.fixed(node):
            # Generation N changes content with every commit, cache entries come and go: never
            # let the kernel cache them.
            e.entry_timeout = e.attr_timeout = 0
        else:
            e.entry_timeout = self.options.entry_timeout
            e.attr_timeout = self.options.attr_timeout
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and isinstance(node, Node):
            key = self._linked_key[ino] = (st.st_dev, st.st_ino)
            self._linked.setdefault(key, set()).add(ino)
        return e

    def _other_names(self, st, but: int | None = None) -> list[int]:
        """Our inodes known to the kernel for other hard links of the file `st` describes."""
        if st is None or stat.S_ISDIR(st.st_mode):  # symlinks and fifos can have hard links too
            return []
        key = (st.st_dev, st.st_ino)
        inos = self._linked.get(key)
        if not inos:
            return []
        inos &= {ino for ino in inos if isinstance(self.inodes.get(ino), Node)}
        if not inos:
            del self._linked[key]
            return []
        return [ino for ino in inos if ino != but]

    async def _drop_cached_attrs(self, inos: list[int]) -> None:
        if inos:
            await self.workers.run(self._invalidate_each, inos)

    @classmethod
    def _invalidate_each(cls, inos: list[int]) -> None:
        for ino in inos:
            cls._invalidate_attrs(ino)

    def _stat(self, node: Node):
        if node.fd is not None:
            return os.stat(node.fd)
        if node.pending:
            # A new file's committed content is still nothing: owner and mode are its own, the
            # size is 0 until the first commit.
            if node.stage is None:
                raise FileNotFoundError(errno.ENOENT, "gone")
            st = os.fstat(node.stage.fd)
            return Attrs(st.st_mode, 1, st.st_uid, st.st_gid, 0, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        if node.parent is None:
            for reader in node.readers:  # fstat of an open file whose name was replaced
                return os.fstat(reader.fd)
        parent, name = self._readable_location(node)
        return os.stat(name, dir_fd=parent.fd, follow_symlinks=False)

    @staticmethod
    def _readable_location(node: Node) -> tuple[Node, bytes]:
        """Where to read the node's content: its name, or, when a rename or commit just took
        the name away, the name's new content (the kernel resolved the path just before)."""
        if node.parent is not None:
            return node.parent, node.name
        if node.former is not None and node.former[0].fd is not None:
            return node.former
        raise FileNotFoundError(errno.ENOENT, "the file has no name any more")

    def _check_name(self, parent: Node, name: bytes) -> None:
        """Names that new entries may not take: the state directory, the virtual dirs and the
        names of new files not yet committed."""
        if parent.ino == ROOT_INODE and name in _RESERVED:
            raise pyfuse3.FUSEError(errno.EEXIST if name in _VIRTUAL_NAMES else errno.EPERM)
        if name in self.inodes.pending_in(parent):
            raise pyfuse3.FUSEError(errno.EEXIST)

    def _known(self, parent: Node, name: bytes, st: os.stat_result) -> Node:
        """The node for entry `name` of `parent` with stat `st`, made if new (no lookup added)."""
        node = self.inodes.find(parent, name)
        is_dir = stat.S_ISDIR(st.st_mode)
        if node is not None:
            if node.is_dir == is_dir and (not is_dir or self._same_dir(node, st)):
                return node
            self.inodes.unplace(node)  # replaced behind our back: a new node for the new file
        fd = None
        if is_dir:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent.fd)
            st2 = os.fstat(fd)
            if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):  # swapped while we looked
                os.close(fd)
                raise pyfuse3.FUSEError(errno.EAGAIN)
        return self.inodes.add(is_dir, fd, parent, name)

    @staticmethod
    def _same_dir(node: Node, st: os.stat_result) -> bool:
        own = os.fstat(node.fd)
        return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)

    def _looked_up(self, node: Node | VirtualNode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self._entry(node.ino, st)

    def _owner(self, parent: Node, ctx) -> tuple[int, int] | None:
        """The owner a new entry gets when the daemon runs as root: the caller's, with the group
        of a set-group-ID parent directory, as a local filesystem does."""
        if self.uid != 0:
            return None
        gid = ctx.gid
        pst = os.fstat(parent.fd)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
        return ctx.uid, gid

    def _relpath(self, parent: Node, name: bytes) -> str:
        base = parent.relpath()
        return f"{base}/{os.fsdecode(name)}" if base else os.fsdecode(name)

    @staticmethod
    def _invalidate_entry(parent_ino: int, name: bytes) -> None:
        try:
            pyfuse3.invalidate_entry(parent_ino, name)
        except OSError:
            pass  # the kernel does not have the name cached

    @staticmethod
    def _invalidate_attrs(ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, True)
        except OSError:
            pass  # the kernel no longer knows the inode: nothing is cached

    def _new_stage(self, relpath: str, mode: int = 0o600, owner: tuple[int, int] | None = None) -> Stage:
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

    def _virtual_root(self, name: bytes) -> tuple[VirtualNode, Attrs]:
        view = self.backups_view if name == BACKUPS_NAME.encode() else self.cache_view
        return view.root(self.inodes)

    def _virtual(self, ino: int) -> VirtualNode | None:
        node = self.inodes.get(ino)
        return node if isinstance(node, VirtualNode) else None

    # -- lookups and attributes ------------------------------------------------------------

    @_errors
    async def lookup(self, parent_inode, name, ctx):
        vparent = self._virtual(parent_inode)
        if vparent is not None:
            vnode, st = await vparent.view.lookup(self.inodes, vparent, name)
            return self._looked_up(vnode, st)
        parent = self._dir(parent_inode)
        if name == b".":
            return self._looked_up(parent, os.fstat(parent.fd))
        if name == b"..":
            up = parent.parent or parent
            return self._looked_up(up, os.fstat(up.fd))
        if parent.ino == ROOT_INODE:
            if name == STATE_NAME.encode():
                raise pyfuse3.FUSEError(errno.ENOENT)
            if name in _VIRTUAL_NAMES:
                return self._looked_up(*self._virtual_root(name))
        pending = self.inodes.pending_in(parent).get(name)
        if pending is not None:
            return self._looked_up(pending, self._stat(pending))
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        node = self._known(parent, name, st)
        return self._looked_up(node, st)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            try:
                self.inodes.forget(ino, count)
            except Exception:
                log.exception("forget of inode %d failed", ino)
            if ino in self._linked_key and self.inodes.get(ino) is None:
                key = self._linked_key.pop(ino)
                names = self._linked.get(key, set())
                names.discard(ino)
                if not names:
                    self._linked.pop(key, None)

    @_errors
    async def getattr(self, inode, ctx):
        vnode = self._virtual(inode)
        if vnode is not None:
            return self._entry(inode, await vnode.view.stat(vnode))
        node = self._node(inode)
        try:
            return self._entry(inode, self._stat(node))
        except FileNotFoundError:
            if node.parent is not None and not node.pending:
                # Removed in the backing tree behind our back: drop the kernel's cached name
                # too, so that the next open(O_CREAT) of it creates the file instead of
                # reaching this node.
                parent, name = node.location
                self.inodes.unplace(node)
                pyfuse3.invalidate_entry_async(parent.ino, name, ignore_enoent=True)
            raise

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        vnode = self._virtual(inode)
        if vnode is not None:
            # Only a file being written in `.cache` changes: its size. Times a copying program
            # sets afterwards are accepted and dropped (the entry keeps its own times).
            writer = self.handles.get(fh) if fh is not None else None
            if not isinstance(writer, CacheWriter) or fields.update_mode or fields.update_uid or fields.update_gid:
                raise pyfuse3.FUSEError(errno.EROFS)
            if fields.update_size:
                await self.cache_view.truncate(writer, attr.st_size)
            st = await vnode.view.stat(vnode) if not writer.dirty else os.fstat(writer.fd)
            return self._entry(inode, st)
        node = self._node(inode)
        if fields.update_size:
            await self._truncate(node, attr.st_size, self.handles.get(fh) if fh is not None else None)
        if fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime or fields.update_mtime:
            await self.workers.run(self._set_metadata, node, attr, fields)
        st = self._stat(node)
        if st.st_nlink > 1:
            await self._drop_cached_attrs(self._other_names(st, inode))
        return self._entry(inode, st)

    def _set_metadata(self, node: Node, attr, fields) -> None:
        if node.pending and node.stage is not None:
            target, kw = node.stage.fd, {}
        elif node.fd is not None:
            target, kw = node.fd, {}
        else:
            parent, name = node.location
            target, kw = name, {"dir_fd": parent.fd, "follow_symlinks": False}
        if fields.update_uid or fields.update_gid:
            os.chown(target, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, **kw)
        if fields.update_mode:
            if isinstance(target, int):
                os.chmod(target, stat.S_IMODE(attr.st_mode))
            else:
                # chmod has no O_NOFOLLOW form for regular files: pin the inode with O_PATH.
                pfd = os.open(target, _PATH_FLAGS, dir_fd=kw["dir_fd"])
                try:
                    if stat.S_ISLNK(os.fstat(pfd).st_mode):
                        raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
                    os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(attr.st_mode))
                finally:
                    os.close(pfd)
        if fields.update_atime or fields.update_mtime:
            st = self._stat(node)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(target, ns=(atime, mtime), **kw)

    async def _truncate(self, node: Node, size: int, handle) -> None:
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if size < 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        relpath = node.relpath()
        if self.store.rule(relpath).mode == "append" and not node.pending:
            parent, name = node.location
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            return
        async with node.commit_lock():
            stage = await self._ensure_stage(node, empty=(size == 0))
            os.ftruncate(stage.fd, size)
        if isinstance(handle, Handle) and handle.writer:
            handle.dirty = True
        elif not node.writers:
            # truncate(2) on a path, or ftruncate on a file nobody writes: a commit of its own.
            await self._commit(node)
        else:
            for writer in node.writers:
                writer.dirty = True

    @_errors
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        parent, name = node.location
        return os.fsencode(os.readlink(name, dir_fd=parent.fd))

    @_errors
    async def statfs(self, ctx):
        sv = os.statvfs(self.store.root_fd)
        data = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, attr, getattr(sv, attr))
        return data

    @_errors
    async def access(self, inode, mode, ctx):
        # The kernel checks permissions itself (default_permissions); existence is all we add.
        if self._virtual(inode) is None:
            self._stat(self._node(inode))
        return True

    # -- creating and removing names -------------------------------------------------------

    def _made(self, parent: Node, name: bytes, owner, mode: int | None = None) -> pyfuse3.EntryAttributes:
        """The entry for a name just made: give it its owner, and `mode` again after the chown
        (which may clear set-id bits), then look it up."""
        if owner is not None:
            os.chown(name, owner[0], owner[1], dir_fd=parent.fd, follow_symlinks=False)
            if mode is not None:
                os.chmod(name, mode, dir_fd=parent.fd)
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        return self._looked_up(self._known(parent, name, st), st)

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        vparent = self._virtual(parent_inode)
        if vparent is not None:
            if vparent.view is not self.cache_view:
                raise pyfuse3.FUSEError(errno.EROFS)
            return self._looked_up(*await self.cache_view.mkdir(self.inodes, vparent, name))
        parent = self._writable_dir(parent_inode)
        self._check_name(parent, name)
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent.fd)
        # A directory in a set-group-ID directory inherits the bit; keep it through the chown.
        inherited = os.stat(name, dir_fd=parent.fd).st_mode & stat.S_ISGID
        return self._made(parent, name, self._owner(parent, ctx), stat.S_IMODE(mode) | inherited)

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self._writable_dir(parent_inode)
        self._check_name(parent, name)
        if stat.S_ISREG(mode) and self.store.rule(self._relpath(parent, name)).validate != "none":
            # An empty file is not a valid document; mknod has no content to commit later.
            raise pyfuse3.FUSEError(errno.EBADMSG)
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        return self._made(parent, name, self._owner(parent, ctx))

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        parent = self._writable_dir(parent_inode)
        self._check_name(parent, name)
        os.symlink(target, name, dir_fd=parent.fd)
        return self._made(parent, name, self._owner(parent, ctx))

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = self._node(inode)
        new_parent = self._writable_dir(new_parent_inode)
        self._check_name(new_parent, new_name)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EPERM)
        parent, name = node.location
        os.link(name, new_name, src_dir_fd=parent.fd, dst_dir_fd=new_parent.fd, follow_symlinks=False)
        st = os.stat(new_name, dir_fd=new_parent.fd, follow_symlinks=False)
        # The link count of every other name changed. Dropping cached attributes takes no inode
        # lock in the kernel, so it is safe while the kernel holds the source for this request,
        # and it lands before the reply, so a stat right after link(2) sees the new count.
        await self._drop_cached_attrs(sorted({node.ino, *self._other_names(st)}))
        return self._looked_up(self._known(new_parent, new_name, st), st)

    def _writable_dir(self, ino: int) -> Node:
        if self._virtual(ino) is not None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self._dir(ino)

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        parent = self._writable_dir(parent_inode)
        if parent.ino == ROOT_INODE and name in _RESERVED:
            raise pyfuse3.FUSEError(errno.EPERM)
        pending = self.inodes.pending_in(parent).get(name)
        if pending is not None:
            # Never committed: nothing in the tree to remove or back up.
            relpath = pending.relpath()
            self.inodes.unplace(pending)
            if not pending.writers and pending.stage is not None:
                stage, pending.stage = pending.stage, None
                await self.workers.run(self.store.discard, stage)
                self.inodes.maybe_free(pending)
            log.debug("removed %s before its first commit", relpath)
            return
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        relpath = self._relpath(parent, name)
        await self.workers.run(self._unlink_keeping_backup, parent.fd, name, relpath)
        node = self.inodes.find(parent, name)
        if node is not None:
            self.inodes.unplace(node)
        if st.st_nlink > 1:
            await self._drop_cached_attrs(self._other_names(st, node.ino if node else None))

    def _unlink_keeping_backup(self, dir_fd: int, name: bytes, relpath: str) -> None:
        self.store.keep_backup(dir_fd, name, relpath)
        os.unlink(name, dir_fd=dir_fd)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        parent = self._writable_dir(parent_inode)
        if parent.ino == ROOT_INODE and name in _RESERVED:
            raise pyfuse3.FUSEError(errno.EPERM)
        os.rmdir(name, dir_fd=parent.fd)
        node = self.inodes.find(parent, name)
        if node is not None:
            self.inodes.unplace(node)

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old_parent = self._writable_dir(parent_inode_old)
        new_parent = self._writable_dir(parent_inode_new)
        for parent, name in ((old_parent, name_old), (new_parent, name_new)):
            if parent.ino == ROOT_INODE and name in _RESERVED:
                raise pyfuse3.FUSEError(errno.EPERM)
        src = self.inodes.find(old_parent, name_old)
        if src is not None and src.stage is not None:
            await self._commit(src)  # a file renamed while still being written: commit first
        os.stat(name_old, dir_fd=old_parent.fd, follow_symlinks=False)
        try:
            dst_st = os.stat(name_new, dir_fd=new_parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            dst_st = None
        dst = self.inodes.find(new_parent, name_new)
        if dst is not None and dst is not src and dst.stage is not None and flags & RENAME_EXCHANGE:
            await self._commit(dst)
        src_rel = self._relpath(old_parent, name_old)
        dst_rel = self._relpath(new_parent, name_new)
        await self.workers.run(
            self._rename, old_parent.fd, name_old, new_parent.fd, name_new, flags, src_rel, dst_rel, dst_st is not None
        )
        if dst is not None:
            self.inodes.unplace(dst)
        if src is not None:
            self.inodes.place(src, new_parent, name_new)
        if dst is not None and flags & RENAME_EXCHANGE:
            self.inodes.place(dst, old_parent, name_old)
        elif dst_st is not None and dst_st.st_nlink > 1:  # the replaced file lost a name
            await self._drop_cached_attrs(self._other_names(dst_st, dst.ino if dst else None))

    def _rename(self, old_fd, name_old, new_fd, name_new, flags, src_rel, dst_rel, dst_exists) -> None:
        # Content that may not stand under its new name is refused before anything moves.
        reason = self.store.check_file(old_fd, name_old, dst_rel)
        if reason is None and flags & RENAME_EXCHANGE:
            reason = self.store.check_file(new_fd, name_new, src_rel)
        if reason is not None:
            self.store.stats.rejections += 1
            log.warning("rejected rename of %s to %s: %s", src_rel, dst_rel, reason)
            raise Rejected(dst_rel, reason, None)
        if dst_exists and not flags & (RENAME_EXCHANGE | RENAME_NOREPLACE):
            self.store.keep_backup(new_fd, name_new, dst_rel)
        renameat2(old_fd, name_old, new_fd, name_new, flags)
        os.fsync(new_fd)
        if old_fd != new_fd:
            os.fsync(old_fd)

    # -- files -----------------------------------------------------------------------------

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        vparent = self._virtual(parent_inode)
        if vparent is not None:
            if vparent.view is not self.cache_view:
                raise pyfuse3.FUSEError(errno.EROFS)
            writer, st = await self.cache_view.create(self.inodes, vparent, name)
            info = pyfuse3.FileInfo(fh=self._fh(writer), direct_io=True)
            return info, self._looked_up(writer.node, st)
        parent = self._writable_dir(parent_inode)
        self._check_name(parent, name)
        if flags & os.O_DIRECT:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            # Created behind our back since the kernel's lookup: open the existing file instead.
            node = self._known(parent, name, st)
            info = await self._open(node, flags & ~os.O_CREAT, ctx)
            return info, self._looked_up(node, self._stat(node))
        # A new file exists only as its staged copy until the first commit puts it in the tree.
        relpath = self._relpath(parent, name)
        if self.store.rule(relpath).mode == "append":
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         stat.S_IMODE(mode), dir_fd=parent.fd)
            try:
                owner = self._owner(parent, ctx)
                if owner is not None:
                    os.fchown(fd, *owner)
            finally:
                os.close(fd)
            node = self._known(parent, name, os.stat(name, dir_fd=parent.fd, follow_symlinks=False))
        else:
            stage = self._new_stage(relpath, stat.S_IMODE(mode), self._owner(parent, ctx))
            node = self.inodes.add(False, None, parent, name, stage)
        info = await self._open(node, flags, ctx)
        return info, self._looked_up(node, self._stat(node))

    @_errors
    async def open(self, inode, flags, ctx):
        vnode = self._virtual(inode)
        if vnode is not None:
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                if vnode.view is not self.cache_view:
                    raise pyfuse3.FUSEError(errno.EROFS)
                handle = await self.cache_view.open_write(vnode, bool(flags & os.O_TRUNC))
            else:
                handle = await vnode.view.open_read(vnode)
                vnode.handles += 1
            return pyfuse3.FileInfo(fh=self._fh(handle), direct_io=True)
        if flags & os.O_DIRECT:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return await self._open(self._node(inode), flags, ctx)

    async def _open(self, node: Node, flags: int, ctx) -> pyfuse3.FileInfo:
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        handle = Handle(node, flags)
        info = pyfuse3.FileInfo()
        # Direct I/O for every open: the kernel keeps one size and one page cache per inode, so
        # a reader that opened before a commit would otherwise be cut to the new size or served
        # pages of the new content. Each handle reads its own version from its own fd.
        info.direct_io = True
        if not handle.writer:
            if not node.pending:  # a new file not yet committed reads as empty
                parent, name = self._readable_location(node)
                handle.fd = os.open(name, _READ_FLAGS, dir_fd=parent.fd)
                node.readers.add(handle)
        else:
            relpath = node.relpath()
            if self.store.rule(relpath).mode == "append" and not node.pending:
                handle.append = True
                parent, name = node.location
                pass_flags = flags & (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC)
                handle.fd = os.open(name, pass_flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
            else:
                if flags & os.O_TRUNC and not (node.pending and not node.writers):
                    # Not dirty yet: a shell's `>` closes a duplicate of the fd before the
                    # command writes, and that flush must not commit the empty file. A stage
                    # nobody writes to is committed when the last writer releases it.
                    async with node.commit_lock():
                        if node.stage is None:
                            node.stage = self._new_stage(relpath)
                        else:
                            os.ftruncate(node.stage.fd, 0)
                node.writers.add(handle)
                if ctx.uid != 0:
                    node.kill_setid = True  # see Store.commit
        node.handles += 1
        info.fh = self._fh(handle)
        return info

    async def _ensure_stage(self, node: Node, empty: bool = False) -> Stage:
        """The node's staged copy, made from the committed content on first need. Call with the
        node's commit lock held."""
        if node.stage is not None:
            return node.stage
        relpath = node.relpath()
        if empty:
            node.stage = self._new_stage(relpath)
            return node.stage
        parent, name = node.location
        src = os.open(name, _READ_FLAGS, dir_fd=parent.fd)
        try:
            node.stage = await self.workers.run(self.store.stage_copy, src, relpath)
        finally:
            os.close(src)
        self._keep_pool_filled()
        return node.stage

    @_errors
    async def read(self, fh, off, size):
        handle = self.handles[fh]
        if isinstance(handle, (GenerationReader, CacheReader)):
            return handle.read(off, size)
        if isinstance(handle, CacheWriter):
            return os.pread(handle.fd, size, off)
        node = handle.node
        if handle.writer and not handle.append:
            if node.stage is not None:
                return os.pread(node.stage.fd, size, off)
            if handle.fd is None:
                parent, name = node.location
                handle.fd = os.open(name, _READ_FLAGS, dir_fd=parent.fd)
        if handle.fd is None:
            return b""  # opened while the file was new and not yet committed
        return os.pread(handle.fd, size, off)

    @_errors
    async def write(self, fh, off, buf):
        handle = self.handles[fh]
        if isinstance(handle, CacheWriter):
            return await self.cache_view.write(handle, off, buf)
        if isinstance(handle, (GenerationReader, CacheReader)):
            raise pyfuse3.FUSEError(errno.EBADF)
        if not handle.writer:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.append:
            if handle.flags & os.O_APPEND:
                return os.write(handle.fd, buf)
            return os.pwrite(handle.fd, buf, off)
        node = handle.node
        async with node.commit_lock():
            stage = await self._ensure_stage(node)
            if handle.flags & os.O_APPEND:
                off = os.fstat(stage.fd).st_size
            written = os.pwrite(stage.fd, buf, off)
        handle.dirty = True
        return written

    @_errors
    async def flush(self, fh):
        handle = self.handles.get(fh)
        if isinstance(handle, CacheWriter):
            await self.cache_view.flush(handle)
            return
        if not isinstance(handle, Handle) or not handle.writer or handle.append:
            return
        node = handle.node
        if handle.dirty:
            await self._commit(node)
        elif node.stage is not None and node.parent is not None:
            # Created or truncated but not written: empty content is final only if the rule
            # accepts it; for a JSON file the real content is still coming through another fd
            # (a shell's `>`), so wait for the last release.
            if self.store.rule(node.relpath()).validate == "none":
                await self._commit(node)
                # If the writer goes on, this empty content was only an intermediate state:
                # the next commit need not keep it as a backup generation.
                node.intermediate = True

    @_errors
    async def fsync(self, fh, datasync):
        handle = self.handles[fh]
        if isinstance(handle, CacheWriter):
            await self.workers.run(os.fsync, handle.fd)
        elif isinstance(handle, Handle):
            if handle.append:
                await self.workers.run(os.fsync, handle.fd)
            elif handle.node.stage is not None:
                await self.workers.run(os.fsync, handle.node.stage.fd)

    @_errors
    async def release(self, fh):
        handle = self.handles.pop(fh)
        if isinstance(handle, CacheWriter):
            await self.cache_view.release(self.inodes, handle)
            return
        if isinstance(handle, (GenerationReader, CacheReader)):
            if handle.fd is not None:
                os.close(handle.fd)
            handle.node.handles -= 1
            self.inodes.maybe_free(handle.node)
            return
        node = handle.node
        if handle.fd is not None:
            os.close(handle.fd)
        node.readers.discard(handle)
        try:
            if handle.writer and not handle.append:
                node.writers.discard(handle)
                if not node.writers:
                    node.intermediate = False
                    if node.stage is not None:
                        # flush normally committed already; whatever is left must not be
                        # dropped. Nobody waits for this answer, so failures go to the log.
                        try:
                            await self._commit(node)
                        except Rejected:
                            pass  # logged and counted by the store
                        except (OSError, pyfuse3.FUSEError) as e:
                            log.warning("%s was not committed when its last writer closed it: %s", node.relpath(), e)
        finally:
            node.handles -= 1
            self.inodes.maybe_free(node)

    async def _commit(self, node: Node) -> None:
        """Commit the node's staged content (or quarantine it) and tell the kernel."""
        async with node.commit_lock():
            stage = node.stage
            if stage is None:
                return
            node.stage = None
            keep_empty, node.intermediate = not node.intermediate, False
            kill_setid, node.kill_setid = node.kill_setid, bool(node.writers) and node.kill_setid
            for writer in node.writers:
                writer.dirty = False
            relpath = node.relpath()
            if node.parent is None:
                # The program removed the file while writing it (an anonymous temporary file,
                # or a name renamed over): its data goes away, as on any filesystem.
                await self.workers.run(self.store.discard, stage)
                return
            parent, name = node.location
            try:
                left = await self.workers.run(self._commit_and_invalidate, node.ino, stage, parent.fd, name, relpath, keep_empty,
                                       kill_setid)
            except Rejected:
                if node.pending:
                    # A new file whose first content is refused never existed. The kernel must
                    # forget the name before close() returns, or the writer's next open of the
                    # same name would reach this node instead of creating the file anew.
                    self.inodes.unplace(node)
                    await self.workers.run(self._invalidate_entry, parent.ino, name)
                raise
            self.inodes.committed(node)
            if left is not None:  # the name has a new inode; the file it left has one name fewer
                await self._drop_cached_attrs(self._other_names(left, node.ino))

    def _commit_and_invalidate(self, ino: int, stage: Stage, dir_fd: int, name: bytes, relpath: str, keep_empty: bool,
                               kill_setid: bool) -> os.stat_result | None:
        """In a worker thread: the commit, then the kernel's cached attributes of the file are
        dropped before the writer's close() returns, so the next stat sees the new size. Pages
        need no invalidation: every open is direct I/O, and the kernel drops a direct-I/O file's
        pages itself whenever it is mapped. (The call writes to /dev/fuse, so it never runs on
        the trio thread; sharing the commit's thread saves a hop.) Returns the stat of the file the
        name had before, when that file has other hard links (their attributes changed too)."""
        try:
            before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            before = None
        self.store.commit(stage, dir_fd, name, relpath, keep_empty, kill_setid)
        self._invalidate_attrs(ino)
        return before if before is not None and before.st_nlink > 1 else None

    async def commit_all(self) -> int:
        """Commit (or quarantine) every staged file; used when unmounting. Returns how many."""
        count = 0
        for node in list(self.inodes.nodes()):
            if node.stage is not None:
                count += 1
                try:
                    await self._commit(node)
                except Exception as e:  # noqa: BLE001 - a rejection is already quarantined and logged
                    log.warning("at unmount, %s was not committed: %s", node.relpath(), e)
        return count

    def open_stages(self) -> int:
        return sum(1 for node in self.inodes.nodes() if node.stage is not None)

    # -- directories -----------------------------------------------------------------------

    @_errors
    async def opendir(self, inode, ctx):
        node = self.inodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if isinstance(node, Node) and not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        node.handles += 1
        return self._fh(DirHandle(node))

    @_errors
    async def readdir(self, fh, start_id, token):
        handle: DirHandle = self.handles[fh]
        node = handle.node
        if isinstance(node, VirtualNode):
            if handle.entries is None or start_id == 0:
                handle.entries = await node.view.listing(node)
            for i in range(start_id, len(handle.entries)):
                name = handle.entries[i]
                try:
                    vnode, st = await node.view.lookup(self.inodes, node, name)
                except (OSError, pyfuse3.FUSEError):
                    continue
                if not pyfuse3.readdir_reply(token, name, self._entry(vnode.ino, st), i + 1):
                    self.inodes.maybe_free(vnode)
                    return
                vnode.lookups += 1
            return
        if handle.entries is None or start_id == 0:
            names = [os.fsencode(n) for n in os.listdir(node.fd)]
            if node.ino == ROOT_INODE:
                names = [n for n in names if n not in _RESERVED]
                if self.options.show_virtual:
                    names.extend(_VIRTUAL_NAMES)
            listed = set(names)
            names.extend(n for n in self.inodes.pending_in(node) if n not in listed)
            names.sort()
            handle.entries = names
        for i in range(start_id, len(handle.entries)):
            name = handle.entries[i]
            pending = self.inodes.pending_in(node).get(name)
            if node.ino == ROOT_INODE and name in _VIRTUAL_NAMES:
                child, st = self._virtual_root(name)
            elif pending is not None:
                child, st = pending, self._stat(pending)
            else:
                try:
                    st = os.stat(name, dir_fd=node.fd, follow_symlinks=False)
                    child = self._known(node, name, st)
                except (OSError, pyfuse3.FUSEError):
                    continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, name, self._entry(child.ino, st), i + 1):
                self.inodes.maybe_free(child)
                return
            child.lookups += 1

    @_errors
    async def releasedir(self, fh):
        handle = self.handles.pop(fh)
        handle.node.handles -= 1
        self.inodes.maybe_free(handle.node)

    @_errors
    async def fsyncdir(self, fh, datasync):
        handle = self.handles[fh]
        if isinstance(handle.node, Node):
            await self.workers.run(os.fsync, handle.node.fd)

    # -- extended attributes (only with -o xattr) ------------------------------------------

    def _xattr_path(self, inode: int) -> str:
        if not self.options.xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        if node.fd is not None:
            return f"/proc/self/fd/{node.fd}"
        if node.pending and node.stage is not None:
            return f"/proc/self/fd/{node.stage.fd}"
        parent, name = node.location
        return f"/proc/self/fd/{parent.fd}/{os.fsdecode(name)}"

    @_errors
    async def getxattr(self, inode, name, ctx):
        if self._virtual(inode) is not None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return os.getxattr(self._xattr_path(inode), name, follow_symlinks=False)

    @_errors
    async def listxattr(self, inode, ctx):
        if self._virtual(inode) is not None:
            return []
        return [os.fsencode(n) for n in os.listxattr(self._xattr_path(inode), follow_symlinks=False)]

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        if self._virtual(inode) is not None:
            raise pyfuse3.FUSEError(errno.EROFS)
        os.setxattr(self._xattr_path(inode), name, value, follow_symlinks=False)

    @_errors
    async def removexattr(self, inode, name, ctx):
        if self._virtual(inode) is not None:
            raise pyfuse3.FUSEError(errno.EROFS)
        os.removexattr(self._xattr_path(inode), name, follow_symlinks=False)


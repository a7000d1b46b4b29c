"""The FUSE request handlers: translate each request into operations on the backing tree and
the store, and nothing else.

Every handler goes through `_errors`: an OSError becomes its errno, a rejection becomes EBADMSG,
anything unexpected becomes EIO with a logged traceback, so no exception ever ends the daemon.

The life of an open regular file (its open version, handles and commit points) is `files`'s;
this module hands it every regular-file open, read, write, flush, fsync and release.
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
from fusestore.engine.store import Rejected, Store
from fusestore.fs.cacheview import CacheReader, CacheView, CacheWriter
from fusestore.fs.files import Files, Handle, readable_location, version_key
from fusestore.fs.nodes import ROOT_INODE, InodeTable, Node, VirtualNode
from fusestore.fs.virtual import BACKUPS_NAME, CACHE_NAME, Attrs, BackupsView, GenerationReader
from fusestore.fs.workers import Workers

log = logging.getLogger(__name__)
T = TypeVar("T")

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


class DirHandle:
    __slots__ = ("node", "entries")

    def __init__(self, node: Node | VirtualNode):
        self.node = node
        self.entries: list | None = None


VirtualHandle = GenerationReader | CacheReader | CacheWriter


class Options:
    def __init__(self, xattr: bool = False, show_virtual: bool = False,
                 attr_timeout: float = 5.0, entry_timeout: float = 5.0, page_cache: bool = True,
                 passthrough: bool = True):
        self.xattr = xattr
        self.page_cache = page_cache
        self.passthrough = passthrough
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
        self.workers = Workers()
        # Asked of the kernel at mount (tools/pyfuse3.patch built against libfuse 3.17 or
        # later); whether it agreed is known after the INIT request.
        self.enable_passthrough = options.passthrough and pyfuse3.passthrough_supported
        self.files = Files(store, self.inodes, self.workers, self._invalidate_attrs, self._drop_names_of,
                           options.page_cache, options.passthrough)
        self.backups_view = BackupsView(store.backups)
        self.cache_view = CacheView(cache, store.rejected, self.workers)
        self.links = self.inodes.links

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

    def _entry(self, ino: int, st, node: Node | VirtualNode | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        if node is None:
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
        if isinstance(node, Node):
            self.links.seen(node, st)
            e.attr_ino = node.shown
            node.known = version_key(st)
        return e

    async def _drop_names_of(self, st, node: Node) -> None:
        """A commit gave `node`'s name a new file; `st` is the file it had, which has other
        hard links: they keep it, and their cached attributes go (the link count changed)."""
        self.links.broken(node, st)
        await self._drop_cached_attrs(self.links.others(st, node.ino))

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
        if node.stage is not None:  # being written: what its writers see (files.Files.stat)
            return self.files.stat(node, lambda: self._committed_stat(node))
        if node.pending:
            raise FileNotFoundError(errno.ENOENT, "gone")
        return self._committed_stat(node)

    def _committed_stat(self, node: Node):
        if node.parent is None or node.cached:
            # fstat of an open file whose name was replaced, or of the version the node's
            # page cache holds.
            for reader in node.cached or node.readers:
                return os.fstat(reader.fd)
        parent, name = readable_location(node)
        return os.stat(name, dir_fd=parent.fd, follow_symlinks=False)

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

    def _named(self, parent: Node, name: bytes, st: os.stat_result) -> tuple[Node, os.stat_result]:
        """The node of entry `name` (`st`: its stat by name) and the attributes to give the
        kernel: the open version's while the file is being written. When readers hold another
        version of the node in the page cache (the name changed behind the mount, or a rename
        onto it is under way), the name gets a new node: the kernel must not take the name's
        size for theirs."""
        node = self.inodes.find(parent, name)
        if node is not None and not node.handles and not node.is_dir and not stat.S_ISDIR(st.st_mode):
            return node, st  # a known file nobody has open, as most are: nothing to check
        node = self._known(parent, name, st)
        if node.stage is not None:
            return node, self.files.stat(node, lambda: st)
        if node.cached and version_key(st) != node.cache_key:
            node = self.inodes.succeed(node)
        return node, st

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
    def _invalidate_attrs(ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, True)
        except OSError:
            pass  # the kernel no longer knows the inode: nothing is cached

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
        return self._looked_up(*self._named(parent, name, st))

    async def forget(self, inode_list):
        for ino, count in inode_list:
            try:
                self.inodes.forget(ino, count)
            except Exception:
                log.exception("forget of inode %d failed", ino)

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
        if ctx.pid == self.files.notifier.pid:
            # The daemon's own truncate to the size a file has, after its commit: only the
            # inotify event the kernel raises for it was wanted (fs/watchers.py). The reply is
            # not cached, so the kernel keeps what it knew: nothing after the commit.
            entry = self._entry(inode, self._stat(node))
            entry.attr_timeout = 0
            return entry
        if fields.update_size:
            if node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if attr.st_size < 0:
                raise pyfuse3.FUSEError(errno.EINVAL)
            handle = self.handles.get(fh) if fh is not None else None
            await self.files.truncate(node, attr.st_size, handle if isinstance(handle, Handle) else None)
        if fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime or fields.update_mtime:
            await self.workers.run(self._set_metadata, node, attr, fields)
        st = self._stat(node)
        if st.st_nlink > 1:
            await self._drop_cached_attrs(self.links.others(st, inode))
        return self._entry(inode, st)

    def _set_metadata(self, node: Node, attr, fields) -> None:
        stage = node.stage
        if node.pending and stage is not None:
            target, kw = stage.fd, {}
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
            if stage is not None:
                # The times of the open version, which its commit makes the file's (`cp -p`
                # sets them before it closes).
                target, kw = stage.fd, {}
            os.utime(target, ns=(atime, mtime), **kw)

    @_errors
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        parent, name = node.location
        try:
            return os.fsencode(os.readlink(name, dir_fd=parent.fd))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # The kernel asks only for links, so the name was replaced behind the mount by
            # something that is not one. ESTALE makes the kernel look the path up afresh.
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    @_errors
    async def statfs(self, ctx):
        sv = os.statvfs(self.store.root_fd)
        data = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                     "f_namemax"):
            setattr(data, attr, getattr(sv, attr))
        return data

    @_errors
    async def access(self, inode, mode, ctx):
        # Asked only without default_permissions, where the caller is root (see daemon.py):
        # root may read and write anything, and execute what has an execute bit or is a
        # directory, as access(2) answers on a plain directory.
        vnode = self._virtual(inode)
        st = await vnode.view.stat(vnode) if vnode is not None else self._stat(self._node(inode))
        if mode & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
            raise pyfuse3.FUSEError(errno.EACCES)
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
        os.mknod(name, mode, rdev, dir_fd=parent.fd)  # an empty new file is valid everywhere
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
        if node.stage is not None:
            # Both names must show what was written so far, as on a plain file. Content that
            # does not pass yet stays open; a new file without valid content has nothing to link.
            await self.files.commit(node, quiet=True)
            if node.pending:
                raise pyfuse3.FUSEError(errno.EBADMSG)
        parent, name = node.location
        os.link(name, new_name, src_dir_fd=parent.fd, dst_dir_fd=new_parent.fd, follow_symlinks=False)
        st = os.stat(new_name, dir_fd=new_parent.fd, follow_symlinks=False)
        self.links.linking(node, st)
        # The link count of every other name changed. Dropping cached attributes takes no inode
        # lock in the kernel, so it is safe while the kernel holds the source for this request,
        # and it lands before the reply, so a stat right after link(2) sees the new count.
        await self._drop_cached_attrs(sorted({node.ino, *self.links.others(st)}))
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
        node = self.inodes.find(parent, name)
        if node is not None:
            await self.files.keep_open_version(node)
        kept = await self.workers.run(self.store.remove, parent.fd, name, relpath)
        self.store.emit("delete", relpath, generation=1 if kept else None)
        if node is not None:
            self.inodes.unplace(node)
        if st.st_nlink > 1:
            await self._drop_cached_attrs(self.links.others(st, node.ino if node else None))

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        parent = self._writable_dir(parent_inode)
        if parent.ino == ROOT_INODE and name in _RESERVED:
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self.inodes.find(parent, name)
        if node is not None and self.inodes.pending_in(node):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)  # it holds new files not yet committed
        os.rmdir(name, dir_fd=parent.fd)
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
            await self.files.commit(src)  # a file renamed while still being written: commit first
        os.stat(name_old, dir_fd=old_parent.fd, follow_symlinks=False)
        try:
            dst_st = os.stat(name_new, dir_fd=new_parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            dst_st = None
        dst = self.inodes.find(new_parent, name_new)
        if dst is not None and dst is not src:
            if flags & RENAME_EXCHANGE:
                if dst.stage is not None:
                    await self.files.commit(dst)
            else:
                await self.files.keep_open_version(dst)
        src_rel = self._relpath(old_parent, name_old)
        dst_rel = self._relpath(new_parent, name_new)
        # Until the names are moved here too, the backing names and the nodes disagree: an open
        # of either node meanwhile (the kernel resolved its path before the rename) reads
        # through the daemon, as the kernel may have or get the other file's size for it.
        moving = [n for n in (src, dst) if n is not None]
        for n in moving:
            n.moving = True
        try:
            kept = await self.workers.run(
                self._rename, old_parent.fd, name_old, new_parent.fd, name_new, flags, src_rel, dst_rel, dst_st
            )
        finally:
            for n in moving:
                n.moving = False
        self.store.emit("rename", dst_rel, source=src_rel, generation=1 if kept else None)
        if dst is not None:
            self.inodes.unplace(dst)
        if src is not None:
            self.inodes.place(src, new_parent, name_new)
        if dst is not None and flags & RENAME_EXCHANGE:
            self.inodes.place(dst, old_parent, name_old)
        elif dst_st is not None and dst_st.st_nlink > 1:  # the replaced file lost a name
            await self._drop_cached_attrs(self.links.others(dst_st, dst.ino if dst else None))

    def _rename(self, old_fd, name_old, new_fd, name_new, flags, src_rel, dst_rel, dst_st) -> bool:
        with self.store.locks.path(src_rel, dst_rel):  # as a commit of both names, for other hosts
            return self._rename_locked(old_fd, name_old, new_fd, name_new, flags, src_rel, dst_rel, dst_st)

    def _rename_locked(self, old_fd, name_old, new_fd, name_new, flags, src_rel, dst_rel, dst_st) -> bool:
        # Looked at again under the lock: another host may have made or replaced the target.
        try:
            dst_st = os.stat(name_new, dir_fd=new_fd, follow_symlinks=False)
        except FileNotFoundError:
            dst_st = None
        # Content that may not stand under its new name is refused before anything moves.
        replacing = dst_st.st_size if dst_st is not None and stat.S_ISREG(dst_st.st_mode) else None
        reason = self.store.check_file(old_fd, name_old, dst_rel, replacing)
        if reason is None and flags & RENAME_EXCHANGE:
            reason = self.store.check_file(new_fd, name_new, src_rel)
        if reason is not None:
            raise self.store.rejected(dst_rel, f"rename of {src_rel}: {reason}", None)
        kept = False
        if dst_st is not None and not flags & (RENAME_EXCHANGE | RENAME_NOREPLACE):
            kept = self.store.keep_backup(new_fd, name_new, dst_rel)
        renameat2(old_fd, name_old, new_fd, name_new, flags)
        os.fsync(new_fd)
        if old_fd != new_fd:
            os.fsync(old_fd)
        return kept

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
        if flags & os.O_DIRECT:
            raise pyfuse3.FUSEError(errno.EINVAL)
        pending = self.inodes.pending_in(parent).get(name)
        if pending is not None and not flags & os.O_EXCL:
            # Created since the kernel's lookup and not committed yet: open that file.
            info = await self._open(pending, flags & ~os.O_CREAT, ctx)
            return info, self._looked_up(pending, self._stat(pending))
        self._check_name(parent, name)
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
        if self.store.rule(relpath).mode != "staged":
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
            stage = self.files.new_stage(relpath, stat.S_IMODE(mode), self._owner(parent, ctx))
            node = self.inodes.add(False, None, parent, name, stage)
        info = await self._open(node, flags, ctx, created=True)
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

    async def _open(self, node: Node, flags: int, ctx, created: bool = False) -> pyfuse3.FileInfo:
        handle, info = await self.files.open(node, flags, ctx, created)
        info.fh = self._fh(handle)
        return info

    @_errors
    async def read(self, fh, off, size):
        handle = self.handles[fh]
        if isinstance(handle, (GenerationReader, CacheReader)):
            return handle.read(off, size)
        if isinstance(handle, CacheWriter):
            return os.pread(handle.fd, size, off)
        return await self.files.read(handle, off, size)

    @_errors
    async def write(self, fh, off, buf):
        handle = self.handles[fh]
        if isinstance(handle, CacheWriter):
            return await self.cache_view.write(handle, off, buf)
        if isinstance(handle, (GenerationReader, CacheReader)):
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.files.write(handle, off, buf)

    @_errors
    async def fallocate(self, fh, mode, offset, length):
        # Reaches the daemon only with pyfuse3 carrying tools/pyfuse3.patch; without it the
        # kernel answers EOPNOTSUPP itself.
        handle = self.handles[fh]
        if not isinstance(handle, Handle):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # .backups and .cache files
        await self.files.fallocate(handle, mode, offset, length)

    @_errors
    async def flush(self, fh):
        handle = self.handles.get(fh)
        if isinstance(handle, CacheWriter):
            await self.cache_view.flush(handle)
        elif isinstance(handle, Handle):
            await self.files.flush(handle)

    @_errors
    async def fsync(self, fh, datasync):
        handle = self.handles[fh]
        if isinstance(handle, CacheWriter):
            await self.workers.run(os.fsync, handle.fd)
        elif isinstance(handle, Handle):
            await self.files.fsync(handle)

    @_errors
    async def release(self, fh):
        handle = self.handles.pop(fh)
        if isinstance(handle, CacheWriter):
            await self.cache_view.release(self.inodes, handle)
        elif isinstance(handle, (GenerationReader, CacheReader)):
            if handle.fd is not None:
                os.close(handle.fd)
            handle.node.handles -= 1
            self.inodes.maybe_free(handle.node)
        else:
            await self.files.release(handle)

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
            names = os.listdir(b"/proc/self/fd/%d" % node.fd)  # bytes names: no fsencode of each
            if node.ino == ROOT_INODE:
                names = [n for n in names if n not in _RESERVED]
                if self.options.show_virtual:
                    names.extend(_VIRTUAL_NAMES)
            listed = set(names)
            names.extend(n for n in self.inodes.pending_in(node) if n not in listed)
            names.sort()
            handle.entries = names
        pending = self.inodes.pending_in(node)
        root = node.ino == ROOT_INODE
        for i in range(start_id, len(handle.entries)):
            name = handle.entries[i]
            if root and name in _VIRTUAL_NAMES:
                child, st = self._virtual_root(name)
            elif name in pending:
                child = pending[name]
                st = self._stat(child)
            else:
                try:
                    child, st = self._named(node, name, os.stat(name, dir_fd=node.fd, follow_symlinks=False))
                except (OSError, pyfuse3.FUSEError):
                    continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, name, self._entry(child.ino, st, child), i + 1):
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


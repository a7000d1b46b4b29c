"""The inode table: fusestore's own nodes (kernel inodes), one per name, independent of the
backing st_ino.

A commit renames a staged file over its target, which gives the path a new backing inode; the
FUSE inode must not change with it, so nodes are ours and are found by (parent node, name). Hard
links get one node per name: a FUSE open carries no name, and a commit must replace the file
under the name it was written through while the other names keep the old content. A node's id
and the inode number it shows (`shown`) are apart: a name whose node is replaced (`Files.
_supersede`) keeps its number, and every name of one backing file shows one number (`HardLinks`).
Lookup counts follow the kernel exactly: every entry handed to the kernel adds one, `forget` takes
them away, and a node is freed only when the kernel has forgotten it, no handle is open on it and
(for a directory) no known child refers to it.

Directories hold an O_RDONLY directory fd: every operation below them is an `*at()` call on that
fd with O_NOFOLLOW, so renames in the backing tree cannot make us follow a path string into the
wrong place.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterator

import trio

from fusestore.engine.store import Stage

ROOT_INODE = 1


class Node:
    __slots__ = (
        "ino", "is_dir", "fd", "parent", "name", "lookups", "children", "handles",
        "stage", "writers", "readers", "lock", "pending", "former", "kill_setid", "backed_up",
        "refusal_recorded", "commits", "shown", "cached", "cache_key", "known", "moving", "heir", "awaited",
        "backing", "through",
    )

    def __init__(self, ino: int, is_dir: bool, fd: int | None):
        self.ino = ino
        self.is_dir = is_dir
        self.fd = fd  # directories only
        self.parent: Node | None = None  # None once the name is gone (unlinked, replaced)
        self.name = b""
        self.lookups = 0
        self.children = 0
        self.handles = 0
        self.stage: Stage | None = None  # the open version, shared by every writer (fs.files)
        self.writers: set = set()  # the write-capable handles that share the open version
        self.readers: set = set()  # the open read handles, each with its own fd
        # Where the name was before it went (renamed over, replaced): an open or stat that
        # raced with the rename reads what took the name's place, a complete version too.
        self.former: tuple[Node, bytes] | None = None
        self.lock: CommitLock | None = None
        self.pending = False  # a new file: only its staged copy exists until the first commit
        self.kill_setid = False  # an unprivileged process wrote the staged content
        self.backed_up = False  # this session of writers kept its backup generation already
        self.refusal_recorded = False  # the open version's content was refused and recorded
        self.commits = 0  # commits through this node: which version a read-only handle reads
        # The inode number stat(2) shows. A name keeps it when its node is replaced by a new one
        # (see Files.open: each version read through the page cache is its own kernel inode).
        self.shown = ino
        self.cached: set = set()  # read-only handles served from the kernel's page cache
        # The backing id (pyfuse3.backing_open) through which the kernel serves every handle in
        # `cached`, or in `through`, from the backing file itself (FUSE passthrough), or 0.
        self.backing = 0
        self.through: set = set()  # direct files: the handles served through `backing`
        self.cache_key: tuple | None = None  # the version they read (files.version_key)
        # The version (files.version_key) whose size the kernel was last given for the node,
        # by a reply or a commit through it: the size page-cache readers of the node read to.
        self.known: tuple | None = None
        self.moving = False  # renamed or renamed over right now (Operations.rename)
        self.heir: Node | None = None  # the node that took the name from this one (Files._supersede)
        self.awaited = False  # made for a writer the kernel is to retry with: no page cache yet

    @property
    def location(self) -> tuple["Node", bytes]:
        if self.parent is None:
            raise FileNotFoundError(errno.ENOENT, "the file has no name any more")
        return self.parent, self.name

    def relpath(self) -> str:
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return os.fsdecode(b"/".join(reversed(parts)))

    def commit_lock(self) -> "CommitLock":
        if self.lock is None:
            self.lock = CommitLock()
        return self.lock


class CommitLock:
    """Serializes the stage and commits of one file. Almost always free: taking it then costs
    no trip through trio's scheduler (trio.Lock checkpoints twice on every acquire)."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc) -> None:
        self._lock.release()


class VirtualNode:
    """A node of a virtual tree (`.backups`, `.cache`), served by its `view`. In `.backups`: a
    directory of a tree path, or one generation of a file."""

    __slots__ = ("ino", "key", "lookups", "handles", "relpath", "generation", "view")

    def __init__(self, ino: int, key: tuple, relpath: str, generation: int, view):
        self.ino = ino
        self.key = key
        self.lookups = 0
        self.handles = 0
        self.relpath = relpath
        self.generation = generation  # 0 for a directory
        self.view = view


class InodeTable:
    def __init__(self, root_fd: int):
        self._next = ROOT_INODE + 1
        self.root = Node(ROOT_INODE, True, root_fd)
        self.root.lookups = 1  # the kernel never forgets the root
        self.by_ino: dict[int, Node | VirtualNode] = {ROOT_INODE: self.root}
        self.by_name: dict[tuple[int, bytes], Node] = {}
        self.virtual: dict[tuple, VirtualNode] = {}
        self.pending: dict[int, dict[bytes, Node]] = {}  # directory inode -> new files in it
        self.links = HardLinks(self)

    def _ino(self) -> int:
        """A number never used before, as a node id or as a number a node shows."""
        ino = self._next
        self._next += 1
        return ino

    def get(self, ino: int) -> Node | VirtualNode | None:
        return self.by_ino.get(ino)

    def find(self, parent: Node, name: bytes) -> Node | None:
        return self.by_name.get((parent.ino, name))

    def add(self, is_dir: bool, fd: int | None, parent: Node, name: bytes, stage: Stage | None = None) -> Node:
        """A new node; with `stage`, a new file that exists only as that staged copy so far."""
        node = Node(self._ino(), is_dir, fd)
        self.by_ino[node.ino] = node
        self.place(node, parent, name)
        if stage is not None:
            node.stage = stage
            node.pending = True
            self.pending.setdefault(parent.ino, {})[name] = node
        return node

    def committed(self, node: Node) -> None:
        """A pending node's first commit put it in the tree."""
        if node.pending:
            node.pending = False
            self._drop_pending(node)

    def pending_in(self, parent: Node) -> dict[bytes, Node]:
        return self.pending.get(parent.ino, {})

    def _drop_pending(self, node: Node) -> None:
        if node.parent is None:
            return
        names = self.pending.get(node.parent.ino)
        if names is not None and names.get(node.name) is node:
            del names[node.name]
            if not names:
                del self.pending[node.parent.ino]

    def virtual_node(self, key: tuple, relpath: str, generation: int, view) -> VirtualNode:
        node = self.virtual.get(key)
        if node is None:
            node = VirtualNode(self._ino(), key, relpath, generation, view)
            self.virtual[key] = node
            self.by_ino[node.ino] = node
        return node

    # -- names -----------------------------------------------------------------------------

    def place(self, node: Node, parent: Node, name: bytes) -> None:
        """Give `node` the name `name` in `parent`; a node already there loses its name."""
        previous = self.by_name.get((parent.ino, name))
        if previous is not None and previous is not node:
            self.unplace(previous)
        self.unplace(node)
        node.parent, node.name = parent, name
        self.by_name[(parent.ino, name)] = node
        parent.children += 1

    def unplace(self, node: Node) -> None:
        """The node's name is gone (unlinked, renamed over, removed behind our back)."""
        parent = node.parent
        if parent is None:
            return
        self._drop_pending(node)
        if self.by_name.get((parent.ino, node.name)) is node:
            del self.by_name[(parent.ino, node.name)]
        node.former = (parent, node.name)
        node.parent = None
        parent.children -= 1
        self.maybe_free(parent)

    # -- lifetime --------------------------------------------------------------------------

    def forget(self, ino: int, count: int) -> None:
        node = self.by_ino.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups -= count
        self.maybe_free(node)
        if ino not in self.by_ino:
            self.links.forget(ino)

    def maybe_free(self, node: Node | VirtualNode) -> None:
        if node.ino == ROOT_INODE or node.lookups > 0 or node.handles > 0:
            return
        if isinstance(node, VirtualNode):
            self.virtual.pop(node.key, None)
            self.by_ino.pop(node.ino, None)
            return
        if node.children > 0 or node.stage is not None:
            return
        self.by_ino.pop(node.ino, None)
        if node.fd is not None:
            os.close(node.fd)
            node.fd = None
        self.unplace(node)
        heir, node.heir = node.heir, None
        if heir is not None:
            heir.lookups -= 1
            self.maybe_free(heir)

    def succeed(self, node: Node) -> Node:
        """A new node for `node`'s name, showing its number; `node` keeps its readers and no
        name. The heir is held while `node` lives: the kernel, finding another node under the
        name, forgets the one it looked up before it looks the name up again, and a node made
        anew then would show another number."""
        parent, name = node.location
        heir = self.add(False, None, parent, name)
        heir.shown = node.shown
        heir.lookups += 1
        node.heir = heir
        return heir

    def nodes(self) -> Iterator[Node]:
        for node in list(self.by_ino.values()):
            if isinstance(node, Node):
                yield node


class HardLinks:
    """The names known to the kernel of backing files with several hard links, by the backing
    file's (st_dev, st_ino), and the one inode number all of them show (git's local clone, tar,
    rsync -H and du tell hard links by it). Each name is its own node all the same, so the
    kernel caches each name's attributes apart: a change made through one name (chmod, link,
    unlink, a commit) must drop the others' (`others`). A commit through one name gives that
    name a file of its own: it then shows a number of its own (`broken`)."""

    def __init__(self, table: InodeTable):
        self._table = table
        self._names: dict[tuple[int, int], set[int]] = {}
        self._key: dict[int, tuple[int, int]] = {}
        self._number: dict[tuple[int, int], int] = {}

    def seen(self, node: Node, st: os.stat_result) -> None:
        """`node`'s name was stat'ed as `st`: keep track of it if the file has other links."""
        if st.st_nlink < 2 or node.is_dir:
            return
        key = (st.st_dev, st.st_ino)
        if self._key.get(node.ino, key) != key:
            self.forget(node.ino)
        self._key[node.ino] = key
        self._names.setdefault(key, set()).add(node.ino)
        node.shown = self._number.setdefault(key, node.shown)

    def linking(self, node: Node, st: os.stat_result) -> None:
        """A new name for `node`'s file (stat `st`) is being made: it shows node's number."""
        self._number.setdefault((st.st_dev, st.st_ino), node.shown)

    def others(self, st: os.stat_result | None, but: int | None = None) -> list[int]:
        """The nodes known to the kernel for the other names of the file `st` describes."""
        if st is None or stat.S_ISDIR(st.st_mode):  # symlinks and fifos can have hard links too
            return []
        key = (st.st_dev, st.st_ino)
        inos = self._names.get(key)
        if not inos:
            return []
        inos &= {ino for ino in inos if isinstance(self._table.get(ino), Node)}
        if not inos:
            self._drop(key)
            return []
        return [ino for ino in inos if ino != but]

    def broken(self, node: Node, st: os.stat_result) -> None:
        """A commit gave `node`'s name a new file; `st` is the file it had, which keeps its
        other names and their number."""
        key = (st.st_dev, st.st_ino)
        if self._key.get(node.ino) == key:
            self.forget(node.ino)
        if self._number.get(key) == node.shown:
            node.shown = self._table._ino()

    def forget(self, ino: int) -> None:
        key = self._key.pop(ino, None)
        names = self._names.get(key)
        if names is not None:
            names.discard(ino)
            if not names:
                self._drop(key)

    def _drop(self, key: tuple[int, int]) -> None:
        self._names.pop(key, None)
        self._number.pop(key, None)

"""The inode table: fusestore's own inode numbers, one per name, independent of the backing st_ino.

A commit renames a staged file over its target, which gives the path a new backing inode; the
FUSE inode number must not change with it, so nodes are ours and are found by (parent node,
name). Hard links get one node per name: a FUSE open carries no name, and a commit must replace
the file under the name it was written through while the other names keep the old content. The
price is that hard links show different inode numbers through the mount (st_nlink is still the
backing file's). Lookup counts follow the kernel exactly: every entry handed to the kernel adds
one, `forget` takes them away, and a node is freed only when the kernel has forgotten it, no
handle is open on it and (for a directory) no known child refers to it.

Directories hold an O_RDONLY directory fd: every operation below them is an `*at()` call on that
fd with O_NOFOLLOW, so renames in the backing tree cannot make us follow a path string into the
wrong place.
"""

from __future__ import annotations

import errno
import os
from typing import Iterator

import trio

from fusestore.engine.store import Stage

ROOT_INODE = 1


class Node:
    __slots__ = (
        "ino", "is_dir", "fd", "parent", "name", "lookups", "children", "handles",
        "stage", "writers", "readers", "lock", "pending", "former", "kill_setid", "backed_up",
        "refusal_recorded", "commits",
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

    def _ino(self) -> int:
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

    def nodes(self) -> Iterator[Node]:
        for node in list(self.by_ino.values()):
            if isinstance(node, Node):
                yield node

"""The inode table: fusestore's own inode numbers, independent of the backing st_ino.

A commit renames a staged file over its target, which gives the path a new backing inode; the
FUSE inode number must not change with it, so nodes are ours. A node is found by the backing
(st_dev, st_ino) it currently stands for (so hard links share one node) and is re-keyed when a
commit replaces its backing inode. Lookup counts follow the kernel exactly: every entry handed to
the kernel adds one, `forget` takes them away, and a node is freed only when the kernel has
forgotten it, no handle is open on it and (for a directory) no known child refers to it.

Directories hold an O_RDONLY directory fd: every operation below them is an `*at()` call on that
fd with O_NOFOLLOW, so renames in the backing tree cannot make us follow a path string into the
wrong place. Other nodes are reached through one of their names (`links`), which stays correct
when another hard link of the same file is removed.
"""

from __future__ import annotations

import os
from typing import Iterator

import trio

from fusestore.engine.store import Stage

ROOT_INODE = 1
_MAX_LINKS = 16


class Node:
    __slots__ = (
        "ino", "is_dir", "key", "fd", "links", "lookups", "children", "handles",
        "stage", "writers", "lock", "epoch", "cached", "__weakref__",
    )

    def __init__(self, ino: int, is_dir: bool, key: tuple[int, int], fd: int | None):
        self.ino = ino
        self.is_dir = is_dir
        self.key = key
        self.fd = fd  # directories only
        self.links: list[tuple[Node, bytes]] = []  # (parent, name); the last one is used
        self.lookups = 0
        self.children = 0
        self.handles = 0
        self.stage: Stage | None = None  # shared by every writer of this file
        self.writers = 0
        self.lock: trio.Lock | None = None
        self.epoch = 0  # commits since the node was made; see Filesystem.open
        self.cached: dict[int, int] = {}  # epoch -> open handles reading through the page cache

    @property
    def location(self) -> tuple["Node", bytes]:
        if not self.links:
            raise FileNotFoundError("the file has no name left")
        return self.links[-1]

    def relpath(self) -> str:
        parts = []
        node = self
        while node.links:
            parent, name = node.links[-1]
            parts.append(name)
            node = parent
        return os.fsdecode(b"/".join(reversed(parts)))

    def commit_lock(self) -> trio.Lock:
        if self.lock is None:
            self.lock = trio.Lock()
        return self.lock


class VirtualNode:
    """A node of the `.backups` tree: a directory of a tree path, or one generation of a file."""

    __slots__ = ("ino", "key", "lookups", "handles", "relpath", "generation")

    def __init__(self, ino: int, key: tuple, relpath: str, generation: int):
        self.ino = ino
        self.key = key
        self.lookups = 0
        self.handles = 0
        self.relpath = relpath
        self.generation = generation  # 0 for a directory


class InodeTable:
    def __init__(self, root_fd: int, root_key: tuple[int, int]):
        self._next = ROOT_INODE + 1
        self.root = Node(ROOT_INODE, True, root_key, root_fd)
        self.root.lookups = 1  # the kernel never forgets the root
        self.by_ino: dict[int, Node | VirtualNode] = {ROOT_INODE: self.root}
        self.by_key: dict[tuple, Node] = {root_key: self.root}
        self.virtual: dict[tuple, VirtualNode] = {}

    def _ino(self) -> int:
        ino = self._next
        self._next += 1
        return ino

    def __getitem__(self, ino: int) -> Node | VirtualNode:
        return self.by_ino[ino]

    def get(self, ino: int) -> Node | VirtualNode | None:
        return self.by_ino.get(ino)

    def find(self, key: tuple[int, int]) -> Node | None:
        return self.by_key.get(key)

    def add(self, st: os.stat_result, fd: int | None, parent: Node, name: bytes) -> Node:
        import stat as stat_mod

        node = Node(self._ino(), stat_mod.S_ISDIR(st.st_mode), (st.st_dev, st.st_ino), fd)
        self.by_ino[node.ino] = node
        self.by_key[node.key] = node
        self.add_link(node, parent, name)
        return node

    def virtual_node(self, key: tuple, relpath: str, generation: int) -> VirtualNode:
        node = self.virtual.get(key)
        if node is None:
            node = VirtualNode(self._ino(), key, relpath, generation)
            self.virtual[key] = node
            self.by_ino[node.ino] = node
        return node

    # -- names -----------------------------------------------------------------------------

    def add_link(self, node: Node, parent: Node, name: bytes) -> None:
        link = (parent, name)
        if link in node.links:
            node.links.remove(link)
            node.links.append(link)
            return
        if node.is_dir:
            # A directory has one name: a new one replaces the old.
            for old_parent, _ in node.links:
                self._drop_child(old_parent)
            node.links.clear()
        elif len(node.links) >= _MAX_LINKS:
            old_parent, _ = node.links.pop(0)
            self._drop_child(old_parent)
        node.links.append(link)
        parent.children += 1

    def remove_link(self, node: Node, parent: Node, name: bytes) -> None:
        try:
            node.links.remove((parent, name))
        except ValueError:
            return
        self._drop_child(parent)

    def _drop_child(self, parent: Node) -> None:
        parent.children -= 1
        self.maybe_free(parent)

    def rekey(self, node: Node, key: tuple[int, int]) -> None:
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        node.key = key
        self.by_key[key] = node

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
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        if node.fd is not None:
            os.close(node.fd)
            node.fd = None
        links, node.links = node.links, []
        for parent, _ in links:
            self._drop_child(parent)

    def nodes(self) -> Iterator[Node]:
        for node in list(self.by_ino.values()):
            if isinstance(node, Node):
                yield node

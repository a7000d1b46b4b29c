"""The mount's guarantees without a mount: a Python API over a tree, for containers and CI
runners without /dev/fuse, and for programs that would rather call than open files.

    from fusestore import tree

    with tree.open("/srv/pipeline") as t:          # a backing tree or a mount of one
        t.write_json("public/projects/p1/metadata.json", {...})   # validated, backed up, durable
        meta = t.read_json("public/projects/p1/metadata.json")
        script = t.read_json("public/projects/p1/scripts/topic-1.json", migrate=True)
        for g in t.backups("public/projects/p1/metadata.json"):
            print(g.generation, g.superseded, g.change)
        t.restore("public/projects/p1/metadata.json", generation=1)
        t.delete("public/projects/p1/old.json")     # kept as its backup generation 1
        print(t.diff("public/projects/p1/metadata.json").summary())
        for event in t.events(since=time.time() - 60, follow=False): ...

Every write goes the one commit path the CLI's `restore` takes (`trees.TreeWriter`): through
the mount when a daemon serves the tree, so the daemon validates, backs up, commits and tells
its readers and followers; otherwise directly through the engine (the same validation, backup
and atomic, durable commit) while holding the tree's lock, which is taken per write and waited
for while another writer holds it. Content its rule refuses raises `Rejected`, an OSError with
errno EBADMSG (what `close()` returns through the mount) carrying the reason; nothing changes.
"""

from __future__ import annotations

import datetime
import errno
import os
import time
from typing import Any, Iterator

import msgspec

from fusestore import control, projects
from fusestore.engine import config as config_mod
from fusestore.engine import diffs
from fusestore.engine.errors import FusestoreError
from fusestore.engine.jsontext import pretty
from fusestore.engine.paths import components, open_dir
from fusestore.engine.state import STATE_NAME, Busy
from fusestore.engine.store import Rejected as _Refused
from fusestore.engine.store import Store
from fusestore.events import Event
from fusestore.trees import TreeWriter, find_tree, fusestore_mounts

__all__ = ["open", "Tree", "Rejected", "Generation", "TreeError"]


class TreeError(FusestoreError):
    """Something the tree cannot do now (no daemon to stream events, the lock held too long)."""


class Rejected(OSError):
    """Content the file's rule refuses: errno EBADMSG, as `close()` through the mount fails.
    `reason` says why; `quarantined` names the refused bytes in the quarantine, if kept."""

    def __init__(self, path: str, reason: str, quarantined: str | None = None):
        super().__init__(errno.EBADMSG, f"{path} was rejected: {reason}")
        self.path = path
        self.reason = reason
        self.quarantined = quarantined


class Generation(msgspec.Struct, frozen=True):
    generation: int
    superseded: datetime.datetime
    size: int
    change: str  # what the version after it changed (Diff.summary)


def open(root: str | None = None, lock_timeout: float = 30.0) -> "Tree":  # noqa: A001
    """The tree `root` (a backing tree or a mount of one; default: the tree that holds the
    current directory)."""
    return Tree(find_tree(root), lock_timeout)


class Tree:
    def __init__(self, backing: str, lock_timeout: float = 30.0):
        self.backing = os.path.realpath(backing)
        self.lock_timeout = lock_timeout
        self.config = config_mod.load(self.backing)
        # Reads: backups, versions (no lock needed).
        self._store = Store(self.backing, self.config, control.host_of(self.backing))

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "Tree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def served(self) -> bool:
        """Whether a daemon serves the tree through a mount this process can see."""
        return any(os.path.realpath(b) == self.backing for _m, b in fusestore_mounts())

    def _writer(self) -> TreeWriter:
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                return TreeWriter(self.backing)
            except Busy as e:
                # Another writer holds the lock for a moment, or a daemon mounted meanwhile.
                if time.monotonic() > deadline:
                    raise TreeError(f"{e}; waited {self.lock_timeout:g}s") from None
                time.sleep(0.02)

    # -- writing ---------------------------------------------------------------------------

    def write(self, path: str, data: bytes) -> None:
        """Commit `data` as the new content of `path` (relative to the tree): validated by its
        rule, the old content kept as backup generation 1, atomic and durable on return."""
        relpath = "/".join(components(path))
        with self._writer() as writer:
            parent = relpath.rpartition("/")[0]
            if parent:
                writer.makedirs(parent)
            try:
                writer.write(relpath, data)
            except _Refused as e:
                raise Rejected(relpath, e.reason, e.quarantined) from None

    def write_json(self, path: str, document: Any) -> None:
        """`write` of `document` as pretty JSON (2-space indent, as the pipeline writes it)."""
        self.write(path, pretty(document))

    def delete(self, path: str) -> None:
        """Remove `path`, its content kept as backup generation 1 (`restore` brings it back)."""
        with self._writer() as writer:
            writer.delete("/".join(components(path)))

    def restore(self, path: str, generation: int = 1) -> None:
        """Commit backup `generation` of `path` as its content (the current content becomes
        generation 1). FileNotFoundError when there is no such generation."""
        relpath = "/".join(components(path))
        with self._writer() as writer:
            try:
                writer.restore(relpath, generation)
            except _Refused as e:
                raise Rejected(relpath, e.reason, e.quarantined) from None

    # -- reading ---------------------------------------------------------------------------

    def read(self, path: str) -> bytes:
        """The committed content of `path`."""
        return diffs.read_version(self._store, "/".join(components(path)), 0, limit=1 << 62)

    def exists(self, path: str) -> bool:
        return self._store.exists("/".join(components(path)))

    def list(self, path: str = "", suffix: str = "") -> list[str]:
        """The names in directory `path` (ending in `suffix`), sorted; the state directory is
        not among them."""
        parts = components(path)
        fd = open_dir(self._store.root_fd, parts)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        return sorted(n for n in names if n.endswith(suffix) and (parts or n != STATE_NAME))

    def read_json(self, path: str, migrate: bool = False) -> Any:
        """The decoded document; with `migrate`, a versioned document is brought to its
        schema's current version in memory (as `fusestore.projects.load` does)."""
        relpath = "/".join(components(path))
        data = self.read(relpath)
        if not migrate:
            return msgspec.json.decode(data)
        doc_type = self.config.rule_for(relpath).schema
        if doc_type is None:
            raise ValueError(f"{relpath} is not bound to a document schema")
        return projects.migrated(data, doc_type, relpath)

    def backups(self, path: str) -> list[Generation]:
        """The backup generations of `path`, newest (1) first."""
        relpath = "/".join(components(path))
        result = []
        for gen in self._store.backups.generations(relpath):
            when = datetime.datetime.fromtimestamp(gen.superseded_ns / 1e9)
            change = diffs.change_summary(self._store, relpath, gen.number)
            result.append(Generation(gen.number, when, gen.size, change))
        return result

    def diff(self, path: str, generation: int = 1) -> diffs.Diff:
        """What changed from backup `generation` to the current content."""
        return diffs.compare(self._store, "/".join(components(path)), generation, 0)

    def events(self, since: float | None = None, after: int | None = None, follow: bool = True) -> Iterator[Event]:
        """The daemon's change events (`fusestore events`): those kept since the time `since`
        or after the event numbered `after` (without either, from now on; with `follow=False`,
        all it keeps), then new ones as they come while `follow`. Needs a daemon."""
        if not self.served:
            raise TreeError(f"no mount serves {self.backing}: events come from the daemon of a mount")
        if not follow and since is None and after is None:
            after = 0
        return control.events(control.daemon_dir(self.backing), after, since, follow)

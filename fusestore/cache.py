"""The cache as a Python API, for programs that use fusestore without (or beside) a mount.

    from fusestore import cache

    with cache.open() as c:                       # the tree of the cwd, or cache.open("/srv/project")
        hit = c.get("https://example.com/a.jpg", {"w": 640})
        if hit is None:
            slot = c.acquire("pexels", limit=200, per_seconds=3600)
            ...download, then:
            hit = c.put("https://example.com/a.jpg", downloaded_bytes, "media", params={"w": 640})
        print(hit.path)

It is the same engine the mount's `.cache` directory serves, so every process (daemon, CLI, your
programs) shares one cache safely. See `fusestore.engine.cache` for the guarantees.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from fusestore import control
from fusestore.engine import config as config_mod
from fusestore.engine.cache import TYPES, Cache, CacheError, CacheStats, Entry, Slot, directory
from fusestore.engine.jskey import cache_key
from fusestore.trees import find_tree, fusestore_mounts

__all__ = ["open", "cache_key", "Cache", "CacheError", "CacheStats", "Entry", "Slot", "TYPES"]


def open(root: str | None = None, clock: Callable[[], float] = time.time) -> Cache:  # noqa: A001
    """The cache of the tree `root` (a backing tree or a mount of one; default: the tree that
    holds the current directory), configured by that tree's `fusestore.toml`."""
    backing = find_tree(root)
    config = config_mod.load(backing)
    c = Cache(directory(backing, config.cache), config.cache, clock=clock, host=control.host_of(backing))
    if any(os.path.realpath(b) == backing for _m, b in fusestore_mounts()):
        # Inserts and evictions made here reach the event stream of the daemon serving the tree.
        state = control.daemon_dir(backing)
        c.emit = lambda kind, path, **fields: control.note(state, kind, path, **fields)
    return c

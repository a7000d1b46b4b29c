"""Finding fusestore trees: the mounts on this machine, and the backing tree of a path.

Commands and the Python API that take no path of their own (`cache`, `status`) work on the tree
named by `--root` (a backing tree or a mount of one) or, without it, on the tree that holds the
current directory, found upward as git finds its repository.
"""

from __future__ import annotations

import os

from fusestore.engine.state import STATE_NAME


class TreeNotFound(Exception):
    """No backing tree or mount at or above the given directory."""


def _unescape_mountinfo(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fusestore_mounts() -> list[tuple[str, str]]:
    """(mountpoint, backing) of every fusestore mount on this machine."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 2 and rfields[0] == "fuse.fusestore":
                result.append((_unescape_mountinfo(fields[4]), _unescape_mountinfo(rfields[1])))
    return result


def mount_of(path: str) -> tuple[str, str] | None:
    """The fusestore mount that holds `path` (mountpoint, backing), or None."""
    real = os.path.realpath(path)
    best = None
    for mountpoint, backing in fusestore_mounts():
        if real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/"):
            if best is None or len(mountpoint) > len(best[0]):
                best = (mountpoint, backing)
    return best


def find_tree(root: str | None = None) -> str:
    """The backing tree for `root` (a backing tree or a mount of one, taken as given) or, without
    it, for the current directory: its mount's backing, or the nearest directory upward that
    holds a state directory."""
    start = os.path.realpath(root or os.getcwd())
    found = mount_of(start)
    if found:
        return found[1]
    if root is not None:
        if not os.path.isdir(start):
            raise TreeNotFound(f"{root} is not a directory")
        return start
    probe = start
    while True:
        if os.path.isdir(os.path.join(probe, STATE_NAME)):
            return probe
        if probe == "/":
            raise TreeNotFound(f"no fusestore tree at or above {start} (use --root)")
        probe = os.path.dirname(probe)

"""Projects of the pipeline's layout (spec 1.1), and reading their documents from Python.

    from fusestore import projects

    pid = projects.new_project("/srv/tree", name="octopus video")   # committed like any write
    script = projects.load("/srv/tree/public/projects/<id>/scripts/topic-1.json")  # migrated
"""

from __future__ import annotations

import os

import msgspec

from fusestore.engine import config as config_mod
from fusestore.engine import layout, schemas
from fusestore.engine.jsontext import pretty
from fusestore.trees import TreeWriter, find_tree, mount_of


def _document(data: dict) -> bytes:
    return pretty(data)


def new_project(root: str, name: str | None = None, parent: str = layout.DEFAULT_PARENT) -> str:
    """Create a project under `parent` of the tree `root` (through its mount when served);
    returns its id."""
    backing = find_tree(root)
    project_id = layout.new_project_id()
    base = f"{parent.strip('/')}/{project_id}" if parent.strip("/") else project_id
    with TreeWriter(backing) as writer:
        for sub in layout.DIRS:
            writer.makedirs(f"{base}/{sub}")
        for log_name in layout.LOGS:
            # Logs are appended through, not committed: an empty file is their start.
            writer.touch(f"{layout.logs_dir(base)}/{log_name}")
        for rel, doc in layout.skeleton(project_id, name).items():
            writer.write(f"{base}/{rel}", _document(doc))
    return project_id


def load(path: str, doc_type: str | None = None, as_struct: bool = False):
    """The document at `path`, migrated in memory to the current version (the file is not
    changed). `doc_type` defaults to the type its tree's rules bind the path to. Returns the
    decoded object with every field kept, or the schema's Struct with `as_struct`."""
    with open(path, "rb") as f:
        data = f.read()
    if doc_type is None:
        backing = find_tree(start=os.path.dirname(os.path.abspath(path)))
        relpath = os.path.relpath(os.path.realpath(path), backing)
        found = mount_of(os.path.dirname(os.path.abspath(path)))
        if found:
            relpath = os.path.relpath(os.path.abspath(path), found[0])
        doc_type = config_mod.load(backing).rule_for(relpath).schema
        if doc_type is None:
            raise ValueError(f"{path} is not bound to a document schema")
    return migrated(data, doc_type, path, as_struct)


def migrated(data: bytes, doc_type: str, where: str, as_struct: bool = False):
    """Document `data` of type `doc_type`, checked against its schema and migrated in memory
    to the current version (ValueError naming `where` when it does not pass)."""
    reason = schemas.check(doc_type, data)
    if reason is not None:
        raise ValueError(f"{where}: {reason}")
    document = schemas.MIGRATIONS.migrate(doc_type, msgspec.json.decode(data))
    return msgspec.convert(document, schemas.TYPES[doc_type]) if as_struct else document

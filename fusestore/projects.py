"""Projects of the pipeline's layout (spec 1.1), and reading their documents from Python.

    from fusestore import projects

    pid = projects.new_project("/srv/tree", name="octopus video")   # committed like any write
    script = projects.load("/srv/tree/public/projects/<id>/scripts/topic-1.json")  # migrated
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import time

import msgspec

from fusestore import config as config_mod
from fusestore.engine import schemas
from fusestore.trees import TreeWriter, find_tree

DEFAULT_PARENT = "public/projects"


def new_project_id(now: float | None = None) -> str:
    """`project-<epoch ms>-<8 hex>`, as spec 1.2's generateProjectId makes them."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"project-{ms}-{secrets.token_hex(4)}"


def _document(data: dict) -> bytes:
    return json.dumps(data, indent=2, ensure_ascii=False).encode() + b"\n"


def skeleton(project_id: str, name: str | None = None) -> dict[str, dict]:
    """The documents of a new project, by path relative to the project directory."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    metadata = {"projectId": project_id, "createdAt": created, "version": schemas.CURRENT, "status": "initialized"}
    if name:
        metadata["name"] = name
    empty = {"version": schemas.CURRENT, "topics": []}
    return {
        "metadata.json": metadata,
        "topics/discovered.json": empty,
        "topics/selected.json": empty,
        "topics/refined.json": empty,
    }


def new_project(root: str, name: str | None = None, parent: str = DEFAULT_PARENT) -> str:
    """Create a project under `parent` of the tree `root` (through its mount when served);
    returns its id."""
    backing = find_tree(root)
    project_id = new_project_id()
    base = f"{parent.strip('/')}/{project_id}" if parent.strip("/") else project_id
    with TreeWriter(backing) as writer:
        for sub in schemas.PROJECT_DIRS:
            writer.makedirs(f"{base}/{sub}")
        for log_name in schemas.PROJECT_LOGS:
            # Logs are appended through, not committed: an empty file is their start.
            writer.touch(f"{base}/logs/{log_name}")
        for rel, doc in skeleton(project_id, name).items():
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
        from fusestore.trees import mount_of

        found = mount_of(os.path.dirname(os.path.abspath(path)))
        if found:
            relpath = os.path.relpath(os.path.abspath(path), found[0])
        doc_type = config_mod.load(backing).rule_for(relpath).schema
        if doc_type is None:
            raise ValueError(f"{path} is not bound to a document schema")
    reason = schemas.check(doc_type, data)
    if reason is not None:
        raise ValueError(f"{path}: {reason}")
    document = schemas.MIGRATIONS.migrate(doc_type, msgspec.json.decode(data))
    return msgspec.convert(document, schemas.TYPES[doc_type]) if as_struct else document

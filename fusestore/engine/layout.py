"""The project layout (spec sections 1.1 and 1.2), in one place: which directories are projects,
which documents live where and which schema each follows, what a new project holds, and where a
project's logs go. The engine's rules (config), the record of events (store), check and repair
(maintenance) and `fusestore new-project` (projects) all read it from here.
"""

from __future__ import annotations

import secrets
import time

from fusestore.engine import schemas

PROJECT_PREFIX = "project-"  # a project is a directory named project-*, as spec 1.2 names them
DEFAULT_PARENT = "public/projects"  # where `fusestore new-project` puts projects

# Where the layout's documents live, as right-anchored globs (see config.Rule), and the document
# type each follows: the first that matches binds.
BINDINGS: tuple[tuple[str, str], ...] = (
    ("**/project-*/metadata.json", "project"),
    ("**/project-*/topics/discovered.json", "discovered-topics"),
    ("**/project-*/topics/selected.json", "selected-topics"),
    ("**/project-*/topics/refined.json", "refined-topics"),
    ("**/project-*/scripts/tags.json", "script-tags"),
    ("**/project-*/scripts/*.json", "script"),
    ("**/project-*/assets/audio/*.timestamps.json", "timestamps"),
    ("**/project-*/assets/*/*.metadata.json", "asset"),
    ("**/project-*/timeline.json", "timeline"),
)

TOPICS = ("topics/discovered.json", "topics/selected.json", "topics/refined.json")
REQUIRED_FILES = ("metadata.json", *TOPICS)  # `check` reports a project without one
DIRS = ("topics", "scripts", "assets/images", "assets/videos", "assets/audio", "assets/music", "logs")
LOGS = ("errors.log", "warnings.log", "pipeline.log")  # in <project>/logs, appended, never staged


def project_of(relpath: str) -> str | None:
    """The project directory (nearest `project-*` ancestor) that holds `relpath`, or None."""
    parts = relpath.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].startswith(PROJECT_PREFIX):
            return "/".join(parts[: i + 1])
    return None


def logs_dir(project: str) -> str:
    """Where the project's logs are (LOGS), relative to the tree."""
    return f"{project}/logs"


def new_project_id(now: float | None = None) -> str:
    """`project-<epoch ms>-<8 hex>`, as spec 1.2's generateProjectId makes them."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{PROJECT_PREFIX}{ms}-{secrets.token_hex(4)}"


def empty_topics() -> dict:
    """A topics document of a stage the pipeline has not reached yet."""
    return {"version": schemas.CURRENT, "topics": []}


def skeleton(project_id: str, name: str | None = None) -> dict[str, dict]:
    """The documents of a new project, by path relative to the project directory."""
    metadata = {"projectId": project_id, "createdAt": schemas.now_iso(), "version": schemas.CURRENT,
                "status": "initialized"}
    if name:
        metadata["name"] = name
    return {"metadata.json": metadata, **{topics: empty_topics() for topics in TOPICS}}

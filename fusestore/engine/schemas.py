"""The versioned documents of the project layout (spec sections 1.1 and 5): their schemas and
the migrations that bring old versions to the current one (where each lives: engine.layout).

Every document carries `version` ("1.0"). A commit of a document bound to a schema is accepted
when it is the current version and matches the schema, or when it is an older version that the
migration chain turns into a document that matches; it is rejected when `version` is missing, is
newer than fusestore knows, cannot be migrated, or does not match, with a reason that names the
field (`$.segments[0].text`). Fields a schema does not name are allowed and kept: documents are
never re-encoded from the Structs, and migrations work on the decoded objects.

Versions compare numerically, component by component ("1.10" is newer than "1.9").
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

import msgspec

CURRENT = "1.0"


def version_key(version: str) -> tuple[int, ...]:
    """"1.10" -> (1, 10); raises ValueError for anything that is not dotted numbers."""
    parts = version.split(".")
    if not version or not all(p.isdigit() for p in parts):
        raise ValueError(f"version {version!r} is not a dotted number like \"1.0\"")
    return tuple(int(p) for p in parts)


def now_iso() -> str:
    """Now, as the documents write times: ISO 8601 in UTC with milliseconds and a Z."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the documents -----------------------------------------------------------------------------


class Doc(msgspec.Struct, kw_only=True):
    version: str


class ProjectMetadata(Doc):
    """`<project>/metadata.json`."""

    projectId: str
    createdAt: str
    status: str
    name: str | None = None
    updatedAt: str | None = None


class Topic(msgspec.Struct, kw_only=True):
    id: str
    title: str
    score: float | None = None
    source: str | None = None
    url: str | None = None
    keywords: list[str] = []
    discoveredAt: str | None = None


class RefinedTopic(Topic, kw_only=True):
    angle: str | None = None
    outline: list[str] = []
    targetDurationSeconds: float | None = None


class DiscoveredTopics(Doc):
    """`topics/discovered.json`: stage 1, trending topics."""

    topics: list[Topic]


class SelectedTopics(Doc):
    """`topics/selected.json`: stage 2, the topics a user picked."""

    topics: list[Topic]
    selectedAt: str | None = None


class RefinedTopics(Doc):
    """`topics/refined.json`: stage 3, topics with an angle and outline."""

    topics: list[RefinedTopic]


class Segment(msgspec.Struct, kw_only=True):
    id: str
    text: str
    duration: float | None = None
    visualHints: list[str] = []
    tags: list[str] = []


class Script(Doc):
    """`scripts/{topic-id}.json`: a generated script, spoken segment by segment."""

    topicId: str
    title: str
    segments: list[Segment]
    createdAt: str | None = None
    metadata: dict[str, Any] = {}


class ScriptTags(Doc):
    """`scripts/tags.json`: media tags, for the whole project or per segment id."""

    tags: list[str] | dict[str, list[str]]


class AssetMetadata(Doc):
    """`assets/{images,videos,music}/{hash}.metadata.json`: where an asset came from."""

    url: str | None = None
    source: str | None = None
    tags: list[str] = []
    license: str | None = None
    width: int | None = None
    height: int | None = None
    durationSeconds: float | None = None


class WordTiming(msgspec.Struct, kw_only=True):
    word: str
    start: float
    end: float


class Timestamps(Doc):
    """`assets/audio/{segment-id}.timestamps.json`: word timings of a segment's speech."""

    words: list[WordTiming]
    segmentId: str | None = None


class Clip(msgspec.Struct, kw_only=True):
    asset: str | None = None
    start: float = 0.0
    end: float | None = None
    segmentId: str | None = None


class Track(msgspec.Struct, kw_only=True):
    type: str
    clips: list[Clip]


class Timeline(Doc):
    """`timeline.json`: the final edit, as tracks of clips."""

    tracks: list[Track]
    durationSeconds: float | None = None


TYPES: dict[str, type[Doc]] = {
    "project": ProjectMetadata,
    "discovered-topics": DiscoveredTopics,
    "selected-topics": SelectedTopics,
    "refined-topics": RefinedTopics,
    "script": Script,
    "script-tags": ScriptTags,
    "asset": AssetMetadata,
    "timestamps": Timestamps,
    "timeline": Timeline,
}



# -- migrations ---------------------------------------------------------------------------------


class Registry:
    """Migrations per document type, each from one version to the next."""

    def __init__(self, current: str = CURRENT):
        self.current = current
        self.steps: dict[str, dict[tuple[int, ...], tuple[str, Callable[[dict], dict]]]] = {}

    def register(self, doc_type: str, source: str, target: str) -> Callable:
        if version_key(target) <= version_key(source):
            raise ValueError(f"a migration must go forward, not {source} -> {target}")

        def add(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
            self.steps.setdefault(doc_type, {})[version_key(source)] = (target, fn)
            return fn

        return add

    def path(self, doc_type: str, version: str) -> list[tuple[str, str, Callable[[dict], dict]]]:
        """The chain of (from, to, fn) from `version` to the current version; ValueError if
        there is none."""
        chain = []
        steps = self.steps.get(doc_type, {})
        here = version
        while version_key(here) < version_key(self.current):
            step = steps.get(version_key(here))
            if step is None:
                raise ValueError(f"no migration of a {doc_type} document from version {here}")
            chain.append((here, step[0], step[1]))
            here = step[0]
        if version_key(here) != version_key(self.current):
            raise ValueError(f"the migrations of {doc_type} from {version} overshoot {self.current}")
        return chain

    def migrate(self, doc_type: str, data: dict) -> dict:
        """`data` brought to the current version (a new dict; `data` is not changed)."""
        version = data.get("version")
        for _source, target, fn in self.path(doc_type, version):
            data = fn(dict(data))
            data["version"] = target
        return data


MIGRATIONS = Registry()


@MIGRATIONS.register("script", "0.8", "0.9")
def _script_text_field(data: dict) -> dict:
    # 0.8 called a segment's spoken text `content`.
    data["segments"] = [
        {("text" if k == "content" else k): v for k, v in seg.items()} if isinstance(seg, dict) else seg
        for seg in data.get("segments", [])
    ]
    return data


@MIGRATIONS.register("script", "0.9", "1.0")
def _script_created_at(data: dict) -> dict:
    # Spec 5.1's example: metadata became an object of its own, `timestamp` became `createdAt`.
    data["metadata"] = data.get("metadata") or {}
    data["createdAt"] = data.pop("timestamp", None) or data.get("createdAt") or now_iso()
    return data


@MIGRATIONS.register("project", "0.9", "1.0")
def _project_created_at(data: dict) -> dict:
    data["createdAt"] = data.pop("timestamp", None) or data.get("createdAt") or now_iso()
    data.setdefault("status", "initialized")
    return data


# -- checking -----------------------------------------------------------------------------------


class _Versioned(msgspec.Struct):
    version: Any = msgspec.UNSET


_version_decoder = msgspec.json.Decoder(_Versioned)
_decoders = {name: msgspec.json.Decoder(struct) for name, struct in TYPES.items()}


def check(doc_type: str, data: bytes | memoryview, registry: Registry = MIGRATIONS) -> str | None:
    """Why the JSON document `data` is not an acceptable `doc_type` document, or None."""
    struct = TYPES.get(doc_type)
    if struct is None:
        return f"unknown document type {doc_type!r}"
    try:
        version = _version_decoder.decode(data).version
    except msgspec.DecodeError as e:
        return _reason(e)
    if version is msgspec.UNSET:
        return "missing required field `version`"
    if not isinstance(version, str):
        return f"`version` must be a string like \"{registry.current}\", not {type(version).__name__}"
    try:
        key = version_key(version)
    except ValueError as e:
        return str(e)
    if key > version_key(registry.current):
        return f"version {version} is newer than this fusestore knows ({doc_type} {registry.current})"
    if key == version_key(registry.current):
        try:
            _decoders[doc_type].decode(data)
        except msgspec.ValidationError as e:
            return _reason(e)
        return None
    try:
        migrated = registry.migrate(doc_type, msgspec.json.decode(data))
        msgspec.convert(migrated, struct)
    except ValueError as e:  # no migration path
        return f"version {version}: {e}"
    except msgspec.ValidationError as e:
        return f"version {version}, migrated to {registry.current}: {_reason(e)}"
    return None


def _reason(e: Exception) -> str:
    text = str(e)
    return text.replace("Object missing required field", "missing required field").replace("JSON is malformed: ", "")


def behind(doc_type: str, data: bytes, registry: Registry = MIGRATIONS) -> str | None:
    """The document's version when it is older than the current one, else None."""
    try:
        version = _version_decoder.decode(data).version
        if isinstance(version, str) and version_key(version) < version_key(registry.current):
            return version
    except (msgspec.DecodeError, ValueError):
        pass
    return None


def export(directory: str) -> list[str]:
    """Write a JSON Schema file per document type into `directory`; returns their paths."""
    import os

    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, struct in TYPES.items():
        schema = msgspec.json.schema(struct)
        schema["$id"] = f"https://fusestore.invalid/schemas/{name}.schema.json"
        schema["title"] = f"fusestore {name} document, version {CURRENT}"
        path = os.path.join(directory, f"{name}.schema.json")
        with open(path, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(schema), indent=2) + b"\n")
        paths.append(path)
    return paths

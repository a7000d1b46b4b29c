"""The configuration: `fusestore.toml` in the backing tree, or a file given with `--config`.

Owns the rules that decide, for each path, how a write is validated, whether backups are kept
and whether the file is staged, written in place (`direct`) or appended through. Decoding is
strict: an unknown key or a value of the wrong type stops the mount with a message that names it.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import tomllib
from typing import Literal

import msgspec

from fusestore.engine.errors import FusestoreError
from fusestore.engine.layout import BINDINGS
from fusestore.engine.schemas import TYPES

CONFIG_NAME = "fusestore.toml"


class ConfigError(FusestoreError):
    """The configuration file cannot be used; the message names the file and the key."""


class Rule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How writes to the paths matching `glob` are handled.

    A glob without a slash matches the file name in any directory; a glob with a slash matches
    the whole path relative to the backing tree (`*` also crosses directories there); a glob
    that starts with `**/` matches the trailing components of the path, one `*` per component
    (`**/project-*/timeline.json`). `schema` names a document type (see engine.schemas) that the
    content must match; it implies `validate = "json"`.
    """

    glob: str
    validate: Literal["json", "none"] = "none"
    backups: bool = True
    mode: Literal["staged", "direct", "append"] = "staged"
    schema: str | None = None

    def __post_init__(self) -> None:
        if self.schema is not None:
            if self.schema not in TYPES:
                raise ValueError(f"rule {self.glob!r}: unknown schema {self.schema!r} (known: {', '.join(TYPES)})")
            if self.validate != "json":
                object.__setattr__(self, "validate", "json")

    def regex(self) -> str:
        """A regular expression for the relative paths this rule matches."""
        if self.glob.startswith("**/"):
            return "(?:.*/)?" + "/".join(_glob_regex(part, crosses=False) for part in self.glob[3:].split("/"))
        if "/" in self.glob:
            return _glob_regex(self.glob, crosses=True)
        return "(?:.*/)?" + _glob_regex(self.glob, crosses=False)


def _glob_regex(glob: str, crosses: bool) -> str:
    """`glob` as fnmatch reads it (`*`, `?`, `[...]`, `[!...]`), as a regular expression whose
    `*` and `?` match `/` only when `crosses`."""
    one = "." if crosses else "[^/]"
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        i += 1
        if c == "*":
            if not out or out[-1] != one + "*":
                out.append(one + "*")
        elif c == "?":
            out.append(one)
        elif c == "[":
            end = i + (glob[i:i + 1] == "!")
            end += glob[end:end + 1] == "]"
            end = glob.find("]", end)
            if end < 0:
                out.append(re.escape(c))
                continue
            # fnmatch's own translation of the set (ranges, negation, escapes), unwrapped
            # from its "(?s:...)\\Z".
            out.append(("" if crosses else "(?!/)") + fnmatch.translate(glob[i - 1:end + 1])[4:-3])
            i = end + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


@functools.lru_cache(maxsize=64)
def _rule_matcher(rules: tuple[Rule, ...]) -> re.Pattern:
    """One expression for all `rules`: its group `r<i>` matches when rule i is the first that
    matches (alternatives are tried in order)."""
    return re.compile(r"\A(?:" + "|".join(f"(?P<r{i}>{rule.regex()})" for i, rule in enumerate(rules)) + r")\Z",
                      re.DOTALL)


class Backups(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    keep: int = 3  # generations kept per file
    max_age_days: float = 7.0  # `gc` drops older generations, but never generation 1 of a live file
    # Space all generations may take on disk; past it the oldest go first (never generation 1
    # of a live file). A size ("10GiB") or a number of bytes.
    max_bytes: str | int = "10GiB"

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError("backups.keep must be at least 1")
        if self.max_age_days <= 0:
            raise ValueError("backups.max_age_days must be positive")
        if self.budget <= 0:
            raise ValueError("backups.max_bytes must be positive")

    @property
    def budget(self) -> int:
        return parse_size(self.max_bytes)


class Mount(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Seconds the kernel may cache names and attributes. fusestore invalidates what it commits
    # itself, so these only bound how long a change made behind the mount's back stays unseen.
    attr_timeout: float = 5.0
    entry_timeout: float = 5.0
    # Read-only opens of committed files that nobody writes read through the kernel's page
    # cache (shared maps work, repeated reads stay in the kernel).
    page_cache: bool = True
    # Those reads served by the kernel from the backing file itself (FUSE passthrough), where
    # the kernel (6.9 or later), libfuse (3.17 or later) and the daemon's privileges allow it.
    passthrough: bool = True
    # After each commit, an IN_MODIFY for inotify watchers of the file (fs/watchers.py): one
    # more request per commit.
    notify_watchers: bool = True
    # Events the daemon keeps for `fusestore events --since` and for followers that fall
    # behind (one that falls further is dropped with a marker).
    events_kept: int = 10000

    def __post_init__(self) -> None:
        if self.attr_timeout < 0 or self.entry_timeout < 0:
            raise ValueError("mount timeouts must not be negative")
        if self.events_kept < 1:
            raise ValueError("mount.events_kept must be at least 1")


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes from `10GiB`, `512 MB`, `1.5G` or a plain number; every unit is binary (1K = 1024)."""
    if isinstance(text, int):
        return text
    number = text.strip().lower().rstrip("bkmgti ")
    unit = text.strip().lower()[len(number):].strip()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {text!r} (use B, KiB, MiB, GiB or TiB)")
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None


class Cache(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The media and TTS cache (`.cache` in the mount, `fusestore cache`, `fusestore.cache`)."""

    # Where entries live: relative paths are taken from the backing tree. Several trees may
    # share one directory. Default: `.fusestore/cache` of the tree.
    dir: str | None = None
    max_size: str | int = "10GiB"
    media_days: float = 30.0
    tts_days: float = 90.0

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError("cache.max_size must be positive")
        if self.media_days <= 0 or self.tts_days <= 0:
            raise ValueError("cache.media_days and cache.tts_days must be positive")

    @property
    def max_bytes(self) -> int:
        return parse_size(self.max_size)

    def expiry_seconds(self, kind: str) -> float:
        return (self.media_days if kind == "media" else self.tts_days) * 86400.0


def _schema_rules() -> tuple[Rule, ...]:
    return tuple(Rule(glob=glob, validate="json", schema=name) for glob, name in BINDINGS)


# Files that keep their own consistency (SQLite's journal, WAL and locks) are written in place.
# A database keeps a backup when it is deleted or renamed over; its side files, which SQLite
# makes and removes with every transaction, do not.
_DIRECT_RULES = (
    *(Rule(glob=g, mode="direct") for g in ("*.db", "*.sqlite", "*.sqlite3")),
    *(Rule(glob=g, mode="direct", backups=False) for g in ("*-journal", "*-wal", "*-shm")),
)

DEFAULT_RULES: tuple[Rule, ...] = (
    *_schema_rules(),
    *_DIRECT_RULES,
    Rule(glob="*.log", mode="append", backups=False),
    Rule(glob="*.json", validate="json"),
    Rule(glob="*"),
)


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    rules: tuple[Rule, ...] = ()
    backups: Backups = Backups()
    mount: Mount = Mount()
    cache: Cache = Cache()

    def rule_for(self, relpath: str) -> Rule:
        """The first matching rule: the file's own rules first, then the defaults."""
        rules = self.rules + DEFAULT_RULES
        found = _rule_matcher(rules).match(relpath)
        return rules[int(found.lastgroup[1:])] if found is not None else DEFAULT_RULES[-1]


def load(backing: str, path: str | None = None) -> Config:
    """Read `path`, or `BACKING/fusestore.toml` when it exists, or return the defaults."""
    if path is None:
        candidate = os.path.join(backing, CONFIG_NAME)
        if not os.path.isfile(candidate):
            return Config()
        path = candidate
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    # TOML spells a list of tables [[rule]]; accept that name for the `rules` field.
    if "rule" in raw:
        raw["rules"] = raw.pop("rule")
    try:
        return msgspec.convert(raw, Config)
    except (msgspec.ValidationError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None

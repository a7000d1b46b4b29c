"""Whole-tree maintenance: the integrity check and its repairs, migrations, and gc.

`check` only reads (the daemon runs it in the background at mount). `repair` and `migrate`
write every change as an ordinary commit through a `TreeWriter`, so each replaced version is a
backup and the change can be undone with `fusestore restore`.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from typing import Callable, Iterator

import msgspec

from fusestore.engine import layout, schemas
from fusestore.engine.cache import Cache, directory
from fusestore.engine.jsontext import pretty
from fusestore.engine.layout import project_of
from fusestore.engine.state import BACKUPS_NAME, CACHE_NAME, STATE_NAME
from fusestore.engine.store import Rejected, Store

log = logging.getLogger(__name__)

# Kinds of finding. Those in NEEDS_REPAIR keep `check` at exit status 1.
INVALID = "invalid"            # a document that does not parse or fails its schema
MISSING = "missing"            # a required project file is missing
STAGED = "staged"              # staged data left by a daemon that stopped (tree not served)
OUTDATED = "outdated"          # a document behind the current version: `fusestore migrate`
QUARANTINED = "quarantined"    # rejected or orphaned bytes waiting in the quarantine
DAMAGED_BACKUP = "damaged-backup"  # a backup generation that fails its rule
SHADOWED = "shadowed"          # a real .backups or .cache at the root, hidden by the mount's own
NEEDS_REPAIR = (INVALID, MISSING, STAGED, SHADOWED)


class Finding(msgspec.Struct, frozen=True):
    kind: str
    path: str
    detail: str
    repaired: bool = False


class Report(msgspec.Struct):
    findings: list[Finding]
    checked_files: int
    projects: int

    @property
    def unrepaired(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in NEEDS_REPAIR and not f.repaired]


def tree_files(store: Store) -> Iterator[tuple[str, int, str]]:
    """(relpath, dir fd, name) of every regular file of the tree, without following symlinks
    and without the state directory."""
    for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=store.root_fd):
        rel_dir = dirpath[2:] if dirpath.startswith("./") else ""
        if not rel_dir:
            dirnames[:] = [d for d in dirnames if d != STATE_NAME]
        dirnames.sort()
        for name in sorted(filenames):
            try:
                if not stat.S_ISREG(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                    continue
            except FileNotFoundError:
                continue
            yield (f"{rel_dir}/{name}" if rel_dir else name), dfd, name


def check(store: Store, served: bool, progress: Callable[[int], None] | None = None) -> Report:
    """Everything wrong with the tree, read-only."""
    findings: list[Finding] = []
    projects: set[str] = set()
    count = 0
    for relpath, dfd, name in tree_files(store):
        project = project_of(relpath)
        if project is not None:
            projects.add(project)
        rule = store.rule(relpath)
        if rule.validate == "none":
            continue
        count += 1
        if progress:
            progress(count)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        except OSError as e:
            findings.append(Finding(INVALID, relpath, f"cannot be read: {e.strerror}"))
            continue
        try:
            reason = store.check_fd(relpath, fd)
            if reason is not None:
                findings.append(Finding(INVALID, relpath, reason))
            elif rule.schema is not None:
                old = schemas.behind(rule.schema, os.pread(fd, 1 << 20, 0) if os.fstat(fd).st_size <= 1 << 20 else b"")
                if old is not None:
                    findings.append(Finding(OUTDATED, relpath, f"version {old}, current {schemas.CURRENT}"))
        finally:
            os.close(fd)
    for name in (BACKUPS_NAME, CACHE_NAME):
        try:
            os.stat(name, dir_fd=store.root_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        findings.append(Finding(SHADOWED, name, f"is in the backing tree, where the mount shows its own virtual "
                                f"{name}: rename it in the backing tree to reach what it holds"))
    for project in sorted(projects):
        for required in layout.REQUIRED_FILES:
            relpath = f"{project}/{required}"
            try:
                os.stat(relpath, dir_fd=store.root_fd, follow_symlinks=False)
            except FileNotFoundError:
                findings.append(Finding(MISSING, relpath, "required project file is missing"))
    if not served:
        for name in store.leftover_stages():
            findings.append(Finding(STAGED, name, "staged data of a write that never committed"))
    for name in store.quarantine_entries():
        findings.append(Finding(QUARANTINED, name, "in .fusestore/quarantine"))
    for relpath in store.backups.paths():
        for gen in store.backups.generations(relpath):
            reason = store.check_generation(relpath, gen.number)
            if reason is not None:
                findings.append(Finding(DAMAGED_BACKUP, f"{relpath}@{gen.number}", reason))
    return Report(findings, count, len(projects))


def repair(report: Report, writer, store: Store) -> Report:
    """Restore each invalid or missing file from its newest valid backup generation, as a
    commit; quarantine leftover staged data. Returns the report with what was repaired."""
    result = []
    for finding in report.findings:
        if finding.kind in (INVALID, MISSING):
            gen = _newest_valid(store, finding.path)
            project = project_of(finding.path)
            if gen is None and finding.kind == MISSING and project and finding.path[len(project) + 1:] in layout.TOPICS:
                # A stage the pipeline has not reached yet: the empty document a new project has.
                gen = 0, pretty(layout.empty_topics())
            if gen is None:
                result.append(Finding(finding.kind, finding.path, finding.detail + "; no valid backup to restore"))
                continue
            number, data = gen
            try:
                writer.write(finding.path, data)
            except (Rejected, OSError) as e:
                result.append(Finding(finding.kind, finding.path, f"{finding.detail}; restoring failed: {e}"))
                continue
            store.project_event(finding.path, "warnings.log", "warning", "repaired", problem=finding.detail,
                                generation=number)
            how = f"restored generation {number}" if number else "recreated empty"
            log.warning("repaired %s: %s (%s)", finding.path, how, finding.detail)
            result.append(Finding(finding.kind, finding.path, f"{finding.detail}; {how}", True))
        else:
            result.append(finding)
    if any(f.kind == STAGED for f in result):
        store.recover()  # the caller holds the tree's lock: no daemon is writing
        result = [Finding(f.kind, f.path, f.detail + "; moved to the quarantine", True) if f.kind == STAGED else f
                  for f in result]
    return Report(result, report.checked_files, report.projects)


def _newest_valid(store: Store, relpath: str) -> tuple[int, bytes] | None:
    for gen in store.backups.generations(relpath):
        if store.check_generation(relpath, gen.number) is None:
            fd = store.backups.open_generation(relpath, gen.number)
            try:
                return gen.number, os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
    return None


class Migration(msgspec.Struct, frozen=True):
    path: str
    type: str
    source: str
    target: str
    error: str | None = None


def migrate(store: Store, writer, dry_run: bool, progress: Callable[[int, int], None] | None = None) -> list[Migration]:
    """Every document behind the current version, migrated and committed (unless `dry_run`);
    a document that cannot be migrated is reported and left unchanged."""
    todo = []
    for relpath, dfd, name in tree_files(store):
        rule = store.rule(relpath)
        if rule.schema is None:
            continue
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        old = schemas.behind(rule.schema, data)
        if old is not None:
            todo.append((relpath, rule.schema, old, data))
    results = []
    for i, (relpath, doc_type, old, data) in enumerate(todo, 1):
        if progress:
            progress(i, len(todo))
        error = None
        try:
            migrated = schemas.MIGRATIONS.migrate(doc_type, msgspec.json.decode(data))
            encoded = pretty(migrated)
            reason = schemas.check(doc_type, encoded)
            if reason is not None:
                raise ValueError(reason)
            if not dry_run:
                writer.write(relpath, encoded)
                log.info("migrated %s from %s to %s", relpath, old, schemas.CURRENT)
        except (ValueError, msgspec.DecodeError, Rejected, OSError) as e:
            error = str(e)
            log.warning("could not migrate %s from %s: %s", relpath, old, error)
        results.append(Migration(relpath, doc_type, old, schemas.CURRENT, error))
    return results


class GcReport(msgspec.Struct):
    backups_removed: int
    backups_over_budget: int  # of those, dropped to keep backups under backups.max_bytes
    backup_bytes: int  # what the generations left take on disk
    cache_expired: int


def gc(store: Store) -> GcReport:
    """Drop backup generations older than `backups.max_age_days`, then the oldest while backups
    take more than `backups.max_bytes` (never generation 1 of a file that still exists), and
    expired cache entries."""
    cutoff = time.time_ns() - int(store.config.backups.max_age_days * 86400e9)
    removed = store.backups.expire(cutoff, store.exists)
    over = store.keep_backups_in_budget()
    with Cache(directory(store.backing, store.config.cache), store.config.cache, verify=True,
               host=store.state.host) as cache:
        expired = cache.gc()
    return GcReport(removed + over, over, store.backups.usage(), expired)

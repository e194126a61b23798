"""The store's kept indexes: tables beside diskcache's own in its SQLite database, changed in the
same transaction as the content they describe, so that commands and upkeep read what they need
instead of walking every key.

- `hc_blob` (digest, size), `hc_manifest` (digest): what the store holds.
- `hc_ref` (manifest, child, blob): what each manifest names: its blobs (config and layers), or,
  for an index, its platform manifests; indexed by child, to find who uses a blob.
- `hc_tag` (kind, registry, repository, tag, digest, checked): every tag, in name order, and
  indexed by digest, to find the tags that lead to a manifest.
- `hc_count`: blobs, blob bytes, manifests, tags, repositories, kept by triggers on the tables
  above (so no writer can forget one); `hc_repo` counts the tags of each tagged repository.
- `hc_meta`: the schema version; a store without it is indexed once, when first opened.

Why tables and not more diskcache keys: diskcache keys are pickled, so SQLite can neither order
nor filter them; a table with its own indexes answers "the tags of this repository after this
one" or "the manifests using this blob" with one index search each.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..registry import manifests

logger = logging.getLogger(__name__)

SCHEMA = 1
PROGRESS_LINES = 10  # while indexing an older store: a line at every tenth of its entries
SQL = Callable[..., sqlite3.Cursor]

_TABLES = """
CREATE TABLE IF NOT EXISTS hc_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hc_count (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hc_blob (digest TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hc_manifest (digest TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hc_ref (
    manifest TEXT NOT NULL, child TEXT NOT NULL, blob INTEGER NOT NULL, PRIMARY KEY (manifest, child)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hc_ref_child ON hc_ref (child, blob);
CREATE TABLE IF NOT EXISTS hc_tag (
    kind TEXT NOT NULL, registry TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL,
    digest TEXT NOT NULL, checked REAL NOT NULL, PRIMARY KEY (kind, registry, repository, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hc_tag_digest ON hc_tag (digest);
CREATE TABLE IF NOT EXISTS hc_repo (
    registry TEXT NOT NULL, repository TEXT NOT NULL, tags INTEGER NOT NULL, PRIMARY KEY (registry, repository)
) WITHOUT ROWID;
INSERT OR IGNORE INTO hc_count VALUES ('blobs', 0), ('blob_bytes', 0), ('manifests', 0), ('tags', 0), ('repositories', 0);
CREATE TRIGGER IF NOT EXISTS hc_blob_insert AFTER INSERT ON hc_blob BEGIN
    UPDATE hc_count SET value = value + 1 WHERE name = 'blobs';
    UPDATE hc_count SET value = value + NEW.size WHERE name = 'blob_bytes';
END;
CREATE TRIGGER IF NOT EXISTS hc_blob_update AFTER UPDATE OF size ON hc_blob BEGIN
    UPDATE hc_count SET value = value + NEW.size - OLD.size WHERE name = 'blob_bytes';
END;
CREATE TRIGGER IF NOT EXISTS hc_blob_delete AFTER DELETE ON hc_blob BEGIN
    UPDATE hc_count SET value = value - 1 WHERE name = 'blobs';
    UPDATE hc_count SET value = value - OLD.size WHERE name = 'blob_bytes';
END;
CREATE TRIGGER IF NOT EXISTS hc_manifest_insert AFTER INSERT ON hc_manifest BEGIN
    UPDATE hc_count SET value = value + 1 WHERE name = 'manifests';
END;
CREATE TRIGGER IF NOT EXISTS hc_manifest_delete AFTER DELETE ON hc_manifest BEGIN
    UPDATE hc_count SET value = value - 1 WHERE name = 'manifests';
    DELETE FROM hc_ref WHERE manifest = OLD.digest;
END;
CREATE TRIGGER IF NOT EXISTS hc_tag_insert AFTER INSERT ON hc_tag WHEN NEW.kind = 'tag' BEGIN
    UPDATE hc_count SET value = value + 1 WHERE name = 'tags';
    INSERT INTO hc_repo VALUES (NEW.registry, NEW.repository, 1) ON CONFLICT DO UPDATE SET tags = tags + 1;
END;
CREATE TRIGGER IF NOT EXISTS hc_tag_delete AFTER DELETE ON hc_tag WHEN OLD.kind = 'tag' BEGIN
    UPDATE hc_count SET value = value - 1 WHERE name = 'tags';
    UPDATE hc_repo SET tags = tags - 1 WHERE registry = OLD.registry AND repository = OLD.repository;
    DELETE FROM hc_repo WHERE registry = OLD.registry AND repository = OLD.repository AND tags = 0;
END;
CREATE TRIGGER IF NOT EXISTS hc_repo_insert AFTER INSERT ON hc_repo BEGIN
    UPDATE hc_count SET value = value + 1 WHERE name = 'repositories';
END;
CREATE TRIGGER IF NOT EXISTS hc_repo_delete AFTER DELETE ON hc_repo BEGIN
    UPDATE hc_count SET value = value - 1 WHERE name = 'repositories';
END;
"""


def indexed(sql: SQL) -> bool:
    try:
        row = sql("SELECT value FROM hc_meta WHERE name = 'schema'").fetchone()
    except sqlite3.OperationalError:
        return False  # no tables yet
    return row is not None and row[0] >= SCHEMA


def create(sql: SQL) -> None:
    statement = ""
    for line in _TABLES.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):  # executescript would commit the caller's transaction
            sql(statement)
            statement = ""


def build(sql: SQL, decode: Callable[[Any, Any], Any], fetch: Callable[[int, str | None, Any], Any]) -> None:
    """Index a store written before the indexes were kept: one walk of diskcache's rows (in a
    transaction the caller holds). `decode(key, raw)` gives a row's key, `fetch(mode, filename,
    value)` its value."""
    total = sql("SELECT COUNT(*) FROM Cache").fetchone()[0]
    if total:  # a new store has nothing to index
        logger.warning(f"hubcache: indexing the store once for this version of hubcache: {total} entries")
    start = time.monotonic()
    step = max(1, -(-total // PROGRESS_LINES))  # entries between two lines of progress
    walked = 0
    rows = sql("SELECT key, raw, size, mode, filename, value FROM Cache")
    while batch := rows.fetchmany(1000):
        for key, raw, size, mode, filename, value in batch:
            if walked and walked % step == 0:
                logger.warning(f"hubcache: indexing the store: {walked} of {total} entries ({walked * 100 // total} %)")
            walked += 1
            key = decode(key, raw)
            if not isinstance(key, tuple):
                continue
            if key[0] == "blob":
                add_blob(sql, key[1], size)
            elif key[0] == "manifest":
                media_type, body = fetch(mode, filename, value)
                add_manifest(sql, key[1], media_type, body)
            elif key[0] in ("tag", "single-tag"):
                digest, checked = fetch(mode, filename, value)
                _, registry, repository, tag = key
                set_tag(sql, key[0], registry, repository, tag, digest, checked)
    sql("INSERT OR REPLACE INTO hc_meta VALUES ('schema', ?)", (SCHEMA,))
    if total:
        logger.warning(f"hubcache: indexed the store in {time.monotonic() - start:.1f} s")


# Changes (inside the caller's transaction)


def add_blob(sql: SQL, digest: str, size: int) -> None:
    sql("INSERT INTO hc_blob VALUES (?, ?) ON CONFLICT DO UPDATE SET size = excluded.size", (digest, size))


def drop_blob(sql: SQL, digest: str) -> None:
    sql("DELETE FROM hc_blob WHERE digest = ?", (digest,))


def add_manifest(sql: SQL, digest: str, media_type: str, body: bytes) -> None:
    if sql("INSERT OR IGNORE INTO hc_manifest VALUES (?)", (digest,)).rowcount == 0:
        return  # held already, with its references
    try:
        refs = manifests.references(body, media_type)
    except manifests.ManifestError:
        return  # names nothing the store can follow
    rows = [(digest, c.digest, 0) for c in refs.children] + [(digest, b.digest, 1) for b in refs.blobs]
    for row in rows:
        sql("INSERT OR IGNORE INTO hc_ref VALUES (?, ?, ?)", row)


def drop_manifest(sql: SQL, digest: str) -> None:
    sql("DELETE FROM hc_manifest WHERE digest = ?", (digest,))  # its references go with it (trigger)


def set_tag(sql: SQL, kind: str, registry: str, repository: str, tag: str, digest: str, checked: float) -> None:
    sql(
        "INSERT INTO hc_tag VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET digest = excluded.digest, checked = excluded.checked",
        (kind, registry, repository, tag, digest, checked),
    )


def drop_tag(sql: SQL, kind: str, registry: str, repository: str, tag: str) -> None:
    sql("DELETE FROM hc_tag WHERE kind = ? AND registry = ? AND repository = ? AND tag = ?", (kind, registry, repository, tag))


# Reads


def counts(sql: SQL) -> dict[str, int]:
    return dict(sql("SELECT name, value FROM hc_count").fetchall())


def users(sql: SQL, child: str, blob: bool) -> list[str]:
    """The manifests naming `child`: as a blob (config or layer), or as a platform manifest."""
    return [row[0] for row in sql("SELECT manifest FROM hc_ref WHERE child = ? AND blob = ?", (child, int(blob)))]


def named(sql: SQL, manifest: str, blob: bool) -> list[str]:
    """What `manifest` names: its blobs, or its platform manifests."""
    return [row[0] for row in sql("SELECT child FROM hc_ref WHERE manifest = ? AND blob = ?", (manifest, int(blob)))]


def tags_naming(sql: SQL, digests: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """(kind, registry, repository, tag) of every tag whose digest is one of `digests`."""
    found = []
    for digest in digests:
        found += sql("SELECT kind, registry, repository, tag FROM hc_tag WHERE digest = ?", (digest,)).fetchall()
    return found


def tag_page(
    sql: SQL, kind: str, after: tuple[str, str, str] | None, limit: int, registry: str | None, match: Callable[[str, str, str], bool] | None
) -> list[tuple[str, str, str, str, float]]:
    """Up to `limit` tags of `kind` in name order after `after`: (registry, repository, tag,
    digest, checked). Reads only as far as the page needs (keyset paging on the primary key)."""
    query = "SELECT registry, repository, tag, digest, checked FROM hc_tag WHERE kind = ?"
    params: list[Any] = [kind]
    if registry is not None:
        query += " AND registry = ?"
        params.append(registry)
    if after is not None:
        query += " AND (registry, repository, tag) > (?, ?, ?)"
        params += after
    query += " ORDER BY registry, repository, tag"
    rows = sql(query, params)
    page: list[tuple[str, str, str, str, float]] = []
    while len(page) < limit and (batch := rows.fetchmany(256)):
        page += [row for row in batch if match is None or match(*row[:3])]
    return page[:limit]

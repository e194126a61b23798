"""The content store: blobs and manifests by digest, and the tag index, in one diskcache folder.
Nothing is visible under a digest before it verified (a blob is committed by rename), it is safe
across threads and processes, its files are its owner's only, and it knows nothing of HTTP. Its
indexes (index.py) change in the same transaction as the content."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import diskcache
from diskcache.core import MODE_BINARY, UNKNOWN

from ..registry.protocol import digest_of, hash_digest, hasher
from . import index

logger = logging.getLogger(__name__)

UNLIMITED = 2**62
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_LIVE_TEMP_DIRS: set[Path] = set()  # temporary folders of the stores open in this process
STRAY_AGE = 3600.0  # seconds unwritten before a file no entry names counts as left behind
# What SQLite may keep in memory per connection; diskcache opens one per thread, and the proxy
# reads the store from several. No map of the database file: diskcache's default maps its first
# 64 MB in every connection, and each page read through a map stays in the process's RSS once per
# map that read it (an eviction pass at 10^5 blobs, its slices in several threads: +90 MB). Reads
# go through SQLite's page cache instead (out of the kernel's page cache), CACHE_PAGES a connection.
MMAP_BYTES = 0
CACHE_PAGES = 1024  # of 4 KiB: 4 MiB (diskcache's default: 32 MiB)


@dataclass(frozen=True)
class _VerifiedFile:
    """A verified temporary file that the store moves into place instead of copying."""

    path: str
    size: int


class _Index(diskcache.Cache):
    """diskcache, with the errors of an index that cannot be written (a full disk, a read-only
    folder) raised as OSError, like the errors of the files beside it. Reads update the LRU
    access time, so they can fail that way too."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        with _as_os_error():
            return super().get(*args, **kwargs)

    def set(self, *args: Any, **kwargs: Any) -> bool:
        with _as_os_error():
            return super().set(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> bool:
        with _as_os_error():
            return super().delete(*args, **kwargs)

    def __contains__(self, key: object) -> bool:
        with _as_os_error():
            return super().__contains__(key)


class _Change:
    """One transaction over diskcache's rows and the kept indexes. The files of rows it deletes
    are removed once it has committed: a crash in between leaves a stray file (`remove_strays`
    takes it), never an entry whose file is gone."""

    def __init__(self, cache: _Index):
        self._cache = cache
        self.files: list[str] = []

    def sql(self, statement: str, params: Any = ()) -> sqlite3.Cursor:
        return self._cache._sql(statement, params)

    def delete(self, key: tuple) -> bool:
        db_key, raw = self._cache._disk.put(key)
        row = self.sql("SELECT rowid, filename FROM Cache WHERE key = ? AND raw = ?", (db_key, raw)).fetchone()
        if row is None:
            return False
        self.sql("DELETE FROM Cache WHERE rowid = ?", (row[0],))
        if row[1]:
            self.files.append(row[1])
        return True


@contextmanager
def _as_os_error() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise OSError(f"cache index: {e}") from e


class _ContentDisk(diskcache.Disk):
    """diskcache's Disk, but a verified blob file is renamed into the cache, not copied, and
    every folder and file it makes is private."""

    def filename(self, key: Any = UNKNOWN, value: Any = UNKNOWN) -> tuple[str, str]:
        filename, full_path = super().filename(key, value)
        # diskcache makes the two levels of folders with the umask: make them first.
        private_dirs(Path(self._directory), Path(filename).parent)
        return filename, full_path

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[int, int, str | None, Any]:
        if isinstance(value, _VerifiedFile):
            filename, full_path = super().filename(key, value)
            try:
                os.replace(value.path, full_path)  # a temporary file: 0600 already
            except FileNotFoundError:  # its folder is not made yet (or was removed as empty)
                folder = os.path.dirname(full_path)
                try:
                    os.mkdir(folder, PRIVATE_DIR)
                except FileNotFoundError:  # nor its parent
                    private_dirs(Path(self._directory), Path(filename).parent)
                except FileExistsError:
                    pass  # made meanwhile by another writer
                os.replace(value.path, full_path)
            return value.size, MODE_BINARY, filename, None
        size, mode, filename, db_value = super().store(value, read, key)
        if filename is not None:
            os.chmod(os.path.join(self._directory, filename), PRIVATE_FILE)
        return size, mode, filename, db_value


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True)
class BlobEntry:
    digest: str
    size: int
    used: float  # when it was last stored or read (time.time())
    row: int = field(default=0, compare=False)  # its row in diskcache's table, when read from it (0: not known)


class TagKind(StrEnum):
    """Which clients a tag's entry answers. A registry gives a multi-platform tag's index only to a
    client that takes every index type, and one platform's manifest to any other, so each kind is
    kept apart: a client's `Accept` cannot re-point the tag for clients of the other kind. (The
    value is the entry's key: an index-kind entry is keyed as every tag was before there were
    kinds, so older stores read as they did.)"""

    INDEX = "tag"  # what the tag names: its index, or its only manifest
    SINGLE = "single-tag"  # what upstream gives a client that takes no index


@dataclass(frozen=True)
class TagEntry:
    digest: str
    checked: float  # when upstream last confirmed (or gave) this digest for the tag


@dataclass
class Summary:
    blobs: int = 0
    blob_bytes: int = 0
    manifests: int = 0
    tags: int = 0
    repositories: int = 0  # with at least one tag


@dataclass(frozen=True)
class Evicted:
    """What evicting one blob took with it: the manifests naming it and the tags leading to them."""

    manifests: int = 0
    tags: int = 0  # tags of the index kind (what `hubcache ls` lists)


class Store:
    def __init__(self, directory: str | os.PathLike, size_limit: int = UNLIMITED):
        self.directory = Path(directory)
        # Readable by the service's user only: it holds private images and the miss journal.
        private_folder(self.directory)
        self._tmp_root = self.directory / "tmp"
        self._clean_dead_temp_dirs()
        pid_dir = self._tmp_root / str(os.getpid())
        private_dirs(self.directory, pid_dir.relative_to(self.directory))
        # One folder per instance: closing one store must not delete the fills of another store
        # on the same folder in this process (reconfiguring opens the new before closing the old).
        self._tmp = Path(tempfile.mkdtemp(dir=pid_dir))
        _LIVE_TEMP_DIRS.add(self._tmp.resolve())
        self._content = content = self.directory / "content"
        private_dirs(self.directory, Path("content"))
        # SQLite gives its -wal and -shm files the mode of the database: make it private first.
        os.close(os.open(content / "cache.db", os.O_RDONLY | os.O_CREAT, PRIVATE_FILE))
        self._cache = _Index(
            str(content),
            disk=_ContentDisk,
            size_limit=size_limit,
            eviction_policy="least-recently-used",
            sqlite_mmap_size=MMAP_BYTES,
            sqlite_cache_size=CACHE_PAGES,
        )
        self._local = threading.local()  # the transaction under way in this thread, if any
        self._index_once()

    def _index_once(self) -> None:
        """Create the kept indexes, and fill them from what an older store holds (once)."""
        with _as_os_error():
            if index.indexed(self._cache._sql):
                return
            # Waits as long as another process opening it takes to index it (diskcache's own
            # timeout is 60 s; indexing 10^6 entries takes longer).
            with self.batch(wait=True) as change:
                if index.indexed(change.sql):
                    return  # another process indexed it meanwhile
                index.create(change.sql)
                disk = self._cache._disk
                index.build(change.sql, disk.get, lambda mode, filename, value: disk.fetch(mode, filename, value, False))

    @contextmanager
    def batch(self, wait: bool = False) -> Iterator[_Change]:
        """Changes made inside happen together, or (on an exception or a crash) not at all. Nested
        batches of one thread join the outer one. `wait`: for the database however long another
        writer holds it, not diskcache's timeout."""
        current = getattr(self._local, "change", None)
        if current is not None:
            yield current
            return
        change = _Change(self._cache)
        with _as_os_error(), self._cache.transact(retry=wait):
            self._local.change = change
            try:
                yield change
            finally:
                self._local.change = None
        for name in change.files:
            self._cache._disk.remove(name)

    def close(self) -> None:
        self._cache.close()
        _LIVE_TEMP_DIRS.discard(self._tmp.resolve())
        shutil.rmtree(self._tmp, ignore_errors=True)

    def remove_strays(self, older_than: float = STRAY_AGE) -> int:
        """Remove the content files no entry names and nothing wrote for `older_than` seconds: what
        a crash left between a commit and the removal of a dropped entry's file, or between a
        file's move into place and its commit. Returns how many. The age spares a fill of another
        process whose commit is under way."""
        with _as_os_error():
            named = {Path(row[0]) for row in self._cache._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
        cutoff = time.time() - older_than
        removed = 0
        # diskcache writes each file two folder levels down, both named by two hex digits.
        for file in self._content.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"):
            if file.relative_to(self._content) in named or not file.is_file():
                continue
            if file.lstat().st_mtime < cutoff:
                file.unlink(missing_ok=True)
                removed += 1
        return removed

    def _clean_dead_temp_dirs(self) -> None:
        """Drop temporary files left by processes that died mid-fill. Each process owns tmp/<pid>;
        under our own pid only the folders of live stores are kept (a restarted container may
        reuse the pid of the process that left them)."""
        if not self._tmp_root.is_dir():
            return
        for entry in self._tmp_root.iterdir():
            if entry.name == str(os.getpid()):
                for leftover in entry.iterdir():
                    if leftover.resolve() not in _LIVE_TEMP_DIRS:
                        shutil.rmtree(leftover, ignore_errors=True)
                continue
            if entry.name.isdigit():
                try:
                    os.kill(int(entry.name), 0)
                    continue  # still alive: another hubcache process sharing the folder
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue
            shutil.rmtree(entry, ignore_errors=True)

    # Blobs

    def has_blob(self, digest: str) -> bool:
        return ("blob", digest) in self._cache

    def open_blob(self, digest: str) -> BinaryIO | None:
        """An open file of the blob, or None. The file stays readable even if evicted meanwhile.
        A file whose size is no longer the one it verified at is a miss, dropped (`_whole`)."""
        blob = self.open_stored_blob(digest)
        if blob is not None and not self._whole(blob, digest):
            blob.close()
            return None
        return blob

    def open_stored_blob(self, digest: str) -> BinaryIO | None:
        """The blob's file as the store holds it, its size unchecked (`verify` hashes it whole)."""
        blob = self._read_blob(digest)
        if blob is None and self._lookup(self.has_blob, digest):
            # Either a commit landed between the two looks, or the file vanished under the index
            # (diskcache then answers a miss). Look again: only a vanished file stays a miss, and
            # its entry is forgotten, else every refill would be dropped as a duplicate.
            blob = self._read_blob(digest)
            if blob is None:
                try:
                    self.delete_blob(digest)
                except OSError:
                    pass  # an index that cannot be written keeps its stale entry; still a miss
        return blob

    def _whole(self, blob: BinaryIO, digest: str) -> bool:
        """Whether the blob's file still has the size it verified at. A file cut short (a machine
        that lost power before its disk had the data, a copy of the folder that stopped) or changed
        by hand is dropped as `hubcache verify` drops it, so the next pull fetches it again instead
        of sending bytes no client can verify. (A changed byte that keeps the size is found by
        `hubcache verify`, which hashes everything.)"""
        verified = self._lookup(self._indexed_size, digest)
        size = os.fstat(blob.fileno()).st_size
        if verified is None or size == verified:
            return True  # no index entry (evicted meanwhile, or unreadable): nothing to compare
        logger.warning(f"hubcache: blob {digest} is {size} bytes on disk, not the {verified} it verified at: dropped, to be fetched again")
        self._drop_rotten_quietly(digest)
        return False

    def _indexed_size(self, digest: str) -> int | None:
        with _as_os_error():
            row = self._cache._sql("SELECT size FROM hc_blob WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row else None

    def _drop_rotten_quietly(self, digest: str) -> None:
        try:
            self.drop_rotten(digest)
        except OSError:
            pass  # an index that cannot be written keeps the entry: each read finds it again

    @staticmethod
    def _lookup[T](read: Callable[..., T], *args: object) -> T | None:
        """A read of the index; one that fails counts as a miss (the caller then goes upstream)."""
        try:
            return read(*args)
        except OSError as e:
            logger.warning(f"hubcache: {e.strerror or e}")
            return None

    def _read_blob(self, digest: str) -> BinaryIO | None:
        try:
            return self._cache.get(("blob", digest), read=True)
        except OSError:
            return None

    def blob_size(self, digest: str) -> int | None:
        blob = self.open_blob(digest)
        if blob is None:
            return None
        with blob:
            return os.fstat(blob.fileno()).st_size

    def blob_to_answer(self, digest: str, inline_max: int) -> tuple[int, bytes | None] | None:
        """The blob's size and, if it is `inline_max` bytes or fewer (small enough to answer from
        memory), its bytes, hashed again; from one open. None if the store holds none whole, or
        if its bytes no longer hash to `digest` (then it is dropped, to be fetched again, as
        `hubcache verify` drops it)."""
        blob = self.open_blob(digest)
        if blob is None:
            return None
        with blob:
            size = os.fstat(blob.fileno()).st_size
            if size > inline_max:
                return size, None
            body = blob.read()
        if digest_of(body, digest.partition(":")[0]) == digest:
            return len(body), body
        logger.warning(f"hubcache: blob {digest} no longer hashes to its digest: dropped, to be fetched again")
        self._drop_rotten_quietly(digest)
        return None

    def blob_writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self, digest)

    def _commit_blob(self, digest: str, path: str, size: int) -> bool:
        with self.batch() as change:
            if self.has_blob(digest):
                os.unlink(path)  # a concurrent fill got there first: identical bytes
                return False
            self._cache.set(("blob", digest), _VerifiedFile(path, size))
            index.add_blob(change.sql, digest, size)
            return True

    def blob_entries(self) -> list[BlobEntry]:
        """Every blob diskcache holds, in no particular order (eviction reads `least_recently_used`)."""
        # diskcache keeps each entry's access time (its LRU policy updates it on every read) but
        # offers no public way to list it: read its table the way its own cull() does.
        rows = self._cache._sql("SELECT key, raw, size, access_time FROM Cache").fetchall()
        entries = []
        for key, raw, size, used in rows:
            decoded = self._cache._disk.get(key, raw)
            if isinstance(decoded, tuple) and decoded[0] == "blob":
                entries.append(BlobEntry(decoded[1], size, used))
        return entries

    def summary(self) -> Summary:
        """How many blobs, manifests, tags and tagged repositories the store holds, and the blobs'
        total size."""
        with _as_os_error():
            return Summary(**index.counts(self._cache._sql))

    def blob_entry(self, digest: str) -> BlobEntry | None:
        """The blob's size and last use, without counting this look as a use."""
        db_key, raw = self._cache._disk.put(("blob", digest))
        with _as_os_error():
            row = self._cache._sql("SELECT size, access_time FROM Cache WHERE key = ? AND raw = ?", (db_key, raw)).fetchone()
        return BlobEntry(digest, *row) if row else None

    def least_recently_used(self, after: tuple[float, int] | None, limit: int) -> tuple[list[BlobEntry], tuple[float, int] | None]:
        """The blobs among the next `limit` entries in least-recently-used order after the position
        `after`, and the position to go on from (None: no entries left). One index search."""
        query = "SELECT key, raw, size, access_time, rowid FROM Cache"
        params: tuple = ()
        if after is not None:
            query += " WHERE (access_time, rowid) > (?, ?)"  # a row value: an index search, not a scan
            params = after
        with _as_os_error():
            rows = self._cache._sql(query + " ORDER BY access_time, rowid LIMIT ?", (*params, limit)).fetchall()
        blobs = []
        for key, raw, size, used, row in rows:
            decoded = self._cache._disk.get(key, raw)
            if isinstance(decoded, tuple) and decoded[0] == "blob":
                blobs.append(BlobEntry(decoded[1], size, used, row))
        return blobs, ((rows[-1][3], rows[-1][4]) if len(rows) == limit else None)

    def evict(self, blob: BlobEntry, keep: set[str]) -> Evicted | None:
        """Forget a blob unless it was used since `blob.used`, and in the same transaction every
        manifest naming it (but those in `keep`) and every tag leading to those: no tag or
        manifest ever names an evicted blob, whenever the process stops. None: not evicted."""
        with self.batch() as change:
            row = self._evictable_row(change, blob)
            if row is None:
                return None  # gone already, or used meanwhile
            evicted = self._drop_manifests(change, index.users(change.sql, blob.digest, blob=True), keep)
            change.sql("DELETE FROM Cache WHERE rowid = ?", (row[0],))
            change.files.append(row[1])
            index.drop_blob(change.sql, blob.digest)
        return evicted

    def drop_rotten(self, digest: str) -> Evicted | None:
        """Forget a blob or manifest whose bytes no longer hash to `digest`, and with it, in the
        same transaction, what eviction takes with a blob: every manifest naming it, and every tag
        leading to those (so no tag is left that cannot pull). Returns what went with it; None:
        the store does not hold it."""
        with self.batch() as change:
            if change.delete(("blob", digest)):
                index.drop_blob(change.sql, digest)
                return self._drop_manifests(change, index.users(change.sql, digest, blob=True), set())
            if self.has_manifest(digest):
                taken = self._drop_manifests(change, [digest], set())
                return Evicted(taken.manifests - 1, taken.tags)
        return None

    def _drop_manifests(self, change: _Change, manifests: list[str], keep: set[str]) -> Evicted:
        """Forget `manifests` (but those in `keep`) and every tag leading to them, directly or
        through an index listing them."""
        dropped = [m for m in manifests if m not in keep]
        broken = set(dropped)
        for digest in dropped:
            broken.update(m for m in index.users(change.sql, digest, blob=False) if m not in keep)
        tags = index.tags_naming(change.sql, broken)
        for kind, registry, name, tag in tags:
            change.delete((kind, registry, name, tag))
            index.drop_tag(change.sql, kind, registry, name, tag)
        for digest in dropped:
            change.delete(("manifest", digest))
            index.drop_manifest(change.sql, digest)
        return Evicted(len(dropped), sum(1 for t in tags if t[0] == TagKind.INDEX))

    def _evictable_row(self, change: _Change, blob: BlobEntry) -> tuple[int, str] | None:
        """The blob's (rowid, filename) if it was not used since `blob.used`. By its row when known:
        encoding a key as diskcache does (pickletools.optimize) costs more than the rest of an
        eviction."""
        key = ("blob", blob.digest)
        if blob.row:
            found = change.sql("SELECT rowid, filename, key, raw FROM Cache WHERE rowid = ? AND access_time <= ?", (blob.row, blob.used)).fetchone()
            return found[:2] if found and self._cache._disk.get(found[2], found[3]) == key else None
        db_key, raw = self._cache._disk.put(key)
        return change.sql("SELECT rowid, filename FROM Cache WHERE key = ? AND raw = ? AND access_time <= ?", (db_key, raw, blob.used)).fetchone()

    def users(self, child: str, blob: bool) -> list[str]:
        """The manifests naming `child`: as a blob (config or layer), or as a platform manifest."""
        with _as_os_error():
            return index.users(self._cache._sql, child, blob)

    def named(self, manifest: str, blob: bool) -> list[str]:
        """What a held manifest names: its blobs, or its platform manifests."""
        with _as_os_error():
            return index.named(self._cache._sql, manifest, blob)

    def tags_naming(self, digest: str, kind: TagKind = TagKind.INDEX) -> list[tuple[str, str, str]]:
        """(registry, repository, tag) of every tag of `kind` whose digest is `digest`."""
        with _as_os_error():
            return [t[1:] for t in index.tags_naming(self._cache._sql, [digest]) if t[0] == kind.value]

    def tag_page(
        self,
        after: tuple[str, str, str] | None = None,
        limit: int = UNLIMITED,
        registry: str | None = None,
        match: Callable[[str, str, str], bool] | None = None,
        kind: TagKind = TagKind.INDEX,
    ) -> list[tuple[tuple[str, str, str], TagEntry]]:
        """Tags in name order after `after`, at most `limit`, of one registry and for which
        `match(registry, repository, tag)` holds if told."""
        with _as_os_error():
            rows = index.tag_page(self._cache._sql, kind.value, after, limit, registry, match)
        return [((r, n, t), TagEntry(digest, checked)) for r, n, t, digest, checked in rows]

    def disk_usage(self) -> int:
        """Bytes the store takes on disk: its index and its files."""
        return self._cache.volume()

    def delete_blob(self, digest: str) -> bool:
        """Forget a blob and remove its file. A reader that has it open keeps reading it."""
        with self.batch() as change:
            index.drop_blob(change.sql, digest)
            return change.delete(("blob", digest))

    # Manifests

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        if digest_of(body, digest.partition(":")[0]) != digest:
            raise ValueError(f"manifest bytes do not match {digest}")
        with self.batch() as change:
            self._cache.set(("manifest", digest), (media_type, body))
            index.add_manifest(change.sql, digest, media_type, body)

    def get_manifest(self, digest: str) -> Manifest | None:
        """The manifest, or None. One whose bytes changed on disk since they verified is a miss,
        dropped as `hubcache verify` drops it: no client could verify it either."""
        manifest = self.stored_manifest(digest)
        if manifest is not None and digest_of(manifest.body, digest.partition(":")[0]) != digest:
            logger.warning(f"hubcache: manifest {digest} no longer hashes to its digest: dropped, with the tags leading to it")
            self._drop_rotten_quietly(digest)
            return None
        return manifest

    def stored_manifest(self, digest: str) -> Manifest | None:
        """The manifest as the store holds it, unchecked (`verify` hashes it itself)."""
        value = self._lookup(self._cache.get, ("manifest", digest))
        if value is None:
            return None
        media_type, body = value
        return Manifest(digest, media_type, body)

    def has_manifest(self, digest: str) -> bool:
        with _as_os_error():
            return self._cache._sql("SELECT 1 FROM hc_manifest WHERE digest = ?", (digest,)).fetchone() is not None

    def manifest_digests(self) -> list[str]:
        with _as_os_error():
            return [row[0] for row in self._cache._sql("SELECT digest FROM hc_manifest")]

    def delete_manifest(self, digest: str) -> bool:
        with self.batch() as change:
            index.drop_manifest(change.sql, digest)
            return change.delete(("manifest", digest))

    # Tags

    def tags(self, kind: TagKind = TagKind.INDEX) -> list[tuple[tuple[str, str, str], TagEntry]]:
        """Every tag's entry of `kind` as ((registry, repository, tag), entry), in name order."""
        return self.tag_page(kind=kind)

    def delete_tag(self, registry: str, name: str, tag: str, kind: TagKind | None = None) -> bool:
        """Forget the tag's entry of `kind` (of every kind unless told); whether there was one."""
        deleted = []
        with self.batch() as change:
            for k in [kind] if kind else TagKind:
                index.drop_tag(change.sql, k.value, registry, name, tag)
                deleted.append(change.delete((k.value, registry, name, tag)))
        return any(deleted)

    def set_tag(
        self, registry: str, name: str, tag: str, digest: str, checked: float | None = None, kind: TagKind = TagKind.INDEX
    ) -> None:
        """`checked`: when upstream confirmed the digest; now unless told (0: never, e.g. imported)."""
        checked = time.time() if checked is None else checked
        with self.batch() as change:
            self._cache.set((kind.value, registry, name, tag), (digest, checked))
            index.set_tag(change.sql, kind.value, registry, name, tag, digest, checked)

    def get_tag(self, registry: str, name: str, tag: str, kind: TagKind = TagKind.INDEX) -> TagEntry | None:
        value = self._lookup(self._cache.get, (kind.value, registry, name, tag))
        return TagEntry(*value) if value else None

    # Referrers (OCI 1.1): the manifests that name a subject, per repository

    def add_referrers(self, registry: str, name: str, subject: str, descriptors: list[dict]) -> None:
        """Note manifests whose subject is `subject` (descriptors as the referrers API lists them)."""
        key = ("referrers", registry, name, subject)
        known = {d["digest"]: d for d in self._cache.get(key) or []}
        known.update({d["digest"]: d for d in descriptors})
        self._cache.set(key, list(known.values()))

    def referrers(self, registry: str, name: str, subject: str) -> list[dict] | None:
        """The referrers of `subject` noted so far; None if none ever were."""
        return self._lookup(self._cache.get, ("referrers", registry, name, subject))

    # Repositories: who may pull what (see cache/access.py)

    def set_visibility(self, registry: str, name: str, public: bool) -> None:
        self._cache.set(("repository", registry, name), (public, time.time()))

    def visibility(self, registry: str, name: str) -> bool | None:
        """True: anyone may pull it; False: it needs credentials; None: not known yet."""
        value = self._lookup(self._cache.get, ("repository", registry, name))
        return value[0] if value else None

    def visibility_checked(self, registry: str, name: str) -> float | None:
        value = self._lookup(self._cache.get, ("repository", registry, name))
        return value[1] if value else None

    def note_imported(self, registry: str, name: str) -> None:
        """An operator imported images of this repository from a bundle that did not say whether it
        is public: offline, they chose to serve it (cache/access.py); its visibility stays unknown."""
        self._cache.set(("imported", registry, name), True)

    def imported(self, registry: str, name: str) -> bool:
        return bool(self._lookup(self._cache.__contains__, ("imported", registry, name)))

    def link(self, registry: str, name: str, digest: str) -> None:
        """Upstream served `digest` through this repository."""
        self._cache.set(("link", registry, name, digest), True)

    def linked(self, registry: str, name: str, digest: str) -> bool:
        return bool(self._lookup(self._cache.__contains__, ("link", registry, name, digest)))


def private_folder(directory: Path) -> None:
    """Make the cache folder, or tighten it (and everything in it) if others may read it."""
    directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    mode = directory.stat().st_mode & 0o777
    if not mode & 0o077:
        return
    try:
        os.chmod(directory, PRIVATE_DIR)  # first: it alone closes what it holds to others
    except PermissionError as e:
        logger.warning(f"hubcache: the cache folder {directory} is open to other users (mode {mode:o}) and cannot be made private: {e.strerror}")
        return
    tightened = 0
    for root, dirs, files in os.walk(directory):
        for name, private in [*((d, PRIVATE_DIR) for d in dirs), *((f, PRIVATE_FILE) for f in files)]:
            path = os.path.join(root, name)
            try:
                found = os.lstat(path).st_mode
                if found & 0o077 and not stat.S_ISLNK(found):
                    os.chmod(path, private)
                    tightened += 1
            except FileNotFoundError:
                continue  # another process's temporary file, gone meanwhile
    logger.warning(
        f"hubcache: the cache folder {directory} was open to other users (mode {mode:o}): made it private (0700), "
        f"and {tightened} folders and files in it (0700/0600)"
    )


def private_dirs(root: Path, relative: Path) -> None:
    """Make `root` and each missing folder of `relative` under it, readable by the owner only."""
    root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    path = root
    for part in relative.parts:
        path = path / part
        try:
            path.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            pass


class BlobWriter:
    """Receives a blob's bytes in order, hashes them, and commits them only if they verify."""

    def __init__(self, store: Store, digest: str):
        self.store = store
        self.digest = digest
        self.size = 0
        self.write_error: OSError | None = None
        self._hash = hasher(digest)
        fd, self._path = tempfile.mkstemp(dir=store._tmp, prefix="fill-")
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hash and keep `data`. A failed disk write (ENOSPC, read-only folder) stops the keeping,
        not the hashing: the bytes can still be verified for the client, just not stored."""
        self._hash.update(data)
        self.size += len(data)
        if self.write_error is None:
            try:
                self._file.write(data)
            except OSError as e:
                self.write_error = e

    def keep_free(self, reserve: int) -> None:
        """Stop keeping (not hashing), as after a failed write, once the folder has fewer than
        `reserve` bytes free: an answer of no announced size could otherwise fill the disk."""
        if self.write_error is not None:
            return
        try:
            free = shutil.disk_usage(os.path.dirname(self._path)).free
        except OSError as e:
            self.write_error = e
            return
        if free < reserve:
            self.write_error = OSError(errno.ENOSPC, f"the cache folder is down to {free} bytes free")

    @property
    def path(self) -> str:
        """The temporary file the bytes go to until commit."""
        return self._path

    def close(self) -> None:
        """No more bytes: release the file but keep it until commit or discard."""
        try:
            self._file.close()
        except OSError as e:
            self.write_error = self.write_error or e

    @property
    def computed_digest(self) -> str:
        return hash_digest(self._hash)

    def verified(self, expected_size: int | None = None) -> bool:
        size_ok = expected_size is None or expected_size == self.size
        return size_ok and self.computed_digest == self.digest

    def commit(self) -> bool:
        """Move the bytes into the store; refuses (and discards them) unless they verify. False:
        the store held the blob already, and keeps what it had."""
        if self.computed_digest != self.digest or self.write_error:
            self.discard()
            raise ValueError(f"blob bytes for {self.digest} are not verified and complete")
        try:
            self._file.close()
            return self.store._commit_blob(self.digest, self._path, self.size)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

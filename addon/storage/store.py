"""The content store: blobs and manifests by digest, and the tag index, in one diskcache folder.
Nothing is visible under a digest before it verified (a blob is committed by rename), it is safe
across threads and processes, its files are its owner's only, and it knows nothing of HTTP."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import diskcache
from diskcache.core import MODE_BINARY, UNKNOWN

from ..registry.protocol import digest_of, hash_digest, hasher

logger = logging.getLogger(__name__)

UNLIMITED = 2**62
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_LIVE_TEMP_DIRS: set[Path] = set()  # temporary folders of the stores open in this process


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
            filename, full_path = self.filename(key, value)
            os.replace(value.path, full_path)  # a temporary file: 0600 already
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
        content = self.directory / "content"
        private_dirs(self.directory, Path("content"))
        # SQLite gives its -wal and -shm files the mode of the database: make it private first.
        os.close(os.open(content / "cache.db", os.O_RDONLY | os.O_CREAT, PRIVATE_FILE))
        self._cache = _Index(
            str(content),
            disk=_ContentDisk,
            size_limit=size_limit,
            eviction_policy="least-recently-used",
        )

    def close(self) -> None:
        self._cache.close()
        _LIVE_TEMP_DIRS.discard(self._tmp.resolve())
        shutil.rmtree(self._tmp, ignore_errors=True)

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
        """An open file of the blob, or None. The file stays readable even if evicted meanwhile."""
        blob = self._read_blob(digest)
        if blob is None and self._lookup(self.has_blob, digest):
            # Either a commit landed between the two looks, or the file vanished under the index
            # (diskcache then answers a miss). Look again: only a vanished file stays a miss, and
            # its entry is forgotten, else every refill would be dropped as a duplicate.
            blob = self._read_blob(digest)
            if blob is None:
                try:
                    self._cache.delete(("blob", digest))
                except OSError:
                    pass  # an index that cannot be written keeps its stale entry; still a miss
        return blob

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

    def blob_writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self, digest)

    def _commit_blob(self, digest: str, path: str, size: int) -> None:
        if self.has_blob(digest):
            os.unlink(path)  # a concurrent fill got there first: identical bytes
            return
        self._cache.set(("blob", digest), _VerifiedFile(path, size))

    def blob_entries(self) -> list[BlobEntry]:
        """Every blob, least recently used first."""
        # diskcache keeps each entry's access time (its LRU policy updates it on every read) but
        # offers no public way to list it: read its index the way its own cull() does.
        rows = self._cache._sql("SELECT key, raw, size, access_time FROM Cache ORDER BY access_time").fetchall()
        entries = []
        for key, raw, size, used in rows:
            decoded = self._cache._disk.get(key, raw)
            if isinstance(decoded, tuple) and decoded[0] == "blob":
                entries.append(BlobEntry(decoded[1], size, used))
        return entries

    def summary(self) -> Summary:
        """How many blobs, manifests, tags and tagged repositories the store holds, and the blobs'
        total size."""
        summary = Summary()
        repositories = set()
        for key in self._cache.iterkeys():
            if isinstance(key, tuple) and key[0] in ("blob", "manifest", "tag"):
                setattr(summary, key[0] + "s", getattr(summary, key[0] + "s") + 1)
                if key[0] == "tag":
                    repositories.add(key[1:3])
        summary.repositories = len(repositories)
        summary.blob_bytes = sum(entry.size for entry in self.blob_entries())
        return summary

    def disk_usage(self) -> int:
        """Bytes the store takes on disk: its index and its files."""
        return self._cache.volume()

    def delete_blob(self, digest: str) -> bool:
        """Forget a blob and remove its file. A reader that has it open keeps reading it."""
        return self._cache.delete(("blob", digest))

    # Manifests

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        if digest_of(body, digest.partition(":")[0]) != digest:
            raise ValueError(f"manifest bytes do not match {digest}")
        self._cache.set(("manifest", digest), (media_type, body))

    def get_manifest(self, digest: str) -> Manifest | None:
        value = self._lookup(self._cache.get, ("manifest", digest))
        if value is None:
            return None
        media_type, body = value
        return Manifest(digest, media_type, body)

    def manifest_digests(self) -> list[str]:
        return [key[1] for key in self._cache.iterkeys() if isinstance(key, tuple) and key[0] == "manifest"]

    def delete_manifest(self, digest: str) -> bool:
        return self._cache.delete(("manifest", digest))

    # Tags

    def tags(self, kind: TagKind = TagKind.INDEX) -> list[tuple[tuple[str, str, str], TagEntry]]:
        """Every tag's entry of `kind` as ((registry, repository, tag), entry)."""
        result = []
        for key in self._cache.iterkeys():
            if isinstance(key, tuple) and key[0] == kind.value:
                value = self._cache.get(key)
                if value:
                    result.append((key[1:], TagEntry(*value)))
        return result

    def delete_tag(self, registry: str, name: str, tag: str, kind: TagKind | None = None) -> bool:
        """Forget the tag's entry of `kind` (of every kind unless told); whether there was one."""
        deleted = [self._cache.delete((k.value, registry, name, tag)) for k in ([kind] if kind else TagKind)]
        return any(deleted)

    def set_tag(
        self, registry: str, name: str, tag: str, digest: str, checked: float | None = None, kind: TagKind = TagKind.INDEX
    ) -> None:
        """`checked`: when upstream confirmed the digest; now unless told (0: never, e.g. imported)."""
        self._cache.set((kind.value, registry, name, tag), (digest, time.time() if checked is None else checked))

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

    def commit(self) -> None:
        """Move the bytes into the store; refuses (and discards them) unless they verify."""
        if self.computed_digest != self.digest or self.write_error:
            self.discard()
            raise ValueError(f"blob bytes for {self.digest} are not verified and complete")
        try:
            self._file.close()
            self.store._commit_blob(self.digest, self._path, self.size)
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

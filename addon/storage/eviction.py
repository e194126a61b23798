"""Keeping the store in shape: eviction by size and by age (never what a recording pins, nor a blob
used lately), the tag index kept consistent, and re-verification. The `Upkeep` addon evicts every
EVICT_INTERVAL seconds; `hubcache prune`, `rm` and `verify` run the same functions."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from ..registry import manifests
from ..registry.protocol import ImageReference, digest_of, hash_digest, hasher
from ..units import DAY, parse_size
from .folder import CacheFolder
from .recordings import RecordingError, pinned
from .store import BlobEntry, Store, TagKind

logger = logging.getLogger(__name__)

EVICT_INTERVAL = 30.0
IN_USE = 600.0  # seconds after its last use a blob counts as in use (a signed URL's lifetime)


@dataclass
class Pruned:
    blobs: int = 0
    bytes: int = 0
    manifests: int = 0
    tags: int = 0
    remaining: int = 0  # bytes of blobs left


def choose(
    blobs: list[BlobEntry], *, limit: int | None, max_unused: float | None, keep: set[str], now: float, in_use: float
) -> list[BlobEntry]:
    """The blobs to evict, from a least-recently-used-first list."""
    total = sum(b.size for b in blobs)
    chosen = []
    for blob in blobs:
        if blob.digest in keep or now - blob.used < in_use:
            continue
        expired = max_unused is not None and now - blob.used > max_unused
        if expired or (limit is not None and total > limit):
            chosen.append(blob)
            total -= blob.size
    return chosen


def prune(store: Store, cache_dir: Path, *, limit: int | None, max_unused: float | None = None, in_use: float) -> Pruned:
    """Evict what the limits ask for, sparing what recordings pin. Raises RecordingError when a
    recording cannot be read: then nothing can be evicted safely."""
    keep = pinned(cache_dir)
    blobs = store.blob_entries()
    chosen = choose(blobs, limit=limit, max_unused=max_unused, keep=keep, now=time.time(), in_use=in_use)
    result = Pruned(remaining=sum(b.size for b in blobs))
    for blob in chosen:
        if store.delete_blob(blob.digest):
            result.blobs += 1
            result.bytes += blob.size
            result.remaining -= blob.size
    if chosen:
        _drop_incomplete(store, {b.digest for b in chosen}, keep, result)
    return result


def _drop_incomplete(store: Store, evicted: set[str], keep: set[str], result: Pruned) -> None:
    """Drop the manifests that referred to an evicted blob, and every tag that leads to them."""
    dropped: set[str] = set()
    indexes: dict[str, set[str]] = {}
    for digest in store.manifest_digests():
        manifest = store.get_manifest(digest)
        if manifest is None or digest in keep:
            continue
        try:
            refs = manifests.references(manifest.body, manifest.media_type)
        except manifests.ManifestError:
            continue
        if refs.children:
            indexes[digest] = {c.digest for c in refs.children}
        elif evicted & {b.digest for b in refs.blobs} and store.delete_manifest(digest):
            dropped.add(digest)
            result.manifests += 1
    broken = dropped | {d for d, children in indexes.items() if children & dropped}
    for kind in TagKind:
        for (registry, name, tag), entry in store.tags(kind):
            if entry.digest in broken and store.delete_tag(registry, name, tag, kind) and kind is TagKind.INDEX:
                result.tags += 1


@dataclass
class Removed:
    tags: list[str] = field(default_factory=list)  # registry/repository:tag
    manifests: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    bytes: int = 0
    kept: list[str] = field(default_factory=list)  # manifests still needed by another tag or pinned by a recording
    missing: list[str] = field(default_factory=list)  # images named that the cache does not hold


def remove(store: Store, cache_dir: Path, images: list[ImageReference], dry_run: bool = False) -> Removed:
    """Remove images from the cache: their tags (a digest: every tag that names it), the manifests
    no remaining tag needs and no recording pins, and the blobs no remaining manifest uses. A running
    proxy's transfers keep the files they opened; its next pull of the image fills it again.
    Raises RecordingError when a recording cannot be read (then nothing can be removed safely)."""
    result = Removed()
    keep = pinned(cache_dir)
    tags = store.tags()
    roots: set[str] = set()
    dropped_tags: set[tuple[str, str, str]] = set()
    for image in images:
        if ":" in image.reference:  # a digest (a tag has no colon)
            named = [key for key, entry in tags if key[:2] == (image.registry, image.repository) and entry.digest == image.reference]
            found = store.get_manifest(image.reference) is not None
            root = image.reference
        else:
            entry = store.get_tag(image.registry, image.repository, image.reference)
            named = [(image.registry, image.repository, image.reference)] if entry else []
            found, root = entry is not None, entry.digest if entry else ""
        if not found:
            result.missing.append(str(image))
            continue
        roots.add(root)
        dropped_tags.update(named)
    remaining_roots = {entry.digest for key, entry in tags if key not in dropped_tags}
    needed = _closure(store, remaining_roots | (keep & set(store.manifest_digests())))
    doomed = _closure(store, roots) - needed - keep
    result.kept = sorted(_closure(store, roots) & (needed | keep))
    all_manifests = set(store.manifest_digests())
    used = {b for digest in all_manifests - doomed for b in _blobs_of(store, digest)}
    doomed_blobs = {b for digest in doomed for b in _blobs_of(store, digest)} - used - keep
    result.tags = sorted(f"{r}/{n}:{t}" for r, n, t in dropped_tags)
    result.manifests = sorted(d for d in doomed if d in all_manifests)
    result.blobs = sorted(d for d in doomed_blobs if store.has_blob(d))
    result.bytes = sum(store.blob_size(d) or 0 for d in result.blobs)
    if dry_run:
        return result
    for registry, name, tag in dropped_tags:
        store.delete_tag(registry, name, tag)
    for digest in result.manifests:
        store.delete_manifest(digest)
    for digest in result.blobs:
        store.delete_blob(digest)
    return result


def _closure(store: Store, roots: set[str]) -> set[str]:
    """The manifests `roots` lead to: themselves and, for an index, its platform manifests."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        digest = todo.pop()
        if digest in seen:
            continue
        seen.add(digest)
        manifest = store.get_manifest(digest)
        if manifest is None:
            continue
        try:
            refs = manifests.references(manifest.body, manifest.media_type)
        except manifests.ManifestError:
            continue
        todo += [child.digest for child in refs.children]
    return seen


def _blobs_of(store: Store, digest: str) -> list[str]:
    manifest = store.get_manifest(digest)
    if manifest is None:
        return []
    try:
        return [blob.digest for blob in manifests.references(manifest.body, manifest.media_type).blobs]
    except manifests.ManifestError:
        return []


@dataclass
class Verified:
    checked: int = 0
    bytes: int = 0
    dropped: list[str] = field(default_factory=list)


def verify(store: Store, progress: Callable[[int], None] | None = None) -> Verified:
    """Re-hash every blob and manifest; drop those whose bytes do not match their digest."""
    result = Verified()
    for entry in store.blob_entries():
        blob = store.open_blob(entry.digest)
        if blob is None:
            continue
        h = hasher(entry.digest)
        with blob:
            while chunk := blob.read(1 << 20):
                h.update(chunk)
                if progress:
                    progress(len(chunk))
        result.checked += 1
        result.bytes += entry.size
        if hash_digest(h) != entry.digest:
            store.delete_blob(entry.digest)
            result.dropped.append(entry.digest)
    for digest in store.manifest_digests():
        manifest = store.get_manifest(digest)
        if manifest is None:
            continue
        result.checked += 1
        if digest_of(manifest.body, digest.partition(":")[0]) != digest:
            store.delete_manifest(digest)
            result.dropped.append(digest)
    return result


class Upkeep:
    """Evicts by size and age while the proxy runs (options `cache_size_limit`, `expire_unused_days`)."""

    def __init__(self, folder: CacheFolder):
        self.folder = folder
        self.limit: int | None = None
        self._task: asyncio.Task | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "cache_size_limit",
            str,
            "",
            "Largest size of the store's blobs, e.g. 50GB or 500MiB; the least recently used are "
            "evicted (never what a recording pins). Empty: no limit.",
        )
        loader.add_option(
            "expire_unused_days",
            int,
            0,
            "Days a blob may go unused before it is dropped (never what a recording pins). "
            "0: blobs do not expire.",
        )

    def configure(self, updated: set[str]) -> None:
        if "cache_size_limit" in updated:
            try:
                self.limit = parse_size(ctx.options.cache_size_limit) if ctx.options.cache_size_limit else None
            except ValueError as e:
                raise exceptions.OptionsError(f"cache_size_limit: {e}") from e
        if "expire_unused_days" in updated and ctx.options.expire_unused_days < 0:
            raise exceptions.OptionsError("expire_unused_days must be 0 or more")

    def running(self) -> None:
        self._task = asyncio.create_task(self._evict_periodically())

    def done(self) -> None:
        if self._task:
            self._task.cancel()

    async def _evict_periodically(self) -> None:
        while True:
            await asyncio.sleep(EVICT_INTERVAL)
            await self.evict()

    async def evict(self) -> Pruned | None:
        store, days = self.folder.store, ctx.options.expire_unused_days
        if store is None or (self.limit is None and not days):
            return None
        try:
            result = await asyncio.to_thread(
                prune, store, store.directory, limit=self.limit, max_unused=days * DAY if days else None, in_use=IN_USE
            )
        except RecordingError as e:
            logger.warning(f"hubcache: nothing evicted, a recording is unreadable: {e}")
            return None
        except OSError as e:
            logger.warning(f"hubcache: eviction failed: {e.strerror or e}")
            return None
        if result.blobs:
            logger.info(
                f"hubcache: evicted {result.blobs} blobs ({result.bytes} bytes), {result.manifests} manifests, "
                f"{result.tags} tags; {result.remaining} bytes of blobs remain"
            )
        return result

"""Keeping the store in shape: eviction by size and by age (never what a recording pins, nor a blob
used lately), the tag index kept consistent, and re-verification. A pass walks the least recently
used blobs only as far as it evicts, in slices; each blob goes in one transaction with the
manifests and tags naming it, so a pass stopped at any point leaves no tag naming a missing blob.
The `Upkeep` addon evicts every EVICT_INTERVAL seconds, each slice in its own upkeep thread (one
thread: the store's pages a pass reads stay in one SQLite connection's cache, not in one per
worker thread); `hubcache prune`, `rm` and `verify` run the same functions."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from ..registry.protocol import ImageReference, digest_of, hash_digest, hasher
from ..units import DAY, parse_size
from .folder import CacheFolder
from .recordings import RecordingError, pinned
from .store import BlobEntry, Evicted, Store

logger = logging.getLogger(__name__)

EVICT_INTERVAL = 30.0
IN_USE = 600.0  # seconds after its last use a blob counts as in use (a signed URL's lifetime)
SLICE_BLOBS = 64  # blobs evicted in one transaction at most
SLICE_SECONDS = 0.02  # and for no longer than this, once the first is evicted
LOOKAHEAD = 256  # entries of the least-recently-used order read at a time


@dataclass
class Pruned:
    blobs: int = 0
    bytes: int = 0
    manifests: int = 0
    tags: int = 0
    remaining: int = 0  # bytes of blobs left


def choose(
    blobs: Iterable[BlobEntry], *, total: int, limit: int | None, max_unused: float | None, keep: set[str], now: float, in_use: float
) -> Iterator[BlobEntry]:
    """The blobs to evict from a least-recently-used-first sequence of blobs that take `total`
    bytes; reads the sequence only as far as it evicts."""
    for blob in blobs:
        if now - blob.used < in_use:
            return  # so is every later one
        expired = max_unused is not None and now - blob.used > max_unused
        if not (expired or (limit is not None and total > limit)):
            return  # nothing later is expired either, and the total is under the limit
        if blob.digest not in keep:
            yield blob
            total -= blob.size


def least_recently_used(store: Store) -> Iterator[BlobEntry]:
    """The store's blobs, least recently used first, read LOOKAHEAD entries at a time."""
    position = None
    while True:
        blobs, position = store.least_recently_used(position, LOOKAHEAD)
        yield from blobs
        if position is None:
            return


class EvictionPass:
    """One pass of eviction by size and age, done a slice at a time (`step`). Raises
    RecordingError when a recording cannot be read: then nothing can be evicted safely."""

    def __init__(self, store: Store, cache_dir: Path, *, limit: int | None, max_unused: float | None, in_use: float):
        self.store = store
        self.keep = pinned(cache_dir)
        self.result = Pruned(remaining=store.summary().blob_bytes)
        self.done = False
        self._chosen = choose(
            least_recently_used(store),
            total=self.result.remaining,
            limit=limit,
            max_unused=max_unused,
            keep=self.keep,
            now=time.time(),
            in_use=in_use,
        )

    def step(self) -> None:
        """Evict one slice, in one transaction; sets `done` at the end of the pass."""
        start = time.monotonic()
        with self.store.batch():
            for _ in range(SLICE_BLOBS):
                blob = next(self._chosen, None)
                if blob is None:
                    self.done = True
                    return
                evicted = self.store.evict(blob, self.keep)
                if evicted is not None:
                    self.result.blobs += 1
                    self.result.bytes += blob.size
                    self.result.remaining -= blob.size
                    self.result.manifests += evicted.manifests
                    self.result.tags += evicted.tags
                if time.monotonic() - start > SLICE_SECONDS:
                    return


def prune(store: Store, cache_dir: Path, *, limit: int | None, max_unused: float | None = None, in_use: float) -> Pruned:
    """Evict what the limits ask for, sparing what recordings pin, in one go. Raises
    RecordingError when a recording cannot be read: then nothing can be evicted safely."""
    evicting = EvictionPass(store, cache_dir, limit=limit, max_unused=max_unused, in_use=in_use)
    while not evicting.done:
        evicting.step()
    return evicting.result


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
    no remaining tag needs and no recording pins, and the blobs no remaining manifest uses, all in
    one transaction. A running proxy's transfers keep the files they opened; its next pull of the
    image fills it again. Reads only what the images lead to and what leads to that.
    Raises RecordingError when a recording cannot be read (then nothing can be removed safely)."""
    result = Removed()
    keep = pinned(cache_dir)
    roots: set[str] = set()
    dropped_tags: set[tuple[str, str, str]] = set()
    for image in images:
        if ":" in image.reference:  # a digest (a tag has no colon)
            named = [t for t in store.tags_naming(image.reference) if t[:2] == (image.registry, image.repository)]
            found = store.has_manifest(image.reference)
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
    reached = _closure(store, roots)
    needed = {d for d in reached if _needed(store, d, dropped_tags, keep)}
    doomed = reached - needed - keep
    result.kept = sorted(reached & (needed | keep))
    doomed_blobs = {b for digest in doomed for b in store.named(digest, blob=True)} - keep
    result.tags = sorted(f"{r}/{n}:{t}" for r, n, t in dropped_tags)
    result.manifests = sorted(d for d in doomed if store.has_manifest(d))
    blobs = [store.blob_entry(b) for b in doomed_blobs if not set(store.users(b, blob=True)) - doomed]
    result.blobs = sorted(b.digest for b in blobs if b)
    result.bytes = sum(b.size for b in blobs if b)
    if dry_run:
        return result
    with store.batch():
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
        if digest not in seen:
            seen.add(digest)
            todo += store.named(digest, blob=False)
    return seen


def _needed(store: Store, digest: str, dropped_tags: set[tuple[str, str, str]], keep: set[str]) -> bool:
    """Whether a tag that stays, or a recording, leads to the manifest `digest`: itself or an
    index that lists it."""
    seen: set[str] = set()
    todo = [digest]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current != digest and current in keep and store.has_manifest(current):
            return True
        if set(store.tags_naming(current)) - dropped_tags:
            return True
        todo += store.users(current, blob=False)
    return False


@dataclass
class Verified:
    checked: int = 0
    bytes: int = 0
    dropped: list[str] = field(default_factory=list)  # blobs and manifests whose bytes did not match
    manifests: int = 0  # manifests dropped with them: they named a dropped blob
    tags: int = 0  # tags dropped with them (of the kind `hubcache ls` lists)
    strays: int = 0  # files no entry named, left by a crash


def verify(store: Store, progress: Callable[[int], None] | None = None) -> Verified:
    """Re-hash every blob and manifest; drop those whose bytes do not match their digest, each with
    what names it (`Store.drop_rotten`), so every tag left still pulls; remove the files a crash
    left that no entry names."""
    result = Verified()
    for entry in store.blob_entries():
        blob = store.open_stored_blob(entry.digest)
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
            _dropped(result, entry.digest, store.drop_rotten(entry.digest))
    for digest in store.manifest_digests():
        manifest = store.stored_manifest(digest)
        if manifest is None:
            continue
        result.checked += 1
        if digest_of(manifest.body, digest.partition(":")[0]) != digest:
            _dropped(result, digest, store.drop_rotten(digest))
    result.strays = store.remove_strays()
    return result


def _dropped(result: Verified, digest: str, taken: Evicted | None) -> None:
    result.dropped.append(digest)
    if taken:
        result.manifests += taken.manifests
        result.tags += taken.tags


class Upkeep:
    """Evicts by size and age while the proxy runs (options `cache_size_limit`, `expire_unused_days`)."""

    def __init__(self, folder: CacheFolder):
        self.folder = folder
        self.limit: int | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hubcache upkeep")  # starts its thread when first used

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
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def _evict_periodically(self) -> None:
        while True:
            await asyncio.sleep(EVICT_INTERVAL)
            await self.evict()

    async def evict(self) -> Pruned | None:
        store, days = self.folder.store, ctx.options.expire_unused_days
        if store is None or (self.limit is None and not days):
            return None
        loop = asyncio.get_running_loop()
        try:
            evicting = await loop.run_in_executor(
                self._thread,
                functools.partial(EvictionPass, store, store.directory, limit=self.limit, max_unused=days * DAY if days else None, in_use=IN_USE),
            )
            while not evicting.done:
                await loop.run_in_executor(self._thread, evicting.step)
                logger.debug(f"hubcache: evicting: {evicting.result.blobs} blobs so far")
            result = evicting.result
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

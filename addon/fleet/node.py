"""Fleet mode, one node's part: a local miss looks in the shared store (`s3.py`) before upstream,
what the node fetched is put there in the background, and `fleet_lock` lets one node fetch a blob
while the others wait for it there. The store is a tier, not a dependency: while it fails, the node
skips it. docs/fleet.md has the whole."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from ..registry.settings import read_credentials
from ..storage.store import Manifest, Store

if TYPE_CHECKING:
    # Imported when fleet mode is configured: boto3 and redis cost a node without it ~15 MB.
    from .s3 import FleetLock, SharedBlob, SharedStore, SharedStoreError, SharedTag

logger = logging.getLogger(__name__)

# The options that make (or unmake) the connection to the store and the lock.
CONNECTION = {
    "shared_store",
    "shared_store_endpoint",
    "shared_store_region",
    "shared_store_credentials",
    "fleet_lock",
    "ssl_insecure",
    "ssl_verify_upstream_trusted_ca",
}
# mitmproxy has no connect timeout option of its own; this bounds each connect and each read.
TIMEOUT = 10.0
LOCK_TTL = 30.0  # a lock whose node died frees itself after this; its holder refreshes it meanwhile
POLL_FIRST, POLL_MAX = 0.1, 1.0  # seconds between looks for a blob another node is fetching


class Fleet:
    """The shared tier as the cache uses it. Disabled (every call a no-op, every look a miss)
    while `shared_store` is empty."""

    def __init__(self) -> None:
        self.store: SharedStore | None = None
        self.lock: FleetLock | None = None
        self._retry_at = 0.0  # time.monotonic() before which the store is skipped
        self._down = False
        self._refreshers: dict[str, asyncio.Task] = {}  # by digest: the locks this node holds
        self._tasks: set[asyncio.Task] = set()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "shared_store",
            str,
            "",
            "Fleet mode: an S3 bucket shared by several hubcache nodes, as s3://BUCKET[/PREFIX]. "
            "A local miss looks there before upstream; what a node fetches is put there too. "
            "Empty: no shared store.",
        )
        loader.add_option(
            "shared_store_endpoint",
            str,
            "",
            "URL of the S3 endpoint of shared_store (MinIO, Ceph, Swift...); empty: AWS S3.",
        )
        loader.add_option("shared_store_region", str, "", "Region of shared_store; empty: the endpoint's default.")
        loader.add_option(
            "shared_store_credentials",
            str,
            "",
            "@FILE or env:NAME holding ACCESS_KEY:SECRET_KEY for shared_store; empty: the standard "
            "AWS chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials).",
        )
        loader.add_option(
            "fleet_lock",
            str,
            "",
            "redis://HOST:PORT/DB: a lock per blob so that one node of the fleet fetches it from "
            "upstream while the others wait for it in shared_store. Empty: no lock.",
        )
        loader.add_option(
            "shared_store_retry",
            int,
            30,
            "Seconds a node serves from its local cache and upstream alone after shared_store "
            "failed, before it tries the store again.",
        )

    def configure(self, updated: set[str]) -> None:
        if "shared_store_retry" in updated and ctx.options.shared_store_retry < 1:
            raise exceptions.OptionsError("shared_store_retry must be 1 or more seconds")
        if not updated & CONNECTION:
            return
        self.done()
        if not ctx.options.shared_store:
            if ctx.options.fleet_lock:
                raise exceptions.OptionsError("fleet_lock needs shared_store: the lock guards fills of the shared store")
            return
        store, lock = self._connect()
        self.store, self.lock = store, lock
        self._retry_at, self._down = 0.0, False
        with_lock = f", {lock.name}" if lock else ""
        logger.info(f"hubcache: fleet mode, {store.name} bucket {store.bucket}{with_lock}")

    def _connect(self) -> tuple[SharedStore, FleetLock | None]:
        """The store and lock the options name, checked: a bad one stops the start with one line."""
        from .s3 import FleetLock, SharedStore, SharedStoreError

        lock_url = ctx.options.fleet_lock
        if lock_url and not lock_url.startswith(("redis://", "rediss://", "unix://")):
            raise exceptions.OptionsError(f"fleet_lock: {lock_url!r} is not a redis://HOST:PORT/DB URL")
        access_key = secret_key = None
        if source := ctx.options.shared_store_credentials:
            try:
                # Secret keys hold no colon; some access keys do (Swift's ACCOUNT:USER).
                access_key, _, secret_key = read_credentials("shared_store_credentials", source).rpartition(":")
            except ValueError as e:
                raise exceptions.OptionsError(str(e).replace("USER:SECRET", "ACCESS_KEY:SECRET_KEY")) from e
        verify = False if ctx.options.ssl_insecure else (ctx.options.ssl_verify_upstream_trusted_ca or True)
        lock = None
        try:
            store = SharedStore(
                ctx.options.shared_store,
                ctx.options.shared_store_endpoint or None,
                ctx.options.shared_store_region or None,
                access_key,
                secret_key,
                verify,
                TIMEOUT,
            )
            store.check()
            if lock_url:
                # Fleets sharing one Redis lock apart, by the bucket they fill.
                lock = FleetLock(lock_url, TIMEOUT, namespace=f"hubcache:{ctx.options.shared_store}")
                lock.check()
        except SharedStoreError as e:
            raise exceptions.OptionsError(str(e)) from e
        return store, lock

    def done(self) -> None:
        for task in [*self._tasks, *self._refreshers.values()]:
            task.cancel()
        self._refreshers.clear()
        if self.lock:
            self.lock.close()
        self.store = self.lock = None

    @property
    def enabled(self) -> bool:
        return self.store is not None

    @property
    def usable(self) -> bool:
        """Configured, and not skipped after a failure."""
        return self.store is not None and time.monotonic() >= self._retry_at

    # blobs

    async def open_blob(self, digest: str) -> SharedBlob | None:
        """The blob streaming from the shared store, or None (not there, or the store is down)."""
        return await self._use(lambda store: store.open_blob(digest))

    async def claim(self, digest: str) -> bool:
        """Whether this node should fetch `digest` from upstream: it took the lock (kept until
        release()), or there is no lock to take. False: another node is fetching it."""
        if self.lock is None or not self.usable:
            return True  # nobody would wait for a store that is skipped
        if not await _in_thread(self.lock.acquire, digest, LOCK_TTL):
            return False
        self._refreshers[digest] = self._spawn(self._refresh(digest))
        return True

    async def blob_or_claim(self, digest: str) -> SharedBlob | None:
        """The blob from the shared store when another node has fetched it, or is fetching it
        (then waited for). None: this node fetches it from upstream, holding the claim (released
        by release()) where there is a lock."""
        blob = await self.open_blob(digest)
        if blob is None:
            if not await self.claim(digest):
                blob = await self.await_blob(digest)
            elif self.lock is not None and (blob := await self.open_blob(digest)) is not None:
                # Its holder put it and let go between this node's look and its lock.
                self.release(digest)
        return blob

    async def claim_watch(self, entry: str, ttl: float) -> bool:
        """Whether this node checks the watched `entry` this interval (prefetch/watch.py): it took the lock,
        which lapses after `ttl` (never released, so no other node checks it again before), or
        there is no lock to take."""
        if self.lock is None or not self.usable:
            return True
        return bool(await _in_thread(self.lock.acquire, f"watch:{entry}", ttl))

    async def await_blob(self, digest: str) -> SharedBlob | None:
        """The blob another node is fetching, once it is in the shared store; None when the store
        failed or the lock is gone without the blob. The wait lasts while the lock is held, which
        bounds it without a timeout of its own: the holder frees it when its fetch fails (a silent
        upstream after fill_timeout) or once the blob is put, and a dead holder's lock lapses
        after LOCK_TTL. A fixed bound would send every waiting node upstream for a large blob."""
        assert self.lock
        delay = POLL_FIRST
        while (blob := await self.open_blob(digest)) is None:
            if not self.usable or not await _in_thread(self.lock.held, digest):
                return await self.open_blob(digest)  # it may have arrived just before the lock went
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
        return blob

    async def pour(self, blob: SharedBlob, sink: Callable[[bytes], Any]) -> None:
        """Stream `blob` into `sink` (a fill's), then end it. When the store fails midway, the
        fill holds too few bytes to verify and is not committed."""

        def copy() -> None:
            for chunk in blob:
                sink(chunk)

        from .s3 import SharedStoreError

        try:
            await _in_thread(copy)
        except SharedStoreError as e:
            self._failed(e)
        finally:
            await _in_thread(sink, b"")

    def publish_blob(self, digest: str, local: Store) -> None:
        """In the background: put the blob just committed to `local`, then free its lock, so the
        nodes waiting for it find it."""

        def put(store: SharedStore) -> None:
            blob = local.open_blob(digest)
            if blob is None:
                return  # evicted already
            with blob:
                # Through the open descriptor: an eviction cannot pull the file away midway.
                store.put_blob(digest, f"/proc/self/fd/{blob.fileno()}")

        async def publish() -> None:
            try:
                await self._use(put)
            finally:
                self.release(digest)

        self._spawn(publish())

    async def discard_blob(self, digest: str) -> None:
        """The shared store's copy of `digest` did not verify: remove it, so that the next fill
        fetches the blob from upstream and puts a good copy in its place."""
        if self.store is not None:
            logger.warning(f"{self.store.name}: blob {digest} does not hash to its digest; removed from the shared store")
        await self._use(lambda store: store.delete_blob(digest))

    def release(self, digest: str) -> None:
        """Free the lock on `digest` if this node holds it (in the background)."""
        refresher = self._refreshers.pop(digest, None)
        if refresher is None or self.lock is None:
            return
        refresher.cancel()
        self._spawn(_in_thread(self.lock.release, digest))

    async def _refresh(self, digest: str) -> None:
        """Keep the lock while a long fetch runs; it lapses by itself if this node dies."""
        assert self.lock
        while True:
            await asyncio.sleep(LOCK_TTL / 3)
            if not await _in_thread(self.lock.refresh, digest, LOCK_TTL):
                logger.info(f"{self.lock.name}: lost the lock on {digest}; another node may fetch it too")
                return

    # manifests and tags

    async def get_manifest(self, digest: str) -> Manifest | None:
        """The manifest, verified against its digest, or None."""
        return await self._use(lambda store: store.get_manifest(digest))

    async def get_tag(self, registry: str, name: str, tag: str) -> SharedTag | None:
        return await self._use(lambda store: store.get_tag(registry, name, tag))

    def publish_manifest(self, digest: str, media_type: str, body: bytes, tag: tuple[str, str, str] | None) -> None:
        """In the background: put a verified manifest and, for a (registry, repository, tag), the
        tag pointing at it."""

        def put(store: SharedStore) -> None:
            store.put_manifest(digest, media_type, body)
            if tag:
                store.put_tag(*tag, digest, media_type)

        if self.enabled:
            self._spawn(self._use(put))

    # failures

    async def _use(self, call: Callable[[SharedStore], Any]) -> Any:
        """Run `call` on the store in a thread. None when it is missing what was asked, when the
        store is skipped, or when it failed (then skipped for shared_store_retry seconds)."""
        store = self.store
        if store is None or not self.usable:
            return None
        from .s3 import NotInSharedStore, SharedStoreError

        try:
            result = await _in_thread(call, store)
        except NotInSharedStore:
            result = None
        except SharedStoreError as e:
            self._failed(e)
            return None
        except ValueError as e:  # a digest or name hubcache cannot verify: nothing to store
            logger.warning(f"{store.name}: {e}")
            return None
        if self._down:
            self._down = False
            logger.info(f"{store.name}: reachable again; the fleet shares it again")
        return result

    def _failed(self, e: SharedStoreError) -> None:
        """One line per outage, not per request."""
        retry = ctx.options.shared_store_retry
        self._retry_at = time.monotonic() + retry
        if not self._down:
            self._down = True
            logger.warning(f"{e}; serving from the local cache and upstream, trying it again every {retry} s")

    def _spawn[T](self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _in_thread(call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)` in a daemon thread of its own (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = call(*args), None
        except BaseException as e:  # handed to the awaiting coroutine, which raises it
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop closed (hubcache is exiting): nobody waits for this any more

    threading.Thread(target=run, name="hubcache shared store", daemon=True).start()
    return await future

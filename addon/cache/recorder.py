"""The `record` option: every manifest served to a client (hit or miss) goes into a named recording;
listed, not pinned, unless `record_pins`."""

from __future__ import annotations

import asyncio
import logging
import threading

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from ..proxy.routes import route_of
from ..registry import protocol
from ..registry.protocol import Kind
from ..storage.folder import CacheFolder
from ..storage.recordings import Recording, RecordingError

logger = logging.getLogger(__name__)


class Recorder:
    def __init__(self, folder: CacheFolder):
        self.folder = folder
        self.recording: Recording | None = None
        self._lock = threading.Lock()  # notes run in worker threads

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "record",
            str,
            "",
            "Name of a recording to add every pulled image to: its reference, digest, platform "
            "manifests and blobs, kept in <cache_dir>/recordings/<name>.yaml. Empty records nothing.",
        )
        loader.add_option(
            "record_pins",
            bool,
            False,
            "Pin what record adds, so eviction (cache_size_limit, expire_unused_days) never drops it: "
            "only where every client may decide what the disk keeps (prefetch --record sets it). "
            "Off, what clients pull is recorded but may be evicted.",
        )

    def configure(self, updated: set[str]) -> None:
        if "record" not in updated and "cache_dir" not in updated:
            return
        if not ctx.options.record:
            self.recording = None
            return
        try:
            self.recording = Recording.open(ctx.options.cache_dir, ctx.options.record)
        except RecordingError as e:
            raise exceptions.OptionsError(f"record: {e}") from e
        logger.info(f"hubcache: recording pulls into {self.recording.path}")

    async def response(self, flow: http.HTTPFlow) -> None:
        if self.recording is None or not flow.response or flow.response.status_code != 200:
            return
        route = route_of(flow)
        if flow.request.method not in ("GET", "HEAD") or route is None or route.kind is not Kind.MANIFEST:
            return
        headers = flow.response.headers
        body = flow.response.content if flow.request.method == "GET" else None
        if body is not None:
            digest = protocol.digest_of(body, route.reference.partition(":")[0] if route.by_digest else "sha256")
            if route.by_digest and digest != route.reference:
                return  # the cache refused it already; never record what does not verify
        else:
            digest = route.reference if route.by_digest else headers.get("docker-content-digest", "")
            if not protocol.DIGEST_RE.fullmatch(digest):
                return
        media_type = protocol.manifest_media_type(body or b"", headers.get("content-type", ""))
        await asyncio.to_thread(self._note, route, digest, media_type, body)

    def _note(self, route: protocol.Route, digest: str, media_type: str, body: bytes | None) -> None:
        store, recording = self.folder.store, self.recording
        if store is None or recording is None:
            return
        with self._lock:
            changed = recording.note_manifest(
                store, route.registry, route.name, route.reference, digest, media_type, body, ctx.options.record_pins
            )
            if changed:
                try:
                    recording.save()
                except OSError as e:
                    logger.warning(f"recording {recording.name}: not saved: {e.strerror or e}")

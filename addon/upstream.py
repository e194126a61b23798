"""Requests that hubcache itself sends upstream (blob fills, tag revalidation, registry pings).

They run through mitmproxy's own proxy core, exactly like a client replay: the same upstream TLS
verification (`ssl_verify_upstream_trusted_ca`, `ssl_insecure`), upstream proxy mode, name
resolution, `upstream_map` and hooks as the client's own traffic. A user who configured mitmproxy
configured these requests too.

Their answers are read whole only up to `MAX_ANSWER` bytes, counted as they arrive (whatever
Content-Length, chunking or a content encoding claim); a blob fill streams its body to its file
instead (`fill.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from urllib.parse import urljoin

from mitmproxy import ctx, http
from mitmproxy.addons.clientplayback import ReplayHandler

logger = logging.getLogger(__name__)

MARK = "hubcache_subrequest"
UNREAD = "hubcache_unread"  # on hubcache's own request: why its answer was not read (too large...)
MAX_ANSWER = 4 * 1024 * 1024  # registries refuse larger manifests; tokens and errors are far smaller
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5


def is_subrequest(flow: http.HTTPFlow) -> bool:
    return bool(flow.metadata.get(MARK))


def subrequest(like: http.HTTPFlow, request: http.Request) -> http.HTTPFlow:
    """A flow of hubcache's own for `request`, on the connections of the client flow `like`."""
    flow = http.HTTPFlow(like.client_conn, like.server_conn)
    flow.request = request
    # Every byte read counts against MAX_ANSWER: a compressed answer could expand past it.
    request.headers["accept-encoding"] = "identity"
    flow.metadata[MARK] = True
    return flow


class Answers:
    """Reads the answers to hubcache's own requests, bounded (see the module's docstring)."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A fill's own stream callable replaces this one (cache.py runs later).
        if is_subrequest(flow) and flow.response and not flow.response.stream:
            flow.response.stream = _Bounded(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response and isinstance(collected := flow.response.stream, _Bounded):
            flow.response.stream = False
            flow.response.raw_content = collected.body()


class _Bounded:
    """A stream callable that keeps the body, up to MAX_ANSWER bytes (past that it notes why on
    the flow, UNREAD, and keeps nothing)."""

    def __init__(self, flow: http.HTTPFlow):
        self.flow = flow
        self.size = 0
        self.parts: list[bytes] = []

    def __call__(self, data: bytes) -> list[bytes]:
        self.size += len(data)
        if self.size > MAX_ANSWER:
            self.flow.metadata[UNREAD] = f"upstream's answer is larger than {MAX_ANSWER} bytes"
            self.parts.clear()
        elif data:
            self.parts.append(data)
        return []  # nobody reads hubcache's own request

    def body(self) -> bytes:
        """The body as read; a gzip or deflate encoding is decoded here, bounded too, and the
        answer then says identity."""
        raw = b"".join(self.parts)
        assert self.flow.response
        headers = self.flow.response.headers
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate") and raw:
            decoder = zlib.decompressobj(wbits=47)  # gzip or zlib, told apart by their header
            try:
                decoded = decoder.decompress(raw, MAX_ANSWER + 1)
            except zlib.error as e:
                self.flow.metadata[UNREAD] = f"upstream's {encoding} answer does not decode ({e})"
                return b""
            if len(decoded) > MAX_ANSWER or decoder.unconsumed_tail:
                self.flow.metadata[UNREAD] = f"upstream's answer is larger than {MAX_ANSWER} bytes"
                return b""
            raw = decoded
            headers.pop("content-encoding")
            if "content-length" in headers:
                headers["content-length"] = str(len(raw))
        elif encoding != "identity":
            self.flow.metadata[UNREAD] = f"upstream's answer is encoded as {encoding!r}, which hubcache did not ask for"
            return b""
        return raw


async def send(like: http.HTTPFlow, method: str, timeout: float, follow: bool = False) -> http.Response | str:
    """Send the request of `like` upstream again as `method`, with its headers (Accept,
    Authorization). Returns the response, or a short reason why there is none (connection
    error, timeout); never raises for upstream failures. With `follow`, redirects to https
    URLs are followed and the final answer returned (a redirect elsewhere is the answer)."""
    request = like.request.copy()
    request.method = method
    answer = await run(subrequest(like, request), timeout)
    for _ in range(MAX_REDIRECTS if follow else 0):
        if isinstance(answer, str) or answer.status_code not in REDIRECTS:
            break
        if not (location := answer.headers.get("location")):
            break
        request = redirected(request, location)
        if request.scheme != "https":
            break
        answer = await run(subrequest(like, request), timeout)
    return answer


def redirected(request: http.Request, location: str) -> http.Request:
    """The request a redirect asks for. Credentials stay with the origin that was given them: a
    blob host (CDN) gets a signed URL instead, some refuse requests that carry both, and an
    https -> http redirect must not carry them in the clear."""
    target = request.copy()
    target.url = urljoin(request.url, location)
    if (target.scheme, target.host.lower(), target.port) != (request.scheme, request.host.lower(), request.port):
        target.headers.pop("authorization", None)
    return target


async def run(flow: http.HTTPFlow, idle_timeout: float, progress: Callable[[], float] | None = None) -> http.Response | str:
    """Send a subrequest flow and wait for its whole response. It is cut when nothing happened for
    `idle_timeout` seconds: no answer at all, or (with `progress`, the time of the last bytes
    received) a body that stopped growing."""
    circuits = ctx.master.addons.get("circuits")
    if circuits and (refused := circuits.refusal(flow.request.host, flow.client_conn)):
        return refused  # the host is down: not waited for (see circuits.py)
    handler = ReplayHandler(flow, ctx.options)
    task = asyncio.ensure_future(handler.replay())
    started = time.monotonic()
    while not task.done():
        await asyncio.wait({task}, timeout=min(1.0, idle_timeout))
        if reason := flow.metadata.get(UNREAD):
            _cancel(handler, task, f"hubcache: {reason}")
            return reason
        last = max(started, progress()) if progress else started
        if not task.done() and time.monotonic() - last > idle_timeout:
            _cancel(handler, task, "hubcache: upstream stopped answering")
            reason = f"upstream sent nothing for {idle_timeout:g}s"
            if circuits:
                circuits.failed(flow.request.host, reason, flow.request.url)
            return reason
    if reason := flow.metadata.get(UNREAD):
        return reason
    if flow.response is not None and not flow.error:
        return flow.response
    return flow.error.msg if flow.error else "no response"


def _cancel(handler: ReplayHandler, task: asyncio.Future, reason: str) -> None:
    for io in handler.transports.values():
        if io.handler:
            io.handler.cancel(reason)
    task.cancel()

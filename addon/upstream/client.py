"""Requests that hubcache itself sends upstream (fills, revalidation, access checks, tokens, pings),
run through mitmproxy's own proxy core, so its upstream TLS, proxy and `upstream_map` settings
apply. Answers are read only up to `MAX_ANSWER` bytes; no answer is an `UpstreamError`, never a
value in place of a response."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlencode, urljoin

from mitmproxy import connection, http
from mitmproxy.net.http import url

from ..mitm import internals
from ..mitm.flows import Mark, is_subrequest
from ..registry import protocol
from ..registry.protocol import Route
from . import fetcher

logger = logging.getLogger(__name__)


class Breaker(Protocol):
    """The circuit breaker an `Upstream` is given, as its users see it (upstream/circuits.py builds
    on this module, so it is named here by what it offers)."""

    def refusal(self, host: str, port: int, client: connection.Client) -> str | None: ...
    async def attempt(self, host: str, port: int) -> bool: ...
    def failed(self, request: http.Request, reason: str) -> None: ...

MAX_ANSWER = protocol.MAX_MANIFEST  # tokens and errors are far smaller than the largest manifest
MAX_REDIRECTS = 5


class UpstreamError(Exception):
    """Upstream gave no answer hubcache can use. `str(error)` says why, in an operator's words."""


class Unreachable(UpstreamError):
    """No answer: the connection failed or broke, or the host is known to be down (upstream/circuits.py)."""


class Silent(UpstreamError):
    """Nothing arrived for the idle timeout; the request was cancelled."""


class Unreadable(UpstreamError):
    """An answer hubcache will not read: larger than MAX_ANSWER, or in an encoding it did not ask for."""


class Unfollowable(UpstreamError):
    """A redirect hubcache does not follow: to a URL it cannot read (`file:///`, `https://[::1`),
    or (`Renamed`) to what names something else."""


class Renamed(Unfollowable):
    """A registry redirected a request to another API path of its own host that names another
    repository, kind or reference: followed, it would put one thing in the cache under another's name."""


class Unavailable(UpstreamError):
    """Upstream answered that it cannot serve now (5xx, 429). Its answer is kept."""

    def __init__(self, response: http.Response):
        super().__init__(f"upstream answered {response.status_code}")
        self.response = response


def available(response: http.Response) -> http.Response:
    """The one test of "upstream failed" for an answer that came: `response`, unless upstream says
    it cannot serve now (a 5xx, or 429 Too Many Requests); then Unavailable."""
    if response.status_code >= 500 or response.status_code == 429:
        raise Unavailable(response)
    return response


# The client's headers upstream needs to answer a pull: content negotiation, the client's own
# credentials, and who is asking. Nothing else of the client's request travels.
FORWARDED = ("accept", "authorization", "user-agent")


def request_for(like: http.HTTPFlow, route: Route, method: str) -> http.Request:
    """The request hubcache sends upstream for a client's request of `route`, built from the parse
    alone: https to the host and port the request verifiably goes to (proxy/routes.py, proxy/interception.py), the
    route's canonical target, and only the FORWARDED headers. Never the client's own target,
    query or body."""
    client = like.request
    authority = url.hostport("https", client.host, client.port)
    request = http.Request.make(method, f"https://{authority}{route.target}")
    del request.headers["content-length"]  # a pull has no body
    request.http_version = client.http_version
    for name in FORWARDED:
        if values := client.headers.get_all(name):
            request.headers.set_all(name, values)
    request.host_header = authority
    return request


def token_request_for(like: http.HTTPFlow) -> http.Request:
    """The request hubcache relays to a token host for a client's token request, rebuilt from its
    parse (protocol.token_target): its clean path, and only the token fields of its query or form.
    BadRequest for a request that does not parse."""
    client = like.request
    path, query = protocol.token_target(client.path)
    authority = url.hostport("https", client.host, client.port)
    target = f"{path}?{urlencode(query, safe=':/')}" if query else path
    request = http.Request.make(client.method, f"https://{authority}{target}")
    request.http_version = client.http_version
    for name in FORWARDED:
        if values := client.headers.get_all(name):
            request.headers.set_all(name, values)
    if client.method == "POST":
        form = protocol.token_fields(client.get_text(strict=False) or "")
        request.headers["content-type"] = "application/x-www-form-urlencoded"
        request.content = urlencode(form).encode()
    request.host_header = authority
    return request


def only_upstream(flow: http.HTTPFlow) -> bool:
    """Whether hubcache's own request is for something only upstream can give the client (a
    miss, Mark.MISS, or a blob fill): then a host that is down is worth a probe at once."""
    return bool(flow.metadata.get(Mark.MISS) or flow.metadata.get(Mark.FILL))


def subrequest(like: http.HTTPFlow, request: http.Request) -> http.HTTPFlow:
    """A flow of hubcache's own for `request`, on the connections of the client flow `like`."""
    flow = http.HTTPFlow(like.client_conn, like.server_conn)
    flow.request = request
    # Every byte read counts against MAX_ANSWER: a compressed answer could expand past it.
    request.headers["accept-encoding"] = "identity"
    flow.metadata[Mark.SUBREQUEST] = True
    return flow


class BoundedAnswers:
    """Reads the answers to hubcache's own requests, bounded (see the module's docstring)."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A fill's sink replaces this one once the hooks ran (internals.take).
        if is_subrequest(flow) and flow.response and not flow.response.stream:
            flow.response.stream = _Bounded(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response and isinstance(collected := flow.response.stream, _Bounded):
            flow.response.stream = False
            flow.response.raw_content = collected.body()


class _Bounded:
    """A stream callable that keeps the body, up to MAX_ANSWER bytes (past that it notes why on
    the flow, Mark.UNREAD, and keeps nothing)."""

    def __init__(self, flow: http.HTTPFlow):
        self.flow = flow
        self.size = 0
        self.parts: list[bytes] = []

    def __call__(self, data: bytes | memoryview) -> list[bytes]:
        self.size += len(data)
        if self.size > MAX_ANSWER:
            self.flow.metadata[Mark.UNREAD] = f"upstream's answer is larger than {MAX_ANSWER} bytes"
            self.parts.clear()
        elif data:
            self.parts.append(bytes(data))  # the fetcher reads into its buffer again (bytes from mitmproxy: no copy)
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
                self.flow.metadata[Mark.UNREAD] = f"upstream's {encoding} answer does not decode ({e})"
                return b""
            if len(decoded) > MAX_ANSWER or decoder.unconsumed_tail:
                self.flow.metadata[Mark.UNREAD] = f"upstream's answer is larger than {MAX_ANSWER} bytes"
                return b""
            raw = decoded
            headers.pop("content-encoding")
            if "content-length" in headers:
                headers["content-length"] = str(len(raw))
        elif encoding != "identity":
            self.flow.metadata[Mark.UNREAD] = f"upstream's answer is encoded as {encoding!r}, which hubcache did not ask for"
            return b""
        return raw


class Upstream:
    """The one way out for hubcache's own requests. The addons that send them are given an
    instance (tests give them a fake one instead). `circuits`, the breaker asked before each
    request, is set by make_addons (the breaker sends its probes through this instance)."""

    def __init__(self, circuits: Breaker | None = None) -> None:
        self.circuits = circuits

    async def send(self, like: http.HTTPFlow, request: http.Request, timeout: float, follow: bool = False, miss: bool = False) -> http.Response:
        """Send `request` (see request_for) upstream for the client flow `like`, and return the
        response; UpstreamError when there is none. With `follow`, redirects to https URLs are
        followed and the final answer returned (a redirect elsewhere is the answer). With `miss`,
        only upstream can answer it (see `only_upstream`)."""
        flow = subrequest(like, request)
        flow.metadata[Mark.MISS] = miss
        answer = await self.run(flow, timeout)
        for _ in range(MAX_REDIRECTS if follow else 0):
            if answer.status_code not in protocol.REDIRECTS or not (location := answer.headers.get("location")):
                break
            request = redirected(request, location)
            if request.scheme != "https":
                break
            answer = await self.run(subrequest(like, request), timeout)
        return answer

    async def run(
        self, flow: http.HTTPFlow, idle_timeout: float, progress: Callable[[], float] | None = None, sink: internals.Sink | None = None
    ) -> http.Response:
        """Send a subrequest flow and wait for its whole response; UpstreamError when there is none.
        It is cut when nothing happened for `idle_timeout` seconds: no answer at all, or (with
        `progress`, the time of the last bytes received) a body that stopped growing. With a
        `sink`, the answer's owner (a fill) says where its body goes, once its head is in."""
        circuits = self.circuits
        request = flow.request
        if circuits and (refused := circuits.refusal(request.host, request.port, flow.client_conn)):
            # The host is down: not waited for, unless only upstream can answer this; then it is
            # worth one probe (see upstream/circuits.py).
            if not (only_upstream(flow) and await circuits.attempt(request.host, request.port)):
                raise Unreachable(refused)
        exchange = _start(flow, idle_timeout, sink)
        task = exchange.task
        started = time.monotonic()
        while not task.done():
            await asyncio.wait({task}, timeout=min(1.0, idle_timeout))
            if reason := flow.metadata.get(Mark.UNREAD):
                exchange.cancel(f"hubcache: {reason}")
                raise Unreadable(reason)
            last = max(started, progress()) if progress else started
            if not task.done() and time.monotonic() - last > idle_timeout:
                exchange.cancel("hubcache: upstream stopped answering")
                reason = f"upstream sent nothing for {idle_timeout:g}s"
                if circuits:
                    circuits.failed(request, reason)
                raise Silent(reason)
        if reason := flow.metadata.get(Mark.UNREAD):
            raise Unreadable(reason)
        if flow.response is not None and not flow.error:
            return flow.response
        reason = flow.error.msg if flow.error else "no response"
        if circuits:
            circuits.failed(request, reason)
        raise Unreachable(reason)


def redirected(request: http.Request, location: str) -> http.Request:
    """The request a redirect asks for. Credentials stay with the origin that was given them: a
    blob host (CDN) gets a signed URL instead, some refuse requests that carry both, and an
    https -> http redirect must not carry them in the clear. A redirect to an API path of the same
    host must name what the request named (Renamed otherwise): a registry that cleans paths would
    answer for whatever the cleaned path names. A location that is no URL: Unfollowable."""
    target = request.copy()
    try:
        target.url = urljoin(request.url, location)
    except ValueError:
        raise Unfollowable(f"upstream redirected {request.path[:200]} to {location[:200]!r}, which is no URL to follow") from None
    if target.host.lower() == request.host.lower() and target.path.startswith("/v2"):
        if (moved := _parsed(target)) is None or moved != _parsed(request):
            raise Renamed(f"upstream redirected {request.path[:200]} to {target.path[:200]}, which names something else; not followed")
    if (target.scheme, target.host.lower(), target.port) != (request.scheme, request.host.lower(), request.port):
        target.headers.pop("authorization", None)
    return target


def _parsed(request: http.Request) -> Route | None:
    try:
        return protocol.parse_route(request.host, request.path)
    except protocol.BadRequest:
        return None


def _start(flow: http.HTTPFlow, idle_timeout: float, sink: internals.Sink | None) -> internals.Replay | fetcher.Exchange:
    """A blob fill's bytes run on a thread of their own (upstream/fetcher.py) wherever it can carry them."""
    if flow.metadata.get(Mark.FILL) and fetcher.handles(flow):
        return fetcher.Exchange(flow, idle_timeout, sink)
    return internals.Replay(flow, sink)

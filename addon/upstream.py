"""Requests that hubcache itself sends upstream (blob fills, tag revalidation, registry pings).

They run through mitmproxy's own proxy core, exactly like a client replay: the same upstream TLS
verification (`ssl_verify_upstream_trusted_ca`, `ssl_insecure`), upstream proxy mode, name
resolution, `upstream_map` and hooks as the client's own traffic. A user who configured mitmproxy
configured these requests too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mitmproxy import ctx, http
from mitmproxy.addons.clientplayback import ReplayHandler

logger = logging.getLogger(__name__)

MARK = "hubcache_subrequest"


def is_subrequest(flow: http.HTTPFlow) -> bool:
    return bool(flow.metadata.get(MARK))


def subrequest(like: http.HTTPFlow, request: http.Request) -> http.HTTPFlow:
    """A flow of hubcache's own for `request`, on the connections of the client flow `like`."""
    flow = http.HTTPFlow(like.client_conn, like.server_conn)
    flow.request = request
    flow.metadata[MARK] = True
    return flow


async def send(like: http.HTTPFlow, method: str, timeout: float) -> http.Response | str:
    """Send the request of `like` upstream again as `method`, with its headers (Accept,
    Authorization). Returns the response, or a short reason why there is none (connection
    error, timeout); never raises for upstream failures."""
    request = like.request.copy()
    request.method = method
    return await run(subrequest(like, request), timeout)


async def run(flow: http.HTTPFlow, idle_timeout: float, progress: Callable[[], float] | None = None) -> http.Response | str:
    """Send a subrequest flow and wait for its whole response. It is cut when nothing happened for
    `idle_timeout` seconds: no answer at all, or (with `progress`, the time of the last bytes
    received) a body that stopped growing."""
    handler = ReplayHandler(flow, ctx.options)
    task = asyncio.ensure_future(handler.replay())
    started = time.monotonic()
    while not task.done():
        await asyncio.wait({task}, timeout=min(1.0, idle_timeout))
        last = max(started, progress()) if progress else started
        if not task.done() and time.monotonic() - last > idle_timeout:
            for io in handler.transports.values():
                if io.handler:
                    io.handler.cancel("hubcache: upstream stopped answering")
            task.cancel()
            return f"upstream sent nothing for {idle_timeout:g}s"
    if flow.response is not None and not flow.error:
        return flow.response
    return flow.error.msg if flow.error else "no response"

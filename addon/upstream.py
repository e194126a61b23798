"""Requests that hubcache itself sends upstream (tag revalidation, registry pings).

They run through mitmproxy's own proxy core, exactly like a client replay: the same upstream TLS
verification (`ssl_verify_upstream_trusted_ca`, `ssl_insecure`), upstream proxy mode, name
resolution, `upstream_map` and hooks as the client's own traffic. A user who configured mitmproxy
configured these requests too.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, http
from mitmproxy.addons.clientplayback import ReplayHandler

logger = logging.getLogger(__name__)

MARK = "hubcache_subrequest"


def is_subrequest(flow: http.HTTPFlow) -> bool:
    return bool(flow.metadata.get(MARK))


async def send(like: http.HTTPFlow, method: str, timeout: float) -> http.Response | str:
    """Send the request of `like` upstream again as `method`, with its headers (Accept,
    Authorization).

    Returns the response, or a short reason why there is none (connection error, timeout); never
    raises for upstream failures.
    """
    flow = http.HTTPFlow(like.client_conn, like.server_conn)
    flow.request = like.request.copy()
    flow.request.method = method
    flow.metadata[MARK] = True
    handler = ReplayHandler(flow, ctx.options)
    try:
        await asyncio.wait_for(handler.replay(), timeout)
    except TimeoutError:
        for io in handler.transports.values():
            if io.handler:
                io.handler.cancel("hubcache: upstream timed out")
        return f"no answer within {timeout:g}s"
    if flow.response is not None:
        return flow.response
    return flow.error.msg if flow.error else "no response"

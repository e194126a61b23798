"""Request bodies on requests hubcache answers itself: there are none.

The pull API (GET and HEAD of a registry), anything to a registry while offline, a token request
beyond its small form, and every request hubcache answers already in `requestheaders` (the
mirror's early answers, refusals) take no body. `Passthrough` (hosts.py) marks such a request
(`takes_none`); if it comes with a body anyway (any length, chunked, or HTTP/2 DATA with no
content-length), the client gets `413` with the registry error at once, before a byte of the body
is kept, and its connection is closed. So the proxy's memory does not depend on what a client
sends. Everything hubcache passes through (pushes, other hosts) is streamed instead.

The close lingers: what still arrives is dropped as it comes for LINGER seconds at most (a client
that read the answer stops sending and closes first), then the connection is closed. Closing a
socket with unread data in it resets the connection, and a client still sending when told of
the reset may never read the answer that came before it.

mitmproxy's hooks cannot do this: after `requestheaders` a body is either streamed upstream or
read whole before any answer goes out, and only its HTTP layer knows whether an HTTP/2 request
has a body at all (END_STREAM on the HEADERS frame; the headers need not say). So hubcache gives
mitmproxy's HTTP layers streams of its own (`internals.guard`, from the `next_layer` hook) that
refuse it as this module decides.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from . import answers
from .flows import Mark

logger = logging.getLogger(__name__)

LINGER = 5.0  # seconds a refused client has to read its answer before its connection is cut


def takes_none(flow: http.HTTPFlow) -> None:
    """Mark a request hubcache answers itself: a body on it is refused."""
    flow.metadata[Mark.NO_BODY] = True
    # No "100 Continue" invites a body hubcache would refuse: the answer comes instead.
    flow.request.headers.pop("expect", None)


def refuses_body(flow: http.HTTPFlow) -> bool:
    """Whether a body on this request is refused (`takes_none`)."""
    return bool(flow.metadata.get(Mark.NO_BODY))


def announces_body(request: http.Request) -> bool:
    """Whether the request's headers say a body follows (HTTP/2 may send one without saying)."""
    length = request.headers.get("content-length", "0").strip()
    return "transfer-encoding" in request.headers or length != "0"


def refuse(flow: http.HTTPFlow) -> None:
    """The answer to a request that came with a body it takes none of, and the operator's line."""
    request = flow.request
    logger.info(
        f"hubcache: refused a {request.method} with a body to {request.host} from "
        f"{flow.client_conn.peername[0]}: hubcache answers it itself and it takes none"
    )
    answers.error(flow, 413, "UNSUPPORTED", "this request takes no body (hubcache refuses one and closes the connection)")
    assert flow.response
    if not (request.is_http2 or request.is_http3):
        flow.response.headers["Connection"] = "close"

"""Request bodies on requests hubcache answers itself: there are none. Such a request that comes
with a body gets `413` at once, before a byte of it is kept, and its connection is closed after a
short linger. mitmproxy's hooks cannot refuse a body unread (only its HTTP layer knows whether an
HTTP/2 request has one), so `internals.guard` gives its HTTP layers streams that refuse it as this
module decides."""

from __future__ import annotations

import logging

from mitmproxy import http

from ..registry.protocol import ErrorCode
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
    answers.error(flow, ErrorCode.BODY_UNSUPPORTED, "this request takes no body (hubcache refuses one and closes the connection)")
    assert flow.response
    if not (request.is_http2 or request.is_http3):
        flow.response.headers["Connection"] = "close"

"""Request bodies on requests hubcache answers itself: there are none. Such a request that comes
with a body gets `413` at once, before a byte of it is kept, and its connection is closed after a
short linger. mitmproxy's hooks cannot refuse a body unread (only its HTTP layer knows whether an
HTTP/2 request has one), so `guard` gives its HTTP layers streams of hubcache's own."""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    DropStream,
    HttpLayer,
    HttpResponseHeadersHook,
    HttpStream,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    ResponseEndOfMessage,
    SendHttp,
)

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


def announces_body(request: http.Request) -> bool:
    """Whether the request's headers say a body follows (HTTP/2 may send one without saying)."""
    length = request.headers.get("content-length", "0").strip()
    return "transfer-encoding" in request.headers or length != "0"


def guard(top: layer.Layer | None) -> None:
    """Give the HTTP layers of a freshly decided layer stack hubcache's streams."""
    current: object = top
    while current is not None:
        if type(current) is HttpLayer:
            current.__class__ = _GuardedLayer
        current = getattr(current, "child_layer", None)


class _GuardedLayer(HttpLayer):
    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        self.streams[stream_id] = _Stream(self.context.fork(), stream_id)
        yield from self.event_to_child(self.streams[stream_id], events.Start())


class _Stream(HttpStream):
    """mitmproxy's stream, except that a request marked `takes_none` never has its body read."""

    _linger: commands.RequestWakeup | None = None

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and event.command is self._linger:
            yield commands.CloseConnection(self.context.client)
        else:
            yield from super()._handle_event(event)

    def state_wait_for_request_headers(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        yield from super().state_wait_for_request_headers(event)
        # After the requestheaders hook: a body is still to come unless END_STREAM said otherwise.
        if event.end_stream or not self.flow.metadata.get(Mark.NO_BODY):
            return
        if self.client_state != self.state_consume_request_body:
            return  # killed or failed already
        if announces_body(self.flow.request):
            yield from self._refuse()
        else:
            self.client_state = self.state_expect_no_body

    def state_expect_no_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        """HTTP/2 without a length: the end of the stream, or data that is refused."""
        if isinstance(event, RequestEndOfMessage):
            self.client_state = self.state_consume_request_body
            yield from self.client_state(event)
        elif not (isinstance(event, RequestData) and not event.data):
            yield from self._refuse()

    def _refuse(self) -> layer.CommandGenerator[None]:
        flow, request = self.flow, self.flow.request
        logger.info(
            f"hubcache: refused a {request.method} with a body to {request.host} from "
            f"{flow.client_conn.peername[0]}: hubcache answers it itself and it takes none"
        )
        # Whatever the client still sends is dropped as it comes, never kept.
        self.client_state = self.state_errored
        answers.error(flow, ErrorCode.BODY_UNSUPPORTED, "this request takes no body (hubcache refuses one and closes the connection)")
        assert flow.response
        if not (request.is_http2 or request.is_http3):
            flow.response.headers["Connection"] = "close"
        yield HttpResponseHeadersHook(flow)
        yield from self.send_response()
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        flow.live = False
        yield DropStream(self.stream_id)
        self._linger = commands.RequestWakeup(LINGER)
        yield self._linger

"""Canonicalize, then act: every registry request is parsed once, here, into its `Route`, noted on
the flow for the addons after this one; a target that is not the canonical form of what it parses to
is answered 400 before anything else happens. Runs at `requestheaders`, after the mirror."""

from __future__ import annotations

import logging

from mitmproxy import http

from ..mitm import answers
from ..mitm.flows import Mark, is_subrequest
from ..registry import protocol
from ..registry.protocol import Kind, Route
from .interception import Interception

logger = logging.getLogger(__name__)


class Routes:
    def __init__(self, hosts: Interception) -> None:
        self.hosts = hosts

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or is_subrequest(flow):
            return
        if (host := self.hosts.registry(flow)) is None:
            return
        request = flow.request
        try:
            route = protocol.parse_route(host, request.path)
        except protocol.BadRequest as e:
            logger.info(f"hubcache: refused {request.method} {request.path[:200]!r} to {host} from {_peer(flow)}: {e.message}")
            answers.error(flow, e.code, e.message)
            return
        # Plain values: flows are saved and replayed by mitmproxy (`-w`), which serializes metadata.
        flow.metadata[Mark.ROUTE] = [route.kind.value, route.registry, route.name, route.reference, route.artifact_type]
        if route.kind is not Kind.OTHER:
            request.path = route.target


def route_of(flow: http.HTTPFlow) -> Route | None:
    """The route `Routes` parsed for this client request, if it is a registry's."""
    match flow.metadata.get(Mark.ROUTE):
        case [str(kind), str(registry), str(name), str(reference), str(artifact_type)]:
            return Route(Kind(kind), registry, name, reference, artifact_type)
    return None


def _peer(flow: http.HTTPFlow) -> str:
    return flow.client_conn.peername[0] if flow.client_conn.peername else "?"

"""The answers hubcache writes itself: registry errors, the /v2/ check, a manifest from the store,
the redirect to the blob server, a local token. Each is marked `Mark.ANSWERED`, so that the
addons counting upstream's answers (metrics, circuits) leave it alone."""

from __future__ import annotations

import time

from mitmproxy import http

from ..registry import protocol
from ..storage.store import Manifest
from .flows import Mark


def answer(flow: http.HTTPFlow, status: int, body: bytes, headers: dict[str, str]) -> None:
    flow.metadata[Mark.ANSWERED] = True
    flow.response = http.Response.make(status, body, headers)
    # A HEAD answer states the size of the body it does not carry.
    flow.response.headers["Content-Length"] = headers["Content-Length"]


def error(flow: http.HTTPFlow, code: protocol.ErrorCode, message: str, extra: dict[str, str] | None = None) -> None:
    """A registry error (`{"errors": [...]}`) with its code's status, as a client of the registry expects it."""
    body = protocol.error_body(code, message)
    answer(flow, code.status, body if flow.request.method != "HEAD" else b"", {**protocol.error_headers(len(body)), **(extra or {})})


def ping(flow: http.HTTPFlow) -> None:
    """The API version check (`/v2/`): yes."""
    answer(flow, 200, b"{}", {**protocol.API_VERSION_HEADERS, "Content-Type": "application/json", "Content-Length": "2"})


def manifest(flow: http.HTTPFlow, cached: Manifest) -> int:
    """A manifest from the store; returns the bytes of body sent."""
    headers = protocol.manifest_headers(cached.digest, cached.media_type, len(cached.body))
    body = cached.body if flow.request.method == "GET" else b""
    answer(flow, 200, body, headers)
    return len(body)


def blob_redirect(flow: http.HTTPFlow, digest: str, url: str) -> None:
    """Send the client to the blob server for the blob's bytes."""
    headers = {**protocol.API_VERSION_HEADERS, "Location": url, "Docker-Content-Digest": digest, "Content-Length": "0"}
    answer(flow, 307, b"", headers)


def local_token(flow: http.HTTPFlow, token: str) -> None:
    """A token of hubcache's own, for a client whose token host cannot answer (localtokens.py)."""
    body = protocol.local_token_answer(token, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    answer(flow, 200, body, {"Content-Type": "application/json", "Content-Length": str(len(body))})

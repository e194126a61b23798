"""The one writer of a client's answer. The data path decides (a `Decision`: hubcache's own answer,
a registry error, upstream's answer relayed, or the request passed through) and `give` writes it;
the addons outside the data path answer with `error` and `ping` directly. Each answer of
hubcache's own is marked `Mark.ANSWERED`, so that the addons counting upstream's answers
(metrics, circuits) leave it alone."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mitmproxy import http

from ..registry import protocol
from ..storage.store import Manifest
from .flows import Mark


@dataclass(frozen=True)
class Serve:
    """An answer of hubcache's own: a manifest from the store, the redirect to the blob server,
    the /v2/ check, a local token..."""

    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class RegistryError:
    """A registry error (`{"errors": [...]}`), with its code's status."""

    code: protocol.ErrorCode
    message: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Relay:
    """Upstream's answer to hubcache's own request, given to the client as it came. `counted`:
    that request was counted as upstream's answer, so the addons counting those skip this copy."""

    response: http.Response
    counted: bool = True


@dataclass(frozen=True)
class PassThrough:
    """The client's own request goes upstream, and upstream's answer to it back to the client."""


Decision = Serve | RegistryError | Relay | PassThrough


def give(flow: http.HTTPFlow, decision: Decision) -> None:
    """Write the client's answer as decided."""
    match decision:
        case Serve(status, body, headers):
            answer(flow, status, body, headers)
        case RegistryError(code, message, headers):
            error(flow, code, message, headers)
        case Relay(response, counted):
            if counted:
                flow.metadata[Mark.RELAYED] = True
            flow.response = response
        case PassThrough():
            pass


def answer(flow: http.HTTPFlow, status: int, body: bytes, headers: dict[str, str]) -> None:
    flow.metadata[Mark.ANSWERED] = True
    # mitmproxy writes whatever body an addon sets, even after a HEAD: bytes the client would read
    # as the start of its next answer on the connection. A HEAD answer states the size of the
    # body it does not carry.
    flow.response = http.Response.make(status, body if flow.request.method != "HEAD" else b"", headers)
    flow.response.headers["Content-Length"] = headers["Content-Length"]


def error(flow: http.HTTPFlow, code: protocol.ErrorCode, message: str, extra: dict[str, str] | None = None) -> None:
    """A registry error (`{"errors": [...]}`) with its code's status, as a client of the registry expects it."""
    body = protocol.error_body(code, message)
    answer(flow, code.status, body, {**protocol.error_headers(len(body)), **(extra or {})})


def ping(flow: http.HTTPFlow) -> None:
    """The API version check (`/v2/`), answered by an addon outside the data path."""
    give(flow, version_check())


def version_check() -> Serve:
    """The API version check (`/v2/`): yes."""
    return Serve(200, b"{}", {**protocol.API_VERSION_HEADERS, "Content-Type": "application/json", "Content-Length": "2"})


def manifest(cached: Manifest, method: str) -> Serve:
    """A manifest from the store (its body only for a GET)."""
    headers = protocol.manifest_headers(cached.digest, cached.media_type, len(cached.body))
    return Serve(200, cached.body if method == "GET" else b"", headers)


def blob(digest: str, body: bytes) -> Serve:
    """A blob from the store, in the answer itself."""
    return Serve(200, body, protocol.blob_headers(digest, len(body)))


def blob_redirect(digest: str, url: str) -> Serve:
    """Send the client to the blob server for the blob's bytes."""
    headers = {**protocol.API_VERSION_HEADERS, "Location": url, "Docker-Content-Digest": digest, "Content-Length": "0"}
    return Serve(307, b"", headers)


def local_token(token: str) -> Serve:
    """A token of hubcache's own, for a client whose token host cannot answer (cache/local_tokens.py)."""
    body = protocol.local_token_answer(token, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return Serve(200, body, {"Content-Type": "application/json", "Content-Length": str(len(body))})

"""A real HTTPS double of Docker Hub for the integration tests.

`DockerHubDouble` is one threaded HTTPS server on 127.0.0.1 that answers for every Docker Hub host
name at once, choosing by the request's ``Host`` header:

* ``registry-1.docker.io`` and ``index.docker.io``: the ``/v2`` API with Docker Hub's bearer-token
  challenge, its rate-limit headers and its ``307`` redirect of blob downloads to the CDN;
* ``auth.docker.io``: the token service (``GET /token`` and containerd's ``POST /token`` form);
* ``production.cloudflare.docker.com``: the CDN, which checks the signed URL and streams the blob.

Content is not invented: manifests and blobs come from a real distribution registry (the
"upstream") that the tests fill with ``skopeo``. Manifest bodies and their ``Content-Type``,
``Content-Length``, ``Docker-Content-Digest`` and ``Etag`` are passed on byte for byte; blobs are
streamed in chunks (never held in memory), and ``Range`` requests reach the upstream unchanged, so a
``206`` and its ``Content-Range`` are the upstream's own.

What the double guarantees (see registry-wire-facts.md for why each matters):

* ``/v2/`` without a valid token answers 401 with
  ``Bearer realm="https://auth.docker.io/token",service="registry.docker.io"``; with one,
  200 ``{}``.
* Manifest and blob requests need a token whose scope covers ``repository:<name>:pull``; otherwise
  401 with ``scope="repository:<name>:pull"`` in the challenge (plus ``error="insufficient_scope"``
  when a valid token merely lacks the scope).
* Anonymous tokens cover every repository except those in ``private_repos``; a private repository
  is only granted to a token request carrying its Basic credentials. Basic credentials that match
  no configured user get 401 ``{"details":"incorrect username or password"}`` from the token
  service, as on Docker Hub. Tokens are opaque random strings valid for ``token_ttl`` seconds.
* Only manifest GETs count against ``rate_limit`` (HEADs, blobs and the CDN are free): every GET
  that passes the token check and reaches the upstream counts, whatever the upstream answers. Every
  manifest answer carries ``ratelimit-limit: <limit>;w=21600`` and
  ``ratelimit-remaining: <n>;w=21600``; past the limit a GET gets 429 ``TOOMANYREQUESTS`` with
  ``Retry-After`` while HEADs keep working. There is a single counter for the whole instance (one
  client address), authenticated or not.
* A blob GET on the registry answers 307 with an empty body and a ``Location`` on the CDN signed
  with a per-instance secret, valid for ``cdn_url_ttl`` seconds; the CDN answers 403 to a bad or
  expired signature. A blob HEAD on the registry answers like the upstream, without a redirect.
  The CDN never looks at ``Authorization`` (clients must drop it across the redirect; the log
  records whether they did).

Every request is recorded (`RequestRecord`) for assertions; faults are explicit, one-shot switches
(`fail_next`, `hang_next`, `truncate_cdn_after`, `stall_cdn_after`, `corrupt_cdn`,
`corrupt_manifests`), all off by default.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import http.client
import json
import logging
import posixpath
import re
import secrets
import socket
import socketserver
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from os import PathLike
from typing import Any, Final, Literal

log = logging.getLogger(__name__)

REGISTRY_HOSTS: Final = ("registry-1.docker.io", "index.docker.io")
AUTH_HOST: Final = "auth.docker.io"
CDN_HOST: Final = "production.cloudflare.docker.com"
#: Every name the double answers for: the SANs its certificate needs.
ALL_HOSTS: Final = (*REGISTRY_HOSTS, AUTH_HOST, CDN_HOST)

SERVICE: Final = "registry.docker.io"
REALM: Final = f"https://{AUTH_HOST}/token"
RATE_LIMIT_WINDOW: Final = 21600

Kind = Literal["ping", "token", "manifest", "blob", "cdn", "other"]
KINDS: Final[tuple[str, ...]] = ("ping", "token", "manifest", "blob", "cdn", "other")

_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_MANIFEST_RE: Final = re.compile(rf"^/v2/(?P<name>{_NAME})/manifests/(?P<ref>[^/]+)$")
_BLOB_RE: Final = re.compile(rf"^/v2/(?P<name>{_NAME})/blobs/(?P<digest>[^/]+)$")
_REFERRERS_RE: Final = re.compile(rf"^/v2/(?P<name>{_NAME})/referrers/(?P<digest>[^/]+)$")
_SHA256_RE: Final = re.compile(r"^sha256:(?P<hex>[0-9a-f]{64})$")
_CDN_RE: Final = re.compile(
    r"^/registry-v2/docker/registry/v2/blobs/sha256/"
    r"(?P<prefix>[0-9a-f]{2})/(?P<hex>[0-9a-f]{64})/data$"
)

_CHUNK: Final = 64 * 1024
#: The longest a CDN answer stays stalled (stall_cdn_after) when nobody resumes it.
STALL_LIMIT: Final = 300.0
_ERROR_CODES: Final = {
    400: ("BAD_REQUEST", "bad request"),
    401: ("UNAUTHORIZED", "authentication required"),
    403: ("DENIED", "requested access to the resource is denied"),
    404: ("NAME_UNKNOWN", "repository name not known to registry"),
    405: ("UNSUPPORTED", "The operation is unsupported."),
    429: (
        "TOOMANYREQUESTS",
        "You have reached your pull rate limit. You may increase the limit by authenticating and "
        "upgrading: https://www.docker.com/increase-rate-limit",
    ),
    500: ("UNKNOWN", "unknown error"),
    502: ("UNAVAILABLE", "service unavailable"),
    503: ("UNAVAILABLE", "service unavailable"),
    504: ("UNAVAILABLE", "service unavailable"),
}


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the double answered it."""

    host: str
    method: str
    path: str
    """The request path without its query string."""
    status: int
    bytes_sent: int
    """Body bytes actually written (less than Content-Length after a truncation or a disconnect)."""
    had_authorization: bool
    kind: str
    """One of ``KINDS``."""
    range: str | None = None
    """The request's ``Range`` header, if any."""
    query: tuple[tuple[str, str], ...] = ()
    """The request's query parameters, in order."""


@dataclass(frozen=True, slots=True)
class _Grant:
    repos: frozenset[str]
    expires_at: float


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    """The registry's error JSON: ``{"errors":[{"code":..,"message":..,"detail":..}]}``."""
    return json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()


class DockerHubDouble:
    """A threaded HTTPS server on 127.0.0.1 that behaves like Docker Hub's hosts (see module doc).

    ``upstream_url`` is a real distribution registry (``https://127.0.0.1:5000``) whose certificate
    is signed by ``upstream_ca``; ``cert_path``/``key_path`` are what the double presents, and must
    carry SANs for every name in ``ALL_HOSTS``. The fault switches and ``rate_limit``,
    ``cdn_url_ttl``, ``retry_after`` may be changed while the server runs.
    """

    def __init__(
        self,
        upstream_url: str,
        upstream_ca: str | PathLike[str] | None,
        cert_path: str | PathLike[str],
        key_path: str | PathLike[str],
        *,
        rate_limit: int = 100,
        cdn_url_ttl: int = 1200,
        token_ttl: int = 300,
        retry_after: int = 60,
        private_repos: Mapping[str, tuple[str, str]] | None = None,
        port: int = 0,
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"upstream_url must be http(s)://host[:port], not {upstream_url!r}")
        self._upstream_https = parsed.scheme == "https"
        self._upstream_host = parsed.hostname
        self._upstream_port = parsed.port or (443 if self._upstream_https else 80)
        self._upstream_ctx: ssl.SSLContext | None = None
        if self._upstream_https:
            self._upstream_ctx = ssl.create_default_context(
                cafile=str(upstream_ca) if upstream_ca is not None else None
            )

        self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_ctx.load_cert_chain(str(cert_path), str(key_path))
        # Docker Hub speaks HTTP/2 too, but http.server cannot; offering only http/1.1 keeps
        # clients that would prefer h2 on a protocol we actually serve.
        self._server_ctx.set_alpn_protocols(["http/1.1"])

        self.rate_limit = rate_limit
        self.cdn_url_ttl = cdn_url_ttl
        self.token_ttl = token_ttl
        self.retry_after = retry_after
        self.private_repos: dict[str, tuple[str, str]] = dict(private_repos or {})
        # The OCI 1.1 referrers API for the repositories named here: (repository, subject digest)
        # -> the descriptors it lists. Other repositories answer 404, as Docker Hub does.
        self.referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._requested_port = port

        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)
        self._tokens: dict[str, _Grant] = {}
        self._refresh_tokens: dict[str, tuple[str, str]] = {}
        self._blob_repos: dict[str, str] = {}
        self._log: list[RequestRecord] = []
        self._begun: list[tuple[str, str, str, str]] = []
        self._epoch = time.monotonic()  # requests that began earlier are not logged (see reset)
        self._manifest_gets = 0
        self._fail: dict[str, collections.deque[int]] = collections.defaultdict(collections.deque)
        self._hang: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._truncate: collections.deque[int] = collections.deque()
        self._corrupt = 0
        self._stall: collections.deque[int] = collections.deque()
        self._corrupt_manifests = 0

        self._stopping = threading.Event()
        self._released = threading.Event()  # set to end the hangs under way (by reset and stop)
        self._resumed = threading.Event()  # set to let stalled CDN answers go on (resume_cdn, reset, stop)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> int:
        """Bind 127.0.0.1 (a free port unless one was given), serve in a daemon thread; the port."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._stopping.clear()
        self._released = threading.Event()
        self._server = _Server(("127.0.0.1", self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"dockerhub-double:{self._server.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self._server.server_port

    def stop(self) -> None:
        """Stop promptly: end the accept loop, cut keep-alive connections, wake hung answers."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        self._released.set()
        self._resumed.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> DockerHubDouble:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        return self._server.server_port

    # -------------------------------------------------------------------------------- observation

    def requests(
        self, host: str | None = None, method: str | None = None, kind: str | None = None
    ) -> list[RequestRecord]:
        """The recorded requests, oldest first, filtered by any of host, method and kind."""
        with self._lock:
            records = list(self._log)
        return [
            r
            for r in records
            if (host is None or r.host == host)
            and (method is None or r.method == method.upper())
            and (kind is None or r.kind == kind)
        ]

    def counts(self) -> dict[str, int]:
        """How many requests of each kind were handled (every kind in ``KINDS`` is present)."""
        result = dict.fromkeys(KINDS, 0)
        with self._lock:
            for r in self._log:
                result[r.kind] = result.get(r.kind, 0) + 1
        return result

    def grants(self, token: str, repository: str) -> bool:
        """Whether ``token`` (from the token service) lets its bearer pull ``repository`` now:
        false once it has expired (``token_ttl``)."""
        grant = self._grant(token)
        return grant is not None and repository in grant.repos

    @property
    def manifest_gets(self) -> int:
        """Manifest GETs counted against the rate limit so far (those answered 429 excluded)."""
        with self._lock:
            return self._manifest_gets

    def reset(self) -> None:
        """Forget the request log, the rate-limit count and pending faults, and end the hangs
        under way (their connections are closed unanswered).

        Issued tokens and CDN URLs stay valid, as they would on Docker Hub.
        """
        with self._lock:
            self._log.clear()
            self._begun.clear()
            self._released.set()
            self._released = threading.Event()
            self._epoch = time.monotonic()
            self._manifest_gets = 0
            self._fail.clear()
            self._hang.clear()
            self._truncate.clear()
            self._corrupt = 0
            self._stall.clear()
            self._corrupt_manifests = 0
        self.resume_cdn()

    # ------------------------------------------------------------------------------------- faults

    def fail_next(self, kind: Kind, status: int, count: int = 1) -> None:
        """Answer the next ``count`` requests of ``kind`` with ``status`` and the matching error.

        The body is the registry error JSON (code from the status: 401 UNAUTHORIZED with a
        challenge, 403 DENIED, 404 *_UNKNOWN, 429 TOOMANYREQUESTS with Retry-After, 5xx
        UNKNOWN/UNAVAILABLE); the CDN answers a short plain-text body instead. Faulted manifest GETs
        do not count against the rate limit.
        """
        self._check_kind(kind)
        with self._lock:
            self._fail[kind].extend([status] * count)

    def hang_next(self, kind: Kind, seconds: float, count: int = 1) -> None:
        """Sleep ``seconds`` before answering the next ``count`` requests of ``kind`` (then answer
        normally, or with a pending ``fail_next``). ``reset()`` and ``stop()`` cut the sleep short
        and close the connection unanswered."""
        self._check_kind(kind)
        with self._lock:
            self._hang[kind].extend([seconds] * count)

    def truncate_cdn_after(self, nbytes: int, count: int = 1) -> None:
        """The next ``count`` CDN blob GETs send their full headers (Content-Length included) but
        only ``nbytes`` body bytes, then drop the connection without a TLS close_notify."""
        with self._lock:
            self._truncate.extend([nbytes] * count)

    def stall_cdn_after(self, nbytes: int, count: int = 1) -> None:
        """The next ``count`` CDN blob GETs (200 or 206) send their headers and ``nbytes`` body
        bytes, then wait, connection open, until ``resume_cdn()`` (or ``reset()``, ``stop()``, or
        STALL_LIMIT seconds) before sending the rest."""
        with self._lock:
            self._stall.extend([nbytes] * count)

    def resume_cdn(self) -> None:
        """Let the CDN answers stalled by ``stall_cdn_after`` go on."""
        with self._lock:
            self._resumed.set()
            self._resumed = threading.Event()

    def corrupt_manifests(self, count: int = 1) -> None:
        """Change one byte of the next ``count`` manifest GETs answered 200 (its first space
        becomes a tab: still JSON, same length), so the body no longer matches its digest, while
        ``Docker-Content-Digest`` and the other headers still name the right one."""
        with self._lock:
            self._corrupt_manifests += count

    def corrupt_cdn(self, count: int = 1) -> None:
        """Flip the first body byte of the next ``count`` CDN blob GETs (200 or 206) so the bytes
        no longer match their digest; length and headers stay right."""
        with self._lock:
            self._corrupt += count

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")

    # ---------------------------------------------------------------- state used by the handlers

    def _record(self, record: RequestRecord, started: float) -> None:
        with self._lock:
            if started >= self._epoch:  # a request from before the last reset is not this test's
                self._log.append(record)

    def _hold(self, seconds: float) -> bool:
        """Hold a request for `seconds`; True when it was released early (the connection is
        then closed without an answer), so no hang outlives the test that asked for it."""
        with self._lock:
            released = self._released
        return released.wait(seconds)

    def _begin(self, host: str, method: str, kind: str, agent: str) -> None:
        with self._lock:
            self._begun.append((host, method, kind, agent))

    def begun(self) -> list[tuple[str, str, str, str]]:
        """(host, method, kind, User-Agent) of every request begun since the last reset, answered
        or not (a hung request is in `requests()` only once it is answered)."""
        with self._lock:
            return list(self._begun)

    def _take_fault(self, kind: str) -> tuple[float, int | None]:
        with self._lock:
            hang = self._hang[kind].popleft() if self._hang.get(kind) else 0.0
            fail = self._fail[kind].popleft() if self._fail.get(kind) else None
        return hang, fail

    def _take_cdn_faults(self) -> tuple[int | None, bool, int | None, threading.Event]:
        """(truncate after, corrupt, stall after, the event that ends the stall)."""
        with self._lock:
            truncate = self._truncate.popleft() if self._truncate else None
            corrupt = self._corrupt > 0
            if corrupt:
                self._corrupt -= 1
            stall = self._stall.popleft() if self._stall else None
            return truncate, corrupt, stall, self._resumed

    def _take_manifest_fault(self) -> bool:
        with self._lock:
            corrupt = self._corrupt_manifests > 0
            if corrupt:
                self._corrupt_manifests -= 1
            return corrupt

    def _take_pull(self) -> int | None:
        """Count one manifest GET; the remaining allowance, or None when over the limit."""
        with self._lock:
            if self._manifest_gets >= self.rate_limit:
                return None
            self._manifest_gets += 1
            return self.rate_limit - self._manifest_gets

    def _remaining(self) -> int:
        with self._lock:
            return max(self.rate_limit - self._manifest_gets, 0)

    def _known_user(self, user: str, password: str) -> bool:
        return (user, password) in self.private_repos.values()

    def _issue_token(self, repos: Iterable[str]) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = _Grant(frozenset(repos), time.time() + self.token_ttl)
        return token

    def _issue_refresh_token(self, user: str, password: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._refresh_tokens[token] = (user, password)
        return token

    def _refresh_user(self, token: str) -> tuple[str, str] | None:
        with self._lock:
            return self._refresh_tokens.get(token)

    def _grant(self, token: str) -> _Grant | None:
        with self._lock:
            grant = self._tokens.get(token)
        if grant is None or grant.expires_at < time.time():
            return None
        return grant

    def _grantable(self, name: str, creds: tuple[str, str] | None) -> bool:
        required = self.private_repos.get(name)
        return required is None or creds == required

    def _cdn_signature(self, path: str, expiry: int) -> str:
        return hmac.new(self._secret, f"{path}{expiry}".encode(), hashlib.sha256).hexdigest()

    def cdn_location(self, hex_digest: str, ttl: int | None = None) -> str:
        """The signed CDN URL for a sha256 hex digest, as the registry's 307 would give it."""
        path = f"/registry-v2/docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
        expiry = int(time.time()) + (self.cdn_url_ttl if ttl is None else ttl)
        return f"https://{CDN_HOST}{path}?verify={expiry}-{self._cdn_signature(path, expiry)}"

    def _remember_blob(self, hex_digest: str, repo: str) -> None:
        with self._lock:
            self._blob_repos[hex_digest] = repo

    def _blob_repo(self, hex_digest: str) -> str | None:
        with self._lock:
            return self._blob_repos.get(hex_digest)

    def _upstream(
        self, method: str, path: str, headers: Iterable[tuple[str, str]]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request to the upstream registry; the caller reads and closes."""
        conn: http.client.HTTPConnection
        if self._upstream_https:
            conn = http.client.HTTPSConnection(
                self._upstream_host, self._upstream_port, timeout=60, context=self._upstream_ctx
            )
        else:
            conn = http.client.HTTPConnection(self._upstream_host, self._upstream_port, timeout=60)
        try:
            # putheader rather than a dict: repeated Accept lines (dockerd sends several) must
            # reach the upstream as they came.
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders()
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The accept loop hands plain sockets to the handler threads, which do the TLS handshake
    # themselves, so that one slow or broken client cannot stall accept().
    handshake_timeout = 30.0

    def __init__(self, address: tuple[str, int], double: DockerHubDouble) -> None:
        self.double = double
        self._connections: set[ssl.SSLSocket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN of the address, which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.handshake_timeout)
        try:
            tls = self.double._server_ctx.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            log.debug("TLS handshake from %s failed: %s", client_address, exc)
            return
        with self._connections_lock:
            self._connections.add(tls)
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except (OSError, ValueError) as exc:
            log.debug("connection from %s ended: %s", client_address, exc)
        finally:
            with self._connections_lock:
                self._connections.discard(tls)
            tls.close()

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops the SSL object
                # under the feet of the thread reading it; this just wakes that thread with EOF.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("error while serving %s", client_address, exc_info=True)  # noqa: LOG014 (socketserver calls it while handling)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "docker-hub-double"
    sys_version = ""
    timeout = 120  # idle keep-alive connections end by themselves eventually
    server: _Server

    # per-request state, set in _dispatch
    _host: str
    _path: str
    _query: dict[str, list[str]]
    _status: int
    _sent: int
    _body_read: bool

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    @property
    def hub(self) -> DockerHubDouble:
        return self.server.double

    # ------------------------------------------------------------------------------- plumbing

    def _dispatch(self) -> None:
        self._host = urllib.parse.urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
        # As Go's server reads a target: split at "?" only (a "#" stays in the path), then decoded.
        raw_path, _, query = self.path.partition("?")
        self._path = urllib.parse.unquote(raw_path)
        self._query = urllib.parse.parse_qs(query, keep_blank_values=True)
        self._status = 0
        self._sent = 0
        self._started = time.monotonic()
        self._body_read = False
        kind = self._classify()
        self.hub._begin(self._host, self.command, kind, self.headers.get("User-Agent", ""))
        try:
            hang, fail = self.hub._take_fault(kind)
            if hang and self.hub._hold(hang):
                self.close_connection = True
                return
            if fail is not None:
                self._fault_response(kind, fail)
                return
            self._route(kind)
        finally:
            if self.command not in ("GET", "HEAD") and not self._body_read:
                # An unread request body would be taken for the next request on this connection.
                self.close_connection = True
            self.hub._record(
                RequestRecord(
                    host=self._host,
                    method=self.command,
                    path=self._path,
                    status=self._status,
                    bytes_sent=self._sent,
                    had_authorization="Authorization" in self.headers,
                    kind=kind,
                    range=self.headers.get("Range"),
                    query=tuple((k, v) for k, values in getattr(self, "_query", {}).items() for v in values),
                ),
                self._started,
            )

    def _classify(self) -> str:
        if self._host in REGISTRY_HOSTS:
            if self._path in ("/v2", "/v2/"):
                return "ping"
            if _MANIFEST_RE.match(self._path):
                return "manifest"
            if _BLOB_RE.match(self._path):
                return "blob"
            if _REFERRERS_RE.match(self._path):
                return "referrers"
        elif self._host == AUTH_HOST:
            if self._path == "/token":
                return "token"
        elif self._host == CDN_HOST:
            if _CDN_RE.match(self._path):
                return "cdn"
        return "other"

    def _route(self, kind: str) -> None:
        if self._host in REGISTRY_HOSTS and (cleaned := _clean(self._path)) != self._path:
            # The distribution registry's router (gorilla/mux) redirects a path that is not
            # clean to its cleaned form, before any auth check.
            query = self.path.partition("?")[2]
            self._send(301, b"", {"Location": urllib.parse.quote(cleaned) + (f"?{query}" if query else "")})
            return
        if self._host in REGISTRY_HOSTS:
            if self.command not in ("GET", "HEAD"):
                self._registry_error(405, "UNSUPPORTED", "The operation is unsupported.")
            elif kind == "ping":
                self._ping()
            elif kind == "manifest":
                m = _MANIFEST_RE.match(self._path)
                assert m is not None
                self._manifest(m["name"], m["ref"])
            elif kind == "blob":
                m = _BLOB_RE.match(self._path)
                assert m is not None
                self._blob(m["name"], m["digest"])
            elif kind == "referrers" and any(name == self._path.split("/referrers/")[0][4:] for name, _ in self.hub.referrers):
                m = _REFERRERS_RE.match(self._path)
                assert m is not None
                self._referrers(m["name"], m["digest"])
            else:
                self._registry_error(404, "NAME_UNKNOWN", "repository name not known to registry")
        elif self._host == AUTH_HOST:
            if kind != "token":
                self._send(404, b"404 page not found\n", {"Content-Type": "text/plain"})
            elif self.command in ("GET", "HEAD"):
                self._token_get()
            elif self.command == "POST":
                self._token_post()
            else:
                self._send(405, b"method not allowed\n", {"Content-Type": "text/plain"})
        elif self._host == CDN_HOST:
            if self.command not in ("GET", "HEAD"):
                self._send(405, b"method not allowed\n", {"Content-Type": "text/plain"})
            elif kind != "cdn":
                self._send(404, b"Not Found\n", {"Content-Type": "text/plain"})
            else:
                self._cdn()
        else:
            self._send(
                421, f"no such host here: {self._host!r}\n".encode(), {"Content-Type": "text/plain"}
            )

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        """A whole response; HEAD gets the same headers (Content-Length included) and no body."""
        self._status = status
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self._sent += len(body)

    def _registry_error(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        all_headers = {
            "Content-Type": "application/json",
            "Docker-Distribution-Api-Version": "registry/2.0",
            **(headers or {}),
        }
        self._send(status, error_body(code, message, detail), all_headers)

    def _fault_response(self, kind: str, status: int) -> None:
        headers: dict[str, str] = {}
        if status == 429:
            headers["Retry-After"] = str(self.hub.retry_after)
        if kind == "cdn":
            body = f"error code: {status}\n".encode()
            self._send(status, body, {"Content-Type": "text/plain", **headers})
            return
        code, message = _ERROR_CODES.get(status, ("UNKNOWN", "unknown error"))
        if status == 404 and kind == "manifest":
            code, message = "MANIFEST_UNKNOWN", "manifest unknown"
        elif status == 404 and kind == "blob":
            code, message = "BLOB_UNKNOWN", "blob unknown to registry"
        if status == 401 and kind in ("ping", "manifest", "blob"):
            headers["WWW-Authenticate"] = self._challenge(self._scope_for_path())
        if status == 429 and kind == "manifest":
            headers.update(self._ratelimit_headers(0))
        self._registry_error(status, code, message, None, headers)

    def _scope_for_path(self) -> str | None:
        m = _MANIFEST_RE.match(self._path) or _BLOB_RE.match(self._path)
        return f"repository:{m['name']}:pull" if m else None

    @staticmethod
    def _challenge(scope: str | None, error: str | None = None) -> str:
        value = f'Bearer realm="{REALM}",service="{SERVICE}"'
        if scope:
            value += f',scope="{scope}"'
        if error:
            value += f',error="{error}"'
        return value

    def _ratelimit_headers(self, remaining: int) -> dict[str, str]:
        return {
            "ratelimit-limit": f"{self.hub.rate_limit};w={RATE_LIMIT_WINDOW}",
            "ratelimit-remaining": f"{remaining};w={RATE_LIMIT_WINDOW}",
            "docker-ratelimit-source": self.client_address[0],
        }

    def _basic_credentials(self) -> tuple[str, str] | None:
        value = self.headers.get("Authorization", "")
        scheme, _, param = value.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(param.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user, password

    def _bearer_grant(self) -> _Grant | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.hub._grant(token.strip())

    def _authorize(self, name: str) -> bool:
        """True if the bearer token may pull ``name``; otherwise answer Docker Hub's 401."""
        grant = self._bearer_grant()
        if grant is not None and name in grant.repos:
            return True
        scope = f"repository:{name}:pull"
        self._registry_error(
            401,
            "UNAUTHORIZED",
            "authentication required",
            [{"Type": "repository", "Class": "", "Name": name, "Action": "pull"}],
            {"WWW-Authenticate": self._challenge(scope, "insufficient_scope" if grant else None)},
        )
        return False

    # ------------------------------------------------------------------------------- registry

    def _ping(self) -> None:
        if self._bearer_grant() is None:
            self._registry_error(
                401,
                "UNAUTHORIZED",
                "authentication required",
                None,
                {"WWW-Authenticate": self._challenge(None)},
            )
            return
        self._send(
            200,
            b"{}",
            {"Content-Type": "application/json", "Docker-Distribution-Api-Version": "registry/2.0"},
        )

    def _manifest(self, name: str, ref: str) -> None:
        if not self._authorize(name):
            return
        if self.command == "GET":
            remaining = self.hub._take_pull()
            if remaining is None:
                self._registry_error(
                    429,
                    *_ERROR_CODES[429],
                    None,
                    {"Retry-After": str(self.hub.retry_after), **self._ratelimit_headers(0)},
                )
                return
        else:
            remaining = self.hub._remaining()
        accept = [("Accept", value) for value in self.headers.get_all("Accept", [])]
        try:
            conn, resp = self.hub._upstream(self.command, f"/v2/{name}/manifests/{ref}", accept)
        except OSError as exc:
            log.warning("upstream unreachable: %s", exc)
            self._registry_error(503, "UNAVAILABLE", "service unavailable")
            return
        try:
            body = resp.read() if self.command == "GET" else b""
            headers = _copy_headers(
                resp, ("Content-Type", "Content-Length", "Docker-Content-Digest", "Etag")
            )
        finally:
            conn.close()
        if self.command == "GET" and resp.status == 200 and self.hub._take_manifest_fault():
            space = body.find(b" ")
            body = body[:space] + b"\t" + body[space + 1 :] if space >= 0 else body[:-1] + bytes([body[-1] ^ 1])
        headers["Docker-Distribution-Api-Version"] = "registry/2.0"
        headers.update(self._ratelimit_headers(remaining))
        self._send(resp.status, body, headers)

    def _referrers(self, name: str, digest: str) -> None:
        if not self._authorize(name):
            return
        listed = self.hub.referrers.get((name, digest), [])
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": listed}
        self._send(200, json.dumps(index).encode(), {"Content-Type": "application/vnd.oci.image.index.v1+json"})

    def _blob(self, name: str, digest: str) -> None:
        if not self._authorize(name):
            return
        m = _SHA256_RE.match(digest)
        if m is None:
            self._registry_error(400, "DIGEST_INVALID", "invalid digest", digest)
            return
        # Ask the upstream first: Docker Hub answers BLOB_UNKNOWN itself rather than redirecting
        # to a CDN URL that would 404.
        try:
            conn, resp = self.hub._upstream("HEAD", f"/v2/{name}/blobs/{digest}", ())
        except OSError as exc:
            log.warning("upstream unreachable: %s", exc)
            self._registry_error(503, "UNAVAILABLE", "service unavailable")
            return
        try:
            resp.read()
            headers = _copy_headers(
                resp, ("Content-Type", "Content-Length", "Docker-Content-Digest", "Etag")
            )
        finally:
            conn.close()
        if resp.status != 200:
            if resp.status == 404:
                self._registry_error(404, "BLOB_UNKNOWN", "blob unknown to registry", digest)
            else:
                code, message = _ERROR_CODES.get(resp.status, ("UNKNOWN", "unknown error"))
                self._registry_error(resp.status, code, message)
            return
        if self.command == "HEAD":
            headers["Docker-Distribution-Api-Version"] = "registry/2.0"
            self._send(200, b"", headers)
            return
        self.hub._remember_blob(m["hex"], name)
        self._send(
            307,
            b"",
            {
                "Content-Type": "application/octet-stream",
                "Docker-Distribution-Api-Version": "registry/2.0",
                "Location": self.hub.cdn_location(m["hex"]),
            },
        )

    # ---------------------------------------------------------------------------------- token

    def _token_get(self) -> None:
        creds = self._basic_credentials()
        scopes = self._query.get("scope", [])
        offline = self._query.get("offline_token", [""])[0].lower() == "true"
        self._token_response(creds, scopes, offline, "Authorization" in self.headers)

    def _token_post(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
        # A chunked body is left unread; the connection then closes after the answer.
        self._body_read = "Transfer-Encoding" not in self.headers
        grant_type = form.get("grant_type", [""])[0]
        creds: tuple[str, str] | None
        if grant_type == "password":
            creds = (form.get("username", [""])[0], form.get("password", [""])[0])
        elif grant_type == "refresh_token":
            creds = self.hub._refresh_user(form.get("refresh_token", [""])[0])
            if creds is None:
                self._token_error(401, "invalid refresh token")
                return
        else:
            self._send_json(400, {"error": "unsupported_grant_type"})
            return
        scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
        offline = form.get("access_type", [""])[0] == "offline"
        self._token_response(creds, scopes, offline, True)

    def _token_response(
        self,
        creds: tuple[str, str] | None,
        scopes: list[str],
        offline: bool,
        authenticated: bool,
    ) -> None:
        if authenticated and (creds is None or not self.hub._known_user(*creds)):
            self._token_error(401, "incorrect username or password")
            return
        repos = [name for name in _pull_scopes(scopes) if self.hub._grantable(name, creds)]
        token = self.hub._issue_token(repos)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": self.hub.token_ttl,
            "issued_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        if self.command == "POST":
            body["scope"] = " ".join(f"repository:{r}:pull" for r in repos)
        if offline and creds is not None:
            body["refresh_token"] = self.hub._issue_refresh_token(*creds)
        self._send_json(200, body)

    def _token_error(self, status: int, details: str) -> None:
        self._send_json(status, {"details": details})

    def _send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self._send(status, body, {"Content-Type": "application/json; charset=utf-8"})

    # ------------------------------------------------------------------------------------ CDN

    def _cdn(self) -> None:
        m = _CDN_RE.match(self._path)
        assert m is not None
        hex_digest = m["hex"]
        expiry_s, _, signature = self._query.get("verify", [""])[0].partition("-")
        valid = (
            m["prefix"] == hex_digest[:2]
            and expiry_s.isdigit()
            and hmac.compare_digest(signature, self.hub._cdn_signature(self._path, int(expiry_s)))
        )
        if not valid or int(expiry_s) < time.time():
            reason = "invalid signature" if not valid else "expired URL"
            self._send(403, f"403 Forbidden: {reason}\n".encode(), {"Content-Type": "text/plain"})
            return
        repo = self.hub._blob_repo(hex_digest)
        if repo is None:  # a signed URL this instance never gave out: only after a restart
            self._send(404, b"404 Not Found\n", {"Content-Type": "text/plain"})
            return
        forward = [(h, v) for h in ("Range", "If-Range") if (v := self.headers.get(h)) is not None]
        try:
            conn, resp = self.hub._upstream(
                self.command, f"/v2/{repo}/blobs/sha256:{hex_digest}", forward
            )
        except OSError as exc:
            log.warning("upstream unreachable: %s", exc)
            self._send(502, b"error code: 502\n", {"Content-Type": "text/plain"})
            return
        try:
            self._stream_cdn(resp)
        finally:
            conn.close()

    def _stream_cdn(self, resp: http.client.HTTPResponse) -> None:
        headers = _copy_headers(
            resp,
            (
                "Content-Type",
                "Content-Length",
                "Content-Range",
                "Accept-Ranges",
                "Etag",
                "Last-Modified",
            ),
        )
        if resp.status in (200, 206):
            headers.setdefault("Accept-Ranges", "bytes")
            headers["Cache-Control"] = "public, max-age=14400"
            headers["cf-cache-status"] = "HIT"
        if "Content-Length" not in headers:
            # Without a length the end of the body can only be told by closing.
            headers["Connection"] = "close"
            self.close_connection = True
        self._status = resp.status
        self.send_response(resp.status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        truncate, corrupt, stall, resumed = None, False, None, None
        if resp.status in (200, 206):
            truncate, corrupt, stall, resumed = self.hub._take_cdn_faults()
        while True:
            chunk = resp.read(_CHUNK)
            if not chunk:
                break
            if corrupt:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                corrupt = False
            if truncate is not None:
                chunk = chunk[: max(truncate - self._sent, 0)]
            if stall is not None and resumed is not None and self._sent + len(chunk) >= stall:
                before = stall - self._sent
                self.wfile.write(chunk[:before])
                self._sent += before
                chunk, stall = chunk[before:], None
                resumed.wait(STALL_LIMIT)
            if chunk:
                self.wfile.write(chunk)
                self._sent += len(chunk)
            if truncate is not None and self._sent >= truncate:
                self.close_connection = True
                return


def _clean(path: str) -> str:
    """Go's path.Clean, as gorilla/mux applies it (a trailing slash is kept)."""
    cleaned = "/" + posixpath.normpath(path).lstrip("/") if path else "/"
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


def _pull_scopes(scopes: Iterable[str]) -> list[str]:
    """Repository names whose pull is requested in ``repository:<name>:<actions>`` scopes."""
    names: list[str] = []
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind == "repository" and name and {"pull", "*"} & set(actions.split(",")):
            names.append(name)
    return names


def _copy_headers(resp: http.client.HTTPResponse, names: Iterable[str]) -> dict[str, str]:
    return {name: value for name in names if (value := resp.getheader(name)) is not None}

"""Registry wire protocol: request routes, digests, media types, ranges and error bodies.

Everything hubcache knows about the OCI distribution API lives here, so that the store knows
nothing of HTTP and the addon knows nothing of path grammar.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl, urlencode

API_VERSION_HEADERS = {"Docker-Distribution-Api-Version": "registry/2.0"}
MAX_MANIFEST = 4 * 1024 * 1024  # the distribution registry's own limit: a larger body is no manifest
REDIRECTS = frozenset({301, 302, 303, 307, 308})

# Docker Hub answers the same API on two names; they share one tag index.
REGISTRY_ALIASES = {"registry-1.docker.io": "docker.io", "index.docker.io": "docker.io"}

# From the distribution spec: path components separated by "/", each lowercase alphanumerics
# joined by ".", "_", "__" or runs of "-".
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
_ANY_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+")
MAX_NAME_LENGTH = 255

MANIFEST_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    }
)


class Kind(Enum):
    PING = "ping"
    MANIFEST = "manifest"
    BLOB = "blob"
    REFERRERS = "referrers"  # OCI 1.1: the manifests whose subject is a digest
    OTHER = "other"  # uploads, catalog, tags list, token endpoints: passed through untouched


_SEGMENT = {Kind.MANIFEST: "manifests", Kind.BLOB: "blobs", Kind.REFERRERS: "referrers"}
PULLS = frozenset(_SEGMENT)  # the kinds a pull asks for: what the account's credentials are for


@dataclass(frozen=True)
class Route:
    """What a registry request asks for. `reference` is a tag or a digest; `artifact_type` is the
    referrers API's filter (the one query parameter a pull endpoint takes)."""

    kind: Kind
    registry: str = ""
    name: str = ""
    reference: str = ""
    artifact_type: str = field(default="", compare=False)

    @property
    def by_digest(self) -> bool:
        return DIGEST_RE.fullmatch(self.reference) is not None

    @property
    def image(self) -> str:
        sep = "@" if self.by_digest else ":"
        return f"{self.registry}/{self.name}{sep}{self.reference}"

    @property
    def target(self) -> str:
        """The request target this route is the parse of, in canonical form: what hubcache sends
        upstream (never the client's own target). Not defined for Kind.OTHER."""
        if self.kind is Kind.PING:
            return "/v2/"
        assert self.kind in _SEGMENT, f"{self.kind} has no canonical target"
        query = f"?{urlencode({'artifactType': self.artifact_type})}" if self.artifact_type else ""
        return f"/v2/{self.name}/{_SEGMENT[self.kind]}/{self.reference}{query}"


class ErrorCode(Enum):
    """A registry error code (the OCI distribution spec's, and the distribution registry's
    UNAVAILABLE and RANGE_INVALID) with the HTTP status it is answered with. Where one code
    answers two situations of different status, each has its member."""

    BLOB_UNKNOWN = ("BLOB_UNKNOWN", 404)
    DIGEST_INVALID = ("DIGEST_INVALID", 400)
    MANIFEST_INVALID = ("MANIFEST_INVALID", 400)
    MANIFEST_UNKNOWN = ("MANIFEST_UNKNOWN", 404)
    NAME_INVALID = ("NAME_INVALID", 400)
    NAME_UNKNOWN = ("NAME_UNKNOWN", 404)
    UNAUTHORIZED = ("UNAUTHORIZED", 401)
    DENIED = ("DENIED", 403)
    RANGE_INVALID = ("RANGE_INVALID", 416)
    UNSUPPORTED = ("UNSUPPORTED", 405)  # a method or operation hubcache does not serve
    UNSUPPORTED_REQUEST = ("UNSUPPORTED", 400)  # an invalid set of parameters
    BODY_UNSUPPORTED = ("UNSUPPORTED", 413)  # a body on a request that takes none
    UNAVAILABLE = ("UNAVAILABLE", 503)  # hubcache cannot answer now (its blob server, a token service)
    UPSTREAM_FAILED = ("UNAVAILABLE", 502)  # upstream gave no usable answer: hubcache is the gateway
    UPSTREAM_MANIFEST_INVALID = ("MANIFEST_INVALID", 502)  # upstream's manifest is unreadable or not what was asked
    INTERNAL = ("UNKNOWN", 500)  # hubcache failed on the request: it goes nowhere

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]


class BadRequest(Exception):
    """A request the registry API would refuse; carries the registry error to answer with."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def canonical_registry(host: str) -> str:
    return REGISTRY_ALIASES.get(host.lower(), host.lower())


# What no canonical target holds: a fragment (no client that follows RFC 9110 sends one),
# percent-encoding (names, tags and digests never need it; a registry decodes it before it routes),
# a backslash (some servers read it as a slash), and empty or dot segments (a registry cleans
# them, and then routes elsewhere).
_UNCLEAN = re.compile(r"[#%\\]|//|/\.{1,2}(?:/|$)")
_MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


def parse_route(host: str, target: str) -> Route:
    """Parse a request target to a registry host. Raises BadRequest for a malformed API request,
    and for any target that is not the canonical form of what it parses to (`Route.target`): two
    parsers (hubcache's and a registry's) may only ever meet on one spelling of a request. Once
    the path is clean, the grammar of names, tags and digests admits no other spelling."""
    registry = canonical_registry(host)
    path, question, query = target.partition("?")
    if not _clean(path):
        raise BadRequest(ErrorCode.NAME_INVALID, f"request target {target[:200]!r} is not in canonical form")
    route = _route(registry, path)
    if route.kind is Kind.OTHER:
        return route  # passed through as the client sent it: hubcache decides nothing on it
    return _with_query(route, query if question else None)


def _clean(path: str) -> bool:
    return path.startswith("/") and not _UNCLEAN.search(path)


def _route(registry: str, path: str) -> Route:
    if path in ("/v2", "/v2/"):
        return Route(Kind.PING, registry)
    if not path.startswith("/v2/"):
        return Route(Kind.OTHER, registry)
    rest = path[len("/v2/") :]
    for marker, kind in (("/manifests/", Kind.MANIFEST), ("/blobs/", Kind.BLOB), ("/referrers/", Kind.REFERRERS)):
        name, sep, reference = rest.rpartition(marker)
        if not sep:
            continue
        if kind is Kind.BLOB and reference == "uploads":
            return Route(Kind.OTHER, registry)  # push: /blobs/uploads (deeper upload paths hold a "/")
        if "/" in reference:
            continue  # e.g. a blob of repository "a/manifests/b"
        if not NAME_RE.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
            raise BadRequest(ErrorCode.NAME_INVALID, f"invalid repository name {name!r}")
        if kind is not Kind.MANIFEST or ":" in reference:
            check_digest(reference)
        elif not TAG_RE.fullmatch(reference):
            raise BadRequest(ErrorCode.MANIFEST_INVALID, f"invalid tag {reference!r}")
        return Route(kind, registry, name, reference)
    return Route(Kind.OTHER, registry)


def _with_query(route: Route, query: str | None) -> Route:
    """The route with the query parameters its endpoint takes; any other is refused. `ns` (which
    containerd adds) is taken when it names the route's own registry, and is not sent upstream."""
    if query is None:
        return route
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=4)
    except ValueError:
        raise BadRequest(ErrorCode.UNSUPPORTED_REQUEST, f"unreadable query {query[:200]!r}") from None
    artifact_type = ""
    seen: set[str] = set()
    for key, value in pairs:
        if key in seen:
            raise BadRequest(ErrorCode.UNSUPPORTED_REQUEST, f"query parameter {key!r} given twice")
        seen.add(key)
        if key == "ns" and canonical_registry(value) == route.registry:
            continue
        if key == "artifactType" and route.kind is Kind.REFERRERS and _MEDIA_TYPE_RE.fullmatch(value):
            artifact_type = value
            continue
        raise BadRequest(ErrorCode.UNSUPPORTED_REQUEST, f"this endpoint takes no query parameter {key}={value[:100]!r}")
    return Route(route.kind, route.registry, route.name, route.reference, artifact_type)


@dataclass(frozen=True)
class ImageReference:
    """An image as users write it (`alpine`, `ghcr.io/org/app:1`, `name@sha256:...`), normalised
    the way Docker does: no registry means Docker Hub, a single Hub name means `library/`."""

    registry: str  # canonical: docker.io for Docker Hub
    repository: str
    reference: str  # a tag, or a digest

    @property
    def host(self) -> str:
        """The host that serves the registry API."""
        return "registry-1.docker.io" if self.registry == "docker.io" else self.registry

    def __str__(self) -> str:
        return Route(Kind.MANIFEST, self.registry, self.repository, self.reference).image

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        rest, _, digest = text.strip().partition("@")
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, path = canonical_registry(first), remainder
        else:
            registry, path = "docker.io", rest
        path, colon, tag = path.rpartition(":") if ":" in path else (path, "", "")
        if registry == "docker.io" and "/" not in path:
            path = f"library/{path}"
        if not NAME_RE.fullmatch(path) or len(path) > MAX_NAME_LENGTH:
            raise ValueError(f"{text!r}: invalid repository name {path!r}")
        if digest:
            try:
                check_digest(digest)
            except BadRequest as e:
                raise ValueError(f"{text!r}: {e.message}") from None
            return cls(registry, path, digest)
        if colon and not TAG_RE.fullmatch(tag):
            raise ValueError(f"{text!r}: invalid tag {tag!r}")
        return cls(registry, path, tag or "latest")


def check_digest(digest: str) -> None:
    """Raise BadRequest unless `digest` is a digest hubcache can verify."""
    if DIGEST_RE.fullmatch(digest):
        return
    if _ANY_DIGEST_RE.fullmatch(digest):
        algorithm = digest.partition(":")[0]
        if algorithm not in ("sha256", "sha512"):
            raise BadRequest(ErrorCode.DIGEST_INVALID, f"unsupported digest algorithm {algorithm!r}")
    raise BadRequest(ErrorCode.DIGEST_INVALID, f"invalid digest {digest!r}")


def hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object for the algorithm of `digest` (sha256 or sha512)."""
    return hashlib.new(digest.partition(":")[0])


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return hash_digest(hashlib.new(algorithm, data))


def hash_digest(h: hashlib._Hash) -> str:
    """The digest string (`sha256:<hex>`) of a hash object fed with a blob's bytes."""
    return f"{h.name}:{h.hexdigest()}"


def challenge(header: str) -> tuple[str, dict[str, str]]:
    """A `WWW-Authenticate` header's scheme (lower case) and fields."""
    scheme, _, params = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', params))


def token_request(header: str, name: str) -> str | None:
    """The URL that fetches a pull token for repository `name`, from a registry's
    `WWW-Authenticate: Bearer realm=...,service=...` challenge; None if it is not one."""
    scheme, fields = challenge(header)
    if scheme != "bearer" or not fields.get("realm", "").startswith("https://"):
        return None
    query = {"scope": f"repository:{name}:pull", **{k: v for k, v in fields.items() if k in ("service", "scope")}}
    return f"{fields['realm']}?{urlencode(query)}"


# The fields of a token request (the distribution token spec's GET query, and the OAuth form a
# POST carries): what hubcache relays of a client's token request, rebuilt; nothing else.
TOKEN_FIELDS = frozenset(
    {"service", "scope", "account", "client_id", "offline_token", "grant_type", "access_type", "username", "password", "refresh_token"}
)
MAX_TOKEN_FIELDS = 64  # a token request names a handful of scopes, not thousands


def token_target(target: str) -> tuple[str, list[tuple[str, str]]]:
    """A token request's path and its query fields, parsed: the path must be clean, and only
    TOKEN_FIELDS are kept. BadRequest for anything else."""
    path, _, query = target.partition("?")
    if not _clean(path):
        raise BadRequest(ErrorCode.UNSUPPORTED_REQUEST, f"token request target {target[:200]!r} is not in canonical form")
    return path, token_fields(query)


def token_fields(text: str) -> list[tuple[str, str]]:
    """The TOKEN_FIELDS of a query string or a urlencoded form, in order; BadRequest if unreadable."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_TOKEN_FIELDS)
    except ValueError:
        raise BadRequest(ErrorCode.UNSUPPORTED_REQUEST, "unreadable token request") from None
    return [(k, v) for k, v in pairs if k in TOKEN_FIELDS]


# How long a token hubcache hands a client when it answers the token request itself (offline, or
# while the token host is down; cache/local_tokens.py) is good for: clients ask again soon, so a token
# host that came back is used again.
LOCAL_TOKEN_SECONDS = 60


def local_token_answer(token: str, issued: str) -> bytes:
    """The body of a token service's answer, with a local token issued at `issued` (ISO 8601)."""
    return json.dumps(
        {"token": token, "access_token": token, "expires_in": LOCAL_TOKEN_SECONDS, "issued_at": issued}
    ).encode()


def parse_json(data: bytes | str) -> Any:
    """`json.loads`, with a document nested deeper than the parser goes (its RecursionError)
    refused as malformed, like any other (ValueError): whatever sends hubcache JSON (a registry,
    a token service, a bundle) may send that."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("a JSON document nested too deeply") from None


def token_of(body: bytes) -> str | None:
    """The token in a token service's answer (`token`, or OAuth's `access_token`)."""
    try:
        document = parse_json(body)
    except ValueError:
        return None
    token = (document.get("token") or document.get("access_token")) if isinstance(document, dict) else None
    return token if isinstance(token, str) and token else None


def accepts(accept_headers: list[str], media_type: str) -> bool:
    """Whether a client's Accept header(s) allow `media_type`. No Accept header allows anything;
    a range with q=0 allows nothing."""
    ranges = _media_ranges(accept_headers)
    if not ranges:
        return True
    major = media_type.split("/")[0]
    wanted = ("*/*", media_type.lower(), f"{major}/*")
    return any(kind in wanted and not refused for kind, refused in ranges)


INDEX_MEDIA_TYPES = frozenset(
    {"application/vnd.docker.distribution.manifest.list.v2+json", "application/vnd.oci.image.index.v1+json"}
)


def takes_indexes(accept_headers: list[str]) -> bool:
    """Whether a client's Accept names every index type (OCI's index, Docker's manifest list): the
    distribution registry gives a multi-platform tag's index only for the type a client names,
    and any other client (no Accept, wildcards, one index type) one platform's manifest."""
    named = {kind for kind, refused in _media_ranges(accept_headers) if not refused}
    return named >= INDEX_MEDIA_TYPES


def accept_key(accept_headers: list[str]) -> str:
    """What of a client's Accept header(s) a registry's answer can depend on (the media ranges it
    names and refuses), in one canonical spelling: requests alike in it get alike answers."""
    return ",".join(sorted({f"{kind};q=0" if refused else kind for kind, refused in _media_ranges(accept_headers)}))


def _media_ranges(accept_headers: list[str]) -> list[tuple[str, bool]]:
    """Each media range of Accept header(s), lower case, and whether it is refused (q=0)."""
    ranges = []
    for item in (r for h in accept_headers for r in h.split(",") if r.strip()):
        kind, *params = (p.strip().lower() for p in item.split(";"))
        ranges.append((kind, any(re.fullmatch(r"q\s*=\s*0(\.0{0,3})?", p) for p in params)))
    return ranges


def manifest_media_type(body: bytes, content_type: str) -> str:
    """The media type to store a manifest under: the upstream's Content-Type, else its own field."""
    ctype = content_type.split(";")[0].strip()
    if ctype and ctype not in ("application/json", "application/octet-stream", "text/plain"):
        return ctype
    try:
        declared = parse_json(body).get("mediaType")
    except (ValueError, AttributeError):
        declared = None
    return declared if isinstance(declared, str) and declared else ctype or "application/json"


OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def referrers_index(descriptors: list[dict]) -> bytes:
    """The answer of the referrers API: an OCI index of the referring manifests' descriptors."""
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}, separators=(",", ":")).encode()


def manifest_headers(digest: str, media_type: str, size: int) -> dict[str, str]:
    return {
        **API_VERSION_HEADERS,
        "Content-Type": media_type,
        "Content-Length": str(size),
        "Docker-Content-Digest": digest,
        "Etag": f'"{digest}"',
    }


def blob_headers(digest: str, size: int) -> dict[str, str]:
    return {
        **API_VERSION_HEADERS,
        "Content-Type": "application/octet-stream",
        "Content-Length": str(size),
        "Docker-Content-Digest": digest,
        "Etag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
    }


_RANGE_RE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")  # ASCII, and few enough for int()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span a `Range` header asks for, or None for the whole blob.

    Only a single range is supported (what registry clients send); anything else, or a span
    outside the blob, raises BadRequest(RANGE_INVALID).
    """
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise BadRequest(ErrorCode.RANGE_INVALID, f"unsupported Range {header[:80]!r}")
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise BadRequest(ErrorCode.RANGE_INVALID, f"unsatisfiable Range {header[:80]!r}")
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise BadRequest(ErrorCode.RANGE_INVALID, f"unsatisfiable Range {header[:80]!r}")
    return start, end


def error_body(code: ErrorCode, message: str, detail: object = None) -> bytes:
    return json.dumps({"errors": [{"code": code.code, "message": message, "detail": detail}]}).encode()


def error_headers(size: int) -> dict[str, str]:
    return {**API_VERSION_HEADERS, "Content-Type": "application/json", "Content-Length": str(size)}

"""Prefetch: fill the cache online without a container engine. A small registry client pulls through
a hubcache on a loopback port exactly as dockerd would (token flow, redirects, every manifest and
blob), so the cache fills by its normal verified path; the bytes are discarded."""

from __future__ import annotations

import base64
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.response
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPMessage, HTTPResponse
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from ..registry import manifests
from ..registry.protocol import (
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST,
    REDIRECTS,
    ImageReference,
    digest_of,
    hash_digest,
    hasher,
    manifest_media_type,
    parse_json,
    token_of,
    token_request,
)
from .logins import Logins

if TYPE_CHECKING:
    from ..proxy.interception import Interception
    from ..storage.folder import CacheFolder

CHUNK = 1 << 20
COMMIT_WAIT = 10.0  # seconds a verified blob may take to appear in the store after its last byte
BLOB_WORKERS = 4

# What the client's opener answers: HTTPResponse for http(s), addinfourl for the other schemes of
# urllib's default handlers (a redirect may name one).
type Response = HTTPResponse | urllib.response.addinfourl


class PrefetchError(Exception):
    """One image could not be prefetched; the message is for an operator."""


class NotFound(PrefetchError):
    """The registry answered 404."""


class PullProgress(Protocol):
    def start(self, key: str, label: str, total: int) -> None: ...
    def advance(self, key: str, n: int) -> None: ...


@dataclass
class Result:
    image: str
    digest: str = ""
    platforms: list[str] = field(default_factory=list)
    referrers: int = 0  # signatures, SBOMs, attestations found and fetched
    fetched: int = 0  # blobs that went through the proxy into the store
    fetched_bytes: int = 0
    held: int = 0  # blobs the store had already
    error: str = ""


class Cache(Protocol):
    """Where prefetch pulls to: a proxy's registries and its store (LocalProxy, or the watch of a
    running proxy)."""

    @property
    def hosts(self) -> Interception | None: ...
    @property
    def folder(self) -> CacheFolder | None: ...


class RegistryClient:
    """Just enough of a registry client to pull through a proxy: Bearer tokens (anonymous, or
    asked for with the image's login as Basic), Basic where the registry asks for it, redirects
    (credentials are never sent to another scheme, host or port), streamed bodies."""

    ACCEPT = ", ".join(sorted(MANIFEST_MEDIA_TYPES))

    def __init__(self, proxy_url: str, ca_file: Path, timeout: float = 60, logins: Logins | None = None, headers: dict[str, str] | None = None):
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=str(ca_file))
        self._opener = urllib.request.build_opener(
            # Only https goes through the proxy: its blob server's loopback URLs are fetched directly.
            urllib.request.ProxyHandler({"https": proxy_url}),
            urllib.request.HTTPSHandler(context=context),
            _NoRedirects(),
        )
        self.timeout = timeout
        self.logins = logins or Logins()
        self.headers = headers or {}  # for the proxy: they stay with the registry's host, like credentials
        self._tokens: dict[tuple[str, str], str] = {}  # (host, repository) -> Authorization
        self._lock = threading.Lock()

    def manifest(self, image: ImageReference, reference: str) -> tuple[str, bytes, str]:
        """(media type, body, digest) of a manifest; a digest reference is verified."""
        with self._get(image, f"/v2/{image.repository}/manifests/{reference}", {"Accept": self.ACCEPT}) as r:
            body = r.read(MAX_MANIFEST + 1)
            media_type = r.headers.get("Content-Type", "").split(";")[0].strip()
            claimed = r.headers.get("Docker-Content-Digest", "")
        algorithm = reference.partition(":")[0] if ":" in reference else "sha256"
        digest = digest_of(body, algorithm)
        if (":" in reference and digest != reference) or (claimed.startswith(f"{algorithm}:") and claimed != digest):
            raise PrefetchError(f"{image}: manifest {reference} does not match its digest")
        return manifest_media_type(body, media_type), body, digest

    def referrers(self, image: ImageReference, subject: str) -> list[manifests.Descriptor] | None:
        """The manifests the registry's referrers API lists for `subject`; None when it has no
        such API (404: then the tag schema is the way)."""
        path = f"/v2/{image.repository}/referrers/{subject}"
        try:
            with self._get(image, path, {"Accept": "application/vnd.oci.image.index.v1+json"}) as r:
                listed = parse_json(r.read(MAX_MANIFEST + 1)).get("manifests") or []
            return [manifests.descriptor(d) for d in listed]
        except NotFound:
            return None
        except (ValueError, AttributeError, TypeError, manifests.ManifestError) as e:
            raise PrefetchError(f"{image}: the referrers of {subject} cannot be read ({e})") from None

    def blob(self, image: ImageReference, digest: str, progress: PullProgress) -> int:
        """Stream a blob through the proxy and discard it; returns its size once verified."""
        h, size = hasher(digest), 0
        with self._get(image, f"/v2/{image.repository}/blobs/{digest}", {}) as r:
            while chunk := r.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                progress.advance(digest, len(chunk))
        if hash_digest(h) != digest:
            raise PrefetchError(f"{image}: blob {digest} did not verify")
        return size

    def _get(self, image: ImageReference, path: str, headers: dict[str, str]) -> Response:
        url = f"https://{image.host}{path}"
        key = (image.host, image.repository)
        try:
            return self._follow(url, {**self.headers, **headers, **self._auth(key)})
        except urllib.error.HTTPError as e:
            if e.code != 401 or key in self._tokens:
                raise (NotFound if e.code == 404 else PrefetchError)(f"{image}: {_describe(e)}") from None
            self._token(image, e.headers.get("WWW-Authenticate", ""))
        try:
            return self._follow(url, {**self.headers, **headers, **self._auth(key)})
        except urllib.error.HTTPError as e:
            hint = ""
            if e.code in (401, 403) and self.logins.find(image) is None:
                hint = f"; no login for {image.registry} (--creds, --authfile, or the engine's login)"
            raise (NotFound if e.code == 404 else PrefetchError)(f"{image}: {_describe(e)}{hint}") from None

    def _auth(self, key: tuple[str, str]) -> dict[str, str]:
        authorization = self._tokens.get(key)
        return {"Authorization": authorization} if authorization else {}

    def _follow(self, url: str, headers: dict[str, str]) -> Response:
        """GET `url`, following up to 5 redirects; Authorization stays with the original origin
        (scheme, host and port): never sent in the clear, nor to another service of the host."""
        origin = _origin(url)
        for _ in range(6):
            request = urllib.request.Request(url, headers=headers)
            try:
                return self._opener.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                if e.code not in REDIRECTS or "Location" not in e.headers:
                    raise
                url = urllib.parse.urljoin(url, e.headers["Location"])
                if urllib.parse.urlsplit(url).scheme not in ("https", "http"):
                    # urllib would open file:, ftp: and data: URLs too: a registry may not send us there.
                    raise PrefetchError(f"refusing a redirect to {url[:200]!r}: not an http(s) URL") from None
                if _origin(url) != origin:
                    headers = {k: v for k, v in headers.items() if k != "Authorization" and k not in self.headers}
        raise PrefetchError(f"too many redirects at {url}")

    def _token(self, image: ImageReference, challenge: str) -> None:
        """Answer the registry's challenge: a token from the realm it names (with the image's
        login as Basic, if there is one), or the login itself when it asks for Basic."""
        login = self.logins.find(image)
        basic = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()} if login else {}
        url = token_request(challenge, image.repository)
        if url is None:
            scheme = challenge.partition(" ")[0] or "unknown"
            if scheme.lower() == "basic" and basic:
                with self._lock:
                    self._tokens[(image.host, image.repository)] = basic["Authorization"]
                return
            raise PrefetchError(f"{image}: the registry wants {scheme} credentials and there is no login for {image.registry}")
        try:
            with self._follow(url, basic) as r:
                token = token_of(r.read(1 << 20))
        except urllib.error.HTTPError as e:
            raise PrefetchError(f"{image}: token request refused: {_describe(e)}") from None
        if not token:
            raise PrefetchError(f"{image}: the token answer holds no token")
        with self._lock:
            self._tokens[(image.host, image.repository)] = f"Bearer {token}"


def _origin(url: str) -> tuple[str, str, int | None]:
    """A URL's scheme, host and port (the scheme's default when it names none)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1  # no port anyone could be sent to: an origin of its own
    return parts.scheme.lower(), (parts.hostname or "").lower(), port or {"https": 443, "http": 80}.get(parts.scheme.lower())


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str) -> None:
        return None  # RegistryClient._follow decides what a redirect may carry


def _describe(e: urllib.error.HTTPError) -> str:
    """Upstream's status and its registry error messages (or the text of a proxy error page)."""
    try:
        text = e.read(65536).decode(errors="replace")
    except OSError:
        text = ""
    try:
        errors = parse_json(text).get("errors") or []
        detail = "; ".join(f"{x.get('code')}: {x.get('message')}" for x in errors)
    except (ValueError, AttributeError):
        detail = " ".join(re.sub(r"<[^>]*>", " ", text).split())[:200]
    return f"upstream answered {e.code}" + (f" ({detail})" if detail else "")


def matches(platform: str, wanted: list[str]) -> bool:
    """Whether an index entry's platform is one of `wanted` ("os/arch" matches every variant).
    With nothing wanted, every real platform matches (not attestations, "unknown/unknown")."""
    if not wanted:
        return bool(platform) and not platform.startswith("unknown/")
    return any(platform == w or platform.startswith(f"{w}/") for w in wanted)


def find_referrers(client: RegistryClient, image: ImageReference, subjects: list[str]) -> list[tuple[str, bytes]]:
    """(media type, body) of every referrer of `subjects` (the image's digest first), fetched
    through the proxy: those the referrers API lists (a 404 means the registry has none), and the
    tag schema's `sha256-<hex>.sig|.att|.sbom` tags of the image's own digest that exist (cosign
    writes those by default, even where the API exists)."""
    found: dict[str, tuple[str, bytes]] = {}
    for subject in subjects:
        for descriptor in client.referrers(image, subject) or []:
            if descriptor.digest not in found:
                found[descriptor.digest] = client.manifest(image, descriptor.digest)[:2]
    for suffix in ("sig", "att", "sbom"):
        try:
            media_type, body, digest = client.manifest(image, f"{subjects[0].replace(':', '-')}.{suffix}")
        except NotFound:
            continue
        found[digest] = (media_type, body)
    return list(found.values())


def prefetch(
    proxy: Cache, client: RegistryClient, text: str, platforms: list[str], progress: PullProgress, referrers: bool = True
) -> Result:
    """Pull one image (the chosen platforms, and its referrers unless told not to) through
    `proxy`, so that the cache holds all of it."""
    result = Result(text)
    try:
        image = ImageReference.parse(text)
    except ValueError as e:
        result.error = str(e)
        return result
    result.image = str(image)
    assert proxy.hosts and proxy.folder
    store = proxy.folder.open_store()
    try:
        if not proxy.hosts.is_registry(image.host):
            raise PrefetchError(f"{image}: {image.host} is not one of the registries hubcache caches (option `registries`)")
        media_type, body, result.digest = client.manifest(image, image.reference)
        chosen = [("", media_type, body)]  # (platform, media type, body) of each image manifest
        if manifests.is_index(media_type):
            children = [c for c in _references(image, body, media_type).children if matches(c.platform, platforms)]
            if not children:
                raise PrefetchError(f"{image}: no platform matches {', '.join(platforms) or 'any'}")
            chosen = [(c.platform, *client.manifest(image, c.digest)[:2]) for c in children]
        blobs: dict[str, int] = {}
        for platform, child_type, child_body in chosen:
            result.platforms.append(platform or "(single)")
            for blob in _references(image, child_body, child_type).blobs:
                blobs[blob.digest] = blob.size
        if referrers:
            subjects = [result.digest, *(c.digest for c in children)] if manifests.is_index(media_type) else [result.digest]
            found = find_referrers(client, image, subjects)
            result.referrers = len(found)
            for referrer_type, referrer_body in found:
                if not manifests.is_index(referrer_type):
                    for blob in _references(image, referrer_body, referrer_type).blobs:
                        blobs[blob.digest] = blob.size
        missing = {d: s for d, s in blobs.items() if not store.has_blob(d)}
        result.held = len(blobs) - len(missing)

        def fetch(digest: str) -> int:
            progress.start(digest, f"{image.repository} {digest[7:19]}", missing[digest])
            size = client.blob(image, digest, progress)
            deadline = time.monotonic() + COMMIT_WAIT
            while not store.has_blob(digest):
                if time.monotonic() > deadline:
                    raise PrefetchError(f"{image}: blob {digest} was served but not stored; see the proxy log")
                time.sleep(0.05)
            return size

        with ThreadPoolExecutor(BLOB_WORKERS) as pool:
            for size in pool.map(fetch, sorted(missing, key=missing.__getitem__, reverse=True)):
                result.fetched += 1
                result.fetched_bytes += size
    except PrefetchError as e:
        result.error = str(e)
    except OSError as e:
        result.error = f"{result.image}: {getattr(e, 'reason', None) or e}"
    return result


def _references(image: ImageReference, body: bytes, media_type: str) -> manifests.References:
    try:
        return manifests.references(body, media_type)
    except manifests.ManifestError as e:
        raise PrefetchError(f"{image}: unreadable manifest: {e}") from None

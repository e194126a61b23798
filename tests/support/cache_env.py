"""The cache's addons in a unit test: a fake upstream, the `Env` a test drives them through, and
flows, paths and answers for the requests of a pull (tests/unit/cache/)."""

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from hubcache.blobserver.server import BLOB_HOST
from hubcache.cache.access import Access
from hubcache.cache.hooks import RegistryCache
from hubcache.mitm import internals
from hubcache.mitm.flows import Mark
from hubcache.proxy.interception import Interception
from hubcache.registry import protocol
from hubcache.registry.protocol import digest_of
from hubcache.storage.journal import MissJournal
from hubcache.storage.store import Store
from hubcache.upstream import client as upstream
from support.addons import CacheAddons

HUB = "registry-1.docker.io"
CDN = "production.cloudflare.docker.com"
REPO = "library/alpine"

BLOB = os.urandom(150_000)
BLOB_DIGEST = digest_of(BLOB)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_ACCEPT = ", ".join([DOCKER_V2, DOCKER_LIST, OCI_INDEX, OCI_MANIFEST])  # what dockerd asks a manifest with
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
MANIFEST_DIGEST = digest_of(MANIFEST)
MANIFEST2 = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{}]}).encode()
MANIFEST2_DIGEST = digest_of(MANIFEST2)


@dataclass
class Upstream:
    """What a blob fetch of hubcache's own gets from the fake upstream."""

    status: int
    headers: dict
    body: bytes = b""
    before_answer: asyncio.Event | None = None  # upstream answers once this is set
    mid_body: asyncio.Event | None = None  # after the first chunk, the rest waits for this
    broken: str = ""  # the transfer breaks after the body's chunks, with this reason


class FakeUpstream(upstream.Upstream):
    """Stands in for upstream (hubcache's own requests need a running proxy): `send` answers from
    `replies` (a Response, or a reason string: no answer), `run` from `fetches` (an Upstream, or a
    reason string), as mitmproxy would: headers through the addons' responseheaders, then the body
    through the stream callable they set."""

    def __init__(self) -> None:
        super().__init__()  # no circuit breaker unless a test hands it one
        self.replies: list = []
        self.sent: list = []  # (method, url) of every request sent with send()
        self.sent_requests: list = []  # and the request itself
        self.sent_as_miss: list[bool] = []  # whether each was sent as only upstream's to answer
        self.fetches: list = []
        self.fetched: list = []  # the request of every run()
        self.on_headers: list = []  # the responseheaders hooks, in addon order

    async def send(self, like: http.HTTPFlow, request: http.Request, timeout: float, follow: bool = False, miss: bool = False) -> http.Response:
        self.sent.append((request.method, request.url))
        self.sent_requests.append(request)
        self.sent_as_miss.append(miss)
        assert self.replies, f"unexpected upstream {request.method} {request.url}"
        return _answer(self.replies.pop(0))

    async def run(self, f: http.HTTPFlow, idle_timeout: float, progress=None, sink=None) -> http.Response:
        self.fetched.append(f.request.copy())
        assert self.fetches, f"unexpected upstream fetch {f.request.url}"
        answer = _answer(self.fetches.pop(0))
        if answer.before_answer:
            await answer.before_answer.wait()
        f.live = True  # as mitmproxy's HTTP layer makes it
        f.response = upstream_response(answer.status, answer.headers)
        for hook in self.on_headers:
            hook(f)
        if sink:
            internals.take(f, sink)
        if f.error:
            raise upstream.Unreachable(f.error.msg)
        for i in range(0, len(answer.body), 65536):
            f.response.stream(answer.body[i : i + 65536])
            if i == 0 and answer.mid_body:
                await answer.mid_body.wait()
            if reason := f.metadata.get(Mark.UNREAD):
                raise upstream.Unreadable(reason)
        if answer.broken:
            raise upstream.Unreachable(answer.broken)
        f.response.stream(b"")
        upstream.BoundedAnswers().response(f)
        if reason := f.metadata.get(Mark.UNREAD):
            raise upstream.Unreadable(reason)
        return f.response


def _answer(answer):
    if isinstance(answer, str):
        raise upstream.Unreachable(answer)
    return answer


@dataclass
class Env:
    tctx: taddons.context
    addons: CacheAddons
    cache_dir: Path
    answers: list  # what the fake upstream answers to send(), in order: a Response, or a reason string
    sent: list  # (method, url) of every request hubcache sent upstream itself with send()
    fetches: list  # what run() gets, in order: an Upstream, or a reason string
    fetched: list  # the request of every run()

    @property
    def cache(self) -> RegistryCache:
        return self.addons.cache

    @property
    def access(self) -> Access:
        return self.addons.access

    @property
    def hosts(self) -> Interception:
        return self.addons.hosts

    @property
    def store(self) -> Store:
        return self.addons.folder.store

    async def settle(self) -> None:
        """Wait for the fills running in the background."""
        # Awaiting only finished tasks would never yield to the loop, so their done-callbacks
        # (which drop them from the task set) would never run: wait for the unfinished ones, then yield.
        while pending := [task for task in self.addons.fills.tasks if not task.done()]:
            await asyncio.gather(*pending)
        await asyncio.sleep(0)

    def journal(self) -> list[dict]:
        return MissJournal(self.cache_dir / "misses.jsonl").entries()

    def temp_files(self) -> list[str]:
        root = self.cache_dir / "tmp"
        return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def flow(path: str, method: str = "GET", host: str = HUB, headers: dict | None = None) -> http.HTTPFlow:
    if "/manifests/" in path:
        headers = {"Accept": DOCKER_ACCEPT, **(headers or {})}  # as dockerd asks, unless told
    req = tutils.treq(
        host=host,
        port=443,
        scheme=b"https",
        method=method.encode(),
        path=path.encode(),
        headers=http.Headers(**(headers or {})),
        content=b"",
    )
    f = tflow.tflow(req=req)
    f.client_conn.sni = host  # the client's TLS, intercepted for the host it goes to
    return f


def upstream_response(status: int, headers: dict | None = None) -> http.Response:
    """A response as the responseheaders hook sees it: headers, no body yet."""
    return tutils.tresp(status_code=status, headers=http.Headers(**(headers or {})), content=None)


def blob_path(digest: str = BLOB_DIGEST) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def manifest_path(reference: str) -> str:
    return f"/v2/{REPO}/manifests/{reference}"


def sized(body: bytes = BLOB, status: int = 200, **extra) -> Upstream:
    return Upstream(status, {"Content-Length": str(len(body))}, body, **extra)


async def fill_blob(env: Env, body: bytes = BLOB, digest: str = BLOB_DIGEST) -> http.HTTPFlow:
    env.fetches.append(sized(body))
    f = flow(blob_path(digest))
    await env.addons.request(f)
    await env.settle()
    return f


def location(f: http.HTTPFlow) -> tuple[str, dict[str, str]]:
    """Where a 307 sends the client: the blob server's path, and the URL's query."""
    assert f.response.status_code == 307, f.response
    url = urlsplit(f.response.headers["Location"])
    assert (url.scheme, url.hostname) == ("https", BLOB_HOST)
    return url.path, {k: v[0] for k, v in parse_qs(url.query).items()}


async def asked(env: Env, f: http.HTTPFlow, answer: Upstream) -> http.HTTPFlow:
    """A request the store cannot answer: hubcache asks upstream, which gives `answer`, and the
    answer goes through the response hooks as the client's."""
    env.fetches.append(answer)
    await env.addons.request(f)
    assert f.response is not None
    env.cache.responseheaders(f)
    await env.cache.response(f)
    return f


async def fill_manifest(env: Env, reference: str, body: bytes, ctype: str = OCI_INDEX, headers=None) -> http.HTTPFlow:
    env.fetches.append(Upstream(200, {"Content-Type": ctype, **(headers or {})}, body))
    f = flow(manifest_path(reference))
    await env.addons.request(f)
    assert f.response is not None, "upstream's answer"
    env.cache.responseheaders(f)
    assert f.response.stream is False
    await env.cache.response(f)
    return f


def manifest_response(status: int, body: bytes = b"", headers: dict | None = None) -> http.Response:
    r = http.Response.make(status, body)
    r.headers.update(headers or {})
    return r


TOKEN_PATH = f"/token?service=registry.docker.io&scope=repository:{REPO}:pull"


async def local_token(env: Env) -> str:
    """A token hubcache issues while Docker Hub's token host cannot answer."""
    env.answers.append("connection refused")
    f = flow(TOKEN_PATH, host="auth.docker.io")
    await env.addons.request(f)
    return f.response.json()["token"]


SBOM_TYPE = "application/spdx+json"
SIG_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"


def referring(artifact_type: str, subject: str = MANIFEST_DIGEST) -> bytes:
    """An OCI 1.1 artifact manifest (an SBOM, a signature) that names `subject`."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(b"{}"), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_INDEX, "digest": subject, "size": len(MANIFEST)},
        }
    ).encode()


def referrers_path(subject: str = MANIFEST_DIGEST, query: str = "") -> str:
    return f"/v2/{REPO}/referrers/{subject}" + (f"?{query}" if query else "")


def index_of(*entries: tuple[str, bytes]) -> bytes:
    return protocol.referrers_index(
        [{"mediaType": OCI_MANIFEST, "digest": digest_of(body), "size": len(body), "artifactType": kind} for kind, body in entries]
    )

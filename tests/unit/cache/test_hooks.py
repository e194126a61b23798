import asyncio
import gzip
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from mitmproxy import exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils

from hubcache.blobserver.server import BLOB_HOST
from hubcache.cache import access as access_module
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
from hubcache.upstream.circuits import Circuits
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
        while pending := [task for task in self.addons.blobs.tasks if not task.done()]:
            await asyncio.gather(*pending)
        await asyncio.sleep(0)

    def journal(self) -> list[dict]:
        return MissJournal(self.cache_dir / "misses.jsonl").entries()

    def temp_files(self) -> list[str]:
        root = self.cache_dir / "tmp"
        return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


@pytest.fixture
async def env(tmp_path):
    fake = FakeUpstream()
    addons = CacheAddons(upstream=fake)
    fake.on_headers += [upstream.BoundedAnswers().responseheaders, addons.cache.responseheaders]
    # Proxyserver declares connection_strategy, which the cache sets to lazy.
    with taddons.context(Proxyserver(), *addons.addons()) as tctx:
        tctx.options.update(cache_dir=str(tmp_path), tag_freshness=0)
        # A public repository, already probed (see TestAccess for the rest).
        addons.store.set_visibility("docker.io", REPO, True)
        env = Env(tctx, addons, tmp_path, fake.replies, fake.sent, fake.fetches, fake.fetched)
        yield env
        await env.settle()
        addons.folder.done()


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


class TestConfigure:
    async def test_unusable_cache_dir(self, env):
        not_a_dir = env.cache_dir / "file"
        not_a_dir.write_bytes(b"")
        with pytest.raises(exceptions.OptionsError):
            env.tctx.configure(env.cache, cache_dir=str(not_a_dir / "cache"))
        # The rollback reopened the previous folder, which still works.
        await fill_blob(env)
        assert env.store.blob_size(BLOB_DIGEST) == len(BLOB)

    async def test_reconfiguring_the_same_folder_keeps_filling(self, env):
        env.tctx.configure(env.cache, cache_dir=str(env.cache_dir))
        await fill_blob(env)
        assert env.store.has_blob(BLOB_DIGEST)
        assert env.journal()[-1]["outcome"] == "filled"

    async def test_reconfiguring_another_path_to_the_same_folder_keeps_filling(self, env, tmp_path_factory):
        link = tmp_path_factory.mktemp("link") / "cache"
        link.symlink_to(env.cache_dir)
        old = env.store
        env.tctx.configure(env.cache, cache_dir=str(link))
        assert env.store is not old
        await fill_blob(env)
        assert env.store.blob_size(BLOB_DIGEST) == len(BLOB)

    @pytest.mark.parametrize("option, value", [("tag_freshness", -1), ("revalidate_timeout", -1), ("fill_timeout", 0)])
    async def test_bad_seconds(self, env, option, value):
        with pytest.raises(exceptions.OptionsError):
            env.tctx.configure(env.cache, **{option: value})

    async def test_lazy_connection_strategy(self, env):
        assert env.tctx.options.connection_strategy == "lazy"


class TestRouting:
    async def test_bad_path_is_answered_with_a_registry_error(self, env):
        f = flow("/v2/Library/Alpine/manifests/latest")
        await env.addons.request(f)
        assert f.response.status_code == 400
        assert f.response.headers["Content-Type"] == "application/json"
        assert f.response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        error = json.loads(f.response.content)["errors"][0]
        assert error["code"] == "NAME_INVALID"
        assert int(f.response.headers["Content-Length"]) == len(f.response.content)

    async def test_bad_digest(self, env):
        f = flow(f"/v2/{REPO}/blobs/sha256:1234")
        await env.addons.request(f)
        assert f.response.status_code == 400
        assert json.loads(f.response.content)["errors"][0]["code"] == "DIGEST_INVALID"

    @pytest.mark.parametrize(
        "path, method, host",
        [
            (f"/v2/{REPO}/tags/list", "GET", HUB),
            (f"/v2/{REPO}/blobs/uploads/", "POST", HUB),
            (manifest_path("latest"), "PUT", HUB),
            (blob_path(), "GET", "example.com"),
        ],
    )
    async def test_passed_through_untouched(self, env, path, method, host):
        f = flow(path, method, host)
        await env.addons.request(f)
        assert f.response is None
        assert f.request.host == host and f.request.path == path
        assert env.addons.misses.peek(f) is None

    async def test_subrequests_are_ignored(self, env):
        await fill_blob(env)
        f = flow(blob_path(), "HEAD")
        f.metadata[Mark.SUBREQUEST] = True
        await env.addons.request(f)
        assert f.response is None


class TestBlobHit:
    async def test_head(self, env):
        await fill_blob(env)
        f = flow(blob_path(), "HEAD")
        await env.addons.request(f)
        assert f.response.status_code == 200
        assert f.response.raw_content == b""
        assert f.response.headers["Content-Length"] == str(len(BLOB))
        assert f.response.headers["Docker-Content-Digest"] == BLOB_DIGEST

    async def test_get_is_sent_to_the_blob_server(self, env):
        await fill_blob(env)
        f = flow(blob_path(), headers={"Authorization": "Bearer secret", "Range": "bytes=10-"})
        await env.addons.request(f)
        path, query = location(f)
        assert path == f"/blobs/{BLOB_DIGEST}"
        assert set(query) == {"expires", "signature", "tag"}, "a cached blob needs no fill"
        assert query["tag"].startswith("cache."), "its transfer is reported as served from the cache"
        assert f.response.headers["Docker-Content-Digest"] == BLOB_DIGEST
        assert len(env.fetched) == 1
        assert [e["outcome"] for e in env.journal()] == ["filled"]  # the hit itself is no miss


class TestBlobFill:
    async def test_one_fetch_for_every_client_and_each_is_sent_to_the_growing_file(self, env):
        more = asyncio.Event()
        env.fetches.append(sized(mid_body=more))
        try:
            first = flow(blob_path(), headers={"Accept-Encoding": "gzip", "Authorization": "Bearer t", "Range": "bytes=5-"})
            await env.addons.request(first)
            path, query = location(first)
            assert path == f"/blobs/{BLOB_DIGEST}" and query["size"] == str(len(BLOB))
            assert env.temp_files() == [str(env.cache_dir / "tmp" / query["fill"])]

            second = flow(blob_path())  # another client, while the fill is half done
            await env.addons.request(second)
            assert location(second)[1]["fill"] == query["fill"]
            [fetch] = env.fetched
            assert fetch.headers["authorization"] == "Bearer t"  # upstream needs the first client's token
            assert fetch.headers["accept-encoding"] == "identity" and "range" not in fetch.headers  # the whole, identity blob
        finally:
            more.set()  # a failing assertion must not leave the fill waiting forever
        await env.settle()
        with env.store.open_blob(BLOB_DIGEST) as blob:
            assert blob.read() == BLOB
        [entry] = env.journal()
        assert (entry["outcome"], entry["kind"], entry["repository"], entry["bytes"]) == ("filled", "blob", REPO, len(BLOB))
        assert env.temp_files() == [] and env.addons.blobs.fills == {}

    @pytest.mark.parametrize(
        "answer, outcome",
        [
            (sized(BLOB[:-1] + bytes([BLOB[-1] ^ 1])), f"rejected: {len(BLOB)} bytes hashing to"),
            (Upstream(200, {"Content-Length": str(len(BLOB))}, BLOB[:70000]), "rejected: 70000 bytes"),
            (sized(broken="connection reset by peer"), "failed: connection reset by peer"),
        ],
    )
    async def test_a_bad_transfer_is_never_stored(self, env, answer, outcome):
        env.fetches.append(answer)
        f = flow(blob_path())
        await env.addons.request(f)
        if f.response.status_code == 307:  # sent to the fill: the blob server cuts it once its file is gone
            assert "fill" in location(f)[1]
        else:  # the fill had ended when the client looked
            assert f.response.status_code == 502, f.response
            assert json.loads(f.response.content)["errors"][0]["code"] == "BLOB_UNKNOWN"
        await env.settle()
        assert not env.store.has_blob(BLOB_DIGEST)
        assert env.temp_files() == []
        assert env.journal()[0]["outcome"].startswith(outcome)

    async def test_a_fill_that_ended_while_a_request_was_deciding_is_not_repeated(self, env, monkeypatch):
        await fill_blob(env)
        answers = iter([False, True])  # the request's look misses the commit, the fill's sees it
        monkeypatch.setattr(env.store, "has_blob", lambda digest: next(answers))
        f = flow(blob_path())
        await env.addons.request(f)
        assert set(location(f)[1]) == {"expires", "signature", "tag"}
        assert len(env.fetched) == 1, "no second upstream fetch"

    async def test_upstreams_refusal_goes_to_the_client_that_asked(self, env):
        challenge = 'Bearer realm="https://auth.docker.io/token"'
        env.fetches.append(Upstream(401, {"WWW-Authenticate": challenge, "Content-Length": "2"}, b"{}"))
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response.status_code == 401
        assert f.response.headers["WWW-Authenticate"] == challenge
        await env.settle()
        assert env.journal()[0]["outcome"] == "passed: upstream answered 401"
        assert env.temp_files() == []

    async def test_a_client_waiting_on_a_refused_fill_asks_upstream_itself(self, env):
        answer = asyncio.Event()
        env.fetches.append(Upstream(401, {"Content-Length": "0"}, before_answer=answer))
        first = asyncio.create_task(env.addons.request(f1 := flow(blob_path())))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(env.addons.request(f2 := flow(blob_path(), headers={"Authorization": "Bearer mine"})))
        await asyncio.sleep(0.05)
        answer.set()
        await asyncio.gather(first, second)
        assert f1.response.status_code == 401
        assert f2.response is None and f2.request.headers["authorization"] == "Bearer mine"
        assert len(env.fetched) == 1

    async def test_a_cdn_redirect_is_followed_without_credentials(self, env):
        cdn_url = f"https://{CDN}/registry-v2/blobs/{BLOB_DIGEST[7:]}/data?verify=1-abc"
        env.fetches += [Upstream(307, {"Location": cdn_url, "Content-Length": "0"}), sized()]
        f = flow(blob_path(), headers={"Authorization": "Bearer t"})
        await env.addons.request(f)
        assert location(f)[0] == f"/blobs/{BLOB_DIGEST}", "the client never sees the CDN"
        await env.settle()
        registry, cdn = env.fetched
        assert registry.headers["authorization"] == "Bearer t"
        assert cdn.url == cdn_url and "authorization" not in cdn.headers
        assert env.store.blob_size(BLOB_DIGEST) == len(BLOB)
        assert not env.hosts.intercepts(CDN)

    async def test_a_blob_host_that_refuses_hubcache_leaves_the_redirect_to_the_client(self, env):
        elsewhere = "https://blobs.example/layer?signed=1"
        env.fetches += [Upstream(307, {"Location": elsewhere, "Content-Length": "0"}), Upstream(403, {"Content-Length": "0"})]
        f = flow(blob_path(), headers={"Authorization": "Bearer t"})
        await env.addons.request(f)
        assert f.response.status_code == 307 and f.response.headers["Location"] == elsewhere
        await env.settle()
        assert env.store.blob_size(BLOB_DIGEST) is None

    async def test_too_many_redirects(self, env):
        env.fetches += [Upstream(302, {"Location": f"https://{HUB}:{443 + i}/v2/{REPO}/blobs/{BLOB_DIGEST}"}) for i in range(6)]
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response.status_code == 502
        assert json.loads(f.response.content)["errors"][0]["message"].endswith("too many redirects")

    async def test_silent_upstream_fails_the_fill(self, env):
        env.fetches.append("upstream sent nothing for 60s")
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response.status_code == 502
        assert "upstream sent nothing for 60s" in f.response.text
        await env.settle()
        assert env.journal()[0]["outcome"] == "failed: upstream sent nothing for 60s"

    async def test_no_size_from_upstream_sends_the_blob_once_whole(self, env):
        env.fetches.append(Upstream(200, {}, BLOB))
        f = flow(blob_path())
        await env.addons.request(f)
        assert set(location(f)[1]) == {"expires", "signature", "tag"}
        assert env.store.has_blob(BLOB_DIGEST)

    async def test_empty_blob(self, env):
        digest = digest_of(b"")
        env.fetches.append(sized(b""))
        f = flow(blob_path(digest))
        await env.addons.request(f)
        await env.settle()
        path, query = location(f)
        assert path == f"/blobs/{digest}" and query.get("size", "0") == "0"  # the fill's file, or the stored blob
        assert env.store.blob_size(digest) == 0

    @pytest.mark.parametrize("encoding", ["gzip", "br"])
    async def test_an_encoded_answer_hubcache_did_not_ask_for_is_refused_not_stored(self, env, encoding):
        env.fetches.append(Upstream(200, {"Content-Encoding": encoding}, b"not identity"))
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response.status_code == 502
        assert encoding in f.response.json()["errors"][0]["message"]
        await env.settle()
        assert not env.store.has_blob(BLOB_DIGEST)
        outcome = env.journal()[0]["outcome"]
        assert outcome.startswith("failed: upstream's") and encoding in outcome

    async def test_head_miss_is_passed(self, env):
        f = await asked(env, flow(blob_path(), "HEAD"), Upstream(200, {"Content-Length": str(len(BLOB))}))
        assert f.response.status_code == 200
        assert not env.store.has_blob(BLOB_DIGEST)
        assert env.journal()[0]["outcome"] == "passed: upstream answered 200"
        assert [r.method for r in env.fetched] == ["HEAD"]

    async def test_an_index_that_cannot_be_written_costs_only_the_note(self, env, monkeypatch, caplog):
        def read_only(*args):
            raise OSError("cache index: attempt to write a readonly database")

        monkeypatch.setattr(env.store, "link", read_only)
        env.fetches.append(sized())
        f = flow(blob_path())
        await env.addons.request(f)
        assert location(f)[0] == f"/blobs/{BLOB_DIGEST}", "the client still gets the blob"
        await env.settle()
        assert "not noted in the cache: cache index: attempt to write a readonly database" in caplog.text

    async def test_a_full_disk_passes_the_request_through(self, env, monkeypatch):
        monkeypatch.setattr("hubcache.cache.blob_path.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
        env.fetches.append(sized())
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response is None, "the client fetches it itself"
        await env.settle()
        f.response = upstream_response(200)
        await env.cache.response(f)
        assert env.journal()[0]["outcome"] == "passed: upstream answered 200"
        assert not env.store.has_blob(BLOB_DIGEST) and env.temp_files() == []

    async def test_room_promised_to_a_fill_under_way_is_not_given_twice(self, env, monkeypatch):
        reserve = 64 * 1024 * 1024
        free = reserve + len(BLOB) + 1000  # room for one such blob, not two
        monkeypatch.setattr("hubcache.cache.blob_path.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
        more = asyncio.Event()
        other = os.urandom(len(BLOB))
        env.fetches += [sized(mid_body=more), sized(other)]
        first = flow(blob_path())
        await env.addons.request(first)
        assert "fill" in location(first)[1]
        second = flow(blob_path(digest_of(other)))
        await env.addons.request(second)
        assert second.response is None, "passed through: the room is promised to the first fill"
        more.set()
        await env.settle()
        assert env.store.has_blob(BLOB_DIGEST)

    async def test_the_free_space_reserve_is_never_filled(self, env, monkeypatch):
        free = 64 * 1024 * 1024 + len(BLOB) - 1  # room for the blob, but not with the reserve left free
        monkeypatch.setattr("hubcache.cache.blob_path.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
        env.fetches.append(sized())
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response is None, "passed through: the reserve stays free for the index and other fills"

    async def test_an_unusable_cache_folder_passes_the_request_through(self, env, monkeypatch):
        def no_space(digest):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(env.store, "blob_writer", no_space)
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response is None and env.fetched == []
        f.response = upstream_response(200)
        await env.cache.response(f)
        assert env.journal()[0]["outcome"] == "passed: upstream answered 200"


def manifest_response(status: int, body: bytes = b"", headers: dict | None = None) -> http.Response:
    r = http.Response.make(status, body)
    r.headers.update(headers or {})
    return r


class TestPing:
    async def test_upstream_answer_is_relayed(self, env):
        challenge = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'
        env.answers.append(manifest_response(401, b'{"errors":[]}', {"WWW-Authenticate": challenge}))
        f = flow("/v2/", headers={"Authorization": "Bearer t"})
        await env.addons.request(f)
        assert env.sent == [("GET", f"https://{HUB}/v2/")]
        assert f.response.status_code == 401
        assert f.response.headers["WWW-Authenticate"] == challenge

    @pytest.mark.parametrize("failure", ["connection refused", manifest_response(503), manifest_response(429)])
    async def test_answered_locally_when_upstream_fails(self, env, failure):
        env.answers.append(failure)
        f = flow("/v2/")
        await env.addons.request(f)
        assert f.response.status_code == 200
        assert f.response.content == b"{}"
        assert f.response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


class TestManifestByDigest:
    async def test_miss_is_stored_then_served(self, env):
        f = flow(manifest_path(MANIFEST_DIGEST), headers={"Accept": OCI_INDEX})
        await asked(env, f, Upstream(200, {"Content-Type": OCI_INDEX}, MANIFEST))
        assert f.response.content == MANIFEST  # upstream's answer, untouched
        assert env.fetched[0].headers["accept"] == OCI_INDEX, "asked with the client's request"
        stored = env.store.get_manifest(MANIFEST_DIGEST)
        assert (stored.media_type, stored.body) == (OCI_INDEX, MANIFEST)
        [entry] = env.journal()
        assert (entry["kind"], entry["outcome"], entry["digest"], entry["bytes"]) == (
            "manifest", "filled", MANIFEST_DIGEST, len(MANIFEST))

        g = flow(manifest_path(MANIFEST_DIGEST), headers={"Accept": f"{DOCKER_V2}, {OCI_INDEX}"})
        await env.addons.request(g)
        assert g.response.status_code == 200
        assert g.response.content == MANIFEST
        assert g.response.headers["Content-Type"] == OCI_INDEX
        assert g.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        assert g.response.headers["Content-Length"] == str(len(MANIFEST))
        assert g.response.headers["Etag"] == f'"{MANIFEST_DIGEST}"'

        h = flow(manifest_path(MANIFEST_DIGEST), "HEAD")
        await env.addons.request(h)
        assert h.response.status_code == 200
        assert h.response.raw_content == b""
        assert h.response.headers["Content-Length"] == str(len(MANIFEST))
        assert h.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        assert len(env.journal()) == 1  # hits are not journalled
        assert env.sent == [] and len(env.fetched) == 1

    async def test_generic_content_type_stores_the_declared_media_type(self, env):
        await fill_manifest(env, MANIFEST_DIGEST, MANIFEST, ctype="application/json")
        assert env.store.get_manifest(MANIFEST_DIGEST).media_type == OCI_INDEX

    async def test_wrong_bytes_are_refused(self, env):
        f = await asked(env, flow(manifest_path(MANIFEST_DIGEST)), Upstream(200, {"Content-Type": OCI_INDEX}, MANIFEST2))
        assert f.response.status_code == 502
        error = json.loads(f.response.content)["errors"][0]
        assert error["code"] == "MANIFEST_INVALID"
        assert env.store.get_manifest(MANIFEST_DIGEST) is None
        assert env.store.get_manifest(MANIFEST2_DIGEST) is None
        assert env.journal()[0]["outcome"] == "rejected: digest mismatch"

    async def test_accept_excluding_the_stored_type_is_not_answered(self, env):
        await fill_manifest(env, MANIFEST_DIGEST, MANIFEST)
        f = await asked(env, flow(manifest_path(MANIFEST_DIGEST), headers={"Accept": DOCKER_V2}), Upstream(404, {}))
        assert f.response.status_code == 404, "upstream's answer, not the stored manifest"
        assert env.fetched[-1].headers["accept"] == DOCKER_V2

    async def test_upstream_error_is_passed_and_journalled(self, env):
        f = await asked(env, flow(manifest_path(MANIFEST_DIGEST)), Upstream(404, {}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'))
        assert f.response.status_code == 404
        assert env.store.get_manifest(MANIFEST_DIGEST) is None
        assert env.journal()[0]["outcome"] == "passed: upstream answered 404"

    async def test_huge_manifest_is_not_held_in_memory(self, env):
        env.fetches.append(Upstream(200, {"Content-Length": str(5 * 1024 * 1024)}, b"x" * 5 * 1024 * 1024))
        f = flow(manifest_path(MANIFEST_DIGEST))
        await env.addons.request(f)
        assert f.response.status_code == 502
        assert json.loads(f.response.content)["errors"][0]["code"] == "MANIFEST_INVALID"
        assert env.journal()[0]["outcome"] == f"rejected: upstream's answer is larger than {upstream.MAX_ANSWER} bytes"

    @pytest.mark.parametrize(
        "headers, body",
        [
            ({"Transfer-Encoding": "chunked"}, b"x" * (upstream.MAX_ANSWER + 1)),  # no length announced
            ({"Content-Encoding": "gzip"}, gzip.compress(b"{" + b" " * (64 * upstream.MAX_ANSWER))),  # small on the wire
        ],
        ids=["chunked", "gzip bomb"],
    )
    async def test_a_manifest_limit_counts_the_bytes_read(self, env, headers, body):
        f = await asked(env, flow(manifest_path(MANIFEST_DIGEST)), Upstream(200, headers, body))
        assert f.response.status_code == 502
        assert f"larger than {upstream.MAX_ANSWER}" in f.response.json()["errors"][0]["message"]
        assert env.store.get_manifest(MANIFEST_DIGEST) is None

    async def test_a_gzip_encoded_manifest_is_decoded_and_verified(self, env):
        await asked(env, flow(manifest_path(MANIFEST_DIGEST)), Upstream(200, {"Content-Encoding": "gzip", "Content-Type": OCI_INDEX}, gzip.compress(MANIFEST)))
        assert env.store.get_manifest(MANIFEST_DIGEST).body == MANIFEST

    @pytest.mark.parametrize("method", ["GET", "HEAD"])
    async def test_unreachable_upstream_is_a_registry_error(self, env, method):
        env.fetches.append("connection refused")
        f = flow(manifest_path(MANIFEST_DIGEST), method=method)
        await env.addons.request(f)
        assert f.response.status_code == 502
        if method == "GET":
            assert json.loads(f.response.content)["errors"][0]["code"] == "UNAVAILABLE"
        assert env.journal()[0]["outcome"] == "failed: connection refused"


class TestManifestByTag:
    async def test_miss_stores_manifest_and_tag(self, env):
        f = await fill_manifest(env, "3.20", MANIFEST, headers={"Docker-Content-Digest": MANIFEST_DIGEST})
        assert f.response.status_code == 200
        assert env.store.get_manifest(MANIFEST_DIGEST).body == MANIFEST
        entry = env.store.get_tag("docker.io", REPO, "3.20")
        assert entry.digest == MANIFEST_DIGEST
        assert env.journal()[0]["outcome"] == "filled"
        assert env.journal()[0]["reference"] == "3.20"

    async def test_miss_with_a_lying_digest_header_is_refused(self, env):
        f = await fill_manifest(env, "3.20", MANIFEST, headers={"Docker-Content-Digest": MANIFEST2_DIGEST})
        assert f.response.status_code == 502
        assert env.store.get_tag("docker.io", REPO, "3.20") is None
        assert env.store.get_manifest(MANIFEST_DIGEST) is None

    async def test_aliases_share_the_tag(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.tctx.configure(env.cache, tag_freshness=3600)
        f = flow(manifest_path("3.20"), host="index.docker.io")
        await env.addons.request(f)
        assert f.response.content == MANIFEST

    async def test_fresh_tag_is_served_without_upstream(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.tctx.configure(env.cache, tag_freshness=3600)
        f = flow(manifest_path("3.20"))
        await env.addons.request(f)
        assert env.sent == []
        assert f.response.status_code == 200
        assert f.response.content == MANIFEST
        assert f.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST

    async def test_tag_older_than_freshness_is_revalidated(self, env, monkeypatch):
        await fill_manifest(env, "3.20", MANIFEST)
        env.tctx.configure(env.cache, tag_freshness=60)
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 120)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST_DIGEST}))
        f = flow(manifest_path("3.20"))
        await env.addons.request(f)
        assert env.sent == [("HEAD", f"https://{HUB}{manifest_path('3.20')}")]
        assert f.response.content == MANIFEST

    async def test_unchanged_tag_is_served_from_cache(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.store.set_tag("docker.io", REPO, "3.20", MANIFEST_DIGEST, checked=1000.0)  # long ago
        before = time.time()
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST_DIGEST}))
        f = flow(manifest_path("3.20"), headers={"Authorization": "Bearer t"})
        await env.addons.request(f)
        assert env.sent == [("HEAD", f"https://{HUB}{manifest_path('3.20')}")]
        assert f.response.status_code == 200
        assert f.response.content == MANIFEST
        assert f.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        assert env.store.get_tag("docker.io", REPO, "3.20").checked >= before, "upstream's yes refreshed it"
        assert len(env.journal()) == 1

    async def test_head_by_tag_is_answered_with_size_and_digest(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST_DIGEST}))
        f = flow(manifest_path("3.20"), "HEAD")
        await env.addons.request(f)
        assert f.response.raw_content == b""
        assert f.response.headers["Content-Length"] == str(len(MANIFEST))
        assert f.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST

    async def test_tag_moved_to_a_known_manifest(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        await fill_manifest(env, MANIFEST2_DIGEST, MANIFEST2)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST2_DIGEST}))
        f = flow(manifest_path("3.20"))
        await env.addons.request(f)
        assert f.response.content == MANIFEST2
        assert env.store.get_tag("docker.io", REPO, "3.20").digest == MANIFEST2_DIGEST

    async def test_tag_moved_to_a_known_manifest_of_a_type_the_client_refuses_goes_upstream(self, env):
        image = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}).encode()
        await fill_manifest(env, "3.20", MANIFEST)
        await fill_manifest(env, digest_of(image), image, ctype=OCI_MANIFEST)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": digest_of(image)}))
        f = await asked(env, flow(manifest_path("3.20"), headers={"Accept": OCI_INDEX}), Upstream(404, {}))
        assert f.response.content != image, "a manifest the client's Accept excludes is never served"
        assert env.fetched[-1].headers["accept"] == OCI_INDEX, "the client's request went upstream"

    async def test_tag_moved_to_an_unknown_manifest_goes_upstream(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST2_DIGEST}))
        f = await asked(env, flow(manifest_path("3.20")), Upstream(200, {"Content-Type": OCI_INDEX, "Docker-Content-Digest": MANIFEST2_DIGEST}, MANIFEST2))
        assert f.response.content == MANIFEST2
        assert env.store.get_tag("docker.io", REPO, "3.20").digest == MANIFEST2_DIGEST
        assert env.store.get_manifest(MANIFEST2_DIGEST).body == MANIFEST2

    async def test_tag_moved_but_its_get_fails_serves_stale(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST2_DIGEST}))
        f = await asked(env, flow(manifest_path("3.20")), Upstream(503, {}, b"busy"))
        assert f.response.status_code == 200
        assert f.response.content == MANIFEST
        assert env.journal()[-1]["outcome"] == "stale: upstream answered 503"

    @pytest.mark.parametrize("status", [401, 404])
    async def test_refused_revalidation_passes_upstreams_answer(self, env, status):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(manifest_response(status))
        f = await asked(env, flow(manifest_path("3.20")), Upstream(status, {}, b'{"errors":[]}'))
        assert f.response.status_code == status

    @pytest.mark.parametrize(
        "answer, reason",
        [
            (manifest_response(503), "upstream answered 503"),
            (manifest_response(429), "upstream answered 429"),
            ("no answer within 10s", "no answer within 10s"),
        ],
    )
    async def test_upstream_failure_serves_stale(self, env, answer, reason):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(answer)
        f = flow(manifest_path("3.20"))
        await env.addons.request(f)
        assert f.response.status_code == 200
        assert f.response.content == MANIFEST
        assert f.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        entry = env.journal()[-1]
        assert entry["outcome"] == f"stale: {reason}"
        assert (entry["reference"], entry["digest"]) == ("3.20", MANIFEST_DIGEST)

    async def test_an_accept_without_indexes_cannot_repoint_a_multi_platform_tag(self, env, monkeypatch):
        """A client asking with one manifest type only gets one platform's manifest from upstream
        (the registry's answer to a client that takes no index): the tag learned from it is for
        clients like it, never what dockerd (or another node of the fleet) is served."""
        platform = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_V2, "config": {}, "layers": []}).encode()
        platform_digest = digest_of(platform)
        published = []
        monkeypatch.setattr(env.addons.fleet, "publish_manifest", lambda digest, media_type, body, tag: published.append((digest, tag)))
        env.tctx.configure(env.cache, tag_freshness=3600)
        answer = {"Content-Type": DOCKER_V2, "Docker-Content-Digest": platform_digest}
        await asked(env, flow(manifest_path("3.20"), "HEAD", headers={"Accept": f"{DOCKER_V2}, {OCI_INDEX}"}), Upstream(200, answer))
        await asked(env, flow(manifest_path("3.20"), headers={"Accept": DOCKER_V2}), Upstream(200, answer, platform))
        assert published == [(platform_digest, None)], "a platform's manifest is shared, never as the tag"

        docker = await asked(env, flow(manifest_path("3.20")), Upstream(200, {"Content-Type": OCI_INDEX, "Docker-Content-Digest": MANIFEST_DIGEST}, MANIFEST))
        assert docker.response.content == MANIFEST, (docker.response.content, "before: the platform's manifest, from the cache")
        assert published[-1] == (MANIFEST_DIGEST, ("docker.io", REPO, "3.20"))
        assert env.store.get_tag("docker.io", REPO, "3.20").digest == MANIFEST_DIGEST

        fetched = len(env.fetched)
        for accept, body in ((DOCKER_ACCEPT, MANIFEST), (DOCKER_V2, platform), (f"{OCI_INDEX}, {DOCKER_V2}", platform)):
            f = flow(manifest_path("3.20"), headers={"Accept": accept})
            await env.addons.request(f)
            assert (f.response.status_code, f.response.content) == (200, body), accept
        assert len(env.fetched) == fetched and env.sent == [], "each kind of client from the cache"

    async def test_a_single_platform_tag_serves_every_client_that_takes_its_type(self, env):
        platform = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_V2, "config": {}, "layers": []}).encode()
        await fill_manifest(env, "3.20", platform, ctype=DOCKER_V2)
        env.tctx.configure(env.cache, tag_freshness=3600)
        f = flow(manifest_path("3.20"), headers={"Accept": DOCKER_V2})
        await env.addons.request(f)
        assert f.response.content == platform and env.sent == [] and len(env.fetched) == 1

    async def test_accept_excluding_the_cached_type_goes_upstream_without_revalidating(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        f = await asked(env, flow(manifest_path("3.20"), headers={"Accept": DOCKER_V2}), Upstream(404, {}))
        assert f.response.status_code == 404
        assert env.sent == [], "no revalidation: the request itself went upstream"


class TestRegistrySettings:
    async def test_a_registry_keeps_tags_fresh_for_its_own_window(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.tctx.configure(env.hosts, registry_settings=[f"{HUB}:tag_freshness=3600"])
        f = flow(manifest_path("3.20"))
        await env.addons.request(f)
        assert env.sent == [] and f.response.content == MANIFEST
        # Another host of the same registry has no setting: the global window (0) applies.
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST_DIGEST}))
        other = flow(manifest_path("3.20"), host="index.docker.io")
        await env.addons.request(other)
        assert [method for method, _ in env.sent] == ["HEAD"]

    async def test_a_host_named_in_the_settings_is_cached(self, env):
        assert not env.hosts.is_registry("harbor.example.internal")
        env.tctx.configure(env.hosts, registry_settings=["harbor.example.internal:tag_freshness=60"])
        assert env.hosts.is_registry("harbor.example.internal")
        assert env.hosts.tag_freshness("harbor.example.internal") == 60
        assert env.hosts.tag_freshness("ghcr.io") == 0


class TestManifestRedirect:
    """registry.k8s.io redirects manifest requests to another host (its Artifact Registry)."""

    async def redirected(self, env: Env, answer: Upstream) -> http.HTTPFlow:
        env.fetches.append(Upstream(307, {"Location": "https://mirror.example/v2/alpine/manifests/3.20"}))
        f = flow(manifest_path("3.20"), headers={"Authorization": "Bearer for-the-registry"})
        await env.addons.request(f)
        env.cache.responseheaders(f)
        env.fetches.append(answer)
        await env.cache.response(f)
        return f

    async def test_it_is_followed_and_cached_under_the_registry(self, env):
        f = await self.redirected(env, Upstream(200, {"Content-Type": OCI_INDEX, "Docker-Content-Digest": MANIFEST_DIGEST}, MANIFEST))
        assert f.response.status_code == 200 and f.response.content == MANIFEST
        followed = env.fetched[-1]
        assert followed.url == "https://mirror.example/v2/alpine/manifests/3.20"
        assert "authorization" not in followed.headers, "the registry's credentials stay with the registry"
        assert env.store.get_tag("docker.io", REPO, "3.20").digest == MANIFEST_DIGEST

    async def test_a_host_that_refuses_hubcache_leaves_the_redirect_to_the_client(self, env):
        f = await self.redirected(env, Upstream(401, {"WWW-Authenticate": 'Bearer realm="https://mirror.example/token"'}))
        assert f.response.status_code == 307
        assert f.response.headers["Location"] == "https://mirror.example/v2/alpine/manifests/3.20"
        assert env.store.get_tag("docker.io", REPO, "3.20") is None

    async def test_a_redirect_to_plain_http_is_left_to_the_client(self, env):
        plain = "http://mirror.example/v2/alpine/manifests/3.20"
        env.fetches.append(Upstream(307, {"Location": plain}))
        f = flow(manifest_path("3.20"), headers={"Authorization": "Bearer for-the-registry"})
        await env.addons.request(f)
        env.cache.responseheaders(f)
        env.fetches.append(Upstream(200, {"Content-Type": OCI_INDEX, "Docker-Content-Digest": MANIFEST_DIGEST}, MANIFEST))
        await env.cache.response(f)
        assert f.response.status_code == 307 and f.response.headers["Location"] == plain
        assert [r.url for r in env.fetched] == [f"https://{HUB}{manifest_path('3.20')}"], "nothing is fetched over plain HTTP"
        assert env.store.get_tag("docker.io", REPO, "3.20") is None


class TestOffline:
    async def test_head_by_tag_teaches_the_tag_for_later_offline_use(self, env):
        # dockerd: HEAD the tag, then GET by digest.
        await asked(env, flow(manifest_path("3.20"), method="HEAD"), Upstream(200, {"Docker-Content-Digest": MANIFEST_DIGEST}))
        await fill_manifest(env, MANIFEST_DIGEST, MANIFEST)

        env.tctx.configure(env.cache, offline=True)
        f = flow(manifest_path("3.20"))
        await env.addons.request(f)
        assert f.response.status_code == 200 and f.response.content == MANIFEST
        assert env.sent == [], "offline, nothing is revalidated"

    async def test_ping_and_token_are_answered_locally(self, env):
        env.tctx.configure(env.cache, offline=True)
        ping = flow("/v2/")
        await env.addons.request(ping)
        assert ping.response.status_code == 200 and "www-authenticate" not in ping.response.headers
        token = flow("/token?service=registry.docker.io&scope=repository:library/alpine:pull", host="auth.docker.io")
        await env.addons.request(token)
        assert token.response.status_code == 200 and token.response.json()["token"]
        assert env.sent == []

    @pytest.mark.parametrize(
        "path, code, named",
        [
            (manifest_path("3.20"), "MANIFEST_UNKNOWN", "docker.io/library/alpine:3.20"),
            (manifest_path(MANIFEST_DIGEST), "MANIFEST_UNKNOWN", f"docker.io/library/alpine@{MANIFEST_DIGEST}"),
            (blob_path(), "BLOB_UNKNOWN", BLOB_DIGEST),
        ],
    )
    async def test_missing_content_is_a_clear_404_and_a_journal_line(self, env, path, code, named):
        env.tctx.configure(env.cache, offline=True)
        f = flow(path)
        await env.addons.request(f)
        error = f.response.json()["errors"][0]
        assert f.response.status_code == 404 and error["code"] == code
        assert named in error["message"] and "not in the offline cache" in error["message"]
        assert env.journal()[-1]["outcome"] == "missing: offline"
        assert env.sent == []

    async def test_pushes_are_refused(self, env):
        env.tctx.configure(env.cache, offline=True)
        f = flow("/v2/library/alpine/blobs/uploads/", method="POST")
        await env.addons.request(f)
        assert f.response is not None, "a push passed through offline"
        assert f.response.status_code == 405
        assert f.response.json()["errors"][0]["code"] == "UNSUPPORTED"


TOKEN_PATH = f"/token?service=registry.docker.io&scope=repository:{REPO}:pull"


class TestTokens:
    """Token requests to Docker Hub's token host: relayed, or answered locally when it cannot."""

    async def test_the_token_hosts_answer_is_relayed(self, env):
        env.answers.append(tutils.tresp(status_code=200, content=b'{"token": "upstream"}'))
        f = flow(TOKEN_PATH, host="auth.docker.io")
        await env.addons.request(f)
        assert f.response.json() == {"token": "upstream"}
        assert env.sent == [("GET", f"https://auth.docker.io{TOKEN_PATH}")]

    async def test_the_token_request_is_rebuilt_from_its_token_fields(self, env):
        env.answers += [tutils.tresp(status_code=200, content=b'{"token": "upstream"}')] * 2
        f = flow(f"{TOKEN_PATH}&redirect_uri=https://evil.example/&scope=repository:{REPO}:push", host="auth.docker.io", headers={"Cookie": "x"})
        await env.addons.request(f)
        [sent] = env.addons.upstream.sent_requests
        assert parse_qs(urlsplit(sent.url).query) == {"service": ["registry.docker.io"], "scope": [f"repository:{REPO}:pull", f"repository:{REPO}:push"]}
        assert "cookie" not in sent.headers
        form = flow("/token", "POST", host="auth.docker.io", headers={"Content-Type": "application/x-www-form-urlencoded"})
        form.request.content = b"grant_type=password&username=u&password=p&service=registry.docker.io&evil=1"
        await env.addons.request(form)
        posted = env.addons.upstream.sent_requests[1]
        assert parse_qs(posted.get_text()) == {"grant_type": ["password"], "username": ["u"], "password": ["p"], "service": ["registry.docker.io"]}

    @pytest.mark.parametrize("target", ["/token#/../x", "/token/../other", "/to%6ben?service=x"])
    async def test_an_unclean_token_request_is_refused(self, env, target):
        f = flow(target, host="auth.docker.io")
        await env.addons.request(f)
        assert f.response.status_code == 400 and env.sent == []

    async def test_a_refusal_of_the_clients_credentials_is_relayed(self, env):
        env.answers.append(tutils.tresp(status_code=401, content=b'{"details": "incorrect username or password"}'))
        f = flow(TOKEN_PATH, host="auth.docker.io", headers={"Authorization": "Basic bWFsbG9yeTp4"})
        await env.addons.request(f)
        assert f.response.status_code == 401

    @pytest.mark.parametrize("failure", ["connection refused", "upstream sent nothing for 10s", 503, 429])
    async def test_a_token_host_that_cannot_answer_gets_a_local_token(self, env, failure):
        env.answers.append(failure if isinstance(failure, str) else upstream_response(failure))
        f = flow(TOKEN_PATH, host="auth.docker.io")
        await env.addons.request(f)
        assert f.response is not None, "the client was left to the token host that cannot answer"
        assert f.response.status_code == 200
        assert f.response.json()["token"].startswith("hubcache-local.")

    async def test_offline_nothing_is_asked(self, env):
        env.tctx.configure(env.cache, offline=True)
        f = flow(TOKEN_PATH, host="auth.docker.io")
        await env.addons.request(f)
        assert f.response.json()["token"].startswith("hubcache-local.") and env.sent == []

    async def test_a_local_token_pulls_cached_public_content_without_asking_upstream(self, env):
        await fill_manifest(env, "1", MANIFEST)
        await fill_blob(env)
        local = {"Authorization": f"Bearer {await local_token(env)}"}
        tag = flow(manifest_path("1"), headers=local)
        await env.addons.request(tag)
        assert tag.response.status_code == 200 and tag.response.content == MANIFEST
        blob = flow(blob_path(), headers=local)
        await env.addons.request(blob)
        assert blob.response.status_code == 307
        assert env.sent == [("GET", f"https://auth.docker.io{TOKEN_PATH}")], "never a revalidation or an access check with a token upstream never issued"
        assert env.journal()[-1]["outcome"].startswith("stale: no token")

    async def test_a_local_token_gets_a_clear_answer_for_what_is_missing_or_private(self, env):
        local = {"Authorization": f"Bearer {await local_token(env)}"}
        for path in (manifest_path("missing"), blob_path()):
            f = flow(path, headers=local)
            await env.addons.request(f)
            assert f.response.status_code == 503 and "token service" in f.response.json()["errors"][0]["message"]
        await fill_blob(env)
        env.store.set_visibility("docker.io", REPO, False)
        f = flow(blob_path(), headers=local)
        await env.addons.request(f)
        assert f.response.status_code == 503
        assert len(env.sent) == 1 and len(env.fetched) == 1, "only the token request and the fill that cached it"

    @pytest.mark.parametrize(
        "token",
        [
            "hubcache-local",  # the word every local token used to be
            f"hubcache-local.{int(time.time() * 1000)}.{'0' * 64}.auth.docker.io",  # a signature hubcache never made
            f"hubcache-local.{int(time.time() * 1000)}.\u00e9{'0' * 63}.auth.docker.io",  # and not even ASCII
            "expired",
            "for another registry",
        ],
    )
    async def test_a_token_hubcache_did_not_issue_for_this_outage_is_an_ordinary_credential(self, env, token):
        """It skips nothing: a public repository due for its visibility check is probed, and the
        client's own credentials are asked about (here upstream says the repository went private)."""
        await fill_blob(env)
        if token == "expired":
            token = env.cache.tokens.issue("auth.docker.io", now=time.time() - protocol.LOCAL_TOKEN_SECONDS - 1)
        elif token == "for another registry":
            token = env.cache.tokens.issue("auth.example.test")  # another registry's token host is down
        env.tctx.configure(env.access, visibility_check_seconds=0)
        env.fetches.append(Upstream(401, {"Content-Length": "0"}))  # the anonymous probe: private now
        env.answers.append(upstream_response(401))  # the client's own HEAD
        f = flow(blob_path(), headers={"Authorization": f"Bearer {token}"})
        await env.addons.request(f)
        assert f.response.status_code == 401, "before: served from the cache on the word alone"
        assert env.store.visibility("docker.io", REPO) is False
        assert env.sent == [("HEAD", f"https://{HUB}{blob_path()}")]

    async def test_a_local_token_counts_no_more_once_the_token_host_answers_again(self, env):
        local = {"Authorization": f"Bearer {await local_token(env)}"}
        missing = flow(manifest_path("missing"), headers=local)
        await env.addons.request(missing)
        assert missing.response.status_code == 503, "while the token host is down: answered at once"
        env.answers.append(tutils.tresp(status_code=200, content=b'{"token": "upstream"}'))
        await env.addons.request(flow(TOKEN_PATH, host="auth.docker.io"))
        again = await asked(env, flow(manifest_path("missing"), headers=local), Upstream(401, {"Content-Length": "0"}))
        assert again.response.status_code == 401, "upstream's refusal: the client asks the token host again"


async def local_token(env: Env) -> str:
    """A token hubcache issues while Docker Hub's token host cannot answer."""
    env.answers.append("connection refused")
    f = flow(TOKEN_PATH, host="auth.docker.io")
    await env.addons.request(f)
    return f.response.json()["token"]


class TestNegativeCache:
    async def test_a_404_is_remembered_for_the_same_client(self, env):
        f = await asked(env, flow(manifest_path("nope"), headers={"Authorization": "Bearer a"}), Upstream(404, {}, b'{"errors":[]}'))
        assert f.response.status_code == 404
        again = flow(manifest_path("nope"), headers={"Authorization": "Bearer a"})
        await env.addons.request(again)
        assert again.response.status_code == 404 and "404" in again.response.json()["errors"][0]["message"]
        assert len(env.fetched) == 1, "answered without asking upstream again"
        assert env.journal()[-1]["outcome"] == "missing: upstream answered 404 lately"
        other = await asked(env, flow(manifest_path("nope"), headers={"Authorization": "Bearer b"}), Upstream(404, {}))
        assert other.response.status_code == 404 and len(env.fetched) == 2, "another client's credentials ask again"

    async def test_a_blob_404_is_remembered(self, env):
        env.fetches.append(Upstream(404, {}, b"{}"))
        f = flow(blob_path())
        await env.addons.request(f)
        await env.settle()
        assert f.response.status_code == 404
        again = flow(blob_path())
        await env.addons.request(again)
        assert again.response.status_code == 404 and len(env.fetched) == 1

    async def test_it_is_forgotten_after_its_time(self, env):
        env.tctx.configure(env.cache, negative_cache_seconds=0)
        for _ in range(2):
            await asked(env, flow(manifest_path("nope")), Upstream(404, {}))
        assert len(env.fetched) == 2


class TestAccess:
    """Private repositories: see addon/access.py."""

    async def cached_private_blob(self, env) -> None:
        await fill_blob(env)
        env.store.set_visibility("docker.io", REPO, False)

    async def test_public_content_needs_no_round_trip(self, env):
        await fill_blob(env)
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response.status_code == 307 and env.sent == []

    async def test_private_content_is_checked_with_the_clients_own_credentials(self, env):
        await self.cached_private_blob(env)
        env.answers.append(upstream_response(200))
        f = flow(blob_path(), headers={"Authorization": "Bearer alice"})
        await env.addons.request(f)
        assert f.response.status_code == 307
        assert env.sent == [("HEAD", f"https://{HUB}{blob_path()}")]

        again = flow(blob_path(), headers={"Authorization": "Bearer alice"})
        await env.addons.request(again)
        assert again.response.status_code == 307 and len(env.sent) == 1, "the yes is remembered for the token"

        challenge = 'Bearer realm="https://auth.docker.io/token",error="insufficient_scope"'
        env.answers.append(upstream_response(401, {"WWW-Authenticate": challenge}))
        stranger = flow(blob_path(), headers={"Authorization": "Bearer mallory"})
        await env.addons.request(stranger)
        assert stranger.response.status_code == 401
        assert stranger.response.headers["WWW-Authenticate"] == challenge

    async def test_the_yeses_remembered_are_bounded_however_many_tokens_clients_try(self, env, monkeypatch):
        monkeypatch.setattr(access_module, "MAX_ALLOWED", 50)
        await self.cached_private_blob(env)
        for n in range(120):  # a registry that says yes to any token
            env.answers.append(upstream_response(200))
            f = flow(blob_path(), headers={"Authorization": f"Bearer invented-{n}"})
            await env.addons.request(f)
            assert f.response.status_code == 307
        assert len(env.access._allowed) == 50
        last = flow(blob_path(), headers={"Authorization": "Bearer invented-119"})
        await env.addons.request(last)
        assert last.response.status_code == 307 and len(env.sent) == 120, "the newest yes is remembered"
        env.answers.append(upstream_response(200))
        first = flow(blob_path(), headers={"Authorization": "Bearer invented-0"})
        await env.addons.request(first)
        assert first.response.status_code == 307 and len(env.sent) == 121, "the oldest was forgotten: asked again"

    async def test_an_expired_yes_is_forgotten(self, env):
        await self.cached_private_blob(env)
        env.tctx.configure(env.access, access_check_seconds=0)
        for n in range(20):
            env.answers.append(upstream_response(200))
            await env.addons.request(flow(blob_path(), headers={"Authorization": f"Bearer invented-{n}"}))
        assert len(env.access._allowed) <= 1

    @pytest.mark.parametrize("answer", [302, 204], ids=["a redirect upstream ended on", "another 2xx"])
    async def test_only_upstreams_final_200_lets_a_client_have_private_content(self, env, answer):
        await self.cached_private_blob(env)
        env.answers.append(upstream_response(answer, {"Location": f"http://{HUB}{blob_path()}"} if answer == 302 else {}))
        f = flow(blob_path(), headers={"Authorization": "Bearer alice"})
        await env.addons.request(f)
        assert f.response.status_code == 403
        assert json.loads(f.response.content)["errors"][0]["code"] == "DENIED"

    async def test_a_client_joining_a_fill_of_a_private_repository_is_checked_first(self, env):
        env.store.set_visibility("docker.io", REPO, False)
        more = asyncio.Event()
        env.fetches.append(sized(mid_body=more))
        alice = flow(blob_path(), headers={"Authorization": "Bearer alice"})
        await env.addons.request(alice)
        assert alice.response.status_code == 307, "upstream served it to her: she leads the fill"
        challenge = 'Bearer realm="https://auth.docker.io/token"'
        env.answers.append(upstream_response(401, {"WWW-Authenticate": challenge}))
        anonymous = flow(blob_path())
        await env.addons.request(anonymous)  # joins her fill, still streaming
        more.set()  # before any assertion: a failing one must not leave the fill waiting forever
        await env.settle()
        assert anonymous.response.status_code == 401 and anonymous.response.headers["WWW-Authenticate"] == challenge
        assert env.sent == [("HEAD", f"https://{HUB}{blob_path()}")]

    async def test_a_known_digest_is_not_served_through_another_repository(self, env):
        await fill_blob(env)
        env.store.set_visibility("docker.io", "library/public", True)
        env.answers.append(upstream_response(404))
        f = flow(f"/v2/library/public/blobs/{BLOB_DIGEST}")
        await env.addons.request(f)
        assert f.response.status_code == 404
        assert env.sent == [("HEAD", f"https://{HUB}/v2/library/public/blobs/{BLOB_DIGEST}")]

    async def test_a_digest_upstream_confirms_is_linked(self, env):
        await fill_blob(env)
        env.store.set_visibility("docker.io", "library/public", True)
        env.answers.append(upstream_response(200))
        path = f"/v2/library/public/blobs/{BLOB_DIGEST}"
        await env.addons.request(f := flow(path))
        await env.addons.request(g := flow(path))
        assert f.response.status_code == g.response.status_code == 307
        assert len(env.sent) == 1

    @pytest.mark.parametrize("failure", ["connection refused", 503])
    async def test_private_content_is_refused_when_upstream_cannot_confirm(self, env, failure):
        await self.cached_private_blob(env)
        env.answers.append(failure if isinstance(failure, str) else upstream_response(failure))
        f = flow(blob_path(), headers={"Authorization": "Bearer alice"})
        await env.addons.request(f)
        assert f.response.status_code == 503
        assert json.loads(f.response.content)["errors"][0]["code"] == "UNAVAILABLE"

    async def test_a_cached_tag_of_a_private_repository_is_checked_within_its_freshness(self, env):
        await fill_manifest(env, "latest", MANIFEST, headers={"Docker-Content-Digest": MANIFEST_DIGEST})
        env.store.set_visibility("docker.io", REPO, False)
        env.tctx.configure(env.cache, tag_freshness=3600)
        env.answers.append(upstream_response(401))
        f = flow(manifest_path("latest"))
        await env.addons.request(f)
        assert f.response.status_code == 401

    async def test_offline_private_content_needs_the_policy(self, env):
        await self.cached_private_blob(env)
        env.tctx.configure(env.cache, offline=True)
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response.status_code == 401
        assert "cannot check credentials" in f.response.text
        env.tctx.configure(env.access, offline_private=True)
        g = flow(blob_path())
        await env.addons.request(g)
        assert g.response.status_code == 307
        assert env.sent == []

    async def test_offline_unknown_visibility_is_served_only_where_an_operator_imported_it(self, env):
        await fill_blob(env)
        for repository in ("library/imported", "library/unknown"):
            env.store.link("docker.io", repository, BLOB_DIGEST)
        env.store.note_imported("docker.io", "library/imported")
        env.tctx.configure(env.cache, offline=True)
        unknown = flow(f"/v2/library/unknown/blobs/{BLOB_DIGEST}")
        await env.addons.request(unknown)
        assert unknown.response.status_code == 401 and "may be private" in unknown.response.text
        imported = flow(f"/v2/library/imported/blobs/{BLOB_DIGEST}")
        await env.addons.request(imported)
        assert imported.response.status_code == 307
        env.store.set_visibility("docker.io", "library/imported", False)
        learned = flow(f"/v2/library/imported/blobs/{BLOB_DIGEST}")
        await env.addons.request(learned)
        assert learned.response.status_code == 401, "what upstream said private stays private"
        assert env.sent == []

    @pytest.mark.parametrize("public", [True, False])
    async def test_the_first_manifest_of_a_repository_probes_its_visibility(self, env, public):
        challenge = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'
        f = flow("/v2/library/new/manifests/1", headers={"Authorization": "Bearer alice"})
        env.fetches.append(Upstream(200, {"Content-Type": OCI_INDEX}, MANIFEST))
        await env.addons.request(f)
        env.fetches += [
            Upstream(401, {"WWW-Authenticate": challenge, "Content-Length": "0"}),
            Upstream(200, {"Content-Length": "17"}, b'{"token":"anon"}\n'),
            Upstream(200 if public else 401, {"Content-Length": "0"}),
        ]
        env.cache.responseheaders(f)
        await env.cache.response(f)
        assert env.store.visibility("docker.io", "library/new") is public
        asked_for, head, token, anonymous = env.fetched
        assert asked_for.headers["authorization"] == "Bearer alice"
        assert (head.method, "authorization" in head.headers) == ("HEAD", False)
        assert token.url == "https://auth.docker.io/token?scope=repository%3Alibrary%2Fnew%3Apull&service=registry.docker.io"
        assert token.host_header == "auth.docker.io"
        assert anonymous.headers["authorization"] == "Bearer anon"
        assert env.store.linked("docker.io", "library/new", MANIFEST_DIGEST)

    @pytest.mark.parametrize(
        "probe",
        [
            [Upstream(401, {"WWW-Authenticate": 'Basic realm="registry"', "Content-Length": "0"})],
            [
                Upstream(401, {"WWW-Authenticate": 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"', "Content-Length": "0"}),
                Upstream(401, {"Content-Length": "0"}),
            ],
        ],
        ids=["basic-auth", "no-anonymous-token"],
    )
    async def test_a_registry_that_lets_no_anonymous_client_in_is_private(self, env, probe):
        f = flow("/v2/library/new/manifests/1", headers={"Authorization": "Bearer alice"})
        env.fetches.append(Upstream(200, {"Content-Type": OCI_INDEX}, MANIFEST))
        await env.addons.request(f)
        env.fetches += probe
        env.cache.responseheaders(f)
        await env.cache.response(f)
        assert env.store.visibility("docker.io", "library/new") is False
        assert len(env.fetched) == 1 + len(probe)

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


class TestReferrers:
    async def test_upstreams_list_is_relayed_and_answers_offline_filtered_on_request(self, env):
        listed = index_of((SBOM_TYPE, referring(SBOM_TYPE)), (SIG_TYPE, referring(SIG_TYPE)))
        env.answers.append(manifest_response(200, listed, {"Content-Type": OCI_INDEX}))
        f = flow(referrers_path())
        await env.addons.request(f)
        assert f.response.status_code == 200 and f.response.content == listed  # upstream's own answer
        assert env.sent == [("GET", f"https://{HUB}{referrers_path()}")]

        env.store.link("docker.io", REPO, MANIFEST_DIGEST)  # the subject was pulled through this repository
        env.tctx.configure(env.cache, offline=True)
        f = flow(referrers_path())
        await env.addons.request(f)
        assert f.response.status_code == 200 and f.response.headers["Content-Type"] == OCI_INDEX
        assert [m["artifactType"] for m in json.loads(f.response.content)["manifests"]] == [SBOM_TYPE, SIG_TYPE]
        assert "OCI-Filters-Applied" not in f.response.headers

        f = flow(referrers_path(query=urlencode({"artifactType": SBOM_TYPE})))
        await env.addons.request(f)
        [only] = json.loads(f.response.content)["manifests"]
        assert only["digest"] == digest_of(referring(SBOM_TYPE)) and f.response.headers["OCI-Filters-Applied"] == "artifactType"

    async def test_a_stored_manifest_that_names_a_subject_is_listed_when_upstream_is_down(self, env):
        sbom = referring(SBOM_TYPE)
        await fill_manifest(env, digest_of(sbom), sbom, ctype=OCI_MANIFEST)
        env.store.link("docker.io", REPO, MANIFEST_DIGEST)  # the subject was pulled through this repository
        env.answers.append("connection refused")
        f = flow(referrers_path())
        await env.addons.request(f)
        assert f.response.status_code == 200, f.response.content
        [entry] = json.loads(f.response.content)["manifests"]
        assert entry == {"mediaType": OCI_MANIFEST, "digest": digest_of(sbom), "size": len(sbom), "artifactType": SBOM_TYPE}

    async def test_nothing_known_offline_is_a_404_so_clients_use_the_tag_schema(self, env):
        env.tctx.configure(env.cache, offline=True)
        f = flow(referrers_path())
        await env.addons.request(f)
        assert f.response.status_code == 404
        assert json.loads(f.response.content)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert env.sent == []

    async def test_a_registry_without_the_api_answers_404_and_that_is_relayed(self, env):
        env.answers.append(manifest_response(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}'))
        f = flow(referrers_path())
        await env.addons.request(f)
        assert f.response.status_code == 404 and b"NAME_UNKNOWN" in f.response.content

    async def test_a_private_repositorys_referrers_need_the_clients_access(self, env):
        env.answers.append(manifest_response(200, index_of((SBOM_TYPE, referring(SBOM_TYPE))), {"Content-Type": OCI_INDEX}))
        await env.addons.request(flow(referrers_path()))
        env.store.set_visibility("docker.io", REPO, False)
        env.answers += ["upstream down", "upstream down"]  # the list, then the access check
        f = flow(referrers_path())
        await env.addons.request(f)
        assert f.response.status_code == 503, "private, and upstream cannot confirm this client"


# What a distribution registry cleans (and then routes elsewhere): after the first target a client names.
UNCLEAN = {
    "#": "x#/../../../../library/alpine/manifests/3.20",
    "%23": "x%23/../../../../library/alpine/manifests/3.20",
    "dot segments": "x/../../../../library/alpine/manifests/3.20",
    "empty segment": "x//../library/alpine/manifests/3.20",
}


class TestCanonicalRequests:
    """Canonicalize, then act (README, "Security model"): hubcache acts only on the route it parsed,
    and sends upstream only what it rebuilt from it."""

    PRIVATE = "acme/secret"

    @pytest.mark.parametrize("kind", ["tag", "digest", "blob"])
    @pytest.mark.parametrize("trick", UNCLEAN.values(), ids=UNCLEAN.keys())
    async def test_an_unclean_target_is_refused_before_anything_happens(self, env, kind, trick):
        env.store.put_manifest(MANIFEST_DIGEST, OCI_INDEX, MANIFEST)
        writer = env.store.blob_writer(BLOB_DIGEST)
        writer.write(BLOB)
        writer.commit()
        first = {"tag": "manifests/x", "digest": f"manifests/{MANIFEST_DIGEST}", "blob": f"blobs/{BLOB_DIGEST}"}[kind]
        f = flow(f"/v2/{self.PRIVATE}/{first}{trick.removeprefix('x')}")
        await env.addons.request(f)
        assert f.response.status_code == 400
        assert json.loads(f.response.content)["errors"][0]["code"] == "NAME_INVALID"
        assert env.sent == [] and env.fetched == [], "nothing is asked of upstream"
        assert env.store.get_tag("docker.io", self.PRIVATE, "x") is None
        assert env.store.get_tag("docker.io", REPO, "3.20") is None
        assert env.journal() == []

    async def test_what_goes_upstream_is_rebuilt_from_the_route(self, env):
        headers = {"Accept": OCI_INDEX, "Authorization": "Bearer t", "User-Agent": "skopeo", "X-Original-URL": "/v2/other/manifests/1", "Cookie": "c=1"}
        f = flow(f"/v2/{REPO}/manifests/3.20?ns=docker.io", headers=headers)
        await asked(env, f, Upstream(200, {"Content-Type": OCI_INDEX}, MANIFEST))
        [sent] = env.fetched
        assert sent.url == f"https://{HUB}/v2/{REPO}/manifests/3.20", "the route's target: no query the client wrote"
        assert f.request.path == f"/v2/{REPO}/manifests/3.20", "the client's own request carries it too"
        assert sorted(sent.headers.keys()) == sorted(["Host", "accept", "authorization", "user-agent", "accept-encoding"])
        assert (sent.headers["accept"], sent.headers["authorization"]) == (OCI_INDEX, "Bearer t")

    async def test_a_fill_is_rebuilt_from_the_route_without_the_clients_range(self, env):
        env.fetches.append(sized())
        f = flow(blob_path() + "?ns=docker.io", headers={"Range": "bytes=5-", "If-Range": "x", "Authorization": "Bearer t"})
        await env.addons.request(f)
        await env.settle()
        [sent] = env.fetched
        assert sent.url == f"https://{HUB}{blob_path()}"
        assert "range" not in sent.headers and "if-range" not in sent.headers
        assert env.store.blob_size(BLOB_DIGEST) == len(BLOB)

    async def test_a_revalidation_is_rebuilt_from_the_route(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(upstream_response(200, {"Docker-Content-Digest": MANIFEST_DIGEST}))
        f = flow(manifest_path("3.20") + "?ns=docker.io", "HEAD", headers={"X-Evil": "1"})
        await env.addons.request(f)
        assert f.response.status_code == 200
        [sent] = env.addons.upstream.sent_requests
        assert (sent.method, sent.url) == ("HEAD", f"https://{HUB}{manifest_path('3.20')}")
        assert "x-evil" not in sent.headers

    async def test_a_redirect_that_renames_a_manifest_is_not_followed(self, env):
        f = flow(manifest_path("3.21"))
        await asked(env, f, Upstream(301, {"Location": "/v2/library/python/manifests/3.12-slim"}))
        assert f.response.status_code == 502
        assert env.store.get_tag("docker.io", REPO, "3.21") is None
        assert len(env.fetched) == 1, "the redirect was not followed"
        assert env.journal()[-1]["outcome"].startswith("rejected: upstream redirected")

    async def test_a_redirect_that_renames_a_blob_fails_its_fill(self, env):
        other = "sha256:" + "e" * 64
        env.fetches.append(Upstream(301, {"Location": f"/v2/library/python/blobs/{other}", "Content-Length": "0"}))
        f = flow(blob_path())
        await env.addons.request(f)
        await env.settle()
        assert f.response.status_code == 502
        assert len(env.fetched) == 1 and env.store.blob_size(BLOB_DIGEST) is None


def test_request_for_builds_from_the_route_not_the_clients_target():
    """The request sent upstream names what hubcache parsed, whatever the client's flow still says."""
    f = flow(f"/v2/{REPO}/manifests/x#/../../../../library/python/manifests/3", headers={"Accept": OCI_INDEX, "X-Evil": "1", "Content-Length": "5"})
    f.request.port = 8443  # a registry named with its port
    route = protocol.Route(protocol.Kind.MANIFEST, "docker.io", REPO, "x")
    request = upstream.request_for(f, route, "HEAD")
    assert (request.method, request.url) == ("HEAD", f"https://{HUB}:8443/v2/{REPO}/manifests/x")
    assert request.host_header == f"{HUB}:8443"
    assert request.headers.get_all("accept") == [OCI_INDEX]
    assert "x-evil" not in request.headers and "content-length" not in request.headers and request.content == b""


class TestRedirected:
    """upstream.redirected: what a redirect may change."""

    def request(self, path: str = manifest_path("1")) -> http.Request:
        r = http.Request.make("GET", f"https://{HUB}{path}", headers={"Authorization": "Bearer t"})
        return r

    @pytest.mark.parametrize(
        "location",
        ["/v2/library/python/manifests/1", f"/v2/{REPO}/manifests/2", f"/v2/{REPO}/blobs/{BLOB_DIGEST}", f"https://{HUB.upper()}:8443/v2/x/manifests/1", "/v2/a/../b/manifests/1", "/v2/_catalog"],
    )
    def test_a_redirect_to_the_same_host_that_names_something_else_is_refused(self, location):
        with pytest.raises(upstream.Renamed):
            upstream.redirected(self.request(), location)

    def test_a_redirect_to_the_same_route_or_a_blob_host_is_followed(self):
        same = upstream.redirected(self.request(), f"/v2/{REPO}/manifests/1")
        assert same.url == f"https://{HUB}{manifest_path('1')}" and same.headers["authorization"] == "Bearer t"
        cdn = upstream.redirected(self.request(), f"https://{CDN}/data?verify=1")
        assert cdn.host == CDN and "authorization" not in cdn.headers
class TestWhileTheRegistryIsDown:
    """With Docker Hub's circuit open (circuits.py): a pull of cached content stays local, and a
    pull of something new reaches the token host as soon as it answers again."""

    CHALLENGE = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'

    @pytest.fixture
    def breaker(self, env):
        breaker = Circuits(env.hosts, env.addons.metrics, env.addons.upstream)
        env.tctx.master.addons.add(breaker)
        env.addons.upstream.circuits = breaker  # as make_addons wires it
        ping = tflow.tflow(req=tutils.treq(scheme=b"https", host=HUB, port=443, path=b"/v2/"), resp=upstream_response(401, {"WWW-Authenticate": self.CHALLENGE}))
        ping.metadata[Mark.SUBREQUEST] = True
        breaker.response(ping)  # the registry's own challenge, learned as it passed
        breaker.failed(http.Request.make("GET", f"https://{HUB}/v2/"), "connection refused")
        return breaker

    async def test_v2_answers_with_the_registrys_own_challenge(self, env, breaker):
        env.answers.append(f"hubcache: {HUB} is down (connection refused); not waited for")
        f = flow("/v2/")
        await env.addons.request(f)
        assert f.response.status_code == 401
        assert f.response.headers["WWW-Authenticate"] == self.CHALLENGE

    async def test_a_token_for_cached_repositories_is_local_at_once(self, env, breaker):
        f = flow(TOKEN_PATH, host="auth.docker.io")
        await env.addons.request(f)
        assert f.response.json()["token"].startswith("hubcache-local.") and env.sent == []

    async def test_a_token_for_a_repository_the_cache_holds_nothing_of_is_asked_as_a_miss(self, env, breaker):
        env.answers.append(tutils.tresp(status_code=200, content=b'{"token": "upstream"}'))
        f = flow("/token?service=registry.docker.io&scope=repository:library/new:pull", host="auth.docker.io")
        await env.addons.request(f)
        assert f.response.json() == {"token": "upstream"}
        assert env.addons.upstream.sent_as_miss == [True]

    async def test_a_token_form_names_its_repositories_too(self, env, breaker):
        env.answers.append(tutils.tresp(status_code=200, content=b'{"token": "upstream"}'))
        f = flow("/token", method="POST", host="auth.docker.io", headers={"content-type": "application/x-www-form-urlencoded"})
        f.request.content = b"grant_type=password&service=registry.docker.io&scope=repository%3Alibrary%2Fnew%3Apull"
        await env.addons.request(f)
        assert env.addons.upstream.sent_as_miss == [True]

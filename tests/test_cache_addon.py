import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mitmproxy import exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils

from addon import upstream
from addon.cache import HIT, RegistryCache
from addon.hosts import Interception
from addon.journal import MissJournal
from addon.protocol import digest_of

HUB = "registry-1.docker.io"
CDN = "production.cloudflare.docker.com"
REPO = "library/alpine"

BLOB = os.urandom(150_000)
BLOB_DIGEST = digest_of(BLOB)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
MANIFEST_DIGEST = digest_of(MANIFEST)
MANIFEST2 = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{}]}).encode()
MANIFEST2_DIGEST = digest_of(MANIFEST2)


@dataclass
class Env:
    tctx: taddons.context
    cache: RegistryCache
    hosts: Interception
    cache_dir: Path
    answers: list  # what the fake upstream answers, in order: a Response, or a reason string
    sent: list  # (method, url) of every request hubcache sent upstream itself

    def journal(self) -> list[dict]:
        return MissJournal(self.cache_dir / "misses.jsonl").entries()

    def temp_files(self) -> list[str]:
        root = self.cache_dir / "tmp"
        return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


@pytest.fixture
async def env(tmp_path, monkeypatch):
    hosts = Interception()
    cache = RegistryCache(hosts)
    answers, sent = [], []

    async def send(like: http.HTTPFlow, method: str, timeout: float):
        # upstream.send needs a running proxy; this stands in for it.
        sent.append((method, like.request.url))
        assert answers, f"unexpected upstream {method} {like.request.url}"
        return answers.pop(0)

    monkeypatch.setattr(upstream, "send", send)
    # Proxyserver declares connection_strategy, which the cache sets to lazy.
    with taddons.context(Proxyserver(), hosts, cache) as tctx:
        tctx.configure(cache, cache_dir=str(tmp_path), tag_freshness=0)
        yield Env(tctx, cache, hosts, tmp_path, answers, sent)
        cache.done()


def flow(path: str, method: str = "GET", host: str = HUB, headers: dict | None = None) -> http.HTTPFlow:
    req = tutils.treq(
        host=host,
        port=443,
        scheme=b"https",
        method=method.encode(),
        path=path.encode(),
        headers=http.Headers(**(headers or {})),
        content=b"",
    )
    return tflow.tflow(req=req)


def upstream_response(status: int, headers: dict | None = None) -> http.Response:
    """A response as the responseheaders hook sees it: headers, no body yet."""
    return tutils.tresp(status_code=status, headers=http.Headers(**(headers or {})), content=None)


def blob_path(digest: str = BLOB_DIGEST) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


def manifest_path(reference: str) -> str:
    return f"/v2/{REPO}/manifests/{reference}"


def stream_body(f: http.HTTPFlow, body: bytes, chunk: int = 65536) -> bytes:
    """Push `body` through the response's stream callable as mitmproxy does; what the client gets."""
    stream = f.response.stream
    assert callable(stream)
    out = []
    for i in range(0, len(body), chunk):
        out.extend(stream(body[i : i + chunk]))
    out.extend(stream(b""))
    f.response.raw_content = None  # a streamed response arrives at the response hook without content
    return b"".join(out)


async def fill_blob(env: Env, body: bytes = BLOB, digest: str = BLOB_DIGEST) -> http.HTTPFlow:
    f = flow(blob_path(digest))
    await env.cache.request(f)
    assert f.response is None
    f.response = upstream_response(200, {"Content-Length": str(len(body))})
    env.cache.responseheaders(f)
    stream_body(f, body)
    await env.cache.response(f)
    return f


async def fill_manifest(env: Env, reference: str, body: bytes, ctype: str = OCI_INDEX, headers=None) -> http.HTTPFlow:
    f = flow(manifest_path(reference))
    await env.cache.request(f)
    assert f.response is None
    f.response = http.Response.make(200, body, {"Content-Type": ctype, **(headers or {})})
    env.cache.responseheaders(f)
    assert f.response.stream is False
    await env.cache.response(f)
    return f


def fetch(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class TestConfigure:
    async def test_unusable_cache_dir(self, env):
        not_a_dir = env.cache_dir / "file"
        not_a_dir.write_bytes(b"")
        with pytest.raises(exceptions.OptionsError):
            env.tctx.configure(env.cache, cache_dir=str(not_a_dir / "cache"))
        # The rollback reopened the previous folder, which still works.
        await fill_blob(env)
        assert env.cache.store.blob_size(BLOB_DIGEST) == len(BLOB)

    async def test_reconfiguring_the_same_folder_keeps_filling(self, env):
        env.tctx.configure(env.cache, cache_dir=str(env.cache_dir))
        await fill_blob(env)
        assert env.cache.store.has_blob(BLOB_DIGEST)
        assert env.journal()[-1]["outcome"] == "filled"

    async def test_reconfiguring_another_path_to_the_same_folder_keeps_filling(self, env, tmp_path_factory):
        link = tmp_path_factory.mktemp("link") / "cache"
        link.symlink_to(env.cache_dir)
        old = env.cache.store
        env.tctx.configure(env.cache, cache_dir=str(link))
        assert env.cache.store is not old
        await fill_blob(env)
        assert env.cache.store.blob_size(BLOB_DIGEST) == len(BLOB)

    @pytest.mark.parametrize("option", ["tag_freshness", "revalidate_timeout"])
    async def test_negative_seconds(self, env, option):
        with pytest.raises(exceptions.OptionsError):
            env.tctx.configure(env.cache, **{option: -1})

    async def test_lazy_connection_strategy(self, env):
        assert env.tctx.options.connection_strategy == "lazy"


class TestRouting:
    async def test_bad_path_is_answered_with_a_registry_error(self, env):
        f = flow("/v2/Library/Alpine/manifests/latest")
        await env.cache.request(f)
        assert f.response.status_code == 400
        assert f.response.headers["Content-Type"] == "application/json"
        assert f.response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        error = json.loads(f.response.content)["errors"][0]
        assert error["code"] == "NAME_INVALID"
        assert int(f.response.headers["Content-Length"]) == len(f.response.content)

    async def test_bad_digest(self, env):
        f = flow(f"/v2/{REPO}/blobs/sha256:1234")
        await env.cache.request(f)
        assert f.response.status_code == 400
        assert json.loads(f.response.content)["errors"][0]["code"] == "DIGEST_INVALID"

    @pytest.mark.parametrize(
        "path, method, host",
        [
            (f"/v2/{REPO}/tags/list", "GET", HUB),
            (f"/v2/{REPO}/blobs/uploads/", "POST", HUB),
            (manifest_path("latest"), "PUT", HUB),
            (blob_path(), "GET", "example.com"),
            ("/token?scope=repository:library/alpine:pull", "GET", "auth.docker.io"),
        ],
    )
    async def test_passed_through_untouched(self, env, path, method, host):
        f = flow(path, method, host)
        await env.cache.request(f)
        assert f.response is None
        assert f.request.host == host and f.request.path == path
        assert f.id not in env.cache._pending

    async def test_subrequests_are_ignored(self, env):
        await fill_blob(env)
        f = flow(blob_path(), "HEAD")
        f.metadata[upstream.MARK] = True
        await env.cache.request(f)
        assert f.response is None


class TestBlobHit:
    async def test_head(self, env):
        await fill_blob(env)
        f = flow(blob_path(), "HEAD")
        await env.cache.request(f)
        assert f.response.status_code == 200
        assert f.response.raw_content == b""
        assert f.response.headers["Content-Length"] == str(len(BLOB))
        assert f.response.headers["Docker-Content-Digest"] == BLOB_DIGEST

    async def test_get_goes_to_the_blob_server(self, env):
        await fill_blob(env)
        f = flow(blob_path(), headers={"Authorization": "Bearer secret", "Range": "bytes=10-"})
        await env.cache.request(f)
        assert f.response is None
        host, port = env.cache.blob_server.address
        assert f.request.url == f"http://{host}:{port}/blobs/{BLOB_DIGEST}"
        assert f.server_conn.address == (host, port)
        assert "authorization" not in f.request.headers
        assert f.request.headers["range"] == "bytes=10-"  # the client's range reaches the blob server
        assert f.metadata[HIT]
        f.response = upstream_response(200)
        env.cache.responseheaders(f)
        assert f.response.stream is True
        assert [e["outcome"] for e in env.journal()] == ["filled"]  # the hit itself is no miss

    async def test_blob_server_serves_the_bytes(self, env):
        await fill_blob(env)
        f = flow(blob_path())
        await env.cache.request(f)
        url = f.request.url

        status, headers, body = await asyncio.to_thread(fetch, url)
        assert status == 200
        assert body == BLOB
        assert headers["Content-Length"] == str(len(BLOB))
        assert headers["Docker-Content-Digest"] == BLOB_DIGEST

        status, headers, body = await asyncio.to_thread(fetch, url, {"Range": "bytes=100-"})
        assert status == 206
        assert headers["Content-Range"] == f"bytes 100-{len(BLOB) - 1}/{len(BLOB)}"
        assert body == BLOB[100:]

        status, headers, body = await asyncio.to_thread(fetch, url, {"Range": "bytes=5-9"})
        assert (status, headers["Content-Range"], body) == (206, f"bytes 5-9/{len(BLOB)}", BLOB[5:10])

        status, headers, body = await asyncio.to_thread(fetch, url, {"Range": f"bytes={len(BLOB)}-"})
        assert status == 416
        assert headers["Content-Range"] == f"bytes */{len(BLOB)}"
        assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"

    async def test_blob_server_unknown_digest(self, env):
        host, port = env.cache.blob_server.address
        status, _, body = await asyncio.to_thread(fetch, f"http://{host}:{port}/blobs/{BLOB_DIGEST}")
        assert status == 404
        assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        status, _, _ = await asyncio.to_thread(fetch, f"http://{host}:{port}/etc/passwd")
        assert status == 404


class TestBlobFill:
    async def test_miss_is_filled_while_streaming(self, env):
        f = flow(blob_path(), headers={"Accept-Encoding": "gzip", "Authorization": "Bearer t"})
        await env.cache.request(f)
        assert f.response is None
        assert "accept-encoding" not in f.request.headers  # the digest covers identity bytes
        assert f.request.headers["authorization"] == "Bearer t"  # upstream needs it
        f.response = upstream_response(200, {"Content-Length": str(len(BLOB))})
        env.cache.responseheaders(f)
        assert callable(f.response.stream)
        assert stream_body(f, BLOB) == BLOB
        assert not env.cache.store.has_blob(BLOB_DIGEST)  # committed in the response hook
        await env.cache.response(f)
        assert f.error is None
        with env.cache.store.open_blob(BLOB_DIGEST) as blob:
            assert blob.read() == BLOB
        [entry] = env.journal()
        assert entry["outcome"] == "filled"
        assert (entry["kind"], entry["registry"], entry["repository"]) == ("blob", "docker.io", REPO)
        assert (entry["digest"], entry["bytes"]) == (BLOB_DIGEST, len(BLOB))
        assert env.temp_files() == []
        assert env.cache._pending == {}

    async def test_corrupt_bytes_kill_the_flow(self, env):
        corrupt = BLOB[:-1] + bytes([BLOB[-1] ^ 1])
        f = flow(blob_path())
        await env.cache.request(f)
        f.response = upstream_response(200, {"Content-Length": str(len(corrupt))})
        env.cache.responseheaders(f)
        sent = stream_body(f, corrupt)
        assert len(sent) < len(corrupt)  # the end was held back
        await env.cache.response(f)
        assert f.error is not None and f.error.msg == f.error.KILLED_MESSAGE
        assert not env.cache.store.has_blob(BLOB_DIGEST)
        assert env.temp_files() == []
        [entry] = env.journal()
        assert entry["outcome"].startswith("rejected:")
        assert digest_of(corrupt) in entry["outcome"]

    async def test_short_body_is_rejected(self, env):
        f = flow(blob_path())
        await env.cache.request(f)
        f.response = upstream_response(200, {"Content-Length": str(len(BLOB))})
        env.cache.responseheaders(f)
        stream_body(f, BLOB[:1000])
        await env.cache.response(f)
        assert f.error is not None
        assert not env.cache.store.has_blob(BLOB_DIGEST)

    async def test_empty_blob_arrives_whole(self, env):
        digest = digest_of(b"")
        f = flow(blob_path(digest))
        await env.cache.request(f)
        f.response = upstream_response(200, {"Content-Length": "0"})
        env.cache.responseheaders(f)
        await env.cache.response(f)  # mitmproxy never calls the stream callable for no body
        assert f.error is None
        assert env.cache.store.blob_size(digest) == 0

    async def test_compressed_answer_is_passed_not_stored(self, env):
        f = flow(blob_path())
        await env.cache.request(f)
        f.response = upstream_response(200, {"Content-Encoding": "gzip"})
        env.cache.responseheaders(f)
        assert f.response.stream is True
        await env.cache.response(f)
        assert not env.cache.store.has_blob(BLOB_DIGEST)
        assert env.journal()[0]["outcome"] == "passed: upstream answered 200"

    async def test_range_request_miss_is_passed(self, env):
        f = flow(blob_path(), headers={"Range": "bytes=10-", "Accept-Encoding": "gzip"})
        await env.cache.request(f)
        assert f.request.headers["accept-encoding"] == "gzip"
        f.response = upstream_response(206, {"Content-Range": f"bytes 10-{len(BLOB) - 1}/{len(BLOB)}"})
        env.cache.responseheaders(f)
        assert f.response.stream is True
        await env.cache.response(f)
        assert not env.cache.store.has_blob(BLOB_DIGEST)
        assert env.journal()[0]["outcome"] == "passed: upstream answered 206"

    async def test_head_miss_is_passed(self, env):
        f = flow(blob_path(), "HEAD")
        await env.cache.request(f)
        assert f.response is None
        f.response = upstream_response(200, {"Content-Length": str(len(BLOB))})
        env.cache.responseheaders(f)
        assert not callable(f.response.stream)
        await env.cache.response(f)
        assert not env.cache.store.has_blob(BLOB_DIGEST)

    async def test_error_discards_the_pending_fill(self, env):
        f = flow(blob_path())
        await env.cache.request(f)
        f.response = upstream_response(200, {"Content-Length": str(len(BLOB))})
        env.cache.responseheaders(f)
        f.response.stream(BLOB[:65536])
        f.response.stream(BLOB[65536:131072])
        assert env.temp_files()
        f.error = tflow.terr("connection closed")
        await env.cache.error(f)
        assert env.temp_files() == []
        assert not env.cache.store.has_blob(BLOB_DIGEST)
        assert env.journal()[0]["outcome"] == "failed: connection closed"
        assert env.cache._pending == {}

    async def test_redirect_to_a_cdn_fills_the_digest(self, env):
        cdn_path = f"/registry-v2/docker/registry/v2/blobs/sha256/{BLOB_DIGEST[7:9]}/{BLOB_DIGEST[7:]}/data?verify=1-abc"
        f = flow(blob_path())
        await env.cache.request(f)
        assert not env.hosts.intercepts(CDN)
        f.response = upstream_response(307, {"Location": f"https://{CDN}{cdn_path}"})
        env.cache.responseheaders(f)
        assert env.hosts.intercepts(CDN)
        await env.cache.response(f)
        assert env.journal() == []  # the redirect itself is no outcome

        other = flow("/registry-v2/elsewhere/data", host=CDN)
        await env.cache.request(other)
        assert other.id not in env.cache._pending

        g = flow(cdn_path, host=CDN)
        await env.cache.request(g)
        assert g.response is None
        g.response = upstream_response(200, {"Content-Length": str(len(BLOB))})
        env.cache.responseheaders(g)
        assert stream_body(g, BLOB) == BLOB
        await env.cache.response(g)
        assert env.cache.store.blob_size(BLOB_DIGEST) == len(BLOB)
        [entry] = env.journal()
        assert (entry["outcome"], entry["repository"], entry["digest"]) == ("filled", REPO, BLOB_DIGEST)

        again = flow(cdn_path, host=CDN)  # a redirect is used once
        await env.cache.request(again)
        assert again.id not in env.cache._pending

    async def test_redirect_to_a_digest_cached_meanwhile_is_a_hit(self, env):
        f = flow(blob_path())
        await env.cache.request(f)
        f.response = upstream_response(307, {"Location": f"https://{CDN}/data?verify=2"})
        env.cache.responseheaders(f)
        await env.cache.response(f)
        await fill_blob(env)  # another client's fill completed first

        g = flow("/data?verify=2", host=CDN, headers={"Authorization": "x"})
        await env.cache.request(g)
        host, port = env.cache.blob_server.address
        assert g.request.url == f"http://{host}:{port}/blobs/{BLOB_DIGEST}"

    async def test_plain_http_redirect_is_not_followed(self, env):
        f = flow(blob_path())
        await env.cache.request(f)
        f.response = upstream_response(307, {"Location": f"http://{CDN}/data"})
        env.cache.responseheaders(f)
        assert not env.hosts.intercepts(CDN)
        assert env.cache._redirects == {}


def manifest_response(status: int, body: bytes = b"", headers: dict | None = None) -> http.Response:
    r = http.Response.make(status, body)
    r.headers.update(headers or {})
    return r


class TestPing:
    async def test_upstream_answer_is_relayed(self, env):
        challenge = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'
        env.answers.append(manifest_response(401, b'{"errors":[]}', {"WWW-Authenticate": challenge}))
        f = flow("/v2/", headers={"Authorization": "Bearer t"})
        await env.cache.request(f)
        assert env.sent == [("GET", f"https://{HUB}/v2/")]
        assert f.response.status_code == 401
        assert f.response.headers["WWW-Authenticate"] == challenge

    @pytest.mark.parametrize("failure", ["connection refused", manifest_response(503), manifest_response(429)])
    async def test_answered_locally_when_upstream_fails(self, env, failure):
        env.answers.append(failure)
        f = flow("/v2/")
        await env.cache.request(f)
        assert f.response.status_code == 200
        assert f.response.content == b"{}"
        assert f.response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


class TestManifestByDigest:
    async def test_miss_is_stored_then_served(self, env):
        f = flow(manifest_path(MANIFEST_DIGEST), headers={"Accept": OCI_INDEX})
        await env.cache.request(f)
        assert f.response is None
        f.response = manifest_response(200, MANIFEST, {"Content-Type": OCI_INDEX})
        env.cache.responseheaders(f)
        assert f.response.stream is False
        await env.cache.response(f)
        assert f.response.content == MANIFEST  # the client's own answer is untouched
        stored = env.cache.store.get_manifest(MANIFEST_DIGEST)
        assert (stored.media_type, stored.body) == (OCI_INDEX, MANIFEST)
        [entry] = env.journal()
        assert (entry["kind"], entry["outcome"], entry["digest"], entry["bytes"]) == (
            "manifest", "filled", MANIFEST_DIGEST, len(MANIFEST))

        g = flow(manifest_path(MANIFEST_DIGEST), headers={"Accept": f"{DOCKER_V2}, {OCI_INDEX}"})
        await env.cache.request(g)
        assert g.response.status_code == 200
        assert g.response.content == MANIFEST
        assert g.response.headers["Content-Type"] == OCI_INDEX
        assert g.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        assert g.response.headers["Content-Length"] == str(len(MANIFEST))
        assert g.response.headers["Etag"] == f'"{MANIFEST_DIGEST}"'

        h = flow(manifest_path(MANIFEST_DIGEST), "HEAD")
        await env.cache.request(h)
        assert h.response.status_code == 200
        assert h.response.raw_content == b""
        assert h.response.headers["Content-Length"] == str(len(MANIFEST))
        assert h.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        assert len(env.journal()) == 1  # hits are not journalled
        assert env.sent == []

    async def test_generic_content_type_stores_the_declared_media_type(self, env):
        await fill_manifest(env, MANIFEST_DIGEST, MANIFEST, ctype="application/json")
        assert env.cache.store.get_manifest(MANIFEST_DIGEST).media_type == OCI_INDEX

    async def test_wrong_bytes_are_refused(self, env):
        f = flow(manifest_path(MANIFEST_DIGEST))
        await env.cache.request(f)
        f.response = manifest_response(200, MANIFEST2, {"Content-Type": OCI_INDEX})
        env.cache.responseheaders(f)
        await env.cache.response(f)
        assert f.response.status_code == 502
        error = json.loads(f.response.content)["errors"][0]
        assert error["code"] == "MANIFEST_INVALID"
        assert env.cache.store.get_manifest(MANIFEST_DIGEST) is None
        assert env.cache.store.get_manifest(MANIFEST2_DIGEST) is None
        assert env.journal()[0]["outcome"] == "rejected: digest mismatch"

    async def test_accept_excluding_the_stored_type_is_not_answered(self, env):
        await fill_manifest(env, MANIFEST_DIGEST, MANIFEST)
        f = flow(manifest_path(MANIFEST_DIGEST), headers={"Accept": DOCKER_V2})
        await env.cache.request(f)
        assert f.response is None
        assert f.id in env.cache._pending

    async def test_upstream_error_is_passed_and_journalled(self, env):
        f = flow(manifest_path(MANIFEST_DIGEST))
        await env.cache.request(f)
        f.response = manifest_response(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
        env.cache.responseheaders(f)
        await env.cache.response(f)
        assert f.response.status_code == 404
        assert env.cache.store.get_manifest(MANIFEST_DIGEST) is None
        assert env.journal()[0]["outcome"] == "passed: upstream answered 404"

    async def test_huge_manifest_is_not_held_in_memory(self, env):
        f = flow(manifest_path(MANIFEST_DIGEST))
        await env.cache.request(f)
        f.response = upstream_response(200, {"Content-Length": str(5 * 1024 * 1024)})
        f.response.stream = True
        env.cache.responseheaders(f)
        assert f.response.stream is True


class TestManifestByTag:
    async def test_miss_stores_manifest_and_tag(self, env):
        f = await fill_manifest(env, "3.20", MANIFEST, headers={"Docker-Content-Digest": MANIFEST_DIGEST})
        assert f.response.status_code == 200
        assert env.cache.store.get_manifest(MANIFEST_DIGEST).body == MANIFEST
        entry = env.cache.store.get_tag("docker.io", REPO, "3.20")
        assert entry.digest == MANIFEST_DIGEST
        assert env.journal()[0]["outcome"] == "filled"
        assert env.journal()[0]["reference"] == "3.20"

    async def test_miss_with_a_lying_digest_header_is_refused(self, env):
        f = await fill_manifest(env, "3.20", MANIFEST, headers={"Docker-Content-Digest": MANIFEST2_DIGEST})
        assert f.response.status_code == 502
        assert env.cache.store.get_tag("docker.io", REPO, "3.20") is None
        assert env.cache.store.get_manifest(MANIFEST_DIGEST) is None

    async def test_aliases_share_the_tag(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.tctx.configure(env.cache, tag_freshness=3600)
        f = flow(manifest_path("3.20"), host="index.docker.io")
        await env.cache.request(f)
        assert f.response.content == MANIFEST

    async def test_fresh_tag_is_served_without_upstream(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.tctx.configure(env.cache, tag_freshness=3600)
        f = flow(manifest_path("3.20"))
        await env.cache.request(f)
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
        await env.cache.request(f)
        assert env.sent == [("HEAD", f"https://{HUB}{manifest_path('3.20')}")]
        assert f.response.content == MANIFEST

    async def test_unchanged_tag_is_served_from_cache(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        before = env.cache.store.get_tag("docker.io", REPO, "3.20").checked
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST_DIGEST}))
        f = flow(manifest_path("3.20"), headers={"Accept": OCI_INDEX, "Authorization": "Bearer t"})
        await env.cache.request(f)
        assert env.sent == [("HEAD", f"https://{HUB}{manifest_path('3.20')}")]
        assert f.response.status_code == 200
        assert f.response.content == MANIFEST
        assert f.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        assert env.cache.store.get_tag("docker.io", REPO, "3.20").checked >= before
        assert len(env.journal()) == 1

    async def test_head_by_tag_is_answered_with_size_and_digest(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST_DIGEST}))
        f = flow(manifest_path("3.20"), "HEAD")
        await env.cache.request(f)
        assert f.response.raw_content == b""
        assert f.response.headers["Content-Length"] == str(len(MANIFEST))
        assert f.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST

    async def test_tag_moved_to_a_known_manifest(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        await fill_manifest(env, MANIFEST2_DIGEST, MANIFEST2)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST2_DIGEST}))
        f = flow(manifest_path("3.20"))
        await env.cache.request(f)
        assert f.response.content == MANIFEST2
        assert env.cache.store.get_tag("docker.io", REPO, "3.20").digest == MANIFEST2_DIGEST

    async def test_tag_moved_to_an_unknown_manifest_goes_upstream(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST2_DIGEST}))
        f = flow(manifest_path("3.20"))
        await env.cache.request(f)
        assert f.response is None
        assert env.cache._pending[f.id].stale.digest == MANIFEST_DIGEST
        f.response = manifest_response(200, MANIFEST2, {"Content-Type": OCI_INDEX, "Docker-Content-Digest": MANIFEST2_DIGEST})
        env.cache.responseheaders(f)
        await env.cache.response(f)
        assert f.response.content == MANIFEST2
        assert env.cache.store.get_tag("docker.io", REPO, "3.20").digest == MANIFEST2_DIGEST
        assert env.cache.store.get_manifest(MANIFEST2_DIGEST).body == MANIFEST2

    async def test_tag_moved_but_its_get_fails_serves_stale(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(manifest_response(200, headers={"Docker-Content-Digest": MANIFEST2_DIGEST}))
        f = flow(manifest_path("3.20"))
        await env.cache.request(f)
        f.response = manifest_response(503, b"busy")
        env.cache.responseheaders(f)
        await env.cache.response(f)
        assert f.response.status_code == 200
        assert f.response.content == MANIFEST
        assert env.journal()[-1]["outcome"] == "stale: upstream answered 503"

    @pytest.mark.parametrize("status", [401, 404])
    async def test_refused_revalidation_passes_upstreams_answer(self, env, status):
        await fill_manifest(env, "3.20", MANIFEST)
        env.answers.append(manifest_response(status))
        f = flow(manifest_path("3.20"))
        await env.cache.request(f)
        assert f.response is None
        f.response = manifest_response(status, b'{"errors":[]}')
        env.cache.responseheaders(f)
        await env.cache.response(f)
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
        await env.cache.request(f)
        assert f.response.status_code == 200
        assert f.response.content == MANIFEST
        assert f.response.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        entry = env.journal()[-1]
        assert entry["outcome"] == f"stale: {reason}"
        assert (entry["reference"], entry["digest"]) == ("3.20", MANIFEST_DIGEST)

    async def test_accept_excluding_the_cached_type_goes_upstream_without_revalidating(self, env):
        await fill_manifest(env, "3.20", MANIFEST)
        f = flow(manifest_path("3.20"), headers={"Accept": DOCKER_V2})
        await env.cache.request(f)
        assert f.response is None
        assert env.sent == []


class TestOffline:
    async def test_head_by_tag_teaches_the_tag_for_later_offline_use(self, env):
        # dockerd: HEAD the tag, then GET by digest.
        head = flow(manifest_path("3.20"), method="HEAD")
        await env.cache.request(head)
        head.response = upstream_response(200, {"Docker-Content-Digest": MANIFEST_DIGEST})
        env.cache.responseheaders(head)
        await env.cache.response(head)
        await fill_manifest(env, MANIFEST_DIGEST, MANIFEST)

        env.tctx.configure(env.cache, offline=True)
        f = flow(manifest_path("3.20"))
        await env.cache.request(f)
        assert f.response.status_code == 200 and f.response.content == MANIFEST
        assert env.sent == [], "offline, nothing is revalidated"

    async def test_ping_and_token_are_answered_locally(self, env):
        env.tctx.configure(env.cache, offline=True)
        ping = flow("/v2/")
        await env.cache.request(ping)
        assert ping.response.status_code == 200 and "www-authenticate" not in ping.response.headers
        token = flow("/token?service=registry.docker.io&scope=repository:library/alpine:pull", host="auth.docker.io")
        await env.cache.request(token)
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
        await env.cache.request(f)
        error = f.response.json()["errors"][0]
        assert f.response.status_code == 404 and error["code"] == code
        assert named in error["message"] and "not in the offline cache" in error["message"]
        assert env.journal()[-1]["outcome"] == "missing: offline"
        assert env.sent == []

    async def test_pushes_are_refused(self, env):
        env.tctx.configure(env.cache, offline=True)
        f = flow("/v2/library/alpine/blobs/uploads/", method="POST")
        await env.cache.request(f)
        assert f.response.status_code == 405
        assert f.response.json()["errors"][0]["code"] == "UNSUPPORTED"

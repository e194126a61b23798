"""Blob requests: hits sent to the blob server, and fills shared by every client asking meanwhile."""

import asyncio
import json
import os
import shutil

import pytest

from hubcache.registry.protocol import digest_of
from support.cache_env import (
    BLOB,
    BLOB_DIGEST,
    CDN,
    HUB,
    REPO,
    Upstream,
    asked,
    blob_path,
    fill_blob,
    flow,
    location,
    sized,
    upstream_response,
)


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


class TestSmallBlobHit:
    """A blob of at most `blob_inline_max` bytes is answered by the proxy itself: no connection to
    the blob server, and its bytes hashed again on every answer."""

    SMALL = os.urandom(1000)
    DIGEST = digest_of(SMALL)

    async def get(self, env, **headers):
        f = flow(blob_path(self.DIGEST), headers=headers)
        await env.addons.request(f)
        return f

    async def test_get_is_answered_with_the_blob_and_counted_as_served_from_the_cache(self, env):
        await fill_blob(env, self.SMALL, self.DIGEST)
        f = await self.get(env, Authorization="Bearer secret")
        assert f.response.status_code == 200 and f.response.content == self.SMALL
        assert f.response.headers["Docker-Content-Digest"] == self.DIGEST
        assert f.response.headers["Content-Length"] == str(len(self.SMALL))
        assert len(env.fetched) == 1, "the hit asked nothing upstream"
        assert env.addons.metrics.served.labels("cache")._value.get() == len(self.SMALL)
        assert [e["outcome"] for e in env.journal()] == ["filled"]

    @pytest.mark.parametrize(("limit", "inline"), [(1000, True), (999, False), (0, False)])
    async def test_the_limit_is_the_largest_blob_answered_inline(self, env, limit, inline):
        await fill_blob(env, self.SMALL, self.DIGEST)
        env.tctx.options.blob_inline_max = limit
        f = await self.get(env)
        if inline:
            assert f.response.status_code == 200 and f.response.content == self.SMALL
        else:
            path, _ = location(f)
            assert path == f"/blobs/{self.DIGEST}"

    async def test_a_range_is_sent_to_the_blob_server(self, env):
        await fill_blob(env, self.SMALL, self.DIGEST)
        path, _ = location(await self.get(env, Range="bytes=10-"))
        assert path == f"/blobs/{self.DIGEST}"

    async def test_one_whose_bytes_changed_on_disk_is_dropped_and_fetched_again(self, env, caplog):
        """Changed in place, its size kept: only hashing it again finds it, and the client gets
        upstream's verified copy, never the changed bytes."""
        await fill_blob(env, self.SMALL, self.DIGEST)
        with env.store.open_blob(self.DIGEST) as f:
            path = f.name
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"\0" * 10)
        os.close(fd)
        env.fetches.append(sized(self.SMALL))
        f = await self.get(env)
        await env.settle()
        assert len(env.fetched) == 2, "fetched again from upstream"
        assert f"blob {self.DIGEST} no longer hashes to its digest" in caplog.text
        served = f.response.content if f.response.status_code == 200 else None
        assert served in (None, self.SMALL), "the changed bytes were served"
        again = await self.get(env)
        assert again.response.status_code == 200 and again.response.content == self.SMALL

    async def test_of_a_private_repository_only_a_client_upstream_lets_have_it_gets_its_bytes(self, env):
        """The access check comes first, as for a redirect (tests/unit/cache/test_access.py)."""
        await fill_blob(env, self.SMALL, self.DIGEST)
        env.store.set_visibility("docker.io", REPO, False)
        env.answers.append(upstream_response(401))
        mallory = await self.get(env, Authorization="Bearer mallory")
        assert mallory.response.status_code == 401 and self.SMALL not in mallory.response.content
        env.answers.append(upstream_response(200))
        alice = await self.get(env, Authorization="Bearer alice")
        assert alice.response.status_code == 200 and alice.response.content == self.SMALL


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
        assert env.temp_files() == [] and env.addons.fills.under_way == {}

    @pytest.mark.parametrize(
        "answer, outcome",
        [
            (sized(BLOB[:-1] + bytes([BLOB[-1] ^ 1])), ("rejected", f"{len(BLOB)} bytes hashing to")),
            (Upstream(200, {"Content-Length": str(len(BLOB))}, BLOB[:70000]), ("rejected", "70000 bytes")),
            (sized(broken="connection reset by peer"), ("failed", "connection reset by peer")),
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
            assert json.loads(f.response.content)["errors"][0]["code"] == "UNAVAILABLE"
        await env.settle()
        assert not env.store.has_blob(BLOB_DIGEST)
        assert env.temp_files() == []
        entry = env.journal()[0]
        assert entry["outcome"] == outcome[0] and entry["reason"].startswith(outcome[1])

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
        assert (env.journal()[0]["outcome"], env.journal()[0]["reason"]) == ("passed", "upstream answered 401")
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

    async def test_a_redirect_to_no_url_fails_the_fill_with_one_line(self, env, caplog):
        env.fetches.append(Upstream(307, {"Location": "https://[::1/layer", "Content-Length": "0"}))
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response.status_code == 502 and "which is no URL to follow" in f.response.json()["errors"][0]["message"]
        await env.settle()
        assert env.journal()[0]["outcome"] == "failed" and "no URL to follow" in env.journal()[0]["reason"]
        assert "Traceback" not in caplog.text and env.temp_files() == []

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
        assert json.loads(f.response.content)["errors"][0]["code"] == "UNAVAILABLE", "upstream failed: not a claim the blob is unknown"
        assert "upstream sent nothing for 60s" in f.response.text
        await env.settle()
        assert (env.journal()[0]["outcome"], env.journal()[0]["reason"]) == ("failed", "upstream sent nothing for 60s")

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
        entry = env.journal()[0]
        assert entry["outcome"] == "failed" and entry["reason"].startswith("upstream's") and encoding in entry["reason"]

    async def test_head_miss_is_passed(self, env):
        f = await asked(env, flow(blob_path(), "HEAD"), Upstream(200, {"Content-Length": str(len(BLOB))}))
        assert f.response.status_code == 200
        assert not env.store.has_blob(BLOB_DIGEST)
        assert (env.journal()[0]["outcome"], env.journal()[0]["reason"]) == ("passed", "upstream answered 200")
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
        monkeypatch.setattr("hubcache.cache.fills.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
        env.fetches.append(sized())
        f = flow(blob_path())
        await env.addons.request(f)
        assert f.response is None, "the client fetches it itself"
        await env.settle()
        f.response = upstream_response(200)
        await env.cache.response(f)
        assert (env.journal()[0]["outcome"], env.journal()[0]["reason"]) == ("passed", "upstream answered 200")
        assert not env.store.has_blob(BLOB_DIGEST) and env.temp_files() == []

    async def test_room_promised_to_a_fill_under_way_is_not_given_twice(self, env, monkeypatch):
        reserve = 64 * 1024 * 1024
        free = reserve + len(BLOB) + 1000  # room for one such blob, not two
        monkeypatch.setattr("hubcache.cache.fills.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
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
        monkeypatch.setattr("hubcache.cache.fills.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
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
        assert (env.journal()[0]["outcome"], env.journal()[0]["reason"]) == ("passed", "upstream answered 200")

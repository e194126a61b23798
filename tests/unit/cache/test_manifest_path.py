"""Manifest requests by digest and by tag, manifests redirected upstream, and referrers."""

import gzip
import json
import time
from urllib.parse import urlencode

import pytest
from mitmproxy import http

from hubcache.registry.protocol import digest_of
from hubcache.upstream import client as upstream
from support.cache_env import (
    DOCKER_ACCEPT,
    DOCKER_V2,
    HUB,
    MANIFEST,
    MANIFEST2,
    MANIFEST2_DIGEST,
    MANIFEST_DIGEST,
    OCI_INDEX,
    OCI_MANIFEST,
    REPO,
    SBOM_TYPE,
    SIG_TYPE,
    Env,
    Upstream,
    asked,
    fill_manifest,
    flow,
    index_of,
    manifest_path,
    manifest_response,
    referrers_path,
    referring,
)


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
        assert (env.journal()[0]["outcome"], env.journal()[0]["reason"]) == ("rejected", "digest mismatch")

    async def test_accept_excluding_the_stored_type_is_not_answered(self, env):
        await fill_manifest(env, MANIFEST_DIGEST, MANIFEST)
        f = await asked(env, flow(manifest_path(MANIFEST_DIGEST), headers={"Accept": DOCKER_V2}), Upstream(404, {}))
        assert f.response.status_code == 404, "upstream's answer, not the stored manifest"
        assert env.fetched[-1].headers["accept"] == DOCKER_V2

    async def test_upstream_error_is_passed_and_journalled(self, env):
        f = await asked(env, flow(manifest_path(MANIFEST_DIGEST)), Upstream(404, {}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'))
        assert f.response.status_code == 404
        assert env.store.get_manifest(MANIFEST_DIGEST) is None
        assert (env.journal()[0]["outcome"], env.journal()[0]["reason"]) == ("passed", "upstream answered 404")

    async def test_huge_manifest_is_not_held_in_memory(self, env):
        env.fetches.append(Upstream(200, {"Content-Length": str(5 * 1024 * 1024)}, b"x" * 5 * 1024 * 1024))
        f = flow(manifest_path(MANIFEST_DIGEST))
        await env.addons.request(f)
        assert f.response.status_code == 502
        assert json.loads(f.response.content)["errors"][0]["code"] == "MANIFEST_INVALID"
        assert (env.journal()[0]["outcome"], env.journal()[0]["reason"]) == ("rejected", f"upstream's answer is larger than {upstream.MAX_ANSWER} bytes")

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

    @pytest.mark.parametrize("ctype", [OCI_INDEX, "application/json"])
    async def test_a_manifest_nested_deeper_than_the_json_parser_goes_is_only_an_unreadable_one(self, env, ctype):
        """Its bytes hash to its digest, so it is upstream's to serve; what it names is unknown, as
        for any manifest hubcache cannot read. The hook never fails on it (mitmproxy would then pass
        upstream's answer to the client unchecked)."""
        deep = b"[" * 200_000 + b"]" * 200_000
        f = await fill_manifest(env, "deep", deep, ctype, headers={"Docker-Content-Digest": digest_of(deep)})
        assert f.response.status_code == 200 and f.response.content == deep
        assert env.store.get_manifest(digest_of(deep)).body == deep

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
        assert (env.journal()[0]["outcome"], env.journal()[0]["reason"]) == ("failed", "connection refused")


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
        assert (env.journal()[-1]["outcome"], env.journal()[-1]["reason"]) == ("stale", "upstream answered 503")

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
        assert (entry["outcome"], entry["reason"]) == ("stale", reason)
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
        env.fetches += [Upstream(307, {"Location": "https://mirror.example/v2/alpine/manifests/3.20"}), answer]
        f = flow(manifest_path("3.20"), headers={"Authorization": "Bearer for-the-registry"})
        await env.addons.request(f)
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
        env.fetches += [Upstream(307, {"Location": plain}), Upstream(200, {"Content-Type": OCI_INDEX, "Docker-Content-Digest": MANIFEST_DIGEST}, MANIFEST)]
        f = flow(manifest_path("3.20"), headers={"Authorization": "Bearer for-the-registry"})
        await env.addons.request(f)
        assert f.response.status_code == 307 and f.response.headers["Location"] == plain
        assert [r.url for r in env.fetched] == [f"https://{HUB}{manifest_path('3.20')}"], "nothing is fetched over plain HTTP"
        assert env.store.get_tag("docker.io", REPO, "3.20") is None


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

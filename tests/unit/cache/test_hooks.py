"""RegistryCache's hooks: routing, the /v2/ check, tokens, offline, canonical requests, a registry that is down."""

import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import tflow, tutils

from hubcache.mitm.flows import Mark
from hubcache.registry import protocol
from support.cache_env import (
    BLOB,
    BLOB_DIGEST,
    HUB,
    MANIFEST,
    MANIFEST_DIGEST,
    OCI_INDEX,
    REPO,
    TOKEN_PATH,
    Upstream,
    asked,
    blob_path,
    fill_blob,
    fill_manifest,
    flow,
    local_token,
    manifest_path,
    manifest_response,
    sized,
    upstream_response,
)


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
        assert Mark.PASSED not in f.metadata, "not followed to its answer"

    async def test_subrequests_are_ignored(self, env):
        await fill_blob(env)
        f = flow(blob_path(), "HEAD")
        f.metadata[Mark.SUBREQUEST] = True
        await env.addons.request(f)
        assert f.response is None


class TestPing:
    CHALLENGE = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'

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
        again = flow("/v2/")
        env.answers.append(manifest_response(200, b"{}"))
        await env.addons.request(again)
        assert len(env.sent) == 2, "a failure is not remembered as the registry's answer"

    async def test_an_anonymous_check_is_answered_again_without_upstream(self, env):
        env.answers.append(manifest_response(401, b'{"errors":[]}', {"WWW-Authenticate": self.CHALLENGE}))
        first, second = flow("/v2/"), flow("/v2/")
        await env.addons.request(first)
        await env.addons.request(second)
        assert env.sent == [("GET", f"https://{HUB}/v2/")]
        assert second.response.status_code == 401
        assert second.response.headers["WWW-Authenticate"] == self.CHALLENGE
        assert second.metadata[Mark.ANSWERED], "not counted as upstream's answer (metrics, circuits)"

    async def test_a_check_with_credentials_always_reaches_upstream(self, env):
        # docker login checks its credentials with a /v2/ of its own: upstream must judge them.
        env.answers += [manifest_response(401, b"", {"WWW-Authenticate": self.CHALLENGE}), manifest_response(200, b"{}")]
        await env.addons.request(flow("/v2/"))
        login = flow("/v2/", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        await env.addons.request(login)
        assert len(env.sent) == 2 and env.addons.upstream.sent_requests[1].headers["authorization"] == "Basic dXNlcjpwYXNz"
        assert login.response.status_code == 200

    async def test_an_answer_to_credentials_is_never_given_to_another_client(self, env):
        # An attacker waits for a client with credentials to check, then checks without any.
        env.answers += [manifest_response(200, b"{}", {"X-Account": "alice"}), manifest_response(401, b"", {"WWW-Authenticate": self.CHALLENGE})]
        await env.addons.request(flow("/v2/", headers={"Authorization": "Bearer alices-token"}))
        attacker = flow("/v2/")
        await env.addons.request(attacker)
        assert len(env.sent) == 2 and "authorization" not in env.addons.upstream.sent_requests[1].headers
        assert attacker.response.status_code == 401 and "X-Account" not in attacker.response.headers
        # What the anonymous check got is what the next anonymous one gets, from here.
        again = flow("/v2/")
        await env.addons.request(again)
        assert len(env.sent) == 2 and again.response.status_code == 401


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
        assert (env.journal()[-1]["outcome"], env.journal()[-1]["reason"]) == ("missing", "offline")
        assert env.sent == []

    async def test_pushes_are_refused(self, env):
        env.tctx.configure(env.cache, offline=True)
        f = flow("/v2/library/alpine/blobs/uploads/", method="POST")
        await env.addons.request(f)
        assert f.response is not None, "a push passed through offline"
        assert f.response.status_code == 405
        assert f.response.json()["errors"][0]["code"] == "UNSUPPORTED"


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
        entry = env.journal()[-1]
        assert entry["outcome"] == "stale" and entry["reason"].startswith("no token")

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


# What a distribution registry cleans (and then routes elsewhere): after the first target a client names.
UNCLEAN = {
    "#": "x#/../../../../library/alpine/manifests/3.20",
    "%23": "x%23/../../../../library/alpine/manifests/3.20",
    "dot segments": "x/../../../../library/alpine/manifests/3.20",
    "empty segment": "x//../library/alpine/manifests/3.20",
}


class TestCanonicalRequests:
    """Canonicalize, then act (docs/security.md): hubcache acts only on the route it parsed,
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
        entry = env.journal()[-1]
        assert entry["outcome"] == "rejected" and entry["reason"].startswith("upstream redirected")

    async def test_a_redirect_that_renames_a_blob_fails_its_fill(self, env):
        other = "sha256:" + "e" * 64
        env.fetches.append(Upstream(301, {"Location": f"/v2/library/python/blobs/{other}", "Content-Length": "0"}))
        f = flow(blob_path())
        await env.addons.request(f)
        await env.settle()
        assert f.response.status_code == 502
        assert len(env.fetched) == 1 and env.store.blob_size(BLOB_DIGEST) is None


class TestWhileTheRegistryIsDown:
    """With Docker Hub's circuit open (upstream/circuits.py): a pull of cached content stays local, and a
    pull of something new reaches the token host as soon as it answers again."""

    CHALLENGE = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'

    @pytest.fixture
    def breaker(self, env):
        breaker = env.addons.circuits
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

"""Private images stay private: cached content only for clients upstream would serve it to."""

import asyncio
import json

import pytest

from hubcache.cache import access as access_module
from support.cache_env import (
    BLOB_DIGEST,
    CDN,
    HUB,
    MANIFEST,
    MANIFEST_DIGEST,
    OCI_INDEX,
    REPO,
    Upstream,
    blob_path,
    fill_blob,
    fill_manifest,
    flow,
    location,
    manifest_path,
    sized,
    upstream_response,
)


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

    @pytest.mark.parametrize(
        "answer, status, code",
        [(401, 401, "UNAUTHORIZED"), (403, 403, "DENIED"), (404, 404, "BLOB_UNKNOWN"), (410, 403, "DENIED"), (429, 503, "UNAVAILABLE"), (500, 503, "UNAVAILABLE")],
    )
    async def test_upstreams_refusal_is_a_registry_error_whose_status_is_its_codes(self, env, answer, status, code):
        await self.cached_private_blob(env)
        env.answers.append(upstream_response(answer))
        f = flow(blob_path(), headers={"Authorization": "Bearer mallory"})
        await env.addons.request(f)
        assert (f.response.status_code, json.loads(f.response.content)["errors"][0]["code"]) == (status, code)

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

    async def test_a_digest_the_repository_does_not_hold_never_makes_it_private(self, env):
        """Its visibility due for a check, a public repository is probed with what it is known to
        hold, never with a client's digest: that one's 404 would make it private for everyone."""
        await fill_blob(env)
        env.store.set_visibility("docker.io", "library/public", True)
        env.tctx.options.visibility_check_seconds = 0
        env.answers.append(upstream_response(404))
        fetched = len(env.fetched)
        f = flow(f"/v2/library/public/blobs/{BLOB_DIGEST}")
        await env.addons.request(f)
        assert f.response.status_code == 404, "the client's own answer"
        assert env.store.visibility("docker.io", "library/public") is True
        assert len(env.fetched) == fetched, "probed anonymously with the client's digest"

    async def test_an_anonymous_redirect_to_the_blob_host_keeps_a_repository_public(self, env):
        """A registry answers a blob it lets a client pull with a redirect to its blob host."""
        await fill_blob(env)
        env.tctx.options.visibility_check_seconds = 0
        env.fetches.append(Upstream(307, {"Location": f"https://{CDN}/layer?signed=1", "Content-Length": "0"}))
        f = flow(blob_path())
        await env.addons.request(f)
        assert location(f)[0] == f"/blobs/{BLOB_DIGEST}"
        assert env.store.visibility("docker.io", REPO) is True

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
        env.fetches += [
            Upstream(200, {"Content-Type": OCI_INDEX}, MANIFEST),
            Upstream(401, {"WWW-Authenticate": challenge, "Content-Length": "0"}),
            Upstream(200, {"Content-Length": "17"}, b'{"token":"anon"}\n'),
            Upstream(200 if public else 401, {"Content-Length": "0"}),
        ]
        await env.addons.request(f)
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
        env.fetches += [Upstream(200, {"Content-Type": OCI_INDEX}, MANIFEST), *probe]
        await env.addons.request(f)
        assert env.store.visibility("docker.io", "library/new") is False
        assert len(env.fetched) == 1 + len(probe)

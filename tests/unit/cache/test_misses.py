"""What the store cannot answer: upstream's 404 remembered per client (negative caching)."""

from support.cache_env import Upstream, asked, blob_path, flow, manifest_path


class TestNegativeCache:
    async def test_a_404_is_remembered_for_the_same_client(self, env):
        f = await asked(env, flow(manifest_path("nope"), headers={"Authorization": "Bearer a"}), Upstream(404, {}, b'{"errors":[]}'))
        assert f.response.status_code == 404
        again = flow(manifest_path("nope"), headers={"Authorization": "Bearer a"})
        await env.addons.request(again)
        assert again.response.status_code == 404 and "404" in again.response.json()["errors"][0]["message"]
        assert len(env.fetched) == 1, "answered without asking upstream again"
        assert (env.journal()[-1]["outcome"], env.journal()[-1]["reason"]) == ("missing", "upstream answered 404 lately")
        other = await asked(env, flow(manifest_path("nope"), headers={"Authorization": "Bearer b"}), Upstream(404, {}))
        assert other.response.status_code == 404 and len(env.fetched) == 2, "another client's credentials ask again"

    async def test_a_manifest_404_is_remembered_per_accept(self, env):
        """A registry answers 404 for an index to a client that takes none: a client that takes
        indexes, without credentials like the first, must still be asked for, not told 404."""
        oci = "application/vnd.oci.image.manifest.v1+json"
        await asked(env, flow(manifest_path("multi"), headers={"Accept": oci}), Upstream(404, {}, b'{"errors":[]}'))
        again = flow(manifest_path("multi"), headers={"Accept": f" {oci.upper()} ,{oci}"})  # spelled otherwise: the same
        await env.addons.request(again)
        assert again.response.status_code == 404 and len(env.fetched) == 1
        wider = await asked(env, flow(manifest_path("multi")), Upstream(404, {}))  # as dockerd asks: indexes too
        assert wider.response.status_code == 404 and len(env.fetched) == 2, "another Accept asks again"

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

"""make_addons wires every collaborator explicitly: the objects several addons share are handed to
each of them, never found through mitmproxy's addon manager or written into another addon."""

import asyncio

import pytest

from hubcache.addons import make_addons
from hubcache.blobserver.host import BlobHost
from hubcache.cache.hooks import RegistryCache
from hubcache.proxy.credentials import UpstreamCredentials
from hubcache.proxy.interception import Interception
from hubcache.proxy.mirror import Mirror, MirrorChallenges
from hubcache.upstream.circuits import Circuits


@pytest.fixture
def addons() -> dict[type, object]:
    return {type(addon): addon for addon in make_addons()}


def test_the_mirror_and_the_credentials_share_one_token_realm_table(addons):
    assert addons[Mirror].realms is addons[UpstreamCredentials].realms


def test_the_mirrors_listener_is_the_one_interception_and_the_blob_host_read(addons):
    assert addons[Mirror].listener is addons[Interception].mirror
    assert addons[BlobHost].mirror is addons[Mirror].listener


def test_hubcaches_own_requests_ask_the_breaker_that_probes_through_them(addons):
    out = addons[RegistryCache].upstream
    assert out.circuits is addons[Circuits] and addons[Circuits].upstream is out


def test_the_cache_answers_from_the_breaker_that_is_loaded(addons):
    assert addons[RegistryCache].breaker is addons[Circuits]


def test_the_credentials_learn_a_challenge_before_the_mirror_rewrites_it(addons):
    order = list(addons)
    assert order.index(UpstreamCredentials) < order.index(MirrorChallenges)


def test_hubcache_run_adds_its_addons_to_mitmproxys_chain_as_one():
    # mitmproxy pays per addon of its chain on every event; as children they cost far less.
    from mitmproxy import options
    from mitmproxy.tools import dump

    from hubcache.cli.proxy import master_class

    async def masters():
        bare = dump.DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        ours = master_class()(options.Options(), with_termlog=False, with_dumper=False)
        return bare.addons, ours.addons

    bare, ours = asyncio.run(masters())
    assert len(ours.chain) == len(bare.chain) + 1
    assert all(ours.get(type(addon).__name__.lower()) for addon in make_addons())  # each still found by name

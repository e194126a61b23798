"""make_addons wires every collaborator explicitly: the objects several addons share are handed to
each of them, never found through mitmproxy's addon manager or written into another addon."""

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

"""The `env` fixture of the data path's tests: the cache's addons on a fresh cache folder."""

import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from hubcache.upstream import client as upstream
from support.addons import CacheAddons
from support.cache_env import REPO, Env, FakeUpstream


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

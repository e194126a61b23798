"""deny_images and allow_images (addon/policy.py): which pulls hubcache refuses, with taddons."""

from __future__ import annotations

import json

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from hubcache.cache.policy import ImagePolicy
from hubcache.observe.metrics import Metrics
from hubcache.options import CommonOptions
from hubcache.proxy.interception import Interception
from hubcache.proxy.routes import Routes
from hubcache.storage.folder import CacheFolder
from hubcache.storage.journal import MissJournal

HUB = "registry-1.docker.io"
DIGEST = "sha256:" + "a" * 64


@pytest.fixture
def policy(tmp_path):
    hosts = Interception()
    folder = CacheFolder()
    metrics = Metrics(hosts)
    addon = ImagePolicy(folder, metrics)
    routes = Routes(hosts)
    with taddons.context(CommonOptions(), folder, hosts, routes, addon) as tctx:
        tctx.options.update(cache_dir=str(tmp_path))
        yield tctx, (routes, addon), metrics
        folder.done()


def flow(path: str, host: str = HUB) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", path=path.encode(), content=b""))
    f.client_conn.sni = host  # intercepted for the registry it goes to
    return f


async def asked(addons: tuple[Routes, ImagePolicy], path: str, host: str = HUB) -> http.HTTPFlow:
    """The request as mitmproxy hooks it: parsed to its route, then judged."""
    routes, policy = addons
    f = flow(path, host)
    routes.requestheaders(f)
    await policy.request(f)
    return f


def refused_by(f: http.HTTPFlow) -> int | None:
    """The status of the policy's own answer; None when it let the request through."""
    return f.response.status_code if f.response else None


@pytest.mark.parametrize(
    "deny, path, refused",
    [
        (["docker.io/library/*"], "/v2/library/alpine/manifests/3.20", True),
        (["docker.io/library/*"], f"/v2/library/alpine/blobs/{DIGEST}", True),
        (["docker.io/library/*"], "/v2/acme/app/manifests/1", False),
        (["*:latest"], "/v2/library/alpine/manifests/latest", True),
        (["*:latest"], "/v2/library/alpine/manifests/3.20", False),
        (["*:latest"], f"/v2/library/alpine/manifests/{DIGEST}", False),  # a digest names no tag
        (["docker.io/library/alpine:3.*"], "/v2/library/alpine/manifests/3.19", True),
        (["docker.io/library/alpine:3.*"], f"/v2/library/alpine/blobs/{DIGEST}", False),
        (["ghcr.io/*"], "/v2/library/alpine/manifests/1", False),
    ],
)
async def test_deny(policy, deny, path, refused):
    tctx, addon, metrics = policy
    tctx.options.update(deny_images=deny)
    f = await asked(addon, path)
    if not refused:
        assert f.response is None
        return
    assert f.response is not None, "not refused"
    assert f.response.status_code == 403
    [error] = json.loads(f.response.content)["errors"]
    assert error["code"] == "DENIED" and repr(deny[0]) in error["message"]
    assert metrics.registry.get_sample_value("hubcache_denied_total", {"rule": f"deny_images rule {deny[0]!r}"}) == 1
    [entry] = MissJournal(tctx.options.cache_dir + "/misses.jsonl").entries()
    assert (entry["outcome"], entry["reason"]) == ("denied", f"deny_images rule {deny[0]!r}")


async def test_allow_names_what_may_be_pulled_and_deny_wins(policy):
    tctx, addon, _ = policy
    tctx.options.update(allow_images=["docker.io/library/*", "ghcr.io/acme/app:1.*"])
    assert (await asked(addon, "/v2/library/alpine/manifests/3.20")).response is None
    assert (await asked(addon, f"/v2/library/alpine/blobs/{DIGEST}")).response is None
    assert (await asked(addon, "/v2/acme/app/manifests/1.2", host="ghcr.io")).response is None
    assert (await asked(addon, f"/v2/acme/app/manifests/{DIGEST}", host="ghcr.io")).response is None  # its repository is allowed
    assert refused_by(await asked(addon, "/v2/acme/app/manifests/2.0", host="ghcr.io")) == 403
    refused = await asked(addon, "/v2/evil/app/manifests/1")
    assert refused_by(refused) == 403 and "allow_images" in refused.response.text
    tctx.options.update(deny_images=["docker.io/library/alpine"])
    assert refused_by(await asked(addon, "/v2/library/alpine/manifests/3.20")) == 403


async def test_only_registry_pulls_are_judged(policy):
    tctx, addon, _ = policy
    tctx.options.update(deny_images=["*"])
    assert (await asked(addon, "/v2/")).response is None  # the version check
    assert (await asked(addon, "/v2/library/alpine/tags/list")).response is None
    assert (await asked(addon, "/v2/library/alpine/manifests/1", host="example.com")).response is None  # not a registry
    spoofed = flow("/v2/library/alpine/manifests/1")
    spoofed.client_conn.sni = "example.com"  # a tunnel elsewhere that names the registry in Host
    routes, judge = addon
    routes.requestheaders(spoofed)
    await judge.request(spoofed)
    assert spoofed.response is None
    assert (await asked(addon, "/v2/library/alpine/manifests/1")).response.status_code == 403


@pytest.mark.parametrize("bad", ["", "alpine", "docker.io/library/alpine;rm", "docker.io/library/(x)"])
def test_bad_patterns_are_refused_in_one_line(policy, bad):
    tctx, _, _ = policy
    with pytest.raises(exceptions.OptionsError, match="deny_images"):
        tctx.options.update(deny_images=[bad])

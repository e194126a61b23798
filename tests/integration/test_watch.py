"""Keep fresh, with the real pieces: the distribution registry as upstream (its access log says
what hubcache asked of it), a real hubcache process with a short `watch_interval`, and skopeo.

A watched tag retagged upstream is fetched by the watch within an interval, and then pulled with
upstream gone, 0 bytes from upstream; an unchanged tag costs upstream one HEAD per interval and
nothing else; the watch pauses while upstream is down and resumes once it is back; a pattern picks
up a tag pushed later."""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.request
import uuid

import pytest

from support.clients import skopeo_copy
from support.images import build_image
from support.registry import REGISTRY_NAME, push

from .test_airgap import hubcache_cli
from .test_fleet import bucket, node  # noqa: F401 (its fixtures: nodes sharing a bucket)

INTERVAL = 2  # seconds: short, so that a test waits a few rounds at most
DEADLINE = 90.0  # seconds any awaited event may take on a loaded machine


def wait_for(condition, what: str, proxy, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen\n{proxy.log_text()[-4000:]}"
        time.sleep(0.1)
    return found


def checks(proxy, registry: str = REGISTRY_NAME) -> float:
    with urllib.request.urlopen(proxy.status_url + "metrics", timeout=10) as answer:
        found = re.search(r'^hubcache_watch_checks_total\{registry="' + re.escape(registry) + r'"\} (\S+)$', answer.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


def metric(proxy, name: str) -> float:
    with urllib.request.urlopen(proxy.status_url + "metrics", timeout=10) as answer:
        found = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", answer.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def images(layouts):
    """Two different small single-platform images, to push one after the other under one tag."""
    return [build_image(layouts / f"watch{n}", "1", [300_000, 200_000], seed=f"watch{n}") for n in (1, 2)]


def test_a_retagged_image_is_fetched_before_anyone_asks_and_upstream_sees_heads_only_meanwhile(
    registry, hubcache, images, tmp_path
):
    repository = f"watch/retag{uuid.uuid4().hex[:8]}"
    ref = f"{REGISTRY_NAME}/{repository}:1"
    first, second = images
    push(registry, f"{repository}:1", first)
    proxy = hubcache(watch=[ref], watch_interval=INTERVAL)
    wait_for(lambda: f"watch: {ref} is now {first.top.digest}" in proxy.log_text(), "the first fetch", proxy)

    # Unchanged: each round is one HEAD upstream, and nothing else.
    registry.settle()
    registry.reset_requests()
    before = checks(proxy)
    wait_for(lambda: checks(proxy) >= before + 3, "three more checks", proxy)
    registry.settle()
    asked = [(r.method, r.path) for r in registry.requests()]
    assert asked and set(asked) == {("HEAD", f"/v2/{repository}/manifests/1")}, asked

    # Retagged upstream: fetched within an interval or so, by the watch, through the fill path.
    registry.reset_requests()
    push(registry, f"{repository}:1", second)
    pushed = time.monotonic()
    wait_for(lambda: f"watch: {ref} is now {second.top.digest}" in proxy.log_text(), "the fetch of the new digest", proxy)
    assert time.monotonic() - pushed < DEADLINE
    wait_for(lambda: re.search(rf"pull {re.escape(REGISTRY_NAME)}/{repository}@{second.top.digest} by watch: 3 blobs", proxy.log_text()), "the watch's pull line", proxy)
    registry.settle()
    gets = sorted(r.path for r in registry.requests() if r.method == "GET")
    wanted = [second.top.digest] + [blob.digest for blob in second.platforms[0].blobs[1:]]
    assert gets == sorted(f"/v2/{repository}/{'manifests' if d == second.top.digest else 'blobs'}/{d}" for d in wanted), gets
    assert metric(proxy, "hubcache_watch_fetched_bytes_total") > 500_000

    # Upstream gone: the first pull after the change is a hit, 0 bytes from upstream.
    registry.stop()
    out = tmp_path / "pulled"
    pulled = skopeo_copy(f"docker://{ref}", out, proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr + proxy.log_text()[-3000:]
    assert "sha256:" + hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == second.top.digest
    wait_for(lambda: re.search(rf"pull {re.escape(ref)} by 127\.0\.0\.1: 3 blobs, .* from cache, 0 B from upstream", proxy.log_text()), "a pull served from the cache alone", proxy)
    assert metric(proxy, "hubcache_watch_served_first_total") == 1, "skopeo's one tag request"
    assert metric(proxy, "hubcache_upstream_pulls_saved_total") >= 1

    # While upstream is down the watch pauses; once it is back, it checks again.
    wait_for(lambda: f"watch: {REGISTRY_NAME} paused (upstream down)" in proxy.log_text(), "the pause", proxy)
    registry.start()
    wait_for(lambda: f"watch: {REGISTRY_NAME} is checked again" in proxy.log_text(), "the resumption", proxy)
    resumed = checks(proxy)
    wait_for(lambda: checks(proxy) > resumed, "a check after the outage", proxy)

    with urllib.request.urlopen(proxy.status_url + "status.json", timeout=10) as answer:
        shown = {w["image"]: w for w in json.load(answer)["watch"]}
    assert shown[ref]["digest"] == second.top.digest and shown[ref]["changed"] > 0, shown
    with urllib.request.urlopen(proxy.status_url + "status.json", timeout=10) as answer:
        assert json.load(answer)["watch_served_first"] == 1

    listed = hubcache_cli("watch", "--cache-dir", proxy.cache_dir, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert repository in listed.stdout and second.top.digest[:19] in listed.stdout, listed.stdout


def test_a_pattern_picks_up_a_tag_pushed_later(registry, hubcache, images):
    repository = f"watch/pattern{uuid.uuid4().hex[:8]}"
    first, second = images
    push(registry, f"{repository}:v1", first)
    push(registry, f"{repository}:other", first)
    proxy = hubcache(watch=[f"{REGISTRY_NAME}/{repository}:v*"], watch_interval=INTERVAL)
    wait_for(lambda: f"watch: {REGISTRY_NAME}/{repository}:v1 is now {first.top.digest}" in proxy.log_text(), "v1 fetched", proxy)
    push(registry, f"{repository}:v2", second)
    wait_for(lambda: f"watch: {REGISTRY_NAME}/{repository}:v2 is now {second.top.digest}" in proxy.log_text(), "v2 fetched", proxy)
    assert f"{repository}:other" not in proxy.log_text()


def test_only_the_listed_platforms_are_fetched(registry, hubcache, multi_image):
    """An index watched for one platform: upstream sees the watch's HEAD, then GETs of the index,
    that platform's manifest and its blobs, and nothing of the other platform (and, the first time
    hubcache meets the repository, its anonymous HEAD that learns whether it is public: cache/access.py)."""
    repository = f"watch/multi{uuid.uuid4().hex[:8]}"
    push(registry, f"{repository}:1", multi_image)
    registry.settle()
    registry.reset_requests()
    ref = f"{REGISTRY_NAME}/{repository}:1"
    arm = multi_image.platform("linux/arm64/v8")
    proxy = hubcache(watch=[f"{ref}@linux/arm64"], watch_interval=3600)
    wait_for(lambda: f"watch: {ref} is now {multi_image.index_digest}" in proxy.log_text(), "the fetch", proxy)
    registry.settle()
    asked = sorted((r.method, r.path) for r in registry.requests())
    probes = [(m, p) for m, p in asked if m == "HEAD" and p != f"/v2/{repository}/manifests/1"]
    assert len(probes) == 1 and probes[0][1].partition("/manifests/")[2] in (multi_image.index_digest, arm.manifest.digest)
    wanted = [("HEAD", f"/v2/{repository}/manifests/1"), *probes]
    wanted += [("GET", f"/v2/{repository}/manifests/{d}") for d in (multi_image.index_digest, arm.manifest.digest)]
    wanted += [("GET", f"/v2/{repository}/blobs/{blob.digest}") for blob in arm.blobs[1:]]
    assert asked == sorted(wanted), asked


def test_two_fleet_nodes_check_a_watched_tag_once_between_them(registry, node, redis, images):  # noqa: F811
    """Node a checks and fetches; node b, started in the same interval, finds the lock taken and
    asks upstream nothing: the registry sees one HEAD of the tag for the two of them."""
    repository = f"watch/fleet{uuid.uuid4().hex[:8]}"
    ref = f"{REGISTRY_NAME}/{repository}:1"
    push(registry, f"{repository}:1", images[0])
    options = {"watch": [ref], "watch_interval": 3600, "fleet_lock": redis.start().url}
    a = node("a", **options)
    wait_for(lambda: f"watch: {ref} is now {images[0].top.digest}" in a.log_text(), "node a's fetch", a)
    b = node("b", **options)
    state = b.cache_dir / "watch.json"
    wait_for(lambda: state.exists() and "checked by another node" in state.read_text(), "node b's round", b)
    registry.settle()
    heads = [r for r in registry.requests() if r.method == "HEAD" and r.path == f"/v2/{repository}/manifests/1"]
    assert len(heads) == 1, heads


def test_docker_hub_heads_cost_no_pulls_and_few_pulls_left_hold_the_fetch(registry, dockerhub, hubcache, images, tmp_path):
    """A private repository on the Docker Hub double, watched with the registry_settings login:
    the watch's HEADs (with a token the login asked for) cost no pull; with no pulls left, a moved
    tag waits (said once) and is fetched once pulls are back."""
    name = f"library/watchhub{uuid.uuid4().hex[:8]}"
    ref = f"docker.io/{name}:1"
    first, second = images
    push(registry, f"{name}:1", first)
    dockerhub.private_repos[name] = ("alice", "s3cret")
    login = tmp_path / "alice.login"
    login.write_text("alice:s3cret\n")
    try:
        proxy = hubcache(watch=[ref], watch_interval=INTERVAL, registry_settings=[f"registry-1.docker.io:credentials=@{login}"])
        wait_for(lambda: f"watch: {ref} is now {first.top.digest}" in proxy.log_text(), "the first fetch", proxy)
        assert any(r.kind == "token" and r.had_authorization for r in dockerhub.requests()), "the login went to the token realm"
        pulls = dockerhub.manifest_gets
        assert pulls == 1, "the manifest, by digest"
        before = checks(proxy, "docker.io")
        wait_for(lambda: checks(proxy, "docker.io") >= before + 3, "three more checks", proxy)
        assert dockerhub.manifest_gets == pulls, "HEADs are free"

        dockerhub.rate_limit = pulls  # none left
        push(registry, f"{name}:1", second)
        said = "watch: docker.io has 0 pulls left; watch fetches wait until it has more"
        wait_for(lambda: said in proxy.log_text(), "the rate-limit note", proxy)
        held = checks(proxy, "docker.io")
        wait_for(lambda: checks(proxy, "docker.io") >= held + 2, "two more checks", proxy)
        assert proxy.log_text().count(said) == 1 and dockerhub.manifest_gets == pulls
        assert f"is now {second.top.digest}" not in proxy.log_text()

        dockerhub.rate_limit = 100
        wait_for(lambda: f"watch: {ref} is now {second.top.digest}" in proxy.log_text(), "the fetch once pulls are back", proxy)
        assert dockerhub.manifest_gets == pulls + 1
    finally:
        del dockerhub.private_repos[name]

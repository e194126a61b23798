"""A cached image pulls whatever part of upstream is down (docs/how-it-works.md, "When upstream is
down"): real skopeo and dockerd through hubcache, against the Docker Hub double with its fault
switches, or with its names sent to a closed port or to no address at all."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from hubcache.upstream.circuits import PROBE_AGENT
from support.clients import Dockerd, pulled_blobs, skopeo_copy
from support.dockerhub import ALL_HOSTS, AUTH_HOST
from support.procs import free_port
from support.registry import REGISTRY_NAME

HUB = "registry-1.docker.io"
REF = f"docker://{HUB}/library/multi:1"
LIMIT = 3  # revalidate_timeout: the most an outage may cost


def mapping(dockerhub, registry, **elsewhere: str) -> list[str]:
    """upstream_map with some Docker Hub names sent elsewhere (None: left out, so unresolvable)."""
    entries = [f"{REGISTRY_NAME}=127.0.0.1:{registry.port}"]
    for host in ALL_HOSTS:
        target = elsewhere.get(host, f"127.0.0.1:{dockerhub.port}")
        if target:
            entries.append(f"{host}={target}")
    return entries


def closed() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


def everything_hangs(dockerhub) -> None:
    for kind in ("ping", "token", "manifest", "blob", "cdn"):
        dockerhub.hang_next(kind, 30, count=200)


OUTAGES: dict[str, Callable] = {
    "token-host-refusing": lambda hub, reg: {"upstream_map": mapping(hub, reg, **{AUTH_HOST: closed()})},
    "token-host-503": lambda hub, reg: hub.fail_next("token", 503, count=200),
    "token-host-429": lambda hub, reg: hub.fail_next("token", 429, count=200),
    "token-host-hanging": lambda hub, reg: hub.hang_next("token", 30, count=200),
    "everything-hanging": lambda hub, reg: everything_hangs(hub),
    "everything-refusing": lambda hub, reg: {"upstream_map": mapping(hub, reg, **{h: closed() for h in ALL_HOSTS})},
    "no-dns-for-docker-hub": lambda hub, reg: {"upstream_map": mapping(hub, reg, **{h: "" for h in ALL_HOSTS})},
    "cdn-down": lambda hub, reg: hub.fail_next("cdn", 503, count=200),
}


def pull(proxy, into) -> float:
    started = time.monotonic()
    result = skopeo_copy(REF, into, proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert result.returncode == 0, result.stderr
    return time.monotonic() - started


def wait_for_line(proxy, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log_text():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{proxy.log_text()[-3000:]}"
        time.sleep(0.1)


@pytest.mark.parametrize("outage", OUTAGES)
def test_a_cached_image_pulls_through_an_outage(hubcache, dockerhub, registry, multi_image, outage, tmp_path):
    proxy = hubcache(revalidate_timeout=LIMIT)
    warm = [pull(proxy, tmp_path / "cold"), pull(proxy, tmp_path / "warm")][1]

    options = OUTAGES[outage](dockerhub, registry)
    if options:
        proxy.stop()
        proxy.start(**options)
    hanging = {"token-host-hanging": {"token"}, "everything-hanging": {"ping", "token", "manifest", "blob"}}.get(outage, set())
    begun = len(dockerhub.begun())
    first = pull(proxy, tmp_path / "first")
    in_first = [r for r in dockerhub.begun()[begun:] if not _probe(r)]
    second_begun = len(dockerhub.begun())
    second = pull(proxy, tmp_path / "second")
    in_second = [r for r in dockerhub.begun()[second_begun:] if not _probe(r)]
    print(f"\n{outage}: warm {warm:.2f}s; in the outage, first pull {first:.2f}s, second {second:.2f}s")
    assert not any(kind == "cdn" for _, _, kind, _ in in_first + in_second), "a cached blob needs no CDN"
    # The first pull waits on a hanging host once; the second on none.
    waited = [host for host, _, kind, _ in in_first if kind in hanging]
    assert all(waited.count(host) == 1 for host in waited), in_first
    assert not [r for r in in_second if r[2] in hanging], "the second pull waited on a host known to be down"
    if hanging:
        # One line when a host goes down (and one for the request that found it), none per request.
        log = proxy.log_text()
        assert log.count(" is down (") == 1, log[-3000:]
        assert log.count("serving the cached") + log.count("answering /v2/ from the cache") <= 1, log[-3000:]


def _probe(request: tuple[str, str, str, str]) -> bool:
    """hubcache's probe of a host that is down (upstream/circuits.py says what it is by its User-Agent)."""
    return request[3] == PROBE_AGENT


def test_recovery_is_noticed_without_a_restart(hubcache, dockerhub, multi_image, tmp_path):
    proxy = hubcache(revalidate_timeout=LIMIT)
    pull(proxy, tmp_path / "cold")
    everything_hangs(dockerhub)
    pull(proxy, tmp_path / "outage")
    # The outage pull's /v2/ check is answered as upstream answered the cold pull's (cache/pings.py):
    # the first host it asks, and finds down, is the token host.
    wait_for_line(proxy, f"{AUTH_HOST} is down")
    dockerhub.reset()  # the faults end
    wait_for_line(proxy, f"{AUTH_HOST} is back")
    dockerhub.reset()
    pull(proxy, tmp_path / "after")
    assert [r.method for r in dockerhub.requests(kind="manifest")] == ["HEAD"], "the tag is revalidated again"
    metrics = _get(proxy.status_url + "metrics")
    assert f'hubcache_upstream_up{{host="{HUB}"}} 1.0' in metrics


def test_an_open_circuit_shows_in_the_metrics_and_the_status_page(hubcache, dockerhub, registry, multi_image, tmp_path):
    import json

    proxy = hubcache(revalidate_timeout=LIMIT)
    pull(proxy, tmp_path / "cold")
    proxy.stop()
    proxy.start(upstream_map=mapping(dockerhub, registry, **{h: closed() for h in ALL_HOSTS}))
    pull(proxy, tmp_path / "outage")
    wait_for_line(proxy, f"{HUB} is down")
    assert f'hubcache_upstream_up{{host="{HUB}"}} 0.0' in _get(proxy.status_url + "metrics")
    status = json.loads(_get(proxy.status_url + "status.json"))
    assert {u["host"]: u["up"] for u in status["upstream"]}.get(HUB) is False


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


@pytest.mark.dockerd
@pytest.mark.skipif(os.geteuid() != 0, reason="dockerd needs root")
@pytest.mark.parametrize("outage", ["token-host-refusing", "everything-hanging"])
def test_dockerd_pulls_a_cached_image_through_an_outage(hubcache, dockerhub, registry, multi_image, outage, tmp_path):
    proxy = hubcache(revalidate_timeout=LIMIT)
    daemon = Dockerd(tmp_path / "dockerd")
    try:
        daemon.start(proxy.url, proxy.client_bundle)
        assert daemon.pull("multi:1").returncode == 0
        daemon.wipe()
        options = OUTAGES[outage](dockerhub, registry)
        if options:
            proxy.stop()
            proxy.start(**options)
        daemon.start(proxy.url, proxy.client_bundle)
        for _ in range(2):
            result = daemon.pull("multi:1")
            assert result.returncode == 0, result.stdout + result.stderr
            daemon.wipe()
            daemon.start(proxy.url, proxy.client_bundle)
    finally:
        daemon.close()


CLIENTS = 64
ROUNDS = 2


def test_sixty_four_clients_pull_warm_with_upstream_up_and_down(hubcache, dockerhub, multi_image, tmp_path):
    """A bounded warm soak: 64 skopeo clients, two rounds each with upstream up, then two with
    every Docker Hub host hanging. Every client keeps its own log; no pull may fail."""
    from concurrent.futures import ThreadPoolExecutor

    proxy = hubcache(revalidate_timeout=LIMIT)
    pull(proxy, tmp_path / "cold")
    amd64 = multi_image.platform("linux/amd64")
    wanted = {amd64.config.digest, *(layer.digest for layer in amd64.layers)}

    def client(phase: str, n: int) -> list[str]:
        failures = []
        log = tmp_path / f"{phase}-client-{n}.log"
        for round_ in range(ROUNDS):
            dest = tmp_path / f"{phase}-{n}-{round_}"
            result = skopeo_copy(REF, dest, proxy=proxy.url, ca_bundle=proxy.client_bundle, timeout=120)
            with open(log, "a") as f:
                f.write(f"round {round_}: exit {result.returncode}\n{result.stderr}\n")
            if result.returncode != 0:
                failures.append(f"{log}: {result.stderr[-300:]}")
            elif pulled_blobs(dest) != wanted:
                failures.append(f"{log}: pulled {pulled_blobs(dest)}")
        return failures

    for phase in ("up", "down"):
        if phase == "down":
            everything_hangs(dockerhub)
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            failures = [f for found in pool.map(lambda n, phase=phase: client(phase, n), range(CLIENTS)) for f in found]
        print(f"\n{CLIENTS} clients x {ROUNDS} warm pulls with upstream {phase}: {time.monotonic() - started:.1f}s, {len(failures)} failed")
        assert failures == [], failures[:3]
        assert len(list(tmp_path.glob(f"{phase}-client-*.log"))) == CLIENTS
    dockerhub.reset()

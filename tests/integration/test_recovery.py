"""After an outage, the first cold pull goes upstream (docs/how-it-works.md, "When upstream is
down"), through the proxy and through the mirror, and no client of a registry's name on another port
can make that registry look down to the others (docs/security.md). Real skopeo through a real
hubcache, against the Docker Hub double with every Docker Hub host hanging for the outage."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support.clients import skopeo_copy
from support.dockerhub import AUTH_HOST
from support.images import build_image
from support.mirror import skopeo_via_mirror, wait_for_mirror
from support.procs import free_port
from support.registry import push

HUB = "registry-1.docker.io"
LIMIT = 3  # revalidate_timeout
LONGEST = 4  # upstream_retry_max: the backoff reaches it at the first probe that fails
KINDS = ("ping", "token", "manifest", "blob", "cdn", "other")
# The outages: 15 s, and one in which the backoff reaches its longest interval (the first
# background probe 2 s after the circuit opened, hanging LIMIT s, then LONGEST s between probes,
# each hanging LIMIT s), held for a few probes at that interval.
OUTAGES = {"15s": 15.0, "backoff-at-its-longest": 2 + LIMIT + 3 * (LONGEST + LIMIT)}


@pytest.fixture(scope="module")
def cold_images(registry, layouts):
    """Small images nothing has pulled yet, one per pull that must be cold."""
    names = [f"cold{n}" for n in range(20)]
    for n, name in enumerate(names):
        push(registry, f"library/{name}:1", build_image(layouts / name, "1", [300_000, 100_000], seed=f"recovery-{n}"))
    return iter(names)


def everything_hangs(dockerhub) -> None:
    for kind in KINDS:
        dockerhub.hang_next(kind, 120, count=100_000)


def via_proxy(proxy, name: str, dest: Path):
    return skopeo_copy(f"docker://{HUB}/library/{name}:1", dest, proxy=proxy.url, ca_bundle=proxy.client_bundle, timeout=120)


def via_mirror(proxy, name: str, dest: Path, tmp_path: Path):
    return skopeo_via_mirror(proxy, f"docker://docker.io/library/{name}:1", dest, tmp_path)


def cached(proxy, name: str) -> bool:
    """The image's manifests and blobs were filled into the cache (the client did not go around it)."""
    outcomes = {(e["kind"], e["outcome"]) for e in proxy.journal() if e["repository"] == f"library/{name}"}
    return ("manifest", "filled") in outcomes and ("blob", "filled") in outcomes


def timed(pull, *args):
    started = time.monotonic()
    result = pull(*args)
    return result, time.monotonic() - started


@pytest.mark.parametrize("outage", OUTAGES)
@pytest.mark.parametrize("way", ["proxy", "mirror"])
def test_the_first_cold_pull_after_an_outage_succeeds_and_is_cached(hubcache, dockerhub, multi_image, cold_images, way, outage, tmp_path):
    mirror = f"127.0.0.1:{free_port()}"
    proxy = hubcache(revalidate_timeout=LIMIT, upstream_retry_max=LONGEST, mirror_listen=mirror)
    proxy.mirror = mirror
    wait_for_mirror(proxy)

    def pull(name: str, dest: str):
        if way == "proxy":
            return via_proxy(proxy, name, tmp_path / dest)
        return via_mirror(proxy, name, tmp_path / dest, tmp_path)

    assert pull("multi", "warm-up").returncode == 0
    warm_before, warm_time = timed(pull, "multi", "warm-before")
    assert warm_before.returncode == 0, warm_before.stderr

    everything_hangs(dockerhub)
    started = time.monotonic()
    first, first_time = timed(pull, "multi", "first-in-outage")
    assert first.returncode == 0, first.stderr
    warm, warm_in_outage = timed(pull, "multi", "warm-in-outage")
    assert warm.returncode == 0, warm.stderr
    absent = next(cold_images)
    cold, cold_time = timed(pull, absent, "cold-in-outage")
    assert cold.returncode != 0, "nothing upstream to pull it from"
    assert not cached(proxy, absent)
    # The outage lasts what it lasts: nothing to wait for, the scenario's own length.
    time.sleep(max(0.0, OUTAGES[outage] - (time.monotonic() - started)))
    dockerhub.reset()  # upstream is back

    name = next(cold_images)
    after, after_time = timed(pull, name, "first-after")
    print(
        f"\n{way}, {outage} outage: warm {warm_time:.1f}s; during it first pull {first_time:.1f}s, warm {warm_in_outage:.1f}s,"
        f" cold fails in {cold_time:.1f}s; first cold pull after it: {'ok' if after.returncode == 0 else 'FAILED'} in {after_time:.1f}s"
    )
    assert after.returncode == 0, after.stderr
    assert cached(proxy, name), proxy.journal()
    # The first host the outage pull found down is the token host, or the registry once the
    # remembered /v2/ answer (cache/pings.py) has aged out: each one found down is noticed back.
    down = set(re.findall(r"hubcache: (\S+) is down \(", proxy.log_text()))
    assert down and down <= {HUB, AUTH_HOST}, proxy.log_text()[-3000:]
    for host in down:  # the proxy may write the line a moment after the pull it came with
        deadline = time.monotonic() + 30
        while f"hubcache: {host} is back" not in proxy.log_text():
            assert time.monotonic() < deadline, f"{host} was not noticed back:\n{proxy.log_text()[-3000:]}"
            time.sleep(0.1)


def hammer(proxy, ports: list[int], stop: threading.Event, codes: list[int], rounds: int = 20) -> None:
    """curl's requests for a manifest on other ports of Docker Hub's registry name, round after
    round until `stop` (at most `rounds`): each one's HTTP status (0 for none) added to `codes`
    as it comes."""
    for _ in range(rounds):
        if stop.is_set():
            break
        for port in ports:
            done = subprocess.run(
                ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url,
                 "--cacert", str(proxy.ca_cert), f"https://{HUB}:{port}/v2/library/multi/manifests/1"],
                capture_output=True, text=True, timeout=30,
            )
            codes.append(int(done.stdout or 0))


def test_a_client_hammering_other_ports_of_a_registrys_name_cannot_fail_another_clients_cold_pull(hubcache, dockerhub, multi_image, cold_images, tmp_path):
    proxy = hubcache(revalidate_timeout=LIMIT)
    closed = free_port()  # nothing listens there
    ports = [1, closed, 8443]
    stop = threading.Event()
    codes: list[int] = []
    attacker = threading.Thread(target=hammer, args=(proxy, ports, stop, codes))
    attacker.start()
    try:
        # The attack runs before and during the cold pulls.
        deadline = time.monotonic() + 30
        while len(codes) < len(ports) and time.monotonic() < deadline and attacker.is_alive():
            time.sleep(0.05)
        assert codes, "the attacker sent nothing"
        for n in range(2):
            name = next(cold_images)
            result = via_proxy(proxy, name, tmp_path / f"cold-{n}")
            assert result.returncode == 0, result.stderr
            assert cached(proxy, name)
    finally:
        stop.set()
        attacker.join(timeout=120)
    # Ordinary tunnels to where the name leads (here nowhere): nothing answered them as a registry.
    assert codes and set(codes) == {0}, codes
    assert " is down (" not in proxy.log_text(), proxy.log_text()[-3000:]
    # The legitimate port still works: a warm pull of what the attacker asked for.
    assert via_proxy(proxy, "multi", tmp_path / "multi").returncode == 0


# The outages of test_resilience.py that the Docker Hub double can end without a restart (a
# restart forgets every circuit), each held as long as the one the issue found: 12 s.
ENDING = {
    "token-host-503": lambda hub: hub.fail_next("token", 503, count=100_000),
    "token-host-429": lambda hub: hub.fail_next("token", 429, count=100_000),
    "token-host-hanging": lambda hub: hub.hang_next("token", 120, count=100_000),
    "everything-hanging": everything_hangs,
    "cdn-down": lambda hub: hub.fail_next("cdn", 503, count=100_000),
}
HELD = 12.0


@pytest.mark.parametrize("outage", ENDING)
def test_the_first_cold_pull_right_after_each_outage_of_the_table(hubcache, dockerhub, multi_image, cold_images, outage, tmp_path):
    proxy = hubcache(revalidate_timeout=LIMIT)
    assert via_proxy(proxy, "multi", tmp_path / "warm-up").returncode == 0
    ENDING[outage](dockerhub)
    started = time.monotonic()
    during = via_proxy(proxy, "multi", tmp_path / "during")
    assert during.returncode == 0, during.stderr
    time.sleep(max(0.0, HELD - (time.monotonic() - started)))  # the outage's own length
    dockerhub.reset()
    name = next(cold_images)
    after, seconds = timed(via_proxy, proxy, name, tmp_path / "after")
    print(f"\n{outage}: first cold pull after it {'ok' if after.returncode == 0 else 'FAILED'} in {seconds:.1f}s")
    assert after.returncode == 0, after.stderr
    assert cached(proxy, name)

"""What operators see: the metrics endpoint, the status page (in a real headless Chromium) and the
log line of each pull, from a real hubcache that skopeo pulled through twice (cold, then warm)."""

from __future__ import annotations

import html
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.browser import rendered_dom, screenshot
from support.clients import skopeo_copy
from support.hubcache import Hubcache, upstream_options

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
IMAGE = "docker.io/library/multi:1"
PULL_LINE = re.compile(r"pull (\S+) by (\S+): (\d+) blobs, (.+?) from cache, (.+?) from upstream, ([\d.]+)s")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def metrics(proxy) -> dict[tuple[str, tuple], float]:
    text = fetch(proxy.status_url + "metrics").decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def pull_lines(proxy, count: int, timeout: float = 30) -> list[tuple]:
    """The pull log lines, once `count` are there (a pull ends a few quiet seconds after its last byte)."""
    deadline = time.monotonic() + timeout
    while len(found := PULL_LINE.findall(proxy.log_text())) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def eventually(check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return result


def size_text(size: float) -> str:
    """The page's own format (status.html `size`)."""
    units = ["B", "kB", "MB", "GB", "TB"]
    i = 0
    while size >= 1000 and i < len(units) - 1:
        size /= 1000
        i += 1
    return f"{size:.1f} {units[i]}" if i else f"{size:.0f} {units[i]}"


def element_text(dom: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>(.*?)</', dom, re.S)
    assert found, f"#{element_id} is not on the page"
    return html.unescape(found.group(1)).strip()


@pytest.fixture(scope="module")
def pulled(request, tmp_path_factory, ca, registry, dockerhub, multi_image):
    """One proxy, pulled through cold and then warm; it keeps running for every test here."""
    workdir = tmp_path_factory.mktemp("status")
    dockerhub.reset()
    proxy = Hubcache(workdir / "hubcache", ca.cert_path, upstream_options(registry, dockerhub)).start()
    try:
        for name in ("cold", "warm"):
            result = skopeo_copy("docker://registry-1.docker.io/library/multi:1", workdir / name, proxy=proxy.url, ca_bundle=proxy.client_bundle)
            assert result.returncode == 0, result.stderr
        # What Docker Hub's last answer said was left of its rate limit (tests may reset it later).
        proxy.ratelimit_left = dockerhub.rate_limit - dockerhub.manifest_gets
        yield proxy, multi_image.platform("linux/amd64")
    finally:
        proxy.stop()


def test_one_log_line_per_pull_says_where_the_bytes_came_from(pulled):
    proxy, image = pulled
    lines = pull_lines(proxy, 2)
    assert len(lines) == 2, proxy.log_text()[-3000:]
    blob_bytes = image.config.size + sum(layer.size for layer in image.layers)
    blobs = str(1 + len(image.layers))
    (cold_image, client, cold_blobs, cold_cache, cold_upstream, _), (warm_image, _, warm_blobs, warm_cache, warm_upstream, _) = lines
    assert cold_image == warm_image == IMAGE and client == "127.0.0.1"
    assert cold_blobs == warm_blobs == blobs
    assert cold_cache == "0 B" and warm_upstream == "0 B"
    # Blobs plus the two manifests (index and platform), each a few hundred bytes.
    for text in (cold_upstream, warm_cache):
        number, unit = text.split()
        assert unit == "MB" and abs(float(number) * 1e6 - blob_bytes) < 0.06e6, text


def test_metrics_count_hits_misses_bytes_and_the_rate_limit(pulled, dockerhub):
    proxy, image = pulled
    blobs = 1 + len(image.layers)
    blob_bytes = image.config.size + sum(layer.size for layer in image.layers)
    pull_lines(proxy, 2)  # every transfer reported
    samples = metrics(proxy)
    assert value(samples, "hubcache_requests_total", kind="blob", result="miss") == blobs
    assert value(samples, "hubcache_requests_total", kind="blob", result="hit") == blobs
    assert value(samples, "hubcache_requests_total", kind="manifest", result="hit") >= 2  # the warm index and platform manifest
    cache, streamed = value(samples, "hubcache_served_bytes_total", source="cache"), value(samples, "hubcache_served_bytes_total", source="upstream")
    assert blob_bytes <= cache < blob_bytes + 50_000
    assert blob_bytes <= streamed < blob_bytes + 50_000
    fetched = value(samples, "hubcache_upstream_bytes_total")
    assert blob_bytes <= fetched < blob_bytes + 50_000, "each blob came from upstream once"
    assert value(samples, "hubcache_upstream_requests_total", host="registry-1.docker.io", status="200") >= 2
    assert value(samples, "hubcache_fills_in_progress") == 0
    remaining = value(samples, "hubcache_ratelimit_remaining", host="registry-1.docker.io")
    assert remaining == proxy.ratelimit_left < dockerhub.rate_limit, "the last remaining count Docker Hub sent"
    assert value(samples, "hubcache_ratelimit_limit", host="registry-1.docker.io") == dockerhub.rate_limit
    # The store's figures are refreshed every few seconds.
    entries = eventually(lambda: (s := metrics(proxy)) and value(s, "hubcache_store_entries", type="blobs") == blobs and s)
    assert entries, "the store's figures were refreshed"
    assert value(entries, "hubcache_store_bytes") == blob_bytes
    assert value(entries, "hubcache_store_entries", type="tags") == 1
    # The event loop's lag probe runs: each wake-up is one observation.
    probed = value(entries, "hubcache_event_loop_lag_seconds_count")
    assert probed and probed > 0 and value(entries, "hubcache_event_loop_lag_max_seconds") is not None


def test_the_status_page_renders_the_figures_in_chromium(pulled):
    proxy, _ = pulled
    pull_lines(proxy, 2)
    status = eventually(lambda: (s := json.loads(fetch(proxy.status_url + "status.json"))) and s["store"]["blobs"] and s)
    assert status and status["top_images"] == [{"image": IMAGE, "pulls": 2}]
    assert {m["outcome"] for m in status["recent_misses"]} == {"filled"}
    assert "registry-1.docker.io" in {u["host"] for u in status["upstream"]}

    dom = rendered_dom(proxy.status_url)
    assert element_text(dom, "store-size") == size_text(status["store"]["blob_bytes"])
    assert element_text(dom, "hit-ratio") == f"{100 * status['requests']['hit_ratio']:.1f}%"
    assert element_text(dom, "served-cache") == size_text(status["served"]["cache"])
    assert IMAGE in dom.split('id="top-images"')[1].split("</tbody>")[0]
    assert "filled" in dom.split('id="recent-misses"')[1].split("</tbody>")[0]
    points = re.search(r'id="chart-line"[^>]*points="([^"]*)"', dom) or re.search(r'points="([^"]*)"[^>]*id="chart-line"', dom)
    assert points and points.group(1).strip(), "the hit ratio chart has points"
    shot = screenshot(proxy.status_url, ARTIFACTS / "status-page.png")
    assert shot.stat().st_size > 10_000, "a screenshot with something on it"


def test_the_listener_answers_only_its_pages(pulled):
    proxy, _ = pulled
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(proxy.status_url + "nothing-here")
    assert e.value.code == 404

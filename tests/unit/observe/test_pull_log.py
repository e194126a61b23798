"""The pull log: one line per pull, from the cache's reports and the blob server's."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy.test import tflow

from hubcache.mitm.flows import Source
from hubcache.observe import pull_log as pulls
from hubcache.observe.pull_log import PullLog
from hubcache.registry.protocol import Kind, Route

REGISTRY, REPO = "docker.io", "library/alpine"


def manifest(tag_or_digest: str) -> Route:
    return Route(Kind.MANIFEST, REGISTRY, REPO, tag_or_digest)


def blob(n: int) -> Route:
    return Route(Kind.BLOB, REGISTRY, REPO, f"sha256:{n:064x}")


def client(address: str = "10.0.0.7"):
    f = tflow.tflow()
    f.client_conn.peername = (address, 40000)
    return f


async def settle():
    await asyncio.sleep(0)


async def test_a_pull_is_one_line_with_its_bytes_by_source(monkeypatch, caplog):
    monkeypatch.setattr(pulls, "QUIET", 0.2)
    log = PullLog()
    log.running()
    caplog.set_level(logging.INFO, logger="hubcache.observe.pull_log")
    f = client()
    log.manifest(f, manifest("3.20"), Source.CACHE, 500)
    cached, streamed = log.transfer(f, blob(1), Source.CACHE), log.transfer(f, blob(2), Source.UPSTREAM)
    log.sent(cached, 1_000_000)
    await asyncio.sleep(1.5)
    assert "pull" not in caplog.text, "a transfer is still under way"
    log.sent(streamed, 2_500_000)
    await asyncio.sleep(1.5)
    [line] = [r.message for r in caplog.records if r.message.startswith("pull ")]
    assert line.startswith("pull docker.io/library/alpine:3.20 by 10.0.0.7: 2 blobs, 1.0 MB from cache, 2.5 MB from upstream, ")
    recent, popular = log.snapshot()
    assert [p.image for p in recent] == ["docker.io/library/alpine:3.20"] and popular == [("docker.io/library/alpine:3.20", 1)]
    log.done()


async def test_the_tag_asked_again_after_its_blobs_is_the_next_pull(caplog):
    log = PullLog()
    log.running()
    caplog.set_level(logging.INFO, logger="hubcache.observe.pull_log")
    f = client()
    for _ in range(2):
        log.manifest(f, manifest("3.20"), Source.CACHE, 500)
        log.manifest(f, manifest("sha256:" + "a" * 64), Source.CACHE, 400)  # by digest: the same pull
        log.sent(log.transfer(f, blob(1), Source.CACHE), 100)
        await settle()
    log.manifest(client("10.0.0.8"), manifest("3.20"), Source.CACHE, 500)  # another client: its own pull
    log.done()
    lines = [r.message for r in caplog.records if r.message.startswith("pull ")]
    assert len(lines) == 3
    assert lines[0].startswith("pull docker.io/library/alpine:3.20 by 10.0.0.7: 1 blobs, 1.0 kB from cache")
    assert any("by 10.0.0.8: 0 blobs" in line for line in lines)


async def test_a_report_after_the_loop_closed_is_dropped():
    log = PullLog()
    loop = asyncio.new_event_loop()
    log._loop = loop
    loop.close()
    log.sent("cache.1", 10)  # from the blob server's reader thread, at exit: no exception


def test_the_log_holds_pulls_unless_flow_lines_are_asked_for():
    from mitmproxy.addons.dumper import Dumper
    from mitmproxy.test import taddons

    def levels() -> set[int]:
        return {logging.getLogger(name).level for name in pulls.FLOW_LOGGERS}

    for name in pulls.FLOW_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    with taddons.context(Dumper(), PullLog()) as tctx:
        assert tctx.options.flow_detail == 1, "mitmdump's default"
        tctx.options.update(confdir="~/.mitmproxy")  # mitmproxy's first configure: the options it was given
        assert levels() == {logging.WARNING} and tctx.options.flow_detail == 0
        tctx.options.update(flow_lines=True)
        assert levels() == {logging.NOTSET} and tctx.options.flow_detail == 1
        tctx.options.update(flow_lines=False)
        assert levels() == {logging.WARNING} and tctx.options.flow_detail == 0
    with taddons.context(Dumper(), PullLog()) as tctx:
        tctx.options.update(flow_detail=3)  # the user's choice is kept
        tctx.options.update(flow_lines=True)
        assert tctx.options.flow_detail == 3
    for name in pulls.FLOW_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_counters_carry_no_created_series():
    from prometheus_client import generate_latest

    from hubcache.observe.metrics import Metrics
    from hubcache.proxy.interception import Interception

    metrics = Metrics(Interception())
    metrics.hit("blob")
    text = generate_latest(metrics.registry).decode()
    assert 'hubcache_requests_total{kind="blob",result="hit"} 1.0' in text
    assert "_created" not in text


def test_names_a_client_invents_never_reach_the_most_pulled():
    """Blobs upstream refused (404s passed through) are no pull of an image."""
    log = PullLog()
    for n in range(3 * pulls.POPULAR):
        log.blob(client(), Route(Kind.BLOB, REGISTRY, f"invented/name-{n}", f"sha256:{n:064x}"), Source.UPSTREAM, 120)
    log.done()
    assert log.snapshot()[1] == [] and len(log.popular) == 0


def test_the_most_pulled_are_bounded_and_keep_the_most_pulled(monkeypatch):
    monkeypatch.setattr(pulls, "POPULAR", 10)
    log = PullLog()
    for n in range(100):
        for name in ("library/alpine", f"org/image-{n}"):
            log.manifest(client(), Route(Kind.MANIFEST, REGISTRY, name, "1"), Source.CACHE, 500)
            log.done()
    assert len(log.popular) <= 20
    assert log.snapshot()[1][0] == ("docker.io/library/alpine:1", 100)

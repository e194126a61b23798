"""The circuit breaker per upstream host (addon/circuits.py): unit tests with mitmproxy's helpers.
The real outages are in tests/integration/test_resilience.py."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow, tutils

from hubcache.mitm.flows import Mark
from hubcache.observe.metrics import Metrics
from hubcache.options import CommonOptions
from hubcache.proxy.interception import Interception
from hubcache.upstream import client as upstream
from hubcache.upstream.circuits import FIRST_RETRY, TRIAL_INTERVAL, Circuits, level

HUB = "registry-1.docker.io"


@pytest.fixture
def circuits():
    hosts = Interception()
    metrics = Metrics(hosts)
    circuits = Circuits(hosts, metrics)
    with taddons.context(CommonOptions(), hosts, circuits) as tctx:
        tctx.options.revalidate_timeout = 3
        yield circuits, metrics


def own(url: str, method: str = "GET") -> http.Request:
    """hubcache's own request for `url`."""
    return http.Request.make(method, url)


def connecting(host: str, sni: str | None = None, port: int = 443) -> server_hooks.ServerConnectionHookData:
    server = connection.Server(address=(host, port))
    server.sni = host
    client = tflow.tclient_conn()
    client.sni = sni
    return server_hooks.ServerConnectionHookData(server=server, client=client)


def up(metrics: Metrics, host: str) -> float | None:
    return metrics.registry.get_sample_value("hubcache_upstream_up", {"host": host})


def test_the_first_failure_opens_the_circuit_and_later_connections_are_not_attempted(circuits, caplog):
    breaker, metrics = circuits
    caplog.set_level(logging.WARNING)
    breaker.failed(own(f"https://{HUB}/v2/library/alpine/manifests/1"), "[Errno 111] Connect call failed")
    assert breaker.down(HUB) and up(metrics, HUB) == 0
    later = connecting(HUB)
    breaker.server_connect(later)
    assert later.server.error and later.server.error.startswith(f"hubcache: {HUB} is down"), "the connection was attempted"
    breaker.failed(own(f"https://{HUB}/v2/"), later.server.error)  # its own refusal is not a second failure
    assert [r.message for r in caplog.records].count(f"hubcache: {HUB} is down ([Errno 111] Connect call failed); answering from the cache without waiting for it") == 1


@pytest.mark.parametrize(
    "url",
    [
        f"https://{HUB}:1/v2/library/alpine/manifests/1",  # another port of the name
        f"https://{HUB}:8443/v2/",
        f"https://{HUB}/anything",  # not the registry API
        f"http://{HUB}/v2/",
        "https://auth.docker.io/hang-here?scope=x",  # not the realm a registry named
        "https://auth.docker.io:444/token",
        "https://example.com/v2/",
    ],
)
def test_only_a_canonical_request_opens_a_circuit(circuits, url):
    breaker, _ = circuits
    breaker.failed(own(url), "[Errno 111] Connect call failed")
    assert breaker.open == {}


def test_circuits_are_keyed_by_host_and_port(circuits):
    breaker, _ = circuits
    breaker.failed(own(f"https://{HUB}/v2/"), "refused")
    assert list(breaker.open) == [(HUB, 443)]
    other_port = connecting(HUB, port=1)
    breaker.server_connect(other_port)
    assert other_port.server.error is None
    answered_elsewhere = tflow.tflow(req=tutils.treq(host=HUB, port=1), resp=tutils.tresp(status_code=200))
    breaker.response(answered_elsewhere)
    assert breaker.down(HUB), "an answer from another port says nothing of this one"


def test_the_token_realm_is_learned_from_the_registrys_challenge(circuits):
    breaker, _ = circuits
    challenge = 'Bearer realm="https://auth.docker.io/other-token",service="registry.docker.io"'
    f = tflow.tflow(req=tutils.treq(scheme=b"https", host=HUB, port=443, path=b"/v2/"), resp=tutils.tresp(status_code=401, headers=http.Headers(www_authenticate=challenge)))
    f.metadata[Mark.SUBREQUEST] = True
    breaker.response(f)
    breaker.failed(own("https://auth.docker.io/token"), "refused")
    assert breaker.open == {}
    breaker.failed(own("https://auth.docker.io/other-token?scope=repository:a/b:pull"), "refused")
    assert breaker.down("auth.docker.io").probe == "https://auth.docker.io/other-token"


def test_any_answer_closes_it(circuits, caplog):
    breaker, metrics = circuits
    caplog.set_level(logging.WARNING)
    breaker.failed(own(f"https://{HUB}/v2/"), "upstream sent nothing for 3s")
    f = tflow.tflow(req=tutils.treq(host=HUB, port=443), resp=tutils.tresp(status_code=401))
    breaker.response(f)
    assert breaker.down(HUB) is None and up(metrics, HUB) == 1
    assert any("is back" in r.message for r in caplog.records)
    again = connecting(HUB)
    breaker.server_connect(again)
    assert again.server.error is None


def test_hubcaches_own_answers_and_5xx_do_not_close_it(circuits):
    breaker, _ = circuits
    breaker.failed(own(f"https://{HUB}/v2/"), "refused")
    answered = tflow.tflow(req=tutils.treq(host=HUB, port=443), resp=tutils.tresp(status_code=200))
    answered.metadata[Mark.ANSWERED] = True
    breaker.response(answered)
    failing = tflow.tflow(req=tutils.treq(host=HUB, port=443), resp=tutils.tresp(status_code=503))
    breaker.response(failing)
    assert breaker.down(HUB)


def test_only_the_probe_connects_while_the_host_is_down(circuits):
    breaker, _ = circuits
    breaker.failed(own(f"https://{HUB}/v2/"), "refused")
    breaker._probing[(HUB, 443)] = "probe-1.hubcache.invalid"
    probe, client = connecting(HUB, sni="probe-1.hubcache.invalid"), connecting(HUB, sni=HUB)
    breaker.server_connect(probe)
    breaker.server_connect(client)
    assert probe.server.error is None and client.server.error


def test_hosts_hubcache_does_not_intercept_have_no_circuit(circuits):
    breaker, metrics = circuits
    breaker.failed(own("https://example.com/v2/"), "refused")
    breaker.failed(own("https://production.cloudflare.docker.com/v2/"), "refused")
    assert breaker.open == {} and up(metrics, "example.com") is None


class Probed(upstream.Upstream):
    """An upstream that records what it is asked; `answer` None refuses."""

    def __init__(self, answer: int | None = None):
        self.answer = answer
        self.probed: list[tuple[str, str, str | None]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.asked = asyncio.Event()

    async def run(self, flow, idle_timeout, progress=None):
        self.probed.append((flow.request.method, flow.request.url, flow.request.headers.get("authorization")))
        self.asked.set()
        await self.release.wait()
        if self.answer is None:
            raise upstream.Unreachable("connection refused")
        return http.Response.make(self.answer)


async def test_a_probe_asks_the_host_itself_and_one_that_fails_doubles_the_wait(circuits):
    breaker, _ = circuits
    breaker.failed(own(f"https://{HUB}/v2/library/alpine/manifests/1", "HEAD"), "refused")
    circuit = breaker.down(HUB)
    breaker.upstream = refusing = Probed()
    await breaker._probe((HUB, 443), circuit)
    assert refusing.probed == [("GET", f"https://{HUB}/v2/", None)], "never a replay of what failed"
    assert circuit.backoff == 2 * FIRST_RETRY and breaker.down(HUB)


async def test_the_backoff_stops_at_upstream_retry_max(circuits):
    breaker, _ = circuits
    ctx_options().upstream_retry_max = 5
    breaker.failed(own(f"https://{HUB}/v2/"), "refused")
    circuit = breaker.down(HUB)
    breaker.upstream = Probed()
    for _ in range(4):
        await breaker._probe((HUB, 443), circuit)
    assert circuit.backoff == 5


def ctx_options():
    from mitmproxy import ctx

    return ctx.options


async def test_a_request_only_upstream_can_answer_starts_one_probe_and_all_wait_for_it(circuits):
    breaker, _ = circuits
    breaker.failed(own(f"https://{HUB}/v2/"), "refused")
    breaker.upstream = back = Probed(401)
    back.release.clear()
    waiting = [asyncio.create_task(breaker.attempt(HUB, 443)) for _ in range(5)]
    await asyncio.wait_for(back.asked.wait(), 5)
    await asyncio.sleep(0.01)  # let any second probe start, if there were one
    assert len(back.probed) == 1 and not any(w.done() for w in waiting), "one probe in flight, all wait for it"
    back.release.set()
    assert await asyncio.gather(*waiting) == [True] * 5
    assert breaker.down(HUB) is None


async def test_while_upstream_stays_down_a_probe_is_started_at_most_once_a_second(circuits):
    breaker, _ = circuits
    breaker.failed(own(f"https://{HUB}/v2/"), "refused")
    breaker.upstream = down = Probed()
    assert await breaker.attempt(HUB, 443) is False
    assert await breaker.attempt(HUB, 443) is False
    assert len(down.probed) == 1
    breaker.down(HUB).probed_at -= TRIAL_INTERVAL
    assert await breaker.attempt(HUB, 443) is False
    assert len(down.probed) == 2


async def test_the_wait_for_a_probe_is_bounded_by_revalidate_timeout(circuits):
    breaker, _ = circuits
    ctx_options().revalidate_timeout = 0  # a probe that never ends is not waited for past it
    breaker.failed(own(f"https://{HUB}/v2/"), "refused")
    breaker.upstream = hanging = Probed(200)
    hanging.release.clear()
    assert await breaker.attempt(HUB, 443) is False
    hanging.release.set()


def test_a_request_not_attempted_is_logged_below_the_down_line():
    assert level(f"Connection killed: hubcache: {HUB} is down (refused); not waited for") == logging.DEBUG
    assert level("[Errno 111] Connect call failed") == logging.WARNING


async def test_hubcaches_own_request_to_a_host_that_is_down_is_not_started(circuits):
    breaker, _ = circuits
    breaker.failed(own(f"https://{HUB}/v2/"), "refused")
    breaker.upstream = Probed()
    flow = upstream.subrequest(tflow.tflow(), tutils.treq(host=HUB, port=443, scheme=b"https"))
    with pytest.raises(upstream.UpstreamError) as refused:  # if it were started: Silent, or another failure
        await upstream.Upstream(breaker).run(flow, 5)
    assert str(refused.value) == f"hubcache: {HUB} is down (refused); not waited for"
    assert breaker.upstream.probed == [], "a request the cache could answer does not probe"


async def test_a_miss_to_a_host_that_is_down_waits_for_the_probe_and_goes_upstream_when_it_is_back(circuits):
    breaker, _ = circuits
    breaker.failed(own(f"https://{HUB}/v2/"), "refused")
    breaker.upstream = Probed(401)
    flow = upstream.subrequest(tflow.tflow(), tutils.treq(host=HUB, port=443, scheme=b"https"))
    flow.metadata[Mark.MISS] = True
    sent = []

    class Sent(Exception):
        pass

    def start(f, timeout, sink):
        sent.append(f.request.url)
        raise Sent

    import hubcache.upstream.client as module

    original = module._start
    module._start = start
    try:
        await upstream.Upstream(breaker).run(flow, 30)
    except Sent:
        pass  # it went upstream
    except upstream.UpstreamError as e:
        pytest.fail(f"the miss was refused instead of waiting for the probe: {e}")
    else:
        pytest.fail("the miss never reached the request it was to send")
    finally:
        module._start = original
    assert breaker.upstream.probed == [("GET", f"https://{HUB}/v2/", None)] and sent == [flow.request.url]

"""The circuit breaker per upstream host (addon/circuits.py): unit tests with mitmproxy's helpers.
The real outages are in tests/integration/test_resilience.py."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow, tutils

from hubcache import upstream
from hubcache.circuits import FIRST_RETRY, Circuits, level
from hubcache.flowdata import Mark
from hubcache.hosts import Interception
from hubcache.metrics import Metrics

HUB = "registry-1.docker.io"


@pytest.fixture
def circuits():
    hosts = Interception()
    metrics = Metrics(hosts)
    circuits = Circuits(hosts, metrics)
    with taddons.context(hosts, circuits):
        yield circuits, metrics


def connecting(host: str, sni: str | None = None) -> server_hooks.ServerConnectionHookData:
    server = connection.Server(address=(host, 443))
    server.sni = host
    client = tflow.tclient_conn()
    client.sni = sni
    return server_hooks.ServerConnectionHookData(server=server, client=client)


def up(metrics: Metrics, host: str) -> float | None:
    return metrics.registry.get_sample_value("hubcache_upstream_up", {"host": host})


def test_the_first_failure_opens_the_circuit_and_later_connections_are_not_attempted(circuits, caplog):
    breaker, metrics = circuits
    caplog.set_level(logging.WARNING)
    failing = connecting(HUB)
    failing.server.error = "[Errno 111] Connect call failed"
    breaker.server_connect_error(failing)
    assert breaker.down(HUB) and up(metrics, HUB) == 0
    later = connecting(HUB)
    breaker.server_connect(later)
    assert later.server.error and later.server.error.startswith(f"hubcache: {HUB} is down"), "the connection was attempted"
    breaker.server_connect_error(later)  # its own refusal is not a second failure
    assert [r.message for r in caplog.records].count(f"hubcache: {HUB} is down ([Errno 111] Connect call failed); answering from the cache without waiting for it") == 1


def test_any_answer_closes_it(circuits, caplog):
    breaker, metrics = circuits
    caplog.set_level(logging.WARNING)
    breaker.failed(HUB, "upstream sent nothing for 3s")
    f = tflow.tflow(req=tutils.treq(host=HUB, port=443), resp=tutils.tresp(status_code=401))
    breaker.response(f)
    assert breaker.down(HUB) is None and up(metrics, HUB) == 1
    assert any("is back" in r.message for r in caplog.records)
    again = connecting(HUB)
    breaker.server_connect(again)
    assert again.server.error is None


def test_hubcaches_own_answers_and_5xx_do_not_close_it(circuits):
    breaker, _ = circuits
    breaker.failed(HUB, "refused")
    answered = tflow.tflow(req=tutils.treq(host=HUB, port=443), resp=tutils.tresp(status_code=200))
    answered.metadata[Mark.ANSWERED] = True
    breaker.response(answered)
    failing = tflow.tflow(req=tutils.treq(host=HUB, port=443), resp=tutils.tresp(status_code=503))
    breaker.response(failing)
    assert breaker.down(HUB)


def test_only_the_probe_connects_while_the_host_is_down(circuits):
    breaker, _ = circuits
    breaker.failed(HUB, "refused")
    breaker._probing[HUB] = "probe-1.hubcache.invalid"
    probe, client = connecting(HUB, sni="probe-1.hubcache.invalid"), connecting(HUB, sni=HUB)
    breaker.server_connect(probe)
    breaker.server_connect(client)
    assert probe.server.error is None and client.server.error


def test_hosts_hubcache_does_not_intercept_have_no_circuit(circuits):
    breaker, metrics = circuits
    breaker.failed("example.com", "refused")
    breaker.failed("production.cloudflare.docker.com", "refused")
    assert breaker.open == {} and up(metrics, "example.com") is None


async def test_a_probe_that_fails_doubles_the_wait(circuits):
    breaker, _ = circuits
    breaker.failed(HUB, "refused", f"https://{HUB}/v2/library/alpine/manifests/1")
    circuit = breaker.down(HUB)
    probed = []

    class Refusing(upstream.Upstream):
        async def run(self, flow, idle_timeout, progress=None):
            probed.append((flow.request.method, flow.request.url, flow.request.headers.get("authorization")))
            raise upstream.Unreachable("connection refused")

    breaker.upstream = Refusing()
    await breaker._probe(HUB, circuit)
    assert probed == [("HEAD", f"https://{HUB}/v2/library/alpine/manifests/1", None)]
    assert circuit.backoff == 2 * FIRST_RETRY and breaker.down(HUB)


def test_a_request_not_attempted_is_logged_below_the_down_line():
    assert level(f"Connection killed: hubcache: {HUB} is down (refused); not waited for") == logging.DEBUG
    assert level("[Errno 111] Connect call failed") == logging.WARNING


async def test_hubcaches_own_request_to_a_host_that_is_down_is_not_started(circuits):
    breaker, _ = circuits
    breaker.failed(HUB, "refused")
    flow = upstream.subrequest(tflow.tflow(), tutils.treq(host=HUB, port=443, scheme=b"https"))
    with pytest.raises(upstream.UpstreamError) as refused:  # if it were started: Silent, or another failure
        await upstream.Upstream().run(flow, 5)
    assert str(refused.value) == f"hubcache: {HUB} is down (refused); not waited for"

"""Where clients of the proxy may go (addon/destinations.py): unit tests with mitmproxy's test
helpers."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from mitmproxy import connection, exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow, tutils

from hubcache.blobserver.host import BlobHost
from hubcache.blobserver.server import BLOB_HOST
from hubcache.mitm import internals
from hubcache.proxy.destinations import Destinations, Refused
from hubcache.proxy.interception import UpstreamOverride


@pytest.fixture
def guard():
    override = UpstreamOverride()
    blobs = BlobHost(internals.certstore)
    destinations = Destinations(override, blobs)
    destinations.own_ports.append(lambda: [3129])
    with taddons.context(Proxyserver(), override, blobs, destinations) as tctx:
        tctx.configure(destinations, listen_host="0.0.0.0")
        yield tctx, destinations, override


def connect(host: str, port: int) -> http.HTTPFlow:
    f = tflow.tflow()
    f.request = tutils.treq(method=b"CONNECT", host=host, port=port, path=b"", authority=f"{host}:{port}".encode())
    return f


@pytest.mark.parametrize(
    "host, why",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("localhost", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("168.63.129.16", "cloud metadata"),
        ("192.0.0.192", "cloud metadata"),
        ("::ffff:100.100.100.200", "cloud metadata"),
    ],
)
async def test_serving_a_network_refuses_local_destinations(guard, host, why):
    _, destinations, _ = guard
    with pytest.raises(Refused, match=why):
        await destinations.check(host, 6379)
    f = connect(host, 6379)
    await destinations.http_connect(f)
    assert f.response.status_code == 403 and why.encode() in f.response.content


async def test_an_address_of_this_host_is_local(guard):
    _, destinations, _ = guard
    # The address this host reaches other networks from (a UDP connect sends nothing): not a
    # loopback one, which is refused for being loopback whatever this host's own addresses are.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))
        own = probe.getsockname()[0]
    assert not ipaddress.ip_address(own).is_loopback
    with pytest.raises(Refused, match="an address of this host"):
        await destinations.check(own, 22)


async def test_other_destinations_pass_and_are_pinned(guard):
    _, destinations, _ = guard
    assert await destinations.check("192.0.2.7", 443) == "192.0.2.7"  # a literal: as named
    data = server_hooks.ServerConnectionHookData(server=connection.Server(address=("192.0.2.7", 443)), client=tflow.tclient_conn())
    await destinations.server_connect(data)
    assert data.server.address == ("192.0.2.7", 443) and data.server.error is None


async def test_a_refused_connection_is_never_opened(guard):
    _, destinations, _ = guard
    data = server_hooks.ServerConnectionHookData(server=connection.Server(address=("localhost", 6379)), client=tflow.tclient_conn())
    await destinations.server_connect(data)
    assert "loopback" in data.server.error


async def test_exceptions_the_operator_listed(guard):
    tctx, destinations, _ = guard
    tctx.configure(destinations, local_destinations_allowed=["127.0.0.1:5000", "[::1]", "169.254.0.0/16:80"])
    for host, port in (("127.0.0.1", 5000), ("::1", 7), ("169.254.169.254", 80)):
        try:
            assert await destinations.check(host, port) == host
        except Refused as e:
            pytest.fail(f"an exception the operator listed was refused: {e}")
    for host, port in (("127.0.0.1", 5001), ("169.254.169.254", 443)):
        with pytest.raises(Refused):
            await destinations.check(host, port)


@pytest.mark.parametrize("bad", ["nonsense", "127.0.0.1:99999", "[::1]x", "10.0.0.0/99"])
def test_a_bad_exception_is_one_line(guard, bad):
    tctx, destinations, _ = guard
    with pytest.raises(exceptions.OptionsError, match="local_destinations_allowed"):
        tctx.configure(destinations, local_destinations_allowed=[bad])


async def test_loopback_is_allowed_on_loopback_but_never_hubcaches_own_listeners(guard):
    tctx, destinations, _ = guard
    tctx.configure(destinations, listen_host="127.0.0.1")
    assert await destinations.check("127.0.0.1", 6379) == "127.0.0.1"
    with pytest.raises(Refused, match="hubcache's own listener"):
        await destinations.check("localhost", 3129)
    tctx.configure(destinations, local_destinations="refuse")
    with pytest.raises(Refused, match="loopback"):
        await destinations.check("127.0.0.1", 6379)
    tctx.configure(destinations, local_destinations="allow", listen_host="0.0.0.0")
    assert await destinations.check("127.0.0.1", 6379) == "127.0.0.1"
    with pytest.raises(Refused, match="own listener"):
        await destinations.check("127.0.0.1", 3129)


@pytest.mark.parametrize(
    "mode", [["regular", "regular@0.0.0.0:3128"], ["regular", "socks5@0.0.0.0:1080"], ["socks5@[::]:1080"], ["regular@192.0.2.1:3128"]]
)
async def test_a_listener_added_with_mode_that_serves_a_network_refuses_local_destinations(guard, mode):
    tctx, destinations, _ = guard
    tctx.configure(destinations, listen_host="127.0.0.1", mode=mode)
    for host, why in (("127.0.0.1", "loopback"), ("169.254.169.254", "link-local"), ("fd00:ec2::254", "cloud metadata")):
        with pytest.raises(Refused, match=why):
            await destinations.check(host, 80)


@pytest.mark.parametrize("mode", [["regular"], ["regular@127.0.0.2:3128", "socks5@1080", "socks5@localhost:1081", "regular@[::1]:3130"]])
async def test_listeners_on_loopback_only_leave_local_destinations_open(guard, mode):
    tctx, destinations, _ = guard
    tctx.configure(destinations, listen_host="127.0.0.1", mode=mode)
    assert await destinations.check("127.0.0.1", 6379) == "127.0.0.1"
    assert await destinations.check("100.100.100.200", 80) == "100.100.100.200"


async def test_names_hubcache_routes_itself_are_not_judged(guard):
    tctx, destinations, override = guard
    tctx.configure(override, upstream_map=["registry-1.docker.io=127.0.0.1:5000"])
    assert await destinations.check("registry-1.docker.io", 443) is None
    assert await destinations.check(BLOB_HOST, 443) is None


async def test_behind_an_upstream_proxy_only_literals_are_judged(guard):
    _, destinations, _ = guard
    assert await destinations.check("registry.example", 443, via_proxy=True) is None
    with pytest.raises(Refused):
        await destinations.check("localhost", 6379, via_proxy=True)


async def test_the_blob_servers_listener_for_other_machines_is_reachable_alone(guard):
    """A client without NO_PROXY sends its blob URL on `blob_listen` through the proxy: relayed
    there, though the address is this host's; its other ports stay refused."""
    _, destinations, _ = guard
    blobs = destinations.blobs
    blobs.direct = ("127.0.0.2", 5001)
    f = connect("127.0.0.2", 5001)
    await destinations.http_connect(f)
    assert f.response is None, "the blob server's listener refused"
    for port in (5002, 3129):
        other = connect("127.0.0.2", port)
        await destinations.http_connect(other)
        assert other.response and other.response.status_code == 403, port


@pytest.mark.parametrize("host", ["::ffff:127.0.0.2", "2130706434", "127.2", "0x7f000002", "0177.0.0.2", "127.000.000.002", "127.0.0.2."])
async def test_another_spelling_of_the_blob_listeners_address_opens_nothing_else(guard, host):
    """The exception is the listener's own address and port as hubcache names it: another
    spelling of the address is judged as any destination, on every port."""
    _, destinations, _ = guard
    destinations.blobs.direct = ("127.0.0.2", 5001)
    for port in (5001, 5002, 3129):
        other = connect(host, port)
        await destinations.http_connect(other)
        if other.response is None:  # let through: only where nothing resolves it (mitmproxy then fails to connect)
            assert not await _resolves(host), (host, port)
        else:
            assert other.response.status_code == 403, (host, port)


async def _resolves(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host, 1, type=socket.SOCK_STREAM))
    except OSError:
        return False

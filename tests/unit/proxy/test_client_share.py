"""One client's share of the proxy's connections (addon/proxy/client_share.py), with taddons."""

from __future__ import annotations

import logging
import resource

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from hubcache.proxy.client_share import ClientShare


def client(address: str):
    conn = tflow.tclient_conn()
    conn.peername = (address, 40000)
    conn.error = None
    return conn


def connect(share: ClientShare, address: str):
    conn = client(address)
    share.client_connected(conn)
    return conn


def test_a_client_holds_its_share_and_its_next_connection_is_closed(caplog):
    caplog.set_level(logging.WARNING)
    share = ClientShare()
    with taddons.context(share) as tctx:
        tctx.configure(share, client_connections=3)
        held = [connect(share, "203.0.113.7") for _ in range(3)]
        assert all(conn.error is None for conn in held)
        beyond = connect(share, "203.0.113.7")
        assert beyond.error, "a connection beyond the client's share was kept"
        assert connect(share, "203.0.113.8").error is None, "another client was refused"
        assert [r.getMessage() for r in caplog.records].count(
            "connections to the proxy from 203.0.113.7 refused: it holds 3 at once"
        ) == 1
        share.client_disconnected(beyond)  # mitmproxy tells of a refused connection's end too
        assert connect(share, "203.0.113.7").error, "a refused connection's end freed a place"
        share.client_disconnected(held[0])
        assert connect(share, "203.0.113.7").error is None, "a closed connection still counts"


def test_an_ipv6_client_is_its_slash_64_and_this_machine_has_no_share():
    share = ClientShare()
    with taddons.context(share) as tctx:
        tctx.configure(share, client_connections=2)
        assert connect(share, "2001:db8:1:2::1").error is None
        assert connect(share, "2001:db8:1:2:ffff::9").error is None
        assert connect(share, "2001:db8:1:2:abcd::5").error, "another address of the same /64 was a new client"
        assert connect(share, "2001:db8:1:3::1").error is None, "another /64 was refused"
        assert connect(share, "::ffff:203.0.113.9").error is None
        assert connect(share, "203.0.113.9").error is None
        assert connect(share, "::ffff:203.0.113.9").error, "an IPv4-mapped address is its IPv4 client"
        for own in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            assert all(connect(share, own).error is None for _ in range(5)), own


def test_no_share_with_zero_and_a_negative_one_is_refused():
    share = ClientShare()
    with taddons.context(share) as tctx:
        tctx.configure(share, client_connections=0)
        assert all(connect(share, "198.51.100.1").error is None for _ in range(300))
        with pytest.raises(exceptions.OptionsError, match="client_connections: -1 is not 0 or more"):
            tctx.configure(share, client_connections=-1)


def test_the_proxy_may_open_files_far_beyond_one_clients_share():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        share = ClientShare()
        with taddons.context(share):
            share.running()
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == min(65536, hard) if hard != resource.RLIM_INFINITY else raised == 65536
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

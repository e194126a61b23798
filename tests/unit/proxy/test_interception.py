import ssl

import pytest
from mitmproxy import connection, exceptions, http, tls
from mitmproxy.proxy import context, server_hooks
from mitmproxy.proxy.layers.http._hooks import HttpConnectUpstreamHook
from mitmproxy.proxy.layers.http._upstream_proxy import HttpUpstreamProxy
from mitmproxy.test import taddons, tflow, tutils

from hubcache.blobserver.server import BLOB_HOST
from hubcache.mitm import bodies
from hubcache.mitm.flows import Mark
from hubcache.proxy.interception import MAX_FORM, Interception, Passthrough, UpstreamOverride


def client_hello(sni: str | None) -> tls.ClientHello:
    """A real ClientHello, as Python's TLS client sends it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    outgoing = ssl.MemoryBIO()
    sock = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        sock.do_handshake()
    record = outgoing.read()
    return tls.ClientHello(record[9:])  # past the record (5 bytes) and handshake (4 bytes) headers


def hello_data(tctx, sni: str | None, address: tuple[str, int] | None = None) -> tls.ClientHelloData:
    ctx = context.Context(tflow.tclient_conn(), tctx.options)
    ctx.server.address = address
    return tls.ClientHelloData(ctx, client_hello(sni))


class TestInterception:
    def test_default_registries_and_auth_host(self):
        i = Interception()
        with taddons.context(i):
            for host in ("registry-1.docker.io", "index.docker.io", "auth.docker.io", "Registry-1.Docker.IO", "ghcr.io", "registry.k8s.io"):
                assert i.intercepts(host), host
            for host in ("docker.io", "example.com", "production.cloudflare.docker.com", "us-west1-docker.pkg.dev"):
                assert not i.intercepts(host), host
            assert i.is_registry("registry-1.docker.io")
            assert not i.is_registry("auth.docker.io")

    def test_configured_registries(self):
        i = Interception()
        with taddons.context(i) as tctx:
            tctx.configure(i, registries=["ghcr.io", "Quay.io"])
            assert i.intercepts("ghcr.io")
            assert i.intercepts("quay.io")
            assert i.is_registry("QUAY.IO")
            assert not i.intercepts("registry-1.docker.io")
            assert not i.intercepts("auth.docker.io")  # only with a Docker Hub API host

    @pytest.mark.parametrize("bad", ["", "https://ghcr.io", "ghcr.io/v2", " ghcr.io", "ghcr.io:5000"])
    def test_bad_registry_option(self, bad):
        i = Interception()
        with taddons.context(i) as tctx, pytest.raises(exceptions.OptionsError):
            tctx.configure(i, registries=["ghcr.io", bad])

    def test_clienthello_of_a_registry_is_intercepted(self):
        i = Interception()
        with taddons.context(i) as tctx:
            for host in ("registry-1.docker.io", "auth.docker.io"):
                data = hello_data(tctx, host, (host, 443))
                assert data.client_hello.sni == host
                i.tls_clienthello(data)
                assert not data.ignore_connection, host

    def test_a_registry_sni_in_a_tunnel_to_elsewhere_is_tunnelled(self):
        """hubcache mints a certificate for the SNI: only for the host the tunnel goes to."""
        i = Interception()
        with taddons.context(i) as tctx:
            for target in (("127.0.0.1", 8099), ("example.com", 443), ("index.docker.io", 443)):
                data = hello_data(tctx, "registry-1.docker.io", target)
                i.tls_clienthello(data)
                assert data.ignore_connection, target

    @pytest.mark.parametrize("port", [1, 80, 444, 5000, 8443])
    def test_another_port_of_a_registry_is_an_ordinary_tunnel(self, port):
        i = Interception()
        with taddons.context(i) as tctx:
            for host in ("registry-1.docker.io", "auth.docker.io"):
                data = hello_data(tctx, host, (host, port))
                i.tls_clienthello(data)
                assert data.ignore_connection, (host, port)

    @pytest.mark.parametrize("port, expected", [(443, "registry-1.docker.io"), (1, None), (8443, None)])
    def test_a_request_is_a_registrys_on_its_own_port_only(self, port, expected):
        i = Interception()
        with taddons.context(i):
            flow = tflow.tflow(req=tutils.treq(scheme=b"https", host="registry-1.docker.io", port=port, authority=b""))
            flow.client_conn.sni = "registry-1.docker.io"
            flow.request.headers["host"] = "registry-1.docker.io" if port == 443 else f"registry-1.docker.io:{port}"
            assert i.destination(flow) == expected
            assert i.registry(flow) == expected

    def test_clienthello_of_another_host_is_tunnelled(self):
        i = Interception()
        with taddons.context(i) as tctx:
            data = hello_data(tctx, "example.com")
            i.tls_clienthello(data)
            assert data.ignore_connection

    def test_clienthello_of_the_blob_server_is_tunnelled(self):
        i = Interception()
        with taddons.context(i) as tctx:
            data = hello_data(tctx, BLOB_HOST)
            i.tls_clienthello(data)
            assert data.ignore_connection, "blob bytes must cross mitmproxy as raw TCP"

    def test_clienthello_without_sni_is_tunnelled(self):
        i = Interception()
        with taddons.context(i) as tctx:
            for address in (("index.docker.io", 443), ("10.1.2.3", 443), None):
                data = hello_data(tctx, None, address)
                assert data.client_hello.sni is None
                i.tls_clienthello(data)
                assert data.ignore_connection, address


def connect_data(address: tuple[str, int]) -> server_hooks.ServerConnectionHookData:
    return server_hooks.ServerConnectionHookData(
        server=connection.Server(address=address), client=tflow.tclient_conn()
    )


class TestUpstreamOverride:
    def test_parses_specs(self):
        u = UpstreamOverride()
        with taddons.context(u) as tctx:
            tctx.configure(
                u,
                upstream_map=["Registry-1.docker.io=10.0.0.5:8443", "ghcr.io=[::1]:5000", "a=b.internal:1"],
            )
            assert u.map == {
                "registry-1.docker.io": ("10.0.0.5", 8443),
                "ghcr.io": ("::1", 5000),
                "a": ("b.internal", 1),
            }
            tctx.configure(u, upstream_map=[])
            assert u.map == {}

    @pytest.mark.parametrize(
        "spec",
        ["ghcr.io", "ghcr.io=", "ghcr.io=10.0.0.5", "=10.0.0.5:443", "ghcr.io=:443", "ghcr.io=10.0.0.5:https", "ghcr.io=10.0.0.5:0", "ghcr.io=10.0.0.5:65536"],
    )
    def test_rejects_bad_specs(self, spec):
        u = UpstreamOverride()
        with taddons.context(u) as tctx, pytest.raises(exceptions.OptionsError):
            tctx.configure(u, upstream_map=[spec])

    def test_rewrites_the_server_address(self):
        u = UpstreamOverride()
        with taddons.context(u) as tctx:
            tctx.configure(u, upstream_map=["registry-1.docker.io=127.0.0.1:5000"])
            data = connect_data(("Registry-1.Docker.io", 443))
            u.server_connect(data)
            assert data.server.address == ("127.0.0.1", 5000)

    def test_another_port_of_a_mapped_name_is_not_mapped(self):
        u = UpstreamOverride()
        with taddons.context(u) as tctx:
            tctx.configure(u, upstream_map=["registry-1.docker.io=127.0.0.1:5000"])
            data = connect_data(("registry-1.docker.io", 1))
            u.server_connect(data)
            assert data.server.address == ("registry-1.docker.io", 1)

    def test_leaves_other_servers_alone(self):
        u = UpstreamOverride()
        with taddons.context(u) as tctx:
            tctx.configure(u, upstream_map=["registry-1.docker.io=127.0.0.1:5000"])
            data = connect_data(("example.com", 443))
            u.server_connect(data)
            assert data.server.address == ("example.com", 443)

    def connect_through_proxy(
        self, tctx, u: UpstreamOverride, address: tuple[str, int]
    ) -> tuple[bytes, context.Context]:
        """The CONNECT that mitmproxy's upstream mode sends its proxy for `address`, with `u`'s
        http_connect_upstream hook applied, and the context it was sent from."""
        ctx = context.Context(tflow.tclient_conn(), tctx.options)
        ctx.server.address = address
        ctx.server.via = ("http", ("127.0.0.1", 3128))
        layer = HttpUpstreamProxy.make(ctx, send_connect=True)[0]
        handshake = layer.start_handshake()
        hook = next(handshake)
        assert isinstance(hook, HttpConnectUpstreamHook)
        u.http_connect_upstream(hook.flow)
        sent = handshake.send(None)
        assert sent.connection.address == ("127.0.0.1", 3128)  # still to the proxy
        return sent.data, ctx

    @pytest.mark.parametrize(
        "target, request_line",
        [("127.0.0.1:5000", b"CONNECT 127.0.0.1:5000 HTTP/1.1"), ("[::1]:5000", b"CONNECT [::1]:5000 HTTP/1.1")],
    )
    def test_behind_an_upstream_proxy_the_connect_goes_to_the_mapped_address(self, target, request_line):
        u = UpstreamOverride()
        with taddons.context(u) as tctx:
            tctx.configure(u, upstream_map=[f"registry-1.docker.io={target}"])
            data, ctx = self.connect_through_proxy(tctx, u, ("Registry-1.Docker.io", 443))
            head = data.split(b"\r\n")
            assert head[0] == request_line
            assert b"Host: " + request_line.split()[1] in head
            assert ctx.server.address == ("Registry-1.Docker.io", 443)  # TLS still verifies the name

    def test_behind_an_upstream_proxy_other_connects_are_left_alone(self):
        u = UpstreamOverride()
        with taddons.context(u) as tctx:
            tctx.configure(u, upstream_map=["registry-1.docker.io=127.0.0.1:5000"])
            data, _ = self.connect_through_proxy(tctx, u, ("example.com", 443))
            assert data.split(b"\r\n")[0] == b"CONNECT example.com:443 HTTP/1.1"


# Passthrough: bodies hubcache does not answer are streamed


def request_flow(method: str, host: str, headers: dict, scheme: str = "https") -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(method=method.encode(), host=host, port=443, scheme=scheme.encode(), headers=http.Headers(**headers), content=None))
    f.client_conn.sni = host
    return f


@pytest.mark.parametrize(
    "method, host, headers",
    [
        ("PUT", "example.com", {"content_length": "1000000000"}),
        ("POST", "example.com", {"transfer_encoding": "chunked"}),
        ("GET", "example.com", {}),
        ("PATCH", "registry-1.docker.io", {"content_length": "5"}),  # a push: relayed as it comes
        ("PUT", "registry-1.docker.io", {}),  # a push over HTTP/2 need not say it has a body
        ("POST", "registry-1.docker.io", {"content_length": "0"}),
    ],
)
def test_what_hubcache_passes_through_is_streamed_whatever_the_headers_say(method, host, headers):
    hosts = Interception()
    passthrough = Passthrough(hosts)
    with taddons.context(hosts, passthrough) as tctx:
        tctx.options.add_option("offline", bool, False, "declared by the cache")
        f = request_flow(method, host, headers)
        passthrough.requestheaders(f)
        assert f.request.stream is True and not f.error
        assert Mark.NO_BODY not in f.metadata


@pytest.mark.parametrize(
    "method, host, headers, offline",
    [
        ("GET", "registry-1.docker.io", {"content_length": "1000000000"}, False),
        ("GET", "registry-1.docker.io", {"transfer_encoding": "chunked"}, False),
        ("GET", "registry-1.docker.io", {}, False),  # over HTTP/2 a body may follow unannounced
        ("HEAD", "registry-1.docker.io", {"content_length": "0"}, False),
        ("PUT", "registry-1.docker.io", {"transfer_encoding": "chunked"}, True),  # offline: hubcache answers
        ("POST", "auth.docker.io", {"transfer_encoding": "chunked"}, False),
        ("POST", "auth.docker.io", {"content_length": str(MAX_FORM + 1)}, False),
        ("POST", "auth.docker.io", {}, False),  # HTTP/2 without a length: not a form of known size
        ("GET", "auth.docker.io", {"content_length": "10"}, False),
    ],
)
def test_what_hubcache_answers_itself_takes_no_body(method, host, headers, offline):
    hosts = Interception()
    passthrough = Passthrough(hosts)
    with taddons.context(hosts, passthrough) as tctx:
        tctx.options.add_option("offline", bool, offline, "declared by the cache")
        f = request_flow(method, host, {**headers, "expect": "100-continue"})
        passthrough.requestheaders(f)
        assert f.metadata.get(Mark.NO_BODY) is True and not f.request.stream and not f.error
        assert "expect" not in f.request.headers, "a 100 Continue would invite the body"


def test_a_token_form_of_announced_size_is_read_whole():
    hosts = Interception()
    passthrough = Passthrough(hosts)
    with taddons.context(hosts, passthrough) as tctx:
        tctx.options.add_option("offline", bool, False, "declared by the cache")
        f = request_flow("POST", "auth.docker.io", {"content_length": str(MAX_FORM)})
        passthrough.requestheaders(f)
        assert Mark.NO_BODY not in f.metadata and not f.request.stream


def test_a_request_answered_in_requestheaders_takes_no_body():
    """The mirror's early answers (and any other addon's) come before Passthrough looks."""
    hosts = Interception()
    passthrough = Passthrough(hosts)
    with taddons.context(hosts, passthrough):
        f = request_flow("POST", "example.com", {"transfer_encoding": "chunked"})
        f.response = http.Response.make(404, b"{}")
        passthrough.requestheaders(f)
        assert f.metadata.get(Mark.NO_BODY) is True and not f.request.stream


@pytest.mark.parametrize(
    "headers, announced",
    [({}, False), ({"content_length": "0"}, False), ({"content_length": " 0 "}, False), ({"content_length": "1"}, True), ({"transfer_encoding": "chunked"}, True), ({"content_length": "x"}, True)],
)
def test_which_headers_announce_a_body(headers, announced):
    assert bodies.announces_body(tutils.treq(headers=http.Headers(**headers), content=None)) is announced


def test_upstream_answers_are_streamed_and_hubcaches_own_are_not():
    hosts = Interception()
    passthrough = Passthrough(hosts)
    with taddons.context(hosts, passthrough):
        relayed = request_flow("GET", "example.com", {})
        relayed.response = tutils.tresp(content=None)
        passthrough.responseheaders(relayed)
        assert relayed.response.stream is True
        answered = request_flow("GET", "registry-1.docker.io", {})
        answered.response = http.Response.make(200, b"{}")
        passthrough.responseheaders(answered)
        assert not answered.response.stream

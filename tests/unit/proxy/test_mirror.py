"""The mirror endpoint's decisions (proxy/mirror.py): its option, which registry a request is for, where
it is sent, and which token realms it relays to."""

import json
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow

from hubcache.blobserver.host import BlobHost, MirrorListener
from hubcache.mitm import internals
from hubcache.proxy.credentials import TokenRealms
from hubcache.proxy.interception import Interception
from hubcache.proxy.mirror import Mirror, MirrorChallenges, spec

LISTEN = "127.0.0.1:5443"
SPEC = spec(("127.0.0.1", 5443))


def wired() -> tuple[Interception, Mirror]:
    """Interception and the mirror, wired as make_addons wires them."""
    listener = MirrorListener()
    hosts = Interception(listener)
    return hosts, Mirror(hosts, BlobHost(internals.certstore, listener), listener, TokenRealms())


@pytest.fixture
def mirror():
    hosts, mirror = wired()
    with taddons.context(hosts, mirror) as tctx:
        tctx.configure(mirror, mirror_listen=LISTEN)
        yield mirror


def mirror_flow(path: str, tls: bool = True, mode: str = SPEC):
    flow = tflow.tflow()
    flow.client_conn.proxy_mode = mode_specs.ProxyMode.parse(mode)
    flow.client_conn.timestamp_tls_setup = time.time() if tls else None
    flow.client_conn.sni = None
    flow.client_conn.sockname = ("127.0.0.1", 5443)
    # As mitmproxy's reverse mode makes it: the spec's host, whatever the client wrote.
    flow.request.scheme, flow.request.host, flow.request.port = "https", "registry-1.docker.io", 443
    flow.request.host_header = "registry-1.docker.io"
    flow.request.path = path
    return flow


def error_code(flow) -> str:
    return json.loads(flow.response.content)["errors"][0]["code"]


def assert_unknown_name(mirror, path: str) -> None:
    """The mirror answers the request itself with the registry error, and it is no registry's."""
    flow = mirror_flow(path)
    mirror.requestheaders(flow)
    assert flow.response is not None, "the mirror let the request through"
    assert flow.response.status_code == 404 and error_code(flow) == "NAME_UNKNOWN"
    assert mirror.hosts.destination(flow) is None


class TestOption:
    @pytest.mark.parametrize("bad", ["5443", "127.0.0.1", ":5443", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "host:port", "http://h:1", "a b:1"])
    def test_not_an_address_is_refused_in_one_line(self, bad):
        hosts, mirror = wired()
        with taddons.context(hosts, mirror) as tctx, pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(mirror, mirror_listen=bad)
        assert "mirror_listen" in str(e.value) and "\n" not in str(e.value)

    def test_the_listener_is_a_mode_of_its_own_and_goes_when_the_option_does(self):
        hosts, mirror = wired()
        with taddons.context(hosts, mirror) as tctx:
            assert mirror.listener.mode is None
            tctx.configure(mirror, mirror_listen=LISTEN)
            assert tctx.options.mode == ["regular", "reverse:https://registry-1.docker.io@127.0.0.1:5443"]
            tctx.configure(mirror, mirror_listen="[::1]:6000")
            assert tctx.options.mode == ["regular", "reverse:https://registry-1.docker.io@[::1]:6000"]
            tctx.configure(mirror, mirror_listen="")
            assert tctx.options.mode == ["regular"] and mirror.listener.mode is None

    def test_a_certificate_needs_its_key(self, tmp_path):
        hosts, mirror = wired()
        with taddons.context(hosts, mirror) as tctx, pytest.raises(exceptions.OptionsError, match="go together"):
            tctx.configure(mirror, mirror_cert=str(tmp_path / "cert.pem"))


class TestRegistry:
    def test_docker_hub_without_ns_and_only_cached_registries_with_it(self, mirror):
        assert mirror.registry_for(None) == "registry-1.docker.io"
        assert mirror.registry_for("docker.io") == "registry-1.docker.io"
        assert mirror.registry_for("ghcr.io") == "ghcr.io"
        for other in ("evil.example", "127.0.0.1:5000", "auth.docker.io", "production.cloudflare.docker.com", "ghcr.io:443"):
            assert mirror.registry_for(other) is None, other

    def test_a_registry_not_cached_is_not_served(self, mirror):
        with taddons.context(mirror.hosts, mirror) as tctx:
            tctx.configure(mirror.hosts, registries=["ghcr.io"])
            assert mirror.registry_for(None) is None
            assert mirror.registry_for("ghcr.io") == "ghcr.io"

    def test_ns_retargets_the_request_to_that_registry(self, mirror):
        flow = mirror_flow("/v2/org/app/manifests/1?ns=ghcr.io")
        mirror.requestheaders(flow)
        assert flow.response is None
        assert (flow.request.scheme, flow.request.host, flow.request.port) == ("https", "ghcr.io", 443)
        assert flow.request.host_header == "ghcr.io"
        assert flow.request.path == "/v2/org/app/manifests/1"
        assert mirror.hosts.registry(flow) == "ghcr.io"

    def test_a_path_that_starts_with_a_registry_names_it(self, mirror):
        # podman and skopeo name no registry: a mirror location HOST:PORT/ghcr.io does.
        flow = mirror_flow("/v2/ghcr.io/org/app/manifests/1")
        mirror.requestheaders(flow)
        assert flow.response is None
        assert (flow.request.host, flow.request.path) == ("ghcr.io", "/v2/org/app/manifests/1")
        assert mirror.hosts.registry(flow) == "ghcr.io"
        hub = mirror_flow("/v2/docker.io/library/alpine/manifests/3.20")
        mirror.requestheaders(hub)
        assert (hub.request.host, hub.request.path) == ("registry-1.docker.io", "/v2/library/alpine/manifests/3.20")

    @pytest.mark.parametrize("first", ["evil.example", "127.0.0.1:8099", "localhost"])
    def test_a_path_that_names_another_registry_is_an_error(self, mirror, first):
        assert_unknown_name(mirror, f"/v2/{first}/org/app/manifests/1")

    def test_a_docker_hub_namespace_is_no_registry(self, mirror):
        flow = mirror_flow("/v2/library/alpine/manifests/3.20")
        mirror.requestheaders(flow)
        assert flow.request.path == "/v2/library/alpine/manifests/3.20" and flow.request.host == "registry-1.docker.io"

    def test_docker_hub_by_default(self, mirror):
        flow = mirror_flow("/v2/library/alpine/manifests/3.20")
        mirror.requestheaders(flow)
        assert mirror.hosts.registry(flow) == "registry-1.docker.io"

    @pytest.mark.parametrize("ns", ["evil.example", "127.0.0.1:8099", "auth.docker.io"])
    def test_anything_else_is_a_registry_error_and_no_registry_request(self, mirror, ns):
        assert_unknown_name(mirror, f"/v2/library/alpine/manifests/1?ns={ns}")

    def test_not_the_registry_api(self, mirror):
        flow = mirror_flow("/status.json")
        mirror.requestheaders(flow)
        assert flow.response.status_code == 404

    def test_a_mirror_request_not_routed_by_the_mirror_is_nobodys(self, mirror):
        # The reverse mode names Docker Hub, but only Mirror's routing makes it a registry request.
        assert mirror.hosts.registry(mirror_flow("/v2/")) is None

    def test_plain_http_only_when_allowed(self, mirror):
        flow = mirror_flow("/v2/", tls=False)
        mirror.requestheaders(flow)
        assert flow.response.status_code == 400
        with taddons.context(mirror.hosts, mirror) as tctx:
            tctx.configure(mirror, mirror_plain_http=True)
            flow = mirror_flow("/v2/", tls=False)
            mirror.requestheaders(flow)
            assert flow.response is None and mirror.hosts.registry(flow) == "registry-1.docker.io"

    def test_proxy_flows_are_left_alone(self, mirror):
        flow = tflow.tflow()
        before = flow.request.url
        mirror.requestheaders(flow)
        assert flow.response is None and flow.request.url == before
        assert not mirror.hosts.is_mirror(flow.client_conn)


class TestTokens:
    def challenge_from_docker_hub(self, mirror):
        flow = mirror_flow("/v2/")
        mirror.requestheaders(flow)
        flow.response = tflow.tresp(status_code=401)
        flow.response.headers["www-authenticate"] = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'
        MirrorChallenges(mirror).response(flow)
        return flow.response.headers["www-authenticate"]

    def test_the_realm_becomes_the_mirrors_own(self, mirror):
        header = self.challenge_from_docker_hub(mirror)
        assert header == 'Bearer realm="https://127.0.0.1:5443/hubcache/token/auth.docker.io/token",service="registry.docker.io"'

    @pytest.mark.parametrize("authority", ["auth.docker.io", "auth.docker.io:443"])
    def test_a_learned_realm_is_relayed_to(self, mirror, authority):
        self.challenge_from_docker_hub(mirror)
        flow = mirror_flow(f"/hubcache/token/{authority}/token?service=registry.docker.io&scope=repository:library/alpine:pull")
        mirror.requestheaders(flow)
        assert flow.response is None
        assert flow.request.url == "https://auth.docker.io/token?service=registry.docker.io&scope=repository:library/alpine:pull"
        assert mirror.hosts.destination(flow) == "auth.docker.io"

    @pytest.mark.parametrize(
        "path",
        [
            "/hubcache/token/auth.docker.io/token",
            "/hubcache/token/evil.example/token",
            "/hubcache/token/auth.docker.io:8443/token",
            # A port int() refuses, or none: a registry error, never an exception that leaves the
            # request to go on to Docker Hub as the client wrote it.
            pytest.param("/hubcache/token/auth.docker.io:\u00b2/token", id="port-superscript"),
            pytest.param("/hubcache/token/auth.docker.io:" + "4" * 5000 + "/token", id="port-5000-digits"),
            pytest.param("/hubcache/token/auth.docker.io:/token", id="port-empty"),
        ],
    )
    def test_no_other_realm_is_relayed_to(self, mirror, path):
        if path != "/hubcache/token/auth.docker.io/token":  # that one: before any challenge taught it
            self.challenge_from_docker_hub(mirror)
        flow = mirror_flow(path)
        try:
            mirror.requestheaders(flow)
        except ValueError as e:  # mitmproxy would log it and let the request go on
            pytest.fail(f"the hook raised {e!r}")
        assert flow.response is not None, f"relayed to {flow.request.url}"
        assert flow.response.status_code == 404


def test_without_docker_hub_the_version_check_is_the_mirrors_own(mirror):
    with taddons.context(mirror.hosts, mirror) as tctx:
        tctx.configure(mirror.hosts, registries=["ghcr.io"])
        flow = mirror_flow("/v2/")
        mirror.requestheaders(flow)
        assert flow.response.status_code == 200 and mirror.hosts.destination(flow) is None

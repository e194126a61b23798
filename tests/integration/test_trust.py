"""The trust boundary, attacked the way a client of the proxy port could (see docs/security.md):
every attack runs through a real hubcache with curl or skopeo, against hostile servers on loopback,
and each test also checks that the legitimate pull still works."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import pytest
from cryptography import x509

from support import proxied
from support.clients import pulled_blobs, skopeo_copy
from support.hostile import EVIL_DIGEST, EVIL_MANIFEST, Hostile
from support.images import build_image
from support.pki import TestCA
from support.registry import ALICE, REGISTRY_NAME, private_repository, push

HUB = "registry-1.docker.io"
SECRET = "library/secret"
ACCEPT = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"


@dataclass
class Curl:
    returncode: int
    status: int
    version: str
    body: bytes
    headers: str
    stderr: str


def curl(*args: str, tmp: Path) -> Curl:
    body, headers = tmp / f"body-{time.monotonic_ns()}", tmp / f"headers-{time.monotonic_ns()}"
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-o", str(body), "-D", str(headers), "-w", "%{http_code} %{http_version}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    code, _, version = done.stdout.partition(" ")
    return Curl(
        done.returncode,
        int(code or 0),
        version,
        body.read_bytes() if body.exists() else b"",
        headers.read_text() if headers.exists() else "",
        done.stderr,
    )


@pytest.fixture
def hostile():
    servers: list[Hostile] = []

    def start(mode: str = "yes", cert: Path | None = None, key: Path | None = None) -> Hostile:
        servers.append(Hostile(mode, cert, key))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def secret(registry, dockerhub, multi_image):
    """A private Docker Hub repository (alice's), holding the two-platform image."""
    with private_repository(registry, dockerhub, SECRET, multi_image) as image:
        yield image


def hub_get(proxy, path: str, credentials=None, **options) -> proxied.Answer:
    """A request for the private repository, with a token (alice's, or an anonymous one)."""
    token = proxied.docker_hub_token(proxy.port, SECRET, ca=proxy.ca_cert, credentials=credentials)
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    return proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=headers, **options)


def cache_as_alice(proxy, image) -> dict[str, str]:
    """Alice pulls the private image through the proxy: its paths, now cached."""
    amd64 = image.platform("linux/amd64")
    paths = {
        "tag": f"/v2/{SECRET}/manifests/1",
        "index": f"/v2/{SECRET}/manifests/{image.index_digest}",
        "manifest": f"/v2/{SECRET}/manifests/{amd64.manifest.digest}",
        "layer": f"/v2/{SECRET}/blobs/{amd64.layers[0].digest}",
    }
    for what, path in paths.items():
        assert hub_get(proxy, path, ALICE).status == 200, what
    return paths


def anonymous_is_refused(proxy, paths: dict[str, str]) -> None:
    for what, path in paths.items():
        answer = hub_get(proxy, path, follow=False)
        assert answer.status in (401, 403, 404), (what, answer.status)


SPOOFS = {
    # GET http://ATTACKER/... sent to the proxy, claiming the registry in Host
    "absolute-form": lambda proxy, port: ["-x", proxy.url, "-H", f"Host: {HUB}", f"http://127.0.0.1:{port}"],
    # the same as plain HTTP inside CONNECT ATTACKER
    "in-tunnel": lambda proxy, port: ["-p", "-x", proxy.url, "-H", f"Host: {HUB}", f"http://127.0.0.1:{port}"],
}


@pytest.mark.parametrize("spoof", SPOOFS)
def test_a_spoofed_host_header_never_reaches_private_content(hubcache, dockerhub, secret, hostile, spoof, tmp_path):
    proxy = hubcache()
    paths = cache_as_alice(proxy, secret)
    attacker = hostile("yes")
    for what, path in paths.items():
        answer = curl(*SPOOFS[spoof](proxy, attacker.port)[:-1], SPOOFS[spoof](proxy, attacker.port)[-1] + path, "-H", f"Accept: {ACCEPT}", tmp=tmp_path)
        assert answer.status != 307, (what, answer.headers)
        if what != "layer":
            assert answer.body == EVIL_MANIFEST, (what, answer.status, answer.body[:200])
    # Relayed untouched to where it went: nothing of hubcache's own went there.
    assert [s.method for s in attacker.requests()] == ["GET"] * len(paths)
    anonymous_is_refused(proxy, paths)
    assert hub_get(proxy, paths["layer"], ALICE).status == 200


def test_tls_to_another_host_with_the_registry_sni_is_not_intercepted(hubcache, dockerhub, secret, hostile, ca, tmp_path):
    """CONNECT ATTACKER with SNI and Host naming the registry: hubcache does not intercept (it
    would mint a certificate for the registry's name), so the client meets the attacker's own
    certificate and nothing reaches the cache."""
    proxy = hubcache()
    paths = cache_as_alice(proxy, secret)
    rogue_ca = TestCA(tmp_path / "rogue-ca", common_name="rogue")
    cert, key = rogue_ca.issue("rogue", [HUB])
    attacker = hostile("yes", cert, key)
    for http2 in ([], ["--http2"]):
        strict = curl(*http2, "-x", proxy.url, "--connect-to", f"{HUB}:443:127.0.0.1:{attacker.port}", "--cacert", str(proxy.ca_cert), f"https://{HUB}{paths['tag']}", tmp=tmp_path)
        assert strict.returncode == 60 and strict.status == 0, strict  # the rogue certificate, not hubcache's
        lax = curl(*http2, "-k", "-x", proxy.url, "--connect-to", f"{HUB}:443:127.0.0.1:{attacker.port}", f"https://{HUB}{paths['manifest']}", tmp=tmp_path)
        assert lax.body == EVIL_MANIFEST, lax
    anonymous_is_refused(proxy, paths)


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_a_host_header_naming_another_registry_is_not_that_registry(hubcache, dockerhub, registry, multi_image, http2, tmp_path):
    """Inside verified TLS to Docker Hub, a Host (or :authority) naming another cached registry
    is relayed to Docker Hub untouched, never served from the other registry's cache."""
    proxy = hubcache()
    path = f"/v2/test/multi/manifests/{multi_image.index_digest}"
    assert proxied.request(proxy.port, REGISTRY_NAME, path, ca=proxy.ca_cert, headers={"Accept": ACCEPT}).status == 200
    answer = curl(*(["--http2"] if http2 else ["--http1.1"]), "-x", proxy.url, "--cacert", str(proxy.ca_cert), "-H", f"Host: {REGISTRY_NAME}", "-H", f"Accept: {ACCEPT}", f"https://{HUB}{path}", tmp=tmp_path)
    assert answer.returncode == 0, answer.stderr
    # Docker Hub was asked, and knows no such host: the cache of the other registry never answered.
    assert answer.status == 421 and "docker-hub-double" in answer.headers, answer
    assert ("2" in answer.version) == http2


def test_a_tag_cannot_be_poisoned_through_a_spoofed_request(hubcache, dockerhub, multi_image, hostile, tmp_path):
    proxy = hubcache(tag_freshness=3600)
    attacker = hostile("yes")
    for spoof in SPOOFS.values():
        args = spoof(proxy, attacker.port)
        poisoned = curl(*args[:-1], args[-1] + "/v2/library/multi/manifests/1", "-H", f"Accept: {ACCEPT}", tmp=tmp_path)
        assert poisoned.body == EVIL_MANIFEST
    answer = proxied.request(proxy.port, HUB, "/v2/library/multi/manifests/1", ca=proxy.ca_cert, headers={"Accept": ACCEPT, "Authorization": "Bearer " + proxied.docker_hub_token(proxy.port, "library/multi", ca=proxy.ca_cert)})
    assert answer.status == 200
    assert answer.headers["Docker-Content-Digest"] == multi_image.index_digest
    assert not any(e.get("digest") == EVIL_DIGEST for e in proxy.journal())
    pulled = skopeo_copy(f"docker://{HUB}/library/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr


DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def test_an_accept_without_indexes_cannot_repoint_a_multi_platform_tag(hubcache, dockerhub, registry, layouts, tmp_path):
    """The registry answers a client that names no index type with one platform's manifest (the
    distribution registry falls back to linux/amd64): that answer never becomes the tag for the
    clients that take the manifest list, which still get their own platform."""
    image = build_image(layouts / "listed", "1", [100_000], seed="listed", platforms=[("linux", "amd64"), ("linux", "arm64", "v8")], format="docker")
    push(registry, "library/listed:1", image)
    amd64, arm64 = image.platform("linux/amd64"), image.platform("linux/arm64/v8")
    proxy = hubcache(tag_freshness=3600)
    token = proxied.docker_hub_token(proxy.port, "library/listed", ca=proxy.ca_cert)

    def ask(accept: str, method: str = "GET") -> proxied.Answer:
        headers = {"Accept": accept, "Authorization": f"Bearer {token}"}
        return proxied.request(proxy.port, HUB, "/v2/library/listed/manifests/1", ca=proxy.ca_cert, method=method, headers=headers)

    for method in ("HEAD", "GET"):
        narrow = ask(DOCKER_V2, method)
        assert (narrow.status, narrow.headers["Docker-Content-Digest"]) == (200, amd64.manifest.digest), "upstream's answer to it"
    pulled = skopeo_copy(f"docker://{HUB}/library/listed:1", tmp_path / "arm64", proxy=proxy.url, ca_bundle=proxy.client_bundle, arch="arm64")
    assert pulled.returncode == 0, pulled.stderr
    assert {layer.digest for layer in arm64.layers} <= pulled_blobs(tmp_path / "arm64"), "before: amd64's manifest, from the cache"
    assert ask(f"{DOCKER_V2}, {DOCKER_LIST}, {ACCEPT}").headers["Docker-Content-Digest"] == image.index_digest
    assert ask(DOCKER_V2).headers["Docker-Content-Digest"] == amd64.manifest.digest, "the narrow client keeps its answer"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_configured_credentials_never_reach_a_spoofed_server(hubcache, dockerhub, secret, hostile, tls, tmp_path):
    secret_file = tmp_path / "account"
    secret_file.write_text("alice:s3cret\n")
    proxy = hubcache(registry_settings=[f"{HUB}:credentials=@{secret_file}"])
    if tls:
        cert, key = TestCA(tmp_path / "rogue-ca").issue("rogue", [HUB])
        attacker = hostile("basic", cert, key)
        spoof = ["-k", "-x", proxy.url, "--connect-to", f"{HUB}:443:127.0.0.1:{attacker.port}"]
        base = f"https://{HUB}"
    else:
        attacker = hostile("basic")
        spoof = ["-x", proxy.url, "-H", f"Host: {HUB}"]
        base = f"http://127.0.0.1:{attacker.port}"
    for _ in range(2):  # the first 401 would teach hubcache to present Basic; the second would carry it
        answer = curl(*spoof, f"{base}/v2/{SECRET}/manifests/1", tmp=tmp_path)
        assert answer.status == 401, answer
    assert len(attacker.requests()) == 2
    assert all("authorization" not in seen.headers for seen in attacker.requests())
    # The legitimate anonymous pull still gets the account's access.
    pulled = skopeo_copy(f"docker://{HUB}/{SECRET}:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr


def test_the_account_is_asked_only_for_pull_scopes(hubcache, dockerhub, secret, tmp_path):
    secret_file = tmp_path / "account"
    secret_file.write_text("alice:s3cret\n")
    proxy = hubcache(registry_settings=[f"{HUB}:credentials=@{secret_file}"])
    # hubcache learns the realm from Docker Hub's own challenge.
    assert proxied.request(proxy.port, HUB, "/v2/", ca=proxy.ca_cert).status == 401
    dockerhub.reset()
    query = f"service=registry.docker.io&scope=repository:{SECRET}:pull,push,delete&scope=registry:catalog:*&offline_token=true&client_id=x"
    answer = proxied.request(proxy.port, "auth.docker.io", f"/token?{query}", ca=proxy.ca_cert)
    assert answer.status == 200
    [seen] = dockerhub.requests(kind="token")
    assert seen.had_authorization
    assert sorted(seen.query) == sorted([("service", "registry.docker.io"), ("client_id", "x"), ("scope", f"repository:{SECRET}:pull")])
    # A request for nothing the account pulls (a login check) goes without its credentials.
    dockerhub.reset()
    assert proxied.request(proxy.port, "auth.docker.io", "/token?service=registry.docker.io&scope=registry:catalog:*", ca=proxy.ca_cert).status in (200, 401)
    assert not dockerhub.requests(kind="token")[0].had_authorization


def test_a_registry_that_redirects_everything_unlocks_nothing(hubcache, dockerhub, secret, hostile, ca, tmp_path):
    """A registry answering every path with a redirect (registry.k8s.io does) is judged by where
    the redirect ends: a digest cached from another registry is never served through it."""
    cert, key = ca.issue("redirector", ["redirect.hubcache.test"])
    redirector = hostile("redirect", cert, key)
    proxy = hubcache(
        registries=[HUB, "index.docker.io", REGISTRY_NAME, "redirect.hubcache.test"],
        upstream_map=[*hubcache_map(dockerhub), f"redirect.hubcache.test=127.0.0.1:{redirector.port}"],
    )
    paths = cache_as_alice(proxy, secret)
    layer = paths["layer"].rsplit("/", 1)[1]
    for name in (SECRET, "anything/else"):
        answer = proxied.request(proxy.port, "redirect.hubcache.test", f"/v2/{name}/blobs/{layer}", ca=proxy.ca_cert, follow=False)
        assert answer.status == 404, (name, answer.status, answer.headers)
    assert any(seen.path == "/missing" for seen in redirector.requests()), "the redirect was followed to its end"
    assert hub_get(proxy, paths["layer"], ALICE).status == 200


def hubcache_map(dockerhub) -> list[str]:
    from support.dockerhub import ALL_HOSTS

    return [f"{h}=127.0.0.1:{dockerhub.port}" for h in ALL_HOSTS]


def test_hubcaches_own_listeners_are_not_reachable_through_the_proxy(hubcache, dockerhub, multi_image, tmp_path):
    proxy = hubcache()
    status = int(proxy.status_url.rstrip("/").rsplit(":", 1)[1])
    blob_ports = [int(p) for p in _blob_ports(proxy)]
    for port in [status, proxy.port, *blob_ports]:
        for how in (["-x", proxy.url], ["-p", "-x", proxy.url]):
            answer = curl(*how, f"http://127.0.0.1:{port}/status.json", tmp=tmp_path)
            assert answer.status == 403 or "403" in answer.stderr, (port, how, answer)  # -p: the CONNECT's
            assert b'"store"' not in answer.body, "the status page answered through the proxy"
    # localhost resolves to loopback: the same listener by name.
    assert curl("-x", proxy.url, f"http://localhost:{status}/status.json", tmp=tmp_path).status == 403
    # The listener itself, asked directly, answers.
    assert json.loads(subprocess.run(["curl", "-sS", f"{proxy.status_url}status.json"], capture_output=True, timeout=30).stdout)["store"] is not None
    pulled = skopeo_copy(f"docker://{HUB}/library/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr


def _blob_ports(proxy) -> list[str]:
    import re

    found = re.search(r"blob server on 127\.0\.0\.1:(\d+) \(https\) and :(\d+)", proxy.log_text())
    assert found
    return list(found.groups())


def test_a_proxy_serving_a_network_refuses_local_destinations(hubcache, dockerhub, multi_image, hostile, tmp_path):
    local = hostile("yes")
    proxy = hubcache(local_destinations="refuse")
    for url in (f"http://127.0.0.1:{local.port}/", f"http://localhost:{local.port}/", "http://169.254.169.254/latest/meta-data/", f"http://[::1]:{local.port}/"):
        for how in (["-x", proxy.url], ["-p", "-x", proxy.url]):
            answer = curl(*how, url, tmp=tmp_path)
            assert answer.status == 403 or "403" in answer.stderr, (url, how, answer)
    assert local.requests() == []
    # The registries (routed by upstream_map) still work, and so does a listed exception.
    pulled = skopeo_copy(f"docker://{HUB}/library/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr
    proxy.stop()
    proxy.start(local_destinations_allowed=[f"127.0.0.1:{local.port}"])
    assert curl("-x", proxy.url, f"http://127.0.0.1:{local.port}/", tmp=tmp_path).status == 200
    assert len(local.requests()) == 1


def test_the_ca_key_never_leaves_confdir(hubcache, dockerhub, multi_image, tmp_path):
    before = set(Path("/tmp").glob("hubcache-blobhost-*"))
    proxy = hubcache(blob_urls="https")
    pulled = skopeo_copy(f"docker://{HUB}/library/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr
    ca_key = (proxy.confdir / "mitmproxy-ca.pem").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(proxy.ca_cert.read_bytes())
    # The blob host's certificate: signed by the CA, with a key of its own.
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        raw.sendall(b"CONNECT blobs.hubcache.invalid:443 HTTP/1.1\r\nHost: blobs.hubcache.invalid:443\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname="blobs.hubcache.invalid") as tls:
            leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    assert leaf.public_key().public_numbers() != ca_cert.public_key().public_numbers()
    # No key on disk, nor any file the blob server was handed.
    assert set(Path("/tmp").glob("hubcache-blobhost-*")) == before
    blob_server = _blob_server_pid(proxy)
    cmdline = Path(f"/proc/{blob_server}/cmdline").read_bytes().replace(b"\0", b" ")
    assert b"--key" not in cmdline and b".pem" not in cmdline
    for fd in Path(f"/proc/{blob_server}/fd").iterdir():
        target = os.readlink(fd)
        assert "memfd:" not in target and not target.endswith(".pem"), target  # the key's memfd is closed
    assert ca_key.split(b"-----END")[0] not in Path(f"/proc/{blob_server}/environ").read_bytes()
    # SIGKILL leaves nothing behind either.
    proxy.proc.kill()
    assert set(Path("/tmp").glob("hubcache-blobhost-*")) == before


def _blob_server_pid(proxy) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"hubcache.blobserver.server" in cmdline and str(proxy.cache_dir).encode() in cmdline:
                return int(entry.name)
    raise AssertionError("no blob server process")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


MiB = 1024 * 1024


def test_a_loopback_blob_url_sent_through_the_proxy_keeps_memory_flat(hubcache, dockerhub, big_image, tmp_path):
    """A client with HTTP_PROXY set sends hubcache's loopback blob URL back through the proxy: it
    is redirected to the blob host, whose bytes mitmproxy relays as raw TLS."""
    proxy = hubcache()
    layer = big_image.platform("linux/amd64").layers[0]
    path = f"/v2/library/big/blobs/{layer.digest}"
    token = proxied.docker_hub_token(proxy.port, "library/big", ca=proxy.ca_cert)
    first = proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers={"Authorization": f"Bearer {token}"})
    assert hashlib.sha256(first.body).hexdigest() == layer.digest[7:]
    del first
    answer = proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers={"Authorization": f"Bearer {token}"}, follow=False)
    location = answer.headers["Location"]
    assert location.startswith("http://127.0.0.1:")
    before = peak_rss(proxy.proc.pid)
    out = tmp_path / "layer"
    done = subprocess.run(
        ["curl", "-sS", "-L", "-x", proxy.url, "--cacert", str(proxy.ca_cert), "-o", str(out), "-w", "%{http_code} %{num_redirects} %{url_effective}", location],
        capture_output=True, text=True, timeout=300,
    )
    status, redirects, effective = done.stdout.split()
    assert (status, redirects) == ("200", "1"), done
    assert effective.startswith("https://blobs.hubcache.invalid/blobs/")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == layer.digest[7:]
    assert peak_rss(proxy.proc.pid) - before < 64 * MiB, "the blob went through the proxy's memory"
    # Nothing else on the blob server's port is reachable that way.
    port = location.split(":")[2].split("/")[0]
    assert curl("-x", proxy.url, f"http://127.0.0.1:{port}/status", tmp=tmp_path).status == 403


class _Endless(BaseHTTPRequestHandler):
    """Sends SIZE bytes (chunked, no Content-Length) and takes any upload, counting it."""

    protocol_version = "HTTP/1.1"
    size = 256 * MiB
    received: ClassVar[list[int]] = []  # the handler class is the test's record

    def do_GET(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"x" * MiB
        for _ in range(self.size // MiB):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def do_PUT(self):
        left, got = int(self.headers["Content-Length"]), 0
        while left:
            data = self.rfile.read(min(left, MiB))
            left -= len(data)
            got += len(data)
        self.received.append(got)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_bodies_hubcache_does_not_cache_are_streamed(hubcache, dockerhub, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proxy = hubcache()
        before = peak_rss(proxy.proc.pid)
        got = curl("-x", proxy.url, f"http://127.0.0.1:{server.server_address[1]}/big", tmp=tmp_path)
        assert got.status == 200 and len(got.body) == _Endless.size
        upload = tmp_path / "upload"
        with open(upload, "wb") as f:
            f.truncate(_Endless.size)
        sent = curl("-x", proxy.url, "-T", str(upload), f"http://127.0.0.1:{server.server_address[1]}/up", tmp=tmp_path)
        assert sent.status == 201 and _Endless.received[-1] == _Endless.size
        assert peak_rss(proxy.proc.pid) - before < 64 * MiB
    finally:
        server.shutdown()
        server.server_close()


def test_the_status_page_names_no_private_repository(hubcache, dockerhub, secret, tmp_path):
    import urllib.request

    proxy = hubcache()
    cache_as_alice(proxy, secret)
    page = urllib.request.urlopen(f"{proxy.status_url}status.json", timeout=30).read()
    assert b"secret" not in page
    assert b"(private)" in page
    proxy.stop()
    proxy.start(status_private=True)
    cache_as_alice(proxy, secret)
    page = urllib.request.urlopen(f"{proxy.status_url}status.json", timeout=30).read()
    assert b"library/secret" in page


def test_a_repository_made_private_stops_being_served(hubcache, registry, dockerhub, multi_image, tmp_path):
    repository = "library/turning"
    push(registry, f"{repository}:1", multi_image)
    proxy = hubcache(visibility_check_seconds=0)
    path = f"/v2/{repository}/manifests/{multi_image.index_digest}"
    token = lambda: proxied.docker_hub_token(proxy.port, repository, ca=proxy.ca_cert)  # noqa: E731
    assert proxied.request(proxy.port, HUB, f"/v2/{repository}/manifests/1", ca=proxy.ca_cert, headers={"Authorization": f"Bearer {token()}", "Accept": ACCEPT}).status == 200
    assert proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers={"Authorization": f"Bearer {token()}", "Accept": ACCEPT}).status == 200
    dockerhub.private_repos[repository] = ALICE
    try:
        answer = proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers={"Accept": ACCEPT})
        assert answer.status == 401, answer.status
        alice = proxied.docker_hub_token(proxy.port, repository, ca=proxy.ca_cert, credentials=ALICE)
        assert proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers={"Authorization": f"Bearer {alice}", "Accept": ACCEPT}).status == 200
    finally:
        del dockerhub.private_repos[repository]


def test_the_store_and_the_journal_are_the_service_users_alone(hubcache, dockerhub, multi_image, tmp_path):
    proxy = hubcache()
    pulled = skopeo_copy(f"docker://{HUB}/library/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr
    assert proxy.cache_dir.stat().st_mode & 0o077 == 0
    assert (proxy.cache_dir / "misses.jsonl").stat().st_mode & 0o077 == 0


def test_blob_urls_on_an_address_of_this_machine_still_serve_clients_through_the_proxy(hubcache, dockerhub, multi_image, tmp_path):
    """`blob_listen`: Go clients fetch blobs from that address directly (a loopback one: they never
    proxy it); a client that sends the URL through the proxy (HTTPS_PROXY without NO_PROXY) is
    relayed there, even by a proxy that refuses local destinations; nothing else of the address
    opens; and the listener serves signed URLs only."""
    proxy = hubcache(blob_urls="https", blob_listen="127.0.0.2", local_destinations="refuse")
    pulled = skopeo_copy(f"docker://{HUB}/library/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr
    layer = multi_image.platform("linux/amd64").layers[0]
    path = f"/v2/library/multi/blobs/{layer.digest}"
    token = proxied.docker_hub_token(proxy.port, "library/multi", ca=proxy.ca_cert)
    headers = {"Authorization": f"Bearer {token}"}
    redirect = proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=headers, follow=False)
    assert redirect.status == 307
    location = urlsplit(redirect.headers["Location"])
    assert (location.scheme, location.hostname) == ("https", "127.0.0.2")
    try:
        through = proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=headers)
    except OSError as e:
        raise AssertionError(f"the client through the proxy was not relayed to the blob server: {e}") from None
    assert through.status == 200 and "sha256:" + hashlib.sha256(through.body).hexdigest() == layer.digest
    direct = curl("--noproxy", "*", "--cacert", str(proxy.ca_cert), location.geturl(), tmp=tmp_path)
    assert direct.status == 200 and direct.body == through.body
    tampered = location._replace(query=location.query.replace("signature=", "signature=0"))
    for refused in (location._replace(query=""), tampered):
        answer = curl("--noproxy", "*", "--cacert", str(proxy.ca_cert), refused.geturl(), tmp=tmp_path)
        assert answer.status == 403 and b"DENIED" in answer.body, refused.geturl()
    for port in [location.port + 1, *(int(p) for p in _blob_ports(proxy))]:
        other = curl("-p", "-x", proxy.url, f"http://127.0.0.2:{port}/", tmp=tmp_path)
        assert other.status == 403 or "403" in other.stderr, (port, other)


def test_one_client_address_cannot_take_every_connection_of_the_network_blob_listener(hubcache, registry, multi_image, tmp_path):
    """A client on the network that opens connections and says nothing holds a quarter of the
    network listener's connections at most (each would be kept until its head deadline); its
    next one is closed at once, and a client at another address is served meanwhile."""
    proxy = hubcache(blob_urls="https", blob_listen="127.0.0.2", blob_head_timeout=120)
    pulled = skopeo_copy(f"docker://{REGISTRY_NAME}/test/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr
    layer = multi_image.platform("linux/amd64").layers[0]
    redirect = proxied.request(proxy.port, REGISTRY_NAME, f"/v2/test/multi/blobs/{layer.digest}", ca=proxy.ca_cert, follow=False)
    location = urlsplit(redirect.headers["Location"])
    assert redirect.status == 307 and location.hostname == "127.0.0.2"
    listener = (location.hostname, location.port)
    held = [socket.create_connection(listener, timeout=30, source_address=("127.0.0.3", 0)) for _ in range(256)]
    try:
        with socket.create_connection(listener, timeout=30, source_address=("127.0.0.3", 0)) as beyond:
            try:
                assert beyond.recv(1) == b"", "the connection beyond the share was answered"
            except ConnectionResetError:
                pass  # closed: what the share does
            except TimeoutError:
                pytest.fail("the connection beyond the address's share was kept")
        direct = curl("--noproxy", "*", "--cacert", str(proxy.ca_cert), location.geturl(), tmp=tmp_path)
        assert direct.status == 200 and "sha256:" + hashlib.sha256(direct.body).hexdigest() == layer.digest
    finally:
        for sock in held:
            sock.close()
    assert "connections from 127.0.0.3 refused" in proxy.log_text()


def test_one_client_cannot_take_every_connection_of_the_proxy(hubcache, registry, multi_image, tmp_path):
    """A client on the network that opens connections to the proxy port and says nothing (mitmproxy
    would keep each for tcp_timeout) holds its share at most: its next one is closed at once, while
    a client at another address and this machine's own clients pull meanwhile."""
    proxy = hubcache(client_connections=16)
    manifest = f"https://{REGISTRY_NAME}/v2/test/multi/manifests/{multi_image.index_digest}"
    held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=30, source_address=("127.0.0.3", 0)) for _ in range(16)]
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30, source_address=("127.0.0.3", 0)) as beyond:
            try:
                beyond.sendall(f"CONNECT {REGISTRY_NAME}:443 HTTP/1.1\r\n\r\n".encode())
                assert beyond.recv(1) == b"", "the connection beyond the share was answered"
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed: what the share does
            except TimeoutError:
                pytest.fail("the connection beyond the client's share was kept")
        other = curl("--interface", "127.0.0.4", "-x", proxy.url, "--cacert", str(proxy.ca_cert), "-H", f"Accept: {ACCEPT}", manifest, tmp=tmp_path)
        assert other.status == 200 and json.loads(other.body)["manifests"], other
        pulled = skopeo_copy(f"docker://{REGISTRY_NAME}/test/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
        assert pulled.returncode == 0, pulled.stderr
    finally:
        for sock in held:
            sock.close()
    assert "connections to the proxy from 127.0.0.3 refused" in proxy.log_text()
    # Its connections closed, the client has its share again (once the proxy saw them end).
    deadline = time.monotonic() + 30
    while (again := curl("--interface", "127.0.0.3", "-x", proxy.url, "--cacert", str(proxy.ca_cert), "-H", f"Accept: {ACCEPT}", manifest, tmp=tmp_path)).status != 200:
        assert time.monotonic() < deadline, f"the client's closed connections still count: {again}"

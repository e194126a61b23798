"""The mirror endpoint (`mirror_listen`): engines pointed at hubcache as a registry mirror, with
its CA trusted for that host only, pull through the same cache as proxy clients, keep pulling
what is cached with upstream unreachable, and cannot use it to reach anything but a cached
registry."""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from support.clients import Dockerd, pulled_blobs
from support.containerd import Containerd
from support.images import build_image
from support.mirror import cert_dir, go_offline, mirror_get, skopeo_via_mirror, start_mirror, wait_for_mirror
from support.procs import free_port
from support.registry import REGISTRY_NAME, private_repository, push
from support.setupscript import parse

HUB_REF = "docker://docker.io/library/multi:1"
HUBCACHE = Path(sys.executable).with_name("hubcache")


def wait_for_log(proxy, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log_text():
        assert time.monotonic() < deadline, f"not in the log: {text}\n{proxy.log_text()[-3000:]}"
        time.sleep(0.05)


def test_skopeo_pulls_through_the_mirror_cold_then_warm_with_upstream_unreachable(hubcache, dockerhub, multi_image, tmp_path):
    proxy = start_mirror(hubcache)
    cold = skopeo_via_mirror(proxy, HUB_REF, tmp_path / "cold", tmp_path)
    assert cold.returncode == 0, cold.stderr
    amd64 = multi_image.platform("linux/amd64")
    filled = {e["digest"] for e in proxy.journal() if e["kind"] == "blob" and e["outcome"] == "filled"}
    assert filled == {amd64.config.digest, *(layer.digest for layer in amd64.layers)}
    assert dockerhub.counts()["cdn"] == 1 + len(amd64.layers), "each blob fetched once"

    go_offline(proxy)
    warm = skopeo_via_mirror(proxy, HUB_REF, tmp_path / "warm", tmp_path)
    assert warm.returncode == 0, warm.stderr
    assert pulled_blobs(tmp_path / "warm") == pulled_blobs(tmp_path / "cold")
    wait_for_log(proxy, "pull docker.io/library/multi:1 by 127.0.0.1: 4 blobs, 5.3 MB from cache, 0 B from upstream")

    missing = skopeo_via_mirror(proxy, "docker://docker.io/library/absent:1", tmp_path / "missing", tmp_path)
    assert missing.returncode != 0
    # The mirror answered (a registry 502 UNAVAILABLE); skopeo then tried docker.io itself.
    assert f"Mirrors also failed: [{proxy.mirror}/library/absent:1" in missing.stderr, missing.stderr
    assert "502 Bad Gateway" in missing.stderr, missing.stderr
    assert any(e["repository"] == "library/absent" and e["outcome"] == "failed" for e in proxy.journal())


# private images: the same rules as on the proxy path

SECRET = "library/secret"
ACCEPT = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def secret(registry, dockerhub, multi_image):
    with private_repository(registry, dockerhub, SECRET, multi_image) as image:
        yield image


def mirror_token(proxy, credentials: tuple[str, str] | None = None, repository: str = SECRET) -> dict[str, str]:
    """A pull token the way a mirror client gets one: the realm of the mirror's own challenge."""
    status, headers, _ = mirror_get(proxy, "/v2/")
    assert status == 401, status
    challenge = headers["www-authenticate"]
    realm = challenge.split('realm="', 1)[1].split('"', 1)[0]
    assert realm.startswith(f"https://{proxy.mirror}/hubcache/token/"), challenge
    service = challenge.split('service="', 1)[1].split('"', 1)[0]
    auth = {}
    if credentials:
        auth["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    status, _, body = mirror_get(proxy, f"{realm.removeprefix(f'https://{proxy.mirror}')}?service={service}&scope=repository:{repository}:pull", auth)
    assert status == 200, body
    return {"Authorization": f"Bearer {json.loads(body)['token']}", "Accept": ACCEPT}


def test_a_private_image_alice_filled_through_the_mirror_is_refused_to_anonymous_clients(hubcache, dockerhub, secret):
    proxy = start_mirror(hubcache)
    amd64 = secret.platform("linux/amd64")
    paths = {
        "tag": f"/v2/{SECRET}/manifests/1",
        "manifest": f"/v2/{SECRET}/manifests/{amd64.manifest.digest}",
        **{f"blob {b.digest[7:19]}": f"/v2/{SECRET}/blobs/{b.digest}" for b in (amd64.config, *amd64.layers)},
    }
    alice = mirror_token(proxy, ("alice", "s3cret"))
    for what, path in paths.items():
        status, _, body = mirror_get(proxy, path, alice)
        assert status == 200, (what, status, body[:200])
        if what.startswith("blob"):
            assert hashlib.sha256(body).hexdigest() == path.rsplit(":", 1)[1]
    assert amd64.layers[0].digest in {e["digest"] for e in proxy.journal() if e["outcome"] == "filled"}

    anonymous = mirror_token(proxy)
    for what, path in paths.items():
        status, _, body = mirror_get(proxy, path, anonymous)
        assert status in (401, 403, 404), (what, status)
        assert json.loads(body)["errors"], what
    for what, path in paths.items():  # no token at all
        status, _, _ = mirror_get(proxy, path, {"Accept": ACCEPT})
        assert status in (401, 403, 404), (what, status)


def test_a_public_request_hidden_in_a_private_target_is_refused_by_the_mirror(hubcache, dockerhub, secret):
    """Canonicalize, then act: through the mirror too, a target the registry would clean into a
    public image's never reads the private one alice cached (docs/security.md)."""
    proxy = start_mirror(hubcache)
    index = f"/v2/{SECRET}/manifests/{secret.index_digest}"
    assert mirror_get(proxy, index, mirror_token(proxy, ("alice", "s3cret")))[0] == 200
    public = mirror_token(proxy, repository="library/multi")
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    host, _, port = proxy.mirror.rpartition(":")
    for hidden in ("#", "%23", "/", "//"):
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        try:  # sent byte for byte (urllib would drop a fragment)
            conn.request("GET", f"{index}{hidden}/../../../../library/multi/manifests/1", headers=public)
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        assert answer.status == 400 and json.loads(body)["errors"][0]["code"] == "NAME_INVALID", (hidden, answer.status, body[:200])
    assert mirror_get(proxy, index, public)[0] in (401, 403, 404)
    assert mirror_get(proxy, "/v2/library/multi/manifests/1", public)[0] == 200


def test_the_image_policy_holds_through_the_mirror(hubcache, dockerhub, multi_image):
    proxy = start_mirror(hubcache, deny_images=["docker.io/library/multi"])
    amd64 = multi_image.platform("linux/amd64")
    token = mirror_token(proxy, repository="library/multi")
    for path in ("/v2/library/multi/manifests/1", f"/v2/library/multi/blobs/{amd64.layers[0].digest}"):
        status, _, body = mirror_get(proxy, path, token)
        assert status == 403, (path, status)
        [error] = json.loads(body)["errors"]
        assert error["code"] == "DENIED" and "deny_images" in error["message"], error
    assert [r for r in dockerhub.requests() if "/v2/library/multi/" in r.path] == [], "a refused pull goes nowhere"


def test_registry_settings_credentials_apply_to_mirror_clients_that_bring_none(hubcache, dockerhub, secret, tmp_path):
    ref = f"docker://docker.io/{SECRET}:1"
    plain = start_mirror(hubcache, workdir=tmp_path / "plain")
    refused = skopeo_via_mirror(plain, ref, tmp_path / "refused", tmp_path / "c1")
    assert refused.returncode != 0

    secret_file = tmp_path / "dockerhub.credentials"
    secret_file.write_text("alice:s3cret\n")
    proxy = start_mirror(hubcache, workdir=tmp_path / "account", registry_settings=[f"registry-1.docker.io:credentials=@{secret_file}"])
    pulled = skopeo_via_mirror(proxy, ref, tmp_path / "pulled", tmp_path / "c2")
    assert pulled.returncode == 0, pulled.stderr
    assert "s3cret" not in proxy.log_text()


# attacks: the mirror relays to cached registries only


class Hostile:
    """A plain HTTP server on loopback that counts what reaches it."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                body = b'{"schemaVersion": 2}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def raw_request(proxy, target: str, headers: dict[str, str], tls: bool = True) -> int:
    host, _, port = proxy.mirror.rpartition(":")
    if tls:
        context = ssl.create_default_context(cafile=str(proxy.ca_cert))
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("GET", target, skip_host="Host" in headers, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def test_a_mirror_client_cannot_make_hubcache_relay_anywhere_but_a_cached_registry(hubcache, dockerhub, multi_image):
    hostile = Hostile()
    try:
        proxy = start_mirror(hubcache, mirror_plain_http=True)
        evil = f"127.0.0.1:{hostile.port}"
        answers = {
            "ns names the hostile server": raw_request(proxy, f"/v2/library/multi/manifests/1?ns={evil}", {}),
            "ns names a host name": raw_request(proxy, "/v2/library/multi/manifests/1?ns=evil.example", {}),
            "absolute form": raw_request(proxy, f"http://{evil}/v2/library/multi/manifests/1", {}),
            "absolute form, plain": raw_request(proxy, f"http://{evil}/v2/library/multi/manifests/1", {}, tls=False),
            "Host header": raw_request(proxy, "/v2/library/multi/manifests/1", {"Host": evil}),
            "Host header, plain": raw_request(proxy, "/hubcache/x", {"Host": evil}, tls=False),
            "token path to an unknown realm": raw_request(proxy, f"/hubcache/token/{evil}/token", {}),
            "token path, absolute": raw_request(proxy, f"https://{evil}/hubcache/token/auth.docker.io/token", {}),
            "not the registry API": raw_request(proxy, "/", {"Host": evil}),
        }
        assert hostile.hits == [], hostile.hits
        for what in ("ns names the hostile server", "ns names a host name", "token path to an unknown realm", "not the registry API"):
            assert answers[what] == 404, (what, answers[what])
        # What went to a registry went to Docker Hub (the double), whatever the request named.
        assert {r.host for r in dockerhub.requests()} <= {"registry-1.docker.io", "auth.docker.io", "production.cloudflare.docker.com"}
    finally:
        hostile.close()


def test_plain_http_is_refused_unless_allowed(hubcache):
    proxy = start_mirror(hubcache)
    assert raw_request(proxy, "/v2/", {}, tls=False) == 400
    assert raw_request(proxy, "/v2/", {}) in (200, 401)


def test_the_certificate_names_what_mirror_clients_dial_and_no_registry(hubcache):
    proxy = start_mirror(hubcache, mirror_names=["mirror.example.internal"])
    host, _, port = proxy.mirror.rpartition(":")
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    for name in ("localhost", "127.0.0.1", "mirror.example.internal"):
        with socket.create_connection((host, int(port)), timeout=10) as raw, context.wrap_socket(raw, server_hostname=name) as tls:
            sans = {value for _, value in tls.getpeercert()["subjectAltName"]}
    assert {"localhost", "127.0.0.1", "mirror.example.internal", socket.gethostname().lower()} <= sans
    assert "registry-1.docker.io" not in sans, sans


# dockerd with registry-mirrors


class MirrorDockerd(Dockerd):
    """dockerd with `registry-mirrors` in its daemon.json, no proxy, and hubcache's CA only in
    /etc/docker/certs.d/HOST:PORT/ca.crt (dockerd reads that folder for the mirror's host)."""

    def __init__(self, workdir: Path, mirror: str, ca_cert: Path) -> None:
        super().__init__(workdir)
        self.mirror_config = self.workdir / "mirror-daemon.json"
        self.mirror_config.write_text(json.dumps({"registry-mirrors": [f"https://{mirror}"]}))
        self.certs_d = Path("/etc/docker/certs.d") / mirror
        self.certs_d.mkdir(parents=True, exist_ok=True)
        (self.certs_d / "ca.crt").write_bytes(ca_cert.read_bytes())

    def _argv(self) -> list[str]:
        argv = super()._argv()
        argv[argv.index("--config-file") + 1] = str(self.mirror_config)
        return argv

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.certs_d, ignore_errors=True)


@pytest.mark.dockerd
@pytest.mark.skipif(os.geteuid() != 0, reason="dockerd needs root")
def test_dockerd_pulls_through_registry_mirrors_and_keeps_pulling_with_upstream_unreachable(hubcache, dockerhub, multi_image, tmp_path):
    proxy = start_mirror(hubcache)
    amd64 = multi_image.platform("linux/amd64")
    daemon = MirrorDockerd(tmp_path / "dockerd", proxy.mirror, proxy.ca_cert)
    try:
        daemon.start(None, None)
        cold = daemon.pull("multi:1")
        assert cold.returncode == 0, cold.stdout + cold.stderr
        assert daemon.image_diff_ids("multi:1") == amd64.diff_ids
        filled = {e["digest"] for e in proxy.journal() if e["kind"] == "blob" and e["outcome"] == "filled"}
        assert filled == {amd64.config.digest, *(layer.digest for layer in amd64.layers)}

        daemon.wipe()
        go_offline(proxy)
        daemon.start(None, None)
        warm = daemon.pull("multi:1")
        assert warm.returncode == 0, warm.stdout + warm.stderr
        assert daemon.image_diff_ids("multi:1") == amd64.diff_ids
        wait_for_log(proxy, "pull docker.io/library/multi:1 by 127.0.0.1: 4 blobs, 5.3 MB from cache, 0 B from upstream")

        missing = daemon.pull("absent:1")
        assert missing.returncode != 0
        assert any(e["repository"] == "library/absent" for e in proxy.journal()), "the mirror was asked"
    finally:
        daemon.close()


def test_the_operators_certificate_is_presented_instead(hubcache, ca, dockerhub, multi_image, tmp_path):
    cert, key = ca.issue("mirror-operator", ["mirror.example.internal"])
    proxy = start_mirror(hubcache, mirror_cert=str(cert), mirror_key=str(key))
    host, _, port = proxy.mirror.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca.cert_path))  # the operator's CA, not hubcache's
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="mirror.example.internal") as tls,
    ):
        sans = {value for _, value in tls.getpeercert()["subjectAltName"]}
    assert sans == {"mirror.example.internal", "127.0.0.1"}
    # A client that trusts only the operator's CA pulls.
    pulled = skopeo_via_mirror(proxy, HUB_REF, tmp_path / "pulled", tmp_path, ca_file=ca.cert_path)
    assert pulled.returncode == 0, pulled.stderr


# containerd's ctr with hosts.toml mirrors for two registries, as `hubcache setup containerd --mirror` prints them


def printed_setup(proxy, client: str, tmp_path: Path):
    """What `hubcache setup CLIENT --mirror` prints for this mirror, with the distribution
    registry among the cached registries, parsed."""
    config = tmp_path / "hubcache.yaml"
    config.write_text(f"registries: [registry-1.docker.io, index.docker.io, {REGISTRY_NAME}]\nmirror_listen: {proxy.mirror}\n")
    printed = subprocess.run(
        [HUBCACHE, "setup", client, "--mirror", "--confdir", str(proxy.confdir), "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    return parse(printed.stdout)


@pytest.fixture
def containerd(tmp_path):
    daemon = Containerd(tmp_path / "containerd")
    yield daemon
    daemon.close()


@pytest.fixture(scope="module")
def other_image(registry, layouts):
    """An image of its own on the distribution registry (no blob shared with multi)."""
    image = build_image(layouts / "mirror-other", "1", [1_000_000, 200_000], seed="mirror-other")
    return push(registry, "test/other:1", image)


@pytest.mark.skipif(os.geteuid() != 0, reason="containerd needs root")
def test_ctr_pulls_two_registries_through_the_mirror_with_the_printed_hosts_toml(hubcache, dockerhub, registry, multi_image, other_image, containerd, tmp_path):
    proxy = start_mirror(hubcache)
    script = printed_setup(proxy, "containerd", tmp_path)
    hosts = {Path(p).parent.name: tomllib.loads(text) for p, text in script.files.items() if p.endswith("hosts.toml")}
    assert set(hosts) == {"docker.io", REGISTRY_NAME}
    assert hosts[REGISTRY_NAME]["host"][f"https://{proxy.mirror}"]["ca"] == str(proxy.ca_cert)
    root = tmp_path / "root"
    script.write_files(root)
    hosts_dir = root / "etc/containerd/certs.d"
    refs = ["docker.io/library/multi:1", f"{REGISTRY_NAME}/test/other:1"]

    def pull_all():
        if not containerd.running():
            containerd.start()
        for ref in refs:
            result = containerd.ctr(
                "image", "pull", "--snapshotter", "native", "--platform", "linux/amd64", "--hosts-dir", str(hosts_dir), ref,
            )
            assert result.returncode == 0, result.stdout + result.stderr + proxy.log_text()[-3000:]

    pull_all()
    journal = proxy.journal()
    for image, registry_name, repository in ((multi_image.platform("linux/amd64"), "docker.io", "library/multi"), (other_image.platforms[0], REGISTRY_NAME, "test/other")):
        filled = {e["digest"] for e in journal if e["kind"] == "blob" and e["outcome"] == "filled" and e["registry"] == registry_name}
        assert filled == {image.config.digest, *(layer.digest for layer in image.layers)}, repository
        assert all(e["repository"] == repository for e in journal if e["registry"] == registry_name)

    containerd.wipe()
    go_offline(proxy)
    pull_all()


def test_a_mirror_beyond_loopback_sends_blobs_from_the_blob_servers_listener_on_its_address(hubcache, dockerhub, multi_image, tmp_path):
    # 127.0.0.2 stands for a network address: a client elsewhere cannot use this machine's 127.0.0.1.
    port = free_port()
    proxy = hubcache(mirror_listen=f"127.0.0.2:{port}")
    proxy.mirror = f"127.0.0.2:{port}"
    wait_for_mirror(proxy)
    amd64 = multi_image.platform("linux/amd64")
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    connection = http.client.HTTPSConnection("127.0.0.2", port, context=context, timeout=30)
    connection.request("GET", f"/v2/library/multi/blobs/{amd64.layers[0].digest}", headers=mirror_token(proxy, repository="library/multi"))
    answer = connection.getresponse()
    answer.read()
    connection.close()
    assert answer.status == 307, answer.status
    location = urlsplit(answer.headers["Location"])
    assert (location.scheme, location.hostname) == ("https", "127.0.0.2") and location.port not in (None, port), location
    # That listener faces the network: a URL it did not sign (or signed for another blob) is refused.
    for forged in (location.path, location.path.replace(amd64.layers[0].digest, amd64.layers[1].digest) + "?" + location.query):
        blobs = http.client.HTTPSConnection("127.0.0.2", location.port, context=context, timeout=30)
        blobs.request("GET", forged)
        refused = blobs.getresponse()
        refused.read()
        blobs.close()
        assert refused.status == 403, (forged, refused.status)

    pulled = skopeo_via_mirror(proxy, HUB_REF, tmp_path / "pulled", tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled_blobs(tmp_path / "pulled") == {amd64.config.digest, *(layer.digest for layer in amd64.layers)}


def test_skopeo_pulls_another_registry_through_the_mirror_with_the_printed_registries_conf(hubcache, registry, multi_image, tmp_path):
    proxy = start_mirror(hubcache)
    script = printed_setup(proxy, "skopeo", tmp_path)
    [conf] = [text for path, text in script.files.items() if path.endswith("hubcache-mirror.conf")]
    assert f'location = "{proxy.mirror}/{REGISTRY_NAME}"' in conf  # skopeo names no registry: the path does
    (tmp_path / "printed.conf").write_text(conf)

    # The registry's own name does not resolve here: only the mirror can serve this pull.
    home = tmp_path / "home"
    (home / "empty-certs").mkdir(parents=True)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    pulled = subprocess.run(
        [
            "skopeo", "--registries-conf", str(tmp_path / "printed.conf"), "--policy", str(policy),
            "--override-os", "linux", "--override-arch", "amd64", "copy", "--src-cert-dir", str(cert_dir(proxy, tmp_path)),
            f"docker://{REGISTRY_NAME}/test/multi:1", f"dir:{tmp_path / 'pulled'}",
        ],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "SSL_CERT_DIR": str(home / "empty-certs")},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert pulled.returncode == 0, pulled.stderr
    amd64 = multi_image.platform("linux/amd64")
    assert pulled_blobs(tmp_path / "pulled") == {amd64.config.digest, *(layer.digest for layer in amd64.layers)}
    assert {e["repository"] for e in proxy.journal() if e["outcome"] == "filled"} == {"test/multi"}

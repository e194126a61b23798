"""Request bodies, attacked the way a client of the proxy port or of the mirror could (see
docs/security.md, "Request bodies"): uploads of a few GiB, over HTTP/2 without a length and chunked
over HTTP/1.1, to requests hubcache answers itself are refused at once, with mitmdump's memory
watched; the legitimate pull and push around them still work."""

from __future__ import annotations

import json
import re
import select
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hubcache.mitm import bodies
from support.clients import skopeo_copy
from support.procs import free_port
from support.registry import REGISTRY_NAME

HUB = "registry-1.docker.io"
MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass
class Upload:
    status: int
    version: str
    uploaded: int  # bytes curl got to send before the answer (or the end)
    body: bytes
    headers: str
    stderr: str


def upload(*args: str, size: int, tmp: Path) -> Upload:
    """curl sending `size` bytes read from a pipe (made as they are sent, never stored), so
    neither side knows the length: chunked over HTTP/1.1, DATA frames without a content-length
    over HTTP/2."""
    body, headers = tmp / f"body-{time.monotonic_ns()}", tmp / f"headers-{time.monotonic_ns()}"
    zeros = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
    try:
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "120", "-o", str(body), "-D", str(headers),
             "-w", "%{http_code} %{http_version} %{size_upload}", *args, "-T", "-"],
            stdin=zeros.stdout, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    finally:
        zeros.kill()
        zeros.wait()
    status, version, uploaded = done.stdout.split()
    return Upload(
        int(status),
        version,
        int(float(uploaded)),
        body.read_bytes() if body.exists() else b"",
        headers.read_text() if headers.exists() else "",
        done.stderr,
    )


def attacks(proxy, mirror: str) -> dict[str, tuple[list[str], str, str]]:
    """The ways in, as (curl options, method, URL): to the proxy's intercepted registry, and to
    the mirror (an answer of its own, and a request it routes to the registry)."""
    via_proxy = ["-x", proxy.url, "--cacert", str(proxy.ca_cert)]
    on_mirror = ["--cacert", str(proxy.ca_cert)]
    manifest = f"https://{HUB}/v2/library/multi/manifests/1"
    return {
        "proxy, HTTP/2 without a length": ([*via_proxy, "--http2"], "GET", manifest),
        "proxy, chunked HTTP/1.1": ([*via_proxy, "--http1.1"], "GET", manifest),
        "mirror's own answer, HTTP/2 without a length": ([*on_mirror, "--http2"], "POST", f"https://{mirror}/v2/?ns=unknown.example"),
        "mirror's own answer, chunked HTTP/1.1": ([*on_mirror, "--http1.1"], "POST", f"https://{mirror}/v2/?ns=unknown.example"),
        "mirror to the registry, HTTP/2 without a length": ([*on_mirror, "--http2"], "GET", f"https://{mirror}/v2/library/multi/manifests/1"),
        "mirror to the registry, chunked HTTP/1.1": ([*on_mirror, "--http1.1"], "GET", f"https://{mirror}/v2/library/multi/manifests/1"),
    }


def test_uploads_of_gibibytes_to_what_hubcache_answers_are_refused_at_once(hubcache, dockerhub, multi_image, tmp_path):
    port = free_port()
    mirror = f"localhost:{port}"
    proxy = hubcache(mirror_listen=f"127.0.0.1:{port}")
    for what, (options, method, url) in attacks(proxy, mirror).items():
        before = proxy.memory_mb("VmHWM")["mitmdump"]
        sent = upload(*options, "-X", method, url, size=3 * GiB, tmp=tmp_path)
        grown = proxy.memory_mb("VmHWM")["mitmdump"] - before
        assert sent.status == 413, (what, sent.status, sent.stderr[-2000:])
        assert json.loads(sent.body)["errors"][0]["code"] == "UNSUPPORTED", (what, sent.body[:300])
        assert sent.uploaded < 256 * MiB, f"{what}: {sent.uploaded} bytes sent before the answer"
        assert grown < 64, f"{what}: mitmdump grew by {grown:.0f} MiB"
    assert proxy.log_text().count("with a body to") == len(attacks(proxy, mirror))
    # The legitimate pull right after, through the same proxy.
    pulled = skopeo_copy(f"docker://{HUB}/library/multi:1", tmp_path / "pulled", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr


def test_a_client_that_keeps_sending_after_the_answer_is_cut_off(hubcache, dockerhub, tmp_path):
    """The answer is read (the close lingers), and then the connection ends, however much more
    the client sends: nothing of it is kept."""
    proxy = hubcache()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as raw:
        raw.sendall(f"CONNECT {HUB}:443 HTTP/1.1\r\nHost: {HUB}:443\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        tls = ssl.create_default_context(cafile=str(proxy.ca_cert)).wrap_socket(raw, server_hostname=HUB)
        tls.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {HUB}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (MiB, b"x" * MiB)
        answer, sent, ended = b"", 0, False
        # The close comes LINGER seconds after the answer at the latest; the client gives up long after.
        deadline = time.monotonic() + bodies.LINGER + 60
        while not ended and time.monotonic() < deadline:
            try:
                tls.sendall(chunk)
                sent += MiB
                readable, _, _ = select.select([tls], [], [], 0)
                while readable or tls.pending():
                    data = tls.recv(65536)
                    ended = not data
                    answer += data
                    if ended:
                        break
                    readable, _, _ = select.select([tls], [], [], 0)
            except OSError:  # reset, broken pipe, or the TLS ended under a write
                ended = True
    assert ended, f"still open after {sent} bytes; read {answer[:120]!r}"
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"connection: close" in answer.lower()
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["errors"][0]["code"] == "UNSUPPORTED"


def test_a_push_without_a_length_is_streamed_to_the_registry(hubcache, registry, tmp_path):
    """A push hubcache passes through untouched: over HTTP/2 a blob upload need not say its
    length, and it still goes through as it comes, not into the proxy's memory."""
    proxy = hubcache()
    via_proxy = ["-x", proxy.url, "--cacert", str(proxy.ca_cert)]
    started = subprocess.run(
        ["curl", "-sS", "-D", "-", "-o", "/dev/null", *via_proxy, "-X", "POST", f"https://{REGISTRY_NAME}/v2/test/bodies/blobs/uploads/"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    location = re.search(r"^location: (\S+)", started.stdout, re.IGNORECASE | re.MULTILINE)
    assert re.search(r"^HTTP/\S+ 202", started.stdout, re.MULTILINE) and location, started.stdout + started.stderr
    url = location.group(1) if location.group(1).startswith("https://") else f"https://{REGISTRY_NAME}{location.group(1)}"
    before = proxy.memory_mb("VmHWM")["mitmdump"]
    size = 256 * MiB
    sent = upload(*via_proxy, "--http2", "-X", "PATCH", url, size=size, tmp=tmp_path)
    assert sent.version == "2" and sent.status == 202, (sent.status, sent.stderr[-2000:])
    assert re.search(rf"^range: 0-{size - 1}\s*$", sent.headers, re.IGNORECASE | re.MULTILINE), sent.headers
    assert proxy.memory_mb("VmHWM")["mitmdump"] - before < 64, "the push went through the proxy's memory"


@pytest.mark.parametrize("size", [1024])
def test_a_token_form_of_announced_length_is_still_read(hubcache, dockerhub, size, tmp_path):
    """containerd asks for its token with a small form (a POST of announced length)."""
    proxy = hubcache()
    form = "grant_type=password&service=registry.docker.io&scope=repository:library/multi:pull&client_id=x&username=u&password=" + "p" * size
    done = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-x", proxy.url, "--cacert", str(proxy.ca_cert), "--data", form, "https://auth.docker.io/token"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.rsplit("\n", 1)[1] != "413", done.stdout
    assert "with a body to" not in proxy.log_text()

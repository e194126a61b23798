"""Connection benchmark: the CPU each new client connection costs hubcache's two processes, beside
the floor of any mitmproxy addon, measured side by side in one run.

Go clients (dockerd, containerd's `ctr`, skopeo, podman) open a new connection for every request
of a pull, each with a full TLS handshake: through the proxy, a CONNECT and a TLS session that
mitmproxy terminates, and for every blob one more to the blob server. On a busy cache the
per-connection cost, not the bytes, decides how many pulls a core serves. Measured here, each over
`--connections` connections made one after another on loopback:

- `hubcache proxy`: CONNECT, TLS, and a blob GET that hubcache answers with its 307 to the blob
  server (HTTPS blob URLs on an address of this machine, as for clients on other machines);
- `bare mitmdump`: the same through mitmdump with a one-line addon answering every request 307,
  and a CA of the same kind (hubcache's EC P-256): what mitmproxy itself spends on a CONNECT, a
  TLS session and one request;
- `blob server`: TLS straight to the blob server and a GET of a small blob by its signed URL.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

from bench import MITMDUMP, REGISTRY_NAME, Bench, HubcacheHttps, ImageSpec, console

from hubcache.cli.ca import make_ca
from support.clients import skopeo_copy
from support.pki import ca_bundle
from support.procs import Proc, free_port, wait_for_port

TIMEOUT = 30.0  # seconds for any one connection
ANSWER_307 = """from mitmproxy import http


def request(flow: http.HTTPFlow) -> None:
    flow.response = http.Response.make(307, b"", {"Location": "https://127.0.0.2:1/blobs/x"})
"""


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of the process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answer(sock: ssl.SSLSocket, request: str) -> bytes:
    """Send `request` (which asks to close) and read the whole answer."""
    sock.sendall(request.encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def through_proxy(port: int, context: ssl.SSLContext, path: str) -> bytes:
    """One request through the proxy on `port`, as a Go client makes it: a new CONNECT and TLS."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(f"CONNECT {REGISTRY_NAME}:443 HTTP/1.1\r\nHost: {REGISTRY_NAME}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            if not (chunk := sock.recv(4096)):
                raise ConnectionError("the proxy closed the connection before it answered the CONNECT")
            head += chunk
        with context.wrap_socket(sock, server_hostname=REGISTRY_NAME) as tls:
            return answer(tls, f"GET {path} HTTP/1.1\r\nHost: {REGISTRY_NAME}\r\nConnection: close\r\n\r\n")


def direct(url: str, context: ssl.SSLContext) -> bytes:
    """One GET of `url` on a new TLS connection."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    request = f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock,
        context.wrap_socket(sock, server_hostname=parts.hostname) as tls,
    ):
        return answer(tls, request)


def per_connection(pid: int, connections: int, connect: Callable[[], bytes], status: bytes) -> float:
    """Milliseconds of the process's CPU per connection, over `connections` made in turn."""
    for _ in range(10):  # first connections: certificates made, caches warm
        connect()
    before = cpu_seconds(pid)
    for _ in range(connections):
        if not (got := connect()).startswith(b"HTTP/1.1 " + status):
            raise RuntimeError(f"expected {status.decode()}, got {got[:60]!r}")
    return (cpu_seconds(pid) - before) / connections * 1000


def location(answer: bytes) -> str:
    for line in answer.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"location":
            return value.strip().decode()
    raise RuntimeError(f"no Location in {answer[:200]!r}")


def run(connections: int, runs: int) -> dict[str, list[float]]:
    workdir = Path(tempfile.mkdtemp(prefix="hubcache-bench-connections-"))
    figures: dict[str, list[float]] = {"hubcache proxy": [], "bare mitmdump": [], "blob server": []}
    try:
        with ExitStack() as stack:
            bench = Bench(workdir, (ImageSpec("small", (100_000,)),), stack)
            image = bench.images[0]
            path = f"/v2/bench/{image.name}/blobs/{image.info.platforms[0].layers[0].digest}"
            hubcache = HubcacheHttps(bench)
            hubcache.start()
            stack.callback(hubcache.stop)
            route = hubcache.route()
            filled = skopeo_copy(f"docker://{image.ref(route.host)}", workdir / "pulled", proxy=route.proxy, ca_bundle=route.ca_bundle)
            if filled.returncode:
                raise RuntimeError(f"the filling pull failed: {filled.stderr.strip()[-300:]}")
            hubcache_tls = ssl.create_default_context(cafile=str(route.ca_bundle))
            blob_url = location(through_proxy(hubcache.server.port, hubcache_tls, path))

            (workdir / "answer_307.py").write_text(ANSWER_307)
            bare_port, bare_conf = free_port(), workdir / "bare-conf"
            make_ca(bare_conf)
            bare = Proc(
                [str(MITMDUMP), "-q", "-s", str(workdir / "answer_307.py"), "--listen-host", "127.0.0.1", "--listen-port", str(bare_port),
                 "--set", f"confdir={bare_conf}", "--set", "connection_strategy=lazy"],
                log=workdir / "bare.log", cwd=workdir,
            )  # fmt: skip
            stack.callback(bare.stop)
            wait_for_port("127.0.0.1", bare_port, timeout=30, proc=bare)
            bare_tls = ssl.create_default_context(cafile=str(ca_bundle([bare_conf / "mitmproxy-ca-cert.pem"], workdir / "bare.pem")))

            assert hubcache.server.proc is not None
            proxy_pid, blob_pid = hubcache.server.proc.pid, hubcache.server.blob_server_pid()
            for _ in range(runs):  # alternated, so the machine's load falls on each alike
                figures["hubcache proxy"].append(
                    per_connection(proxy_pid, connections, lambda: through_proxy(hubcache.server.port, hubcache_tls, path), b"307")
                )
                figures["bare mitmdump"].append(
                    per_connection(bare.pid, connections, lambda: through_proxy(bare_port, bare_tls, path), b"307")
                )
                figures["blob server"].append(per_connection(blob_pid, connections, lambda: direct(blob_url, hubcache_tls), b"200"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300, help="connections per figure and run (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions, alternated (default 3)")
    args = parser.parse_args()
    started = time.monotonic()
    figures = run(args.connections, args.runs)
    floor = figures["bare mitmdump"]
    console.print(f"CPU ms per connection, {args.connections} connections in turn, {args.runs} runs (min / median / max):")
    for name, values in figures.items():
        ordered = sorted(values)
        console.print(f"  {name:<15} {ordered[0]:6.2f} {ordered[len(ordered) // 2]:6.2f} {ordered[-1]:6.2f}", highlight=False)
    ratios = sorted(h / b for h, b in zip(figures["hubcache proxy"], floor, strict=True))
    console.print(f"  hubcache proxy / bare mitmdump, run by run: {', '.join(f'{r:.2f}x' for r in ratios)}", highlight=False)
    console.print(f"[dim]{time.monotonic() - started:.0f} s[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

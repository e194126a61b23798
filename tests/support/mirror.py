"""hubcache's mirror endpoint (`mirror_listen`) in integration tests: a proxy started with one, a
client that reaches it as a registry mirror (skopeo with a registries.conf), and requests to it."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from .procs import free_port


def start_mirror(hubcache, **options):
    port = free_port()
    proxy = hubcache(mirror_listen=f"127.0.0.1:{port}", **options)
    proxy.mirror = f"127.0.0.1:{port}"
    wait_for_mirror(proxy)
    return proxy


def cert_dir(proxy, tmp_path: Path, ca_file: Path | None = None) -> Path:
    """A --src-cert-dir holding hubcache's CA (or `ca_file`): trusted for this client only."""
    folder = tmp_path / "certs"
    folder.mkdir(exist_ok=True)
    (folder / "ca.crt").write_bytes((ca_file or proxy.ca_cert).read_bytes())
    return folder


def skopeo_via_mirror(proxy, ref: str, dest: Path, tmp_path: Path, mirror: str | None = None, ca_file: Path | None = None):
    """skopeo copy with a registries.conf that mirrors docker.io to hubcache's mirror (skopeo 1.9
    reads it from --registries-conf), no proxy, the CA only in --src-cert-dir."""
    home = tmp_path / "home"
    (home / "empty-certs").mkdir(parents=True, exist_ok=True)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f'[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
        f'[[registry.mirror]]\nlocation = "{mirror or proxy.mirror}"\n'
    )
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "SSL_CERT_DIR": str(home / "empty-certs")}
    argv = [
        "skopeo", "--registries-conf", str(conf), "--policy", str(policy),
        "--override-os", "linux", "--override-arch", "amd64",
        "copy", "--src-cert-dir", str(cert_dir(proxy, tmp_path, ca_file)), ref, f"dir:{dest}",
    ]
    dest.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)


def go_offline(proxy) -> None:
    """Restart the proxy (same store, same mirror port) with every upstream name mapped to a port
    nobody listens on: upstream is unreachable."""
    dead = free_port()
    names = [entry.partition("=")[0] for entry in proxy.options["upstream_map"]]
    proxy.stop()
    proxy.start(upstream_map=[f"{name}=127.0.0.1:{dead}" for name in names])
    wait_for_mirror(proxy)


def wait_for_mirror(proxy) -> None:
    host, _, port = proxy.mirror.rpartition(":")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the mirror does not listen on {proxy.mirror}")


def mirror_get(proxy, path: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """(status, headers, body) of a request to the mirror over TLS, trusting hubcache's CA."""
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    request = urllib.request.Request(f"https://{proxy.mirror}{path}", headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()

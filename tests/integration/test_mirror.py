"""The mirror endpoint (`mirror_listen`): engines pointed at hubcache as a registry mirror, with
its CA trusted for that host only, pull through the same cache as proxy clients, keep pulling
what is cached with upstream unreachable, and cannot use it to reach anything but a cached
registry."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support.clients import pulled_blobs
from support.procs import free_port
from support.registry import REGISTRY_NAME, push

HUB_REF = "docker://docker.io/library/multi:1"


def start_mirror(hubcache, **options):
    port = free_port()
    proxy = hubcache(mirror_listen=f"127.0.0.1:{port}", **options)
    proxy.mirror = f"127.0.0.1:{port}"
    wait_for_mirror(proxy)
    return proxy


def cert_dir(proxy, tmp_path: Path) -> Path:
    """A --src-cert-dir holding hubcache's CA: trusted for this client only."""
    folder = tmp_path / "certs"
    folder.mkdir(exist_ok=True)
    (folder / "ca.crt").write_bytes(proxy.ca_cert.read_bytes())
    return folder


def skopeo_via_mirror(proxy, ref: str, dest: Path, tmp_path: Path, mirror: str | None = None, **kwargs):
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
        "copy", "--src-cert-dir", str(cert_dir(proxy, tmp_path)), ref, f"dir:{dest}",
    ]
    dest.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False, **kwargs)


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


def wait_for_log(proxy, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log_text():
        assert time.monotonic() < deadline, f"not in the log: {text}\n{proxy.log_text()[-3000:]}"
        time.sleep(0.05)


def mirror_get(proxy, path: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """(status, headers, body) of a request to the mirror over TLS, trusting hubcache's CA."""
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))
    request = urllib.request.Request(f"https://{proxy.mirror}{path}", headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


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
    assert any(e["repository"] == "library/absent" and e["outcome"].startswith("failed") for e in proxy.journal())

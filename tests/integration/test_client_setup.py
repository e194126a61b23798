"""Real-client proofs of `hubcache setup CLIENT`: its printed files and environment, applied the way
an operator would (under a temporary root where the client lets us point it elsewhere), make
skopeo, dockerd and containerd's ctr pull through a running hubcache; a second pull of a wiped
client reaches Docker Hub for no blob at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from support.clients import Dockerd, skopeo_copy
from support.containerd import Containerd
from support.pki import ca_bundle
from support.registry import REGISTRY_NAME
from support.setupscript import Script, parse

HUBCACHE = Path(sys.executable).with_name("hubcache")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def setup_script(client: str, proxy, tmp_path: Path, *args: str) -> Script:
    result = subprocess.run(
        [HUBCACHE, "setup", client, "--proxy", proxy.url, "--confdir", str(proxy.confdir), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return parse(result.stdout)


def assert_served_by_hubcache(dockerhub):
    assert dockerhub.requests(kind="blob") == [] and dockerhub.requests(kind="cdn") == []
    assert dockerhub.requests(kind="manifest", method="GET") == []


def test_skopeo(hubcache, dockerhub, multi_image, tmp_path):
    proxy = hubcache()
    script = setup_script("skopeo", proxy, tmp_path)
    cert = "/etc/containers/certs.d/docker.io/hubcache.crt"
    assert script.files[cert] + "\n" == proxy.ca_cert.read_text()
    root = tmp_path / "root"
    script.write_files(root)
    # skopeo reads /etc/containers/certs.d/<registry>/ as root; --src-cert-dir is the same folder moved.
    def pull(dest: str):
        return skopeo_copy(
            "docker://docker.io/library/multi:1", tmp_path / dest, proxy=None, ca_bundle=None,
            cert_dir=(root / cert.lstrip("/")).parent, extra_env=script.env,
        )

    cold = pull("cold")
    assert cold.returncode == 0, cold.stderr
    assert dockerhub.counts()["cdn"] == 1 + len(multi_image.platform("linux/amd64").layers)
    dockerhub.reset()
    warm = pull("warm")
    assert warm.returncode == 0, warm.stderr
    assert_served_by_hubcache(dockerhub)


def test_skopeo_without_the_ca_is_refused(hubcache, multi_image, tmp_path):
    """The proof above rests on the printed CA file: without it, skopeo does not trust hubcache."""
    proxy = hubcache()
    script = setup_script("skopeo", proxy, tmp_path)
    result = skopeo_copy(
        "docker://docker.io/library/multi:1", tmp_path / "out", proxy=None, ca_bundle=None, extra_env=script.env
    )
    assert result.returncode != 0 and "certificate" in result.stderr


@pytest.fixture
def containerd(tmp_path):
    daemon = Containerd(tmp_path / "containerd")
    yield daemon
    daemon.close()


@as_root
def test_containerd_ctr(hubcache, dockerhub, registry, multi_image, containerd, tmp_path):
    config = tmp_path / "hubcache.yaml"
    config.write_text(f"registries: [registry-1.docker.io, index.docker.io, {REGISTRY_NAME}]\n")
    proxy = hubcache()
    script = setup_script("containerd", proxy, tmp_path, "--config", str(config))
    hosts = {Path(p).parent.name: tomllib.loads(text) for p, text in script.files.items() if p.endswith("hosts.toml")}
    assert set(hosts) == {"docker.io", REGISTRY_NAME}, "Docker Hub's two API hosts share one folder"
    assert hosts["docker.io"]["host"]["https://registry-1.docker.io"]["ca"] == str(proxy.ca_cert)
    assert script.drop_in_environment("containerd") == {"HTTPS_PROXY": proxy.url}
    root = tmp_path / "root"
    script.write_files(root)
    hosts_dir = root / "etc/containerd/certs.d"
    # The set-up text says how ctr pulls: the exported proxy in its environment, --hosts-dir.
    assert any("ctr image pull --hosts-dir /etc/containerd/certs.d" in line for line in script.notes)

    def pull():
        if not containerd.running():
            containerd.start()
        result = containerd.ctr(
            "image", "pull", "--snapshotter", "native", "--platform", "linux/amd64",
            "--hosts-dir", str(hosts_dir), "docker.io/library/multi:1", env=script.env,
        )
        assert result.returncode == 0, result.stdout + result.stderr + proxy.log_text()[-3000:]
        listed = containerd.ctr("image", "ls", "-q")
        assert "docker.io/library/multi:1" in listed.stdout.split()

    containerd.start()
    untrusted = containerd.ctr("image", "pull", "docker.io/library/multi:1", env=script.env)
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr, "without the hosts.toml, no trust"
    pull()
    amd64 = multi_image.platform("linux/amd64")
    assert dockerhub.counts()["cdn"] == 1 + len(amd64.layers)
    filled = {e["digest"] for e in proxy.journal() if e["kind"] == "blob" and e["outcome"] == "filled"}
    assert filled == {amd64.config.digest, *(layer.digest for layer in amd64.layers)}

    containerd.wipe()
    dockerhub.reset()
    pull()
    assert_served_by_hubcache(dockerhub)


@pytest.fixture
def dockerd(tmp_path):
    daemon = Dockerd(tmp_path / "dockerd")
    yield daemon
    daemon.close()


@pytest.mark.dockerd
@as_root
def test_dockerd(hubcache, dockerhub, multi_image, dockerd, tmp_path):
    proxy = hubcache()
    script = setup_script("dockerd", proxy, tmp_path)
    environment = script.drop_in_environment("docker")
    assert environment == {"HTTPS_PROXY": proxy.url}
    # The Engine 23+ alternative; Debian's 20.10 refuses the key, so only its content is checked.
    daemon_json = next(note.strip() for note in script.notes if note.strip().startswith('{"proxies"'))
    assert json.loads(daemon_json) == {"proxies": {"https-proxy": proxy.url}}
    # The CA goes into the system store: cp to /usr/local/share/ca-certificates, update-ca-certificates.
    copy = next(c for c in script.commands if c.startswith("cp "))
    source, target = copy.split()[1:]
    assert target == "/usr/local/share/ca-certificates/hubcache.crt" and Path(source) == proxy.ca_cert
    assert "update-ca-certificates" in script.commands
    # What update-ca-certificates makes of it: the system bundle plus the copied file.
    system_store = ca_bundle([Path(source)], tmp_path / "root/etc/ssl/certs/ca-certificates.crt")

    dockerd.start(environment["HTTPS_PROXY"], system_store)
    cold = dockerd.pull("multi:1")
    assert cold.returncode == 0, cold.stdout + cold.stderr
    assert dockerd.image_diff_ids("multi:1") == multi_image.platform("linux/amd64").diff_ids
    dockerd.wipe()
    dockerhub.reset()
    dockerd.start(environment["HTTPS_PROXY"], system_store)
    warm = dockerd.pull("multi:1")
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert_served_by_hubcache(dockerhub)

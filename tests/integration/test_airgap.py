"""The air-gap round trip with the real command line: prefetch online into a recording, export it,
import it into an empty cache, and pull offline with skopeo and dockerd while upstream is gone."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from support.clients import Dockerd, pulled_blobs, skopeo_copy
from support.hubcache import upstream_options
from support.registry import REGISTRY_NAME

HUBCACHE = Path(sys.executable).with_name("hubcache")
HUB_REF = "docker.io/library/multi:1"
REG_REF = f"{REGISTRY_NAME}/test/multi:1"


def hubcache_cli(*args: str | Path, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HUBCACHE), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def proxy_settings(ca, registry, dockerhub) -> list[str]:
    settings = [f"ssl_verify_upstream_trusted_ca={ca.cert_path}"]
    for name, values in upstream_options(registry, dockerhub).items():
        settings += [f"{name}={v}" for v in values]
    return [arg for s in settings for arg in ("--set", s)]


@dataclass
class Prepared:
    workdir: Path
    prefetch: subprocess.CompletedProcess[str]
    bundle: Path
    upstream_blob_gets: int


@pytest.fixture(scope="module")
def prepared(ca, registry, dockerhub, multi_image, tmp_path_factory) -> Prepared:
    """On the connected side: prefetch two images (every platform) into the recording `lab`, export it."""
    workdir = tmp_path_factory.mktemp("connected")
    registry.start()
    registry.reset_requests()
    dockerhub.reset()
    prefetch = hubcache_cli(
        "prefetch", "--record", "lab", *proxy_settings(ca, registry, dockerhub), "multi:1", REG_REF, cwd=workdir
    )
    registry.settle()
    blob_gets = len(registry.blob_gets())
    export = hubcache_cli("export", "--recording", "lab", "-o", "lab.tar", cwd=workdir)
    assert export.returncode == 0, export.stderr
    return Prepared(workdir, prefetch, workdir / "lab.tar", blob_gets)


def test_prefetch_fills_the_cache_and_the_recording(prepared, multi_image):
    assert prepared.prefetch.returncode == 0, prepared.prefetch.stderr
    assert "linux/amd64" in prepared.prefetch.stdout and "linux/arm64/v8" in prepared.prefetch.stdout
    recording = yaml.safe_load((prepared.workdir / "cache" / "recordings" / "lab.yaml").read_text())
    assert set(recording["images"]) == {HUB_REF, REG_REF}
    for image in recording["images"].values():
        assert image["digest"] == multi_image.index_digest
        assert {m["platform"]: m["digest"] for m in image["manifests"]} == multi_image.manifest_digests
    # Both names hold the same blobs: each one crossed from upstream once, whichever name it came by.
    distinct_blobs = {b.digest for p in multi_image.platforms for b in (p.config, *p.layers)}
    assert prepared.upstream_blob_gets == len(distinct_blobs)


def test_recordings_lists_and_shows(prepared):
    listing = hubcache_cli("recordings", cwd=prepared.workdir)
    assert listing.returncode == 0 and "lab" in listing.stdout
    shown = hubcache_cli("recordings", "lab", cwd=prepared.workdir)
    assert shown.returncode == 0, shown.stderr
    assert HUB_REF in shown.stdout and "everything is in the cache" in shown.stdout
    missing = hubcache_cli("recordings", "lab", "--cache-dir", prepared.workdir / "empty", cwd=prepared.workdir)
    assert missing.returncode != 0 and "no recording 'lab'" in missing.stderr


def test_prune_spares_what_a_recording_pins_and_verify_finds_it_whole(prepared):
    pruned = hubcache_cli("prune", "--all", cwd=prepared.workdir)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("freed 0 B: 0 blobs")
    checked = hubcache_cli("verify", cwd=prepared.workdir)
    assert checked.returncode == 0 and "0 dropped" in checked.stdout, checked.stdout + checked.stderr
    shown = hubcache_cli("recordings", "lab", cwd=prepared.workdir)
    assert "everything is in the cache" in shown.stdout


def test_skopeo_reads_the_bundle_as_a_standard_oci_archive(prepared, multi_image, tmp_path):
    result = skopeo_copy(f"oci-archive:{prepared.bundle}:{REG_REF}", tmp_path / "out", proxy=None, ca_bundle=None, arch="arm64")
    assert result.returncode == 0, result.stderr
    arm64 = multi_image.platform("linux/arm64/v8")
    assert {layer.digest for layer in arm64.layers} <= pulled_blobs(tmp_path / "out")


def test_import_then_pull_offline_with_skopeo(prepared, hubcache, registry, dockerhub, multi_image, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    result = hubcache_cli("import", "--cache-dir", site / "cache", prepared.bundle, cwd=site)
    assert result.returncode == 0, result.stderr
    assert "imported 2 images" in result.stdout, result.stdout
    registry.stop()
    dockerhub.reset()
    proxy = hubcache(site, offline=True)
    for ref in (REG_REF, "registry-1.docker.io/library/multi:1"):
        for arch in ("amd64", "arm64"):
            out = tmp_path / f"{arch}-{ref.partition('/')[0]}"
            pulled = skopeo_copy(f"docker://{ref}", out, proxy=proxy.url, ca_bundle=proxy.client_bundle, arch=arch)
            assert pulled.returncode == 0, pulled.stderr
            platform = multi_image.platform("linux/arm64/v8" if arch == "arm64" else "linux/amd64")
            assert {layer.digest for layer in platform.layers} <= pulled_blobs(out)
    assert dockerhub.requests() == []
    assert not any(e["outcome"] != "filled" for e in proxy.journal())


@pytest.mark.dockerd
@pytest.mark.skipif(os.geteuid() != 0, reason="dockerd needs root")
def test_import_then_pull_offline_with_dockerd(prepared, hubcache, registry, dockerhub, multi_image, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    assert hubcache_cli("import", "--cache-dir", site / "cache", prepared.bundle, cwd=site).returncode == 0
    registry.stop()
    dockerhub.reset()
    proxy = hubcache(site, offline=True)
    daemon = Dockerd(tmp_path / "dockerd")
    try:
        daemon.start(proxy.url, proxy.client_bundle)
        result = daemon.pull("multi:1")
        assert result.returncode == 0, result.stdout + result.stderr
        assert daemon.image_diff_ids("multi:1") == multi_image.platform("linux/amd64").diff_ids
        assert dockerhub.requests() == [], "offline, Docker Hub saw no request at all"
    finally:
        daemon.close()


def test_a_corrupt_bundle_is_refused_and_the_cache_is_unchanged(prepared, multi_image, tmp_path):
    layer = multi_image.platform("linux/amd64").layers[0].digest
    corrupt = tmp_path / "corrupt.tar"
    with tarfile.open(prepared.bundle) as src, tarfile.open(corrupt, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith(layer[7:]):
                data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
            dst.addfile(member, io.BytesIO(data))
    site = tmp_path / "site"
    result = hubcache_cli("import", "--cache-dir", site / "cache", corrupt, cwd=tmp_path)
    assert result.returncode == 1
    assert "the file is corrupt; the cache is unchanged" in result.stderr and "Traceback" not in result.stderr
    listing = hubcache_cli("recordings", "--cache-dir", site / "cache", cwd=tmp_path)
    assert "no recordings" in listing.stdout
    files = [p for p in (site / "cache").rglob("*") if p.is_file() and p.suffix not in (".db", ".db-wal", ".db-shm")]
    assert files == [], "no blob file and no temporary file is left behind"


def test_pulls_through_the_proxy_are_recorded(hubcache, registry, multi_image, tmp_path):
    proxy = hubcache(record="ci")
    pulled = skopeo_copy(f"docker://{REG_REF}", tmp_path / "out", proxy=proxy.url, ca_bundle=proxy.client_bundle, arch="arm64")
    assert pulled.returncode == 0, pulled.stderr
    shown = hubcache_cli("recordings", "ci", "--cache-dir", proxy.cache_dir, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert REG_REF in shown.stdout and "linux/arm64/v8" in shown.stdout and "linux/amd64" not in shown.stdout

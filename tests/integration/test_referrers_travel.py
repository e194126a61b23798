"""Referrers travel with the image: `hubcache prefetch` fetches an SBOM the (double's) referrers API
lists and a cosign-style `.sig` tag; the recording lists both; export -> import into an empty cache
-> offline, upstream gone: the referrers endpoint lists the SBOM, the `.sig` tag resolves, and both
manifests and their blobs pull."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
import yaml

from support import proxied
from support.clients import pull, pulled_blobs
from support.images import build_image
from support.registry import _http_push, push

from .test_airgap import hubcache_cli, proxy_settings

HUB = "registry-1.docker.io"
SBOM_TYPE = "application/spdx+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def write_blob(layout: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


@pytest.fixture
def signed(registry, dockerhub, layouts, multi_image, tmp_path):
    """A repository holding the two-platform image, a cosign-style signature tag, and an SBOM whose
    subject is the image, listed by the double's referrers API."""
    name = f"library/signed{uuid.uuid4().hex[:8]}"
    registry.start()
    push(registry, f"{name}:1", multi_image)
    sig_tag = "sha256-" + multi_image.index_digest.partition(":")[2] + ".sig"
    signature = build_image(layouts / f"signature-{name[-8:]}", "1", [512], seed=f"signature{name}")
    push(registry, f"{name}:{sig_tag}", signature)

    layout = tmp_path / "sbom"
    config = {"mediaType": "application/vnd.oci.empty.v1+json", **write_blob(layout, b"{}")}
    layer = {"mediaType": SBOM_TYPE, **write_blob(layout, json.dumps({"spdxVersion": "SPDX-2.3", "name": name}).encode())}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM_TYPE,
        "config": config,
        "layers": [layer],
        "subject": multi_image.index.descriptor(),
    }
    sbom = {"mediaType": OCI_MANIFEST, **write_blob(layout, json.dumps(manifest).encode())}
    _http_push(registry, layout, sbom, f"{name}:sbom", timeout=30)
    dockerhub.referrers[(name, multi_image.index_digest)] = [{**sbom, "artifactType": SBOM_TYPE}]
    yield name, sig_tag, signature, sbom, [config, layer]
    del dockerhub.referrers[(name, multi_image.index_digest)]


def test_referrers_are_prefetched_recorded_exported_and_served_offline_after_import(
    ca, registry, dockerhub, signed, multi_image, hubcache, tmp_path
):
    name, sig_tag, signature, sbom, sbom_blobs = signed
    ref = f"docker.io/{name}:1"
    work = tmp_path / "connected"
    work.mkdir()
    filled = hubcache_cli("prefetch", "--record", "lab", *proxy_settings(ca, registry, dockerhub), ref, cwd=work)
    assert filled.returncode == 0, filled.stderr
    recording = yaml.safe_load((work / "cache" / "recordings" / "lab.yaml").read_text())
    listed = {r["digest"]: r for r in recording["images"][ref]["referrers"]}
    assert set(listed) == {sbom["digest"], signature.top.digest}
    assert listed[sbom["digest"]]["artifact_type"] == SBOM_TYPE and listed[sbom["digest"]]["subject"] == multi_image.index_digest
    assert listed[signature.top.digest]["tag"] == sig_tag

    exported = hubcache_cli("export", "--recording", "lab", "-o", "lab.tar", cwd=work)
    assert exported.returncode == 0, exported.stderr
    site = tmp_path / "site"
    site.mkdir()
    imported = hubcache_cli("import", "--cache-dir", site / "cache", work / "lab.tar", cwd=site)
    assert imported.returncode == 0, imported.stderr
    registry.stop()
    dockerhub.reset()
    try:
        proxy = hubcache(site, offline=True)
        answer = proxied.request(proxy.port, HUB, f"/v2/{name}/referrers/{multi_image.index_digest}", ca=proxy.ca_cert)
        assert answer.status == 200, answer.body[:300]
        assert [d["digest"] for d in json.loads(answer.body)["manifests"]] == [sbom["digest"]]
        for digest in (sbom["digest"], *(b["digest"] for b in sbom_blobs)):
            kind = "manifests" if digest == sbom["digest"] else "blobs"
            got = proxied.request(proxy.port, HUB, f"/v2/{name}/{kind}/{digest}", ca=proxy.ca_cert, headers={"Accept": OCI_MANIFEST})
            assert got.status == 200 and "sha256:" + hashlib.sha256(got.body).hexdigest() == digest, (kind, got.status)
        pull(proxy, f"docker.io/{name}:{sig_tag}", tmp_path / "sig")
        assert {layer.digest for layer in signature.platforms[0].layers} <= pulled_blobs(tmp_path / "sig")
        assert dockerhub.requests() == []
    finally:
        registry.start()

"""Private images travel too: `hubcache prefetch` with a login fills a private Docker Hub
repository (the double's token realm) where an anonymous prefetch is refused, and the bundle
exported from it stays private after import: offline, anonymous clients get nothing of it."""

from __future__ import annotations

import os
import uuid

import pytest

from support.clients import skopeo_copy
from support.registry import ALICE, private_repository

from .test_airgap import hubcache_cli, proxy_settings


@pytest.fixture
def secret(registry, dockerhub, multi_image):
    name = f"library/private{uuid.uuid4().hex[:8]}"
    registry.start()
    with private_repository(registry, dockerhub, name, multi_image):
        yield name


def run(*args, cwd, home):
    """The command line with a HOME of its own: no login of the machine's user is read."""
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run")}
    env.pop("REGISTRY_AUTH_FILE", None)
    env.pop("DOCKER_CONFIG", None)
    return hubcache_cli(*args, cwd=cwd, env=env)


def test_prefetch_with_a_login_fills_a_private_image_and_the_bundle_stays_private(
    ca, registry, dockerhub, secret, hubcache, tmp_path
):
    settings = proxy_settings(ca, registry, dockerhub)
    anonymous = run("prefetch", *settings, f"{secret}:1", cwd=tmp_path, home=tmp_path)
    assert anonymous.returncode == 1, anonymous.stdout
    assert "no login for docker.io" in anonymous.stderr, anonymous.stderr

    login = tmp_path / "alice.login"
    login.write_text(":".join(ALICE) + "\n")
    dockerhub.reset()
    filled = run("prefetch", "--record", "private", *settings, "--creds", f"@{login}", f"{secret}:1", cwd=tmp_path, home=tmp_path)
    assert filled.returncode == 0, filled.stderr
    assert "linux/amd64" in filled.stdout
    token_requests = [r for r in dockerhub.requests() if r.kind == "token"]
    assert any(r.had_authorization for r in token_requests), "the login went to the token realm"  # (hubcache probes anonymously too)
    assert not [r for r in dockerhub.requests() if r.kind == "cdn" and r.had_authorization], "never to the CDN"

    exported = run("export", "--recording", "private", "-o", "private.tar", cwd=tmp_path, home=tmp_path)
    assert exported.returncode == 0, exported.stderr
    site = tmp_path / "site"
    site.mkdir()
    imported = run("import", "--cache-dir", site / "cache", tmp_path / "private.tar", cwd=site, home=tmp_path)
    assert imported.returncode == 0, imported.stderr
    proxy = hubcache(site, offline=True)
    refused = skopeo_copy(f"docker://docker.io/{secret}:1", tmp_path / "out", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert refused.returncode != 0, "offline, an imported private image is not served to anonymous clients"
    proxy.stop()
    proxy = hubcache(site, offline=True, offline_private=True)  # told: every client may pull it
    pulled = skopeo_copy(f"docker://docker.io/{secret}:1", tmp_path / "told", proxy=proxy.url, ca_bundle=proxy.client_bundle)
    assert pulled.returncode == 0, pulled.stderr

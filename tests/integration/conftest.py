"""Fixtures that start real components on loopback: a test CA, Debian's distribution registry as
the upstream, a Docker Hub double in front of it, hubcache itself as a mitmdump process, and for
fleet mode OpenStack Swift and Redis."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.dockerhub import ALL_HOSTS as DOCKER_HUB_HOSTS
from support.dockerhub import DockerHubDouble
from support.hubcache import Hubcache, upstream_options
from support.images import ImageInfo, build_image
from support.pki import TestCA
from support.redis_server import Redis
from support.registry import REGISTRY_BIN, REGISTRY_NAME, SKOPEO_BIN, Registry, push
from support.swift import Swift

PLATFORMS = [("linux", "amd64"), ("linux", "arm64", "v8")]


def pytest_collection_finish(session):
    """The registry runs Debian's docker-registry and takes the test images from skopeo: when a
    selected test needs it and either is missing, say so once, in one line, before any test runs."""
    if session.config.option.collectonly or not any("registry" in item.fixturenames for item in session.items):
        return
    for tool in (REGISTRY_BIN, SKOPEO_BIN):
        if not os.access(tool, os.X_OK):
            pytest.exit(
                f"{Path(tool).name} is not installed ({tool}) and the selected integration tests need it:"
                ' .ci/run installs it (or run the unit tests alone: scripts/test -m "not integration")',
                1,
            )


@pytest.fixture(scope="session")
def ca(tmp_path_factory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def registry(ca, tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry"), ca, names=(REGISTRY_NAME,))
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def layouts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="session")
def multi_image(registry, layouts) -> ImageInfo:
    """A two-platform image (an OCI index), three layers per platform, pushed under two names."""
    image = build_image(layouts / "multi", "1", [2_000_000, 3_000_000, 300_000], seed=1, platforms=PLATFORMS)
    push(registry, "test/multi:1", image)
    return push(registry, "library/multi:1", image)


@pytest.fixture(scope="session")
def big_image(registry, layouts) -> ImageInfo:
    """One 300 MB incompressible layer."""
    image = build_image(layouts / "big", "1", [300_000_000], seed=2)
    return push(registry, "library/big:1", image)


@pytest.fixture(scope="session")
def dockerhub(ca, registry, tmp_path_factory):
    cert, key = ca.issue("dockerhub", list(DOCKER_HUB_HOSTS))
    double = DockerHubDouble(registry.url, ca.cert_path, cert, key)
    double.start()
    yield double
    double.stop()


@pytest.fixture
def hubcache(ca, registry, dockerhub, tmp_path):
    """A factory of hubcache processes, upstream_options applied. Every proxy started here is
    stopped after the test."""
    started: list[Hubcache] = []

    def start(workdir: Path = tmp_path / "hubcache", **options) -> Hubcache:
        workdir.mkdir(parents=True, exist_ok=True)
        proxy = Hubcache(workdir, ca.cert_path, {**upstream_options(registry, dockerhub), **options})
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream_counters(request):
    """Each test reads only the upstream requests it caused."""
    for name in ("registry", "dockerhub"):
        if name in request.fixturenames:
            upstream = request.getfixturevalue(name)
            if isinstance(upstream, Registry):
                upstream.start()
                upstream.reset_requests()
            else:
                upstream.reset()


@pytest.fixture(scope="session")
def swift(tmp_path_factory):
    """OpenStack Swift with s3api (an S3 endpoint) on loopback. A test that stops it starts it again."""
    store = Swift(tmp_path_factory.mktemp("swift"))
    yield store.start()
    store.stop()


@pytest.fixture(scope="session")
def redis(tmp_path_factory):
    """redis-server on loopback, no persistence. A test that stops it starts it again."""
    server = Redis(tmp_path_factory.mktemp("redis"))
    yield server.start()
    server.stop()

"""The harness's registry: `settle()` returns once every request it has begun is finished and
logged, so a test's exact counts of upstream requests hold on a loaded machine too."""

from __future__ import annotations

import http.client

import pytest

from support.images import build_image
from support.registry import push


def test_settle_waits_for_a_request_in_flight(registry, layouts):
    # Larger than the socket buffers between the registry and this client can hold.
    image = push(registry, "harness/settle:1", build_image(layouts / "settle", "1", [40_000_000], seed="settle"))
    layer = image.platforms[0].layers[0]
    conn = http.client.HTTPSConnection("127.0.0.1", registry.port, context=registry.ssl_context(), timeout=60)
    try:
        conn.request("GET", f"/v2/harness/settle/blobs/{layer.digest}")
        response = conn.getresponse()
        assert response.status == 200 and len(response.read(1 << 20)) == 1 << 20
        # The registry is stuck writing the rest, and its log has been quiet meanwhile.
        with pytest.raises(AssertionError, match="1 requests in flight"):
            registry.settle(timeout=2)
        assert registry.blob_gets() == []
        assert len(response.read()) == layer.size - (1 << 20)
    finally:
        conn.close()
    registry.settle()
    assert [(r.reference, r.status, r.bytes) for r in registry.blob_gets()] == [(layer.digest, 200, layer.size)]

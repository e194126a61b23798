"""What the metrics take from upstream's answers: numbers only as plain decimals, so a registry's
(or anyone's between) odd header is left out, not raised on in the response hook."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tutils

from hubcache.observe.metrics import Metrics
from hubcache.options import CommonOptions
from hubcache.proxy.interception import Interception
from support.cache_env import HUB, flow


def remaining(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("hubcache_ratelimit_remaining", {"host": HUB})


@pytest.mark.parametrize("odd", ["\u00b2", "9" * 5000, "-1", "", "1e3"], ids=["superscript", "5000-digits", "negative", "empty", "float"])
def test_only_a_plain_rate_limit_count_is_taken(odd):
    hosts = Interception()
    metrics = Metrics(hosts)
    with taddons.context(CommonOptions(), hosts, metrics):
        f = flow("/v2/library/alpine/manifests/3.20")
        f.response = tutils.tresp(headers=http.Headers(**{"ratelimit-remaining": f"{odd};w=21600"}))
        try:
            metrics.response(f)
        except ValueError as e:
            pytest.fail(f"the response hook raised on {odd[:20]!r}: {e}")
        assert remaining(metrics) is None
        f.response.headers["ratelimit-remaining"] = "99;w=21600"
        metrics.response(f)
        assert remaining(metrics) == 99

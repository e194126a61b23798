"""A client inventing repository names costs hubcache no memory that grows with them: 10 000
names nobody has (a tag or a blob of each, answered 404 by the real registry upstream) through
a real mitmdump, over a few keep-alive connections, bounded in requests and time (each goes
upstream: a few minutes on a loaded machine). The proxy's resident set, the journal on disk and
the status page's most pulled are measured after a warm-up of 500 names and again after the
10 000; the cache folder the proxy made is private."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from hubcache.storage.journal import MissJournal
from support.registry import REGISTRY_NAME

NAMES = 10_000
WARM_UP = 500
CONNECTIONS = 8
DEADLINE = 840.0  # seconds for all the requests, within the test's timeout


def ask(proxy, names: range, deadline: float) -> list[int]:
    """GET a tag (even names) or a blob (odd names) of each invented name through the proxy, over
    CONNECTIONS keep-alive tunnels; the statuses, in no order."""
    context = ssl.create_default_context(cafile=str(proxy.ca_cert))

    def client(part: range) -> list[int]:
        statuses = []
        conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=context, timeout=30)
        conn.set_tunnel(REGISTRY_NAME, 443)
        try:
            for asked, n in enumerate(part):
                assert time.monotonic() < deadline, f"{asked} of {len(part)} names asked before the deadline"
                what = f"blobs/sha256:{n:064x}" if n % 2 else "manifests/latest"
                conn.request("GET", f"/v2/invented/name-{n}/{what}")
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
        finally:
            conn.close()
        return statuses

    parts = [names[i :: CONNECTIONS] for i in range(CONNECTIONS)]
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        return [s for statuses in pool.map(client, parts) for s in statuses]


@pytest.mark.timeout(900)
def test_ten_thousand_invented_names_cost_no_memory_that_grows_with_them(hubcache, tmp_path, record_property):
    proxy = hubcache()
    deadline = time.monotonic() + DEADLINE
    warm = ask(proxy, range(WARM_UP), deadline)
    assert set(warm) == {404}
    before = proxy.memory_mb("VmRSS")["mitmdump"]
    statuses = ask(proxy, range(WARM_UP, WARM_UP + NAMES), deadline)
    after = proxy.memory_mb("VmRSS")["mitmdump"]
    assert len(statuses) == NAMES and set(statuses) == {404}, "every name was answered upstream's 404"

    journal = MissJournal(proxy.cache_dir / "misses.jsonl")
    on_disk = sum(p.stat().st_size for p in journal.files() if p.exists())
    with urllib.request.urlopen(proxy.status_url + "status.json", timeout=10) as response:
        top = json.loads(response.read())["top_images"]
    summary = (
        f"mitmdump RSS {before:.0f} MB after {WARM_UP} invented names, {after:.0f} MB after {NAMES} more "
        f"({after - before:+.1f} MB); journal {on_disk} bytes in {len(journal.files())} file(s); "
        f"{len(top)} of them among the most pulled"
    )
    print("\n" + summary)
    record_property("invented_names", summary)
    assert top == [], "a name nobody has is no pulled image"
    loose = [p for p in [proxy.cache_dir, *proxy.cache_dir.rglob("*")] if p.stat().st_mode & 0o077]
    assert loose == [], "the cache folder the proxy made is readable by its owner only"
    assert after - before < 20, summary

"""Fleet mode: two real hubcache nodes sharing one real S3 store (OpenStack Swift with s3api) and,
for the fill lock, a real Redis; skopeo pulls through them from the distribution registry. The
options are checked in tests/unit/test_fleet.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from hubcache.fleet.node import Fleet
from hubcache.registry.protocol import digest_of
from support import proxied
from support.clients import pull, pulled_blobs, skopeo_copy
from support.images import ImageInfo, build_image
from support.procs import free_port
from support.registry import REGISTRY_NAME, push

HUBCACHE = Path(sys.executable).with_name("hubcache")
HUB = "registry-1.docker.io"
ALICE = ("alice", "s3cret")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OUTAGE = "serving from the local cache and upstream"
SHARED_FILL = ("filled", "from the shared store")  # a journal line's outcome and reason

# --- a node without a shared store, in a fresh Python process -------------------------


def test_a_node_without_a_shared_store_never_loads_the_s3_client():
    """boto3 and redis cost a process ~15 MB and a first use ~0.2 s on the event loop."""
    script = """
import asyncio, sys
from mitmproxy.test import taddons
from hubcache.fleet.node import Fleet

async def main():
    fleet = Fleet()
    with taddons.context(fleet) as tctx:
        tctx.configure(fleet, shared_store="")
        digest = "sha256:" + "0" * 64
        await fleet.open_blob(digest)
        await fleet.get_tag("docker.io", "library/alpine", "3")
        await fleet.claim(digest)
        fleet.release(digest)

asyncio.run(main())
print(sorted(m for m in ("boto3", "botocore", "redis") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the lock between two nodes (real Swift, real Redis) --------------------------


async def test_a_node_waits_for_the_holder_of_the_lock_and_no_longer(swift, bucket, redis, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", swift.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", swift.secret_key)
    holder, waiter = Fleet(), Fleet()
    waiter.name = "waiter"  # mitmproxy names addons by class; two of one class need two names
    with taddons.context(holder, waiter) as tctx:
        # Both nodes are configured alike: the same store, the same lock.
        tctx.configure(holder, shared_store=f"s3://{bucket}/fleet", shared_store_endpoint=swift.endpoint, fleet_lock=redis.start().url)
        assert holder.lock and waiter.lock
        path = tmp_path / "blob"
        path.write_bytes(os.urandom(300_000))
        digest = digest_of(path.read_bytes())

        assert await holder.claim(digest)
        assert not await waiter.claim(digest)
        waiting = asyncio.create_task(waiter.await_blob(digest))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # nothing in the store yet, and the lock is held
        await asyncio.to_thread(holder.store.put_blob, digest, path)
        holder.release(digest)
        blob = await asyncio.wait_for(waiting, 20)
        with blob:
            assert blob.read() == path.read_bytes()

        # A holder whose fetch failed frees its lock without a blob: the waiter goes upstream itself.
        other = digest_of(b"never fetched")
        assert await holder.claim(other)
        assert not await waiter.claim(other)
        waiting = asyncio.create_task(waiter.await_blob(other))
        await asyncio.sleep(0.3)
        holder.release(other)
        assert await asyncio.wait_for(waiting, 20) is None
        holder.done()
        waiter.done()


# --- real nodes ----------------------------------------------------------------


@pytest.fixture
def bucket(swift) -> str:
    swift.start()  # a test before may have stopped it
    return swift.make_bucket(f"fleet-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def node(hubcache, swift, bucket, tmp_path, monkeypatch):
    """A factory of hubcache nodes sharing the bucket. Node "a" finds its keys through the standard
    AWS variables, the others through shared_store_credentials."""
    secret = tmp_path / "s3-credentials"
    secret.write_text(f"{swift.access_key}:{swift.secret_key}\n")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", swift.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", swift.secret_key)

    def start(name: str, **options):
        if name != "a":
            options["shared_store_credentials"] = f"@{secret}"
        return hubcache(
            tmp_path / name,
            shared_store=f"s3://{bucket}/fleet",
            shared_store_endpoint=swift.endpoint,
            **options,
        )

    return start


def cold_image(registry, layouts: Path, sizes: list[int]) -> tuple[str, ImageInfo]:
    """A single-platform image nobody has pulled yet, pushed under a fresh name."""
    name = f"fleet{uuid.uuid4().hex[:10]}"
    image = build_image(layouts / name, "1", sizes, seed=name)
    push(registry, f"test/{name}:1", image)
    return f"{REGISTRY_NAME}/test/{name}:1", image


def blobs_of(image: ImageInfo) -> list:
    p = image.platforms[0]
    return [p.config, *p.layers]


def image_size(image: ImageInfo) -> int:
    return sum(b.size for b in blobs_of(image))


def wait_until_shared(swift, bucket: str, image: ImageInfo, timeout: float = 30) -> None:
    """Blobs are put to the shared store in the background, after the client has them."""
    wait_until_stored(swift, bucket, [shared_key("blobs", blob.digest) for blob in blobs_of(image)], timeout)


def shared_key(kind: str, digest: str) -> str:
    """Where the nodes keep a blob or a manifest in the bucket."""
    return f"fleet/{kind}/sha256/{digest.partition(':')[2]}"


def wait_until_stored(swift, bucket: str, keys: list[str], timeout: float = 30) -> None:
    client = swift.client()
    deadline = time.monotonic() + timeout
    for key in keys:
        while True:
            try:
                client.head_object(Bucket=bucket, Key=key)
                break
            except client.exceptions.ClientError:
                assert time.monotonic() < deadline, f"{key} never reached the shared store"
                time.sleep(0.1)


def upstream_blob_bytes(registry, image: ImageInfo) -> tuple[int, Counter]:
    """What the registry served of `image`'s blobs (the session's registry serves other tests'
    clients too, and a fault a test injected may still be finishing)."""
    registry.settle()
    digests = {blob.digest for blob in blobs_of(image)}
    gets = [r for r in registry.blob_gets() if r.status == 200 and r.reference in digests]
    return sum(r.bytes for r in gets), Counter(r.reference for r in gets)


def journal_outcomes(proxy, digests) -> dict[str, tuple[str, str | None]]:
    return {e["digest"]: (e["outcome"], e["reason"]) for e in proxy.journal() if e["kind"] == "blob" and e["digest"] in digests}


def test_a_blob_one_node_fetched_comes_to_the_other_from_the_shared_store(node, registry, layouts, swift, bucket, tmp_path):
    ref, image = cold_image(registry, layouts, [3_000_000, 1_000_000])
    digests = {b.digest for b in blobs_of(image)}
    a, b = node("a"), node("b")

    began = time.monotonic()
    pull(a, ref, tmp_path / "via-a")
    cold = time.monotonic() - began
    fetched, _ = upstream_blob_bytes(registry, image)
    assert fetched == image_size(image)
    wait_until_shared(swift, bucket, image)

    registry.reset_requests()
    began = time.monotonic()
    pull(b, ref, tmp_path / "via-b")
    print(f"\nnode a from upstream {cold:.2f} s, then node b from the shared store {time.monotonic() - began:.2f} s")
    assert pulled_blobs(tmp_path / "via-b") == pulled_blobs(tmp_path / "via-a") == digests
    assert upstream_blob_bytes(registry, image)[0] == 0
    assert journal_outcomes(b, digests) == dict.fromkeys(digests, SHARED_FILL)
    deadline = time.monotonic() + 30  # the pull's log line comes once it went quiet
    while "from the shared store, 0 B from upstream" not in b.log_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f"{len(digests)} blobs, " in b.log_text()
    assert f"{image_size(image) / 1e6:.1f} MB from the shared store, 0 B from upstream" in b.log_text()
    # The tag node A learned is revalidated with a HEAD, as if node B had learned it.
    assert registry.manifest_gets() == [] and len(registry.manifest_heads()) == 1

    # By digest, a third node finds the manifest in the shared store too.
    manifest = image.platforms[0].manifest.digest
    registry.reset_requests()
    c = node("c")
    pull(c, f"{ref.rpartition(':')[0]}@{manifest}", tmp_path / "via-c")
    assert pulled_blobs(tmp_path / "via-c") == digests
    assert upstream_blob_bytes(registry, image)[0] == 0 and registry.manifest_gets() == []
    outcomes = {e["digest"]: (e["outcome"], e["reason"]) for e in c.journal()}
    assert outcomes == dict.fromkeys([manifest, *digests], SHARED_FILL)


@pytest.mark.parametrize("lock", ["redis", "none"])
def test_eight_clients_on_two_nodes_pull_one_cold_image(lock, node, registry, redis, layouts, tmp_path):
    options = {"fleet_lock": redis.start().url} if lock == "redis" else {}
    a, b = node("a", **options), node("b", **options)
    ref, image = cold_image(registry, layouts, [16_000_000, 8_000_000, 2_000_000])
    digests = {blob.digest for blob in blobs_of(image)}
    times: list[float] = []
    failures: list[str] = []

    def one(i: int) -> None:
        began = time.monotonic()
        proxy = (a, b)[i % 2]
        result = skopeo_copy(f"docker://{ref}", tmp_path / f"pull{i}", proxy=proxy.url, ca_bundle=proxy.client_bundle)
        times.append(time.monotonic() - began)
        if result.returncode != 0:
            failures.append(result.stderr)

    began = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.monotonic() - began
    assert not failures, failures[0] + a.log_text()[-2000:] + b.log_text()[-2000:]
    for i in range(8):
        assert pulled_blobs(tmp_path / f"pull{i}") == digests

    fetched, per_blob = upstream_blob_bytes(registry, image)
    print(
        f"\nfleet of 2, 8 clients, lock={lock}: upstream/image = {fetched / image_size(image):.2f} "
        f"({fetched} of {image_size(image)} bytes), fetches per blob {sorted(per_blob.values())}, "
        f"pulls {min(times):.2f}-{max(times):.2f} s, all done in {wall:.2f} s"
    )
    assert set(per_blob) == digests
    if lock == "redis":
        # docs/fleet.md: with the lock, upstream serves the image once (1.00x): the node that took a
        # blob's lock fetches it, the other waits and fills from the shared store.
        assert per_blob == Counter(dict.fromkeys(digests, 1)) and fetched == image_size(image)
        outcomes = [journal_outcomes(p, digests) for p in (a, b)]
        for digest in digests:
            assert sorted(o[digest][1] or "" for o in outcomes) == ["", "from the shared store"], outcomes
            assert {o[digest][0] for o in outcomes} == {"filled"}, outcomes
    else:
        # Without it, each node fetches a blob once at most (its clients share its fill): 2.00x at most.
        assert max(per_blob.values()) <= 2


def test_nodes_keep_serving_while_the_shared_store_is_down(node, registry, layouts, swift, bucket, tmp_path):
    a, b = node("a", shared_store_retry=2), node("b", shared_store_retry=2)
    ref1, image1 = cold_image(registry, layouts, [2_000_000])
    pull(a, ref1, tmp_path / "1a")
    wait_until_shared(swift, bucket, image1)
    pull(b, ref1, tmp_path / "1b")

    swift.stop()
    try:
        pull(a, ref1, tmp_path / "1a-again")  # what each node holds, it serves
        pull(b, ref1, tmp_path / "1b-again")
        ref2, image2 = cold_image(registry, layouts, [2_000_000])
        pull(a, ref2, tmp_path / "2a")  # a new image comes from upstream
        assert upstream_blob_bytes(registry, image2)[0] == image_size(image2)
        pull(b, ref2, tmp_path / "2b")
    finally:
        swift.start()
    # Each node's last failure came before the restart, so its next try falls before this.
    retry_due = time.monotonic() + 2
    for proxy in (a, b):
        lines = [line for line in proxy.log_text().splitlines() if OUTAGE in line]
        assert len(lines) == 1, lines
        assert f"shared store {swift.endpoint}: " in lines[0] and "cannot connect" in lines[0]
        assert "Traceback" not in proxy.log_text()

    while time.monotonic() < retry_due:  # shared_store_retry: then the nodes try the store again
        time.sleep(0.1)
    ref3, image3 = cold_image(registry, layouts, [2_000_000])
    pull(a, ref3, tmp_path / "3a")
    wait_until_shared(swift, bucket, image3)
    registry.reset_requests()
    pull(b, ref3, tmp_path / "3b")
    assert upstream_blob_bytes(registry, image3)[0] == 0
    digests = {blob.digest for blob in blobs_of(image3)}
    assert journal_outcomes(b, digests) == dict.fromkeys(digests, SHARED_FILL)
    assert "reachable again" in a.log_text()


# --- what the shared store holds is checked again ------------------------------------------------


def test_a_private_blob_one_node_cached_reaches_only_clients_upstream_allows(node, registry, dockerhub, layouts, swift, bucket):
    """Alice fills a private repository through node A; node B finds the blob and the manifest in
    the shared store, but serves them only to a client upstream lets pull the repository."""
    name = f"library/private{uuid.uuid4().hex[:10]}"
    image = push(registry, f"{name}:1", build_image(layouts / name.replace("/", "-"), "1", [2_000_000], seed=name))
    platform = image.platforms[0]
    layer = platform.layers[0]
    paths = {
        platform.manifest.digest: f"/v2/{name}/manifests/{platform.manifest.digest}",
        layer.digest: f"/v2/{name}/blobs/{layer.digest}",
    }
    dockerhub.private_repos[name] = ALICE
    try:
        a, b = node("a"), node("b")
        alice = bearer(a, name, ALICE)
        for digest, path in paths.items():
            answer = hub_get(a, path, alice)
            assert answer.status == 200 and digest_of(answer.body) == digest, (path, answer.status)
        wait_until_stored(swift, bucket, [shared_key("manifests", platform.manifest.digest), shared_key("blobs", layer.digest)])
        dockerhub.reset()

        anonymous = bearer(b, name)
        for digest, path in paths.items():
            answer = hub_get(b, path, anonymous)
            assert answer.status in (401, 403, 404), (path, answer.status)
            assert answer.json()["errors"] and digest_of(answer.body) != digest
        alice = bearer(b, name, ALICE)
        for digest, path in paths.items():
            answer = hub_get(b, path, alice)
            assert answer.status == 200 and digest_of(answer.body) == digest, (path, answer.status)
        # Both came from the shared store: upstream was asked only whether each client may have them.
        assert dockerhub.requests(kind="cdn") == [] and dockerhub.requests(kind="manifest", method="GET") == []
        assert journal_outcomes(b, {layer.digest}) == {layer.digest: SHARED_FILL}
        # Held by node B now, still not for the anonymous client.
        for path in paths.values():
            assert hub_get(b, path, anonymous).status in (401, 403, 404), path
    finally:
        del dockerhub.private_repos[name]


def bearer(proxy, repository: str, credentials: tuple[str, str] | None = None) -> str:
    """A pull token of the Docker Hub double's token service, through the proxy."""
    return proxied.docker_hub_token(proxy.port, repository, ca=proxy.ca_cert, credentials=credentials)


def hub_get(proxy, path: str, token: str) -> proxied.Answer:
    headers = {"Authorization": f"Bearer {token}", "Accept": OCI_MANIFEST}
    return proxied.request(proxy.port, HUB, path, ca=proxy.ca_cert, headers=headers)


def tamper(swift, bucket: str, digest: str) -> None:
    """Flip one byte in the middle of the shared store's copy of a blob (its size unchanged)."""
    client = swift.client()
    key = shared_key("blobs", digest)
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


def test_a_corrupt_blob_in_the_shared_store_is_never_served(node, registry, layouts, swift, bucket, tmp_path):
    ref, image = cold_image(registry, layouts, [3_000_000])
    layer = image.platforms[0].layers[0]
    a = node("a")
    pull(a, ref, tmp_path / "via-a")
    wait_until_shared(swift, bucket, image)
    tamper(swift, bucket, layer.digest)

    b = node("b")
    path = f"/v2/{ref.partition('/')[2].rpartition(':')[0]}/blobs/{layer.digest}"
    answer = proxied.request(b.port, REGISTRY_NAME, path, ca=b.ca_cert)
    # Node B hashed what the store sent before letting its last byte go: the client never has
    # the corrupt bytes whole (its transfer is cut, or it is told the blob is not there).
    if answer.status == 200 and answer.complete:
        assert digest_of(answer.body) == layer.digest
    [(outcome, reason)] = [(e["outcome"], e["reason"]) for e in b.journal() if e["digest"] == layer.digest]
    assert outcome == "rejected" and reason.startswith(f"{layer.size} bytes hashing to sha256:") and layer.digest not in reason
    assert "the shared store sent" in b.log_text() and "not stored, transfers cut" in b.log_text()
    assert cache_stats(b)["blobs"] == 0


def test_after_a_corrupt_blob_in_the_shared_store_the_next_pull_gets_it_from_upstream(node, registry, layouts, swift, bucket, tmp_path):
    ref, image = cold_image(registry, layouts, [3_000_000])
    a = node("a")
    pull(a, ref, tmp_path / "via-a")
    wait_until_shared(swift, bucket, image)
    tamper(swift, bucket, image.platforms[0].layers[0].digest)
    registry.reset_requests()

    b = node("b")
    # The first pull's transfer may be cut (so that the client retries rather than accepts it).
    skopeo_copy(f"docker://{ref}", tmp_path / "first", proxy=b.url, ca_bundle=b.client_bundle, timeout=120)
    pull(b, ref, tmp_path / "next", timeout=120)
    assert pulled_blobs(tmp_path / "next") == {blob.digest for blob in blobs_of(image)}
    _, per_blob = upstream_blob_bytes(registry, image)
    assert per_blob == Counter({image.platforms[0].layers[0].digest: 1})


def cache_stats(proxy) -> dict:
    done = subprocess.run([HUBCACHE, "stats", "--json", "--cache-dir", proxy.cache_dir], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def run_refused(tmp_path: Path, *settings: str) -> subprocess.CompletedProcess[str]:
    args = [HUBCACHE, "run", "--listen-port", str(free_port())]
    for setting in settings:
        args += ["--set", setting]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_an_unreachable_store_stops_the_start_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_refused(tmp_path, "shared_store=s3://cache", f"shared_store_endpoint={endpoint}")
    assert result.returncode != 0
    assert f"shared store {endpoint}: cannot connect (Connection refused)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_bucket_stops_the_start_in_one_line(tmp_path, swift, monkeypatch):
    swift.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", swift.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", swift.secret_key)
    result = run_refused(tmp_path, "shared_store=s3://no-such-bucket/fleet", f"shared_store_endpoint={swift.endpoint}")
    assert result.returncode != 0
    assert f"shared store {swift.endpoint}: bucket 'no-such-bucket' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_lock_stops_the_start_in_one_line(tmp_path, swift, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", swift.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", swift.secret_key)
    lock = f"redis://127.0.0.1:{free_port()}/0"
    result = run_refused(tmp_path, f"shared_store=s3://{bucket}", f"shared_store_endpoint={swift.endpoint}", f"fleet_lock={lock}")
    assert result.returncode != 0
    assert f"fleet lock {lock}: cannot connect" in result.stderr
    assert "Traceback" not in result.stderr

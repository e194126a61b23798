"""Store scale benchmark: how the commands that read the whole store grow with its size.

For each size it builds a store through the store's own API (one image manifest per ten blobs:
a config and nine layers, one tag per manifest, blobs of 64 bytes, tags spread over 100
repositories), then times, as an operator would run them:

- `hubcache stats`, `hubcache ls` (what it prints first) and `hubcache rm --dry-run` of one tag,
  each a fresh process;
- the status page's summary: the first `Store.summary()` of a freshly opened store, in process;
- an eviction pass removing 1 % of the blobs: `hubcache prune --to` 99 % of the blob bytes;
- the data path's warm lookups: the median of a tag, its manifest and one of its blobs opened;
- the first open of a store written before hubcache kept its indexes (their tables dropped):
  the one-time indexing.

Then it prints one row per figure with the growth factor between successive sizes. Each command
gets at most --timeout seconds (shown as `>N s`), so a run stays bounded. Stores are built under a
temporary folder and removed at the end.

    scripts/bench_store --sizes 1000,10000,100000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

from hubcache.storage.store import Store

REGISTRY = "bench.example"
BLOBS_PER_MANIFEST = 10
BLOB_BYTES = 64
REPOSITORIES = 100
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CLI = [sys.executable, "-c", "from hubcache.cli import main; main()"]


def blob(n: int) -> tuple[str, bytes]:
    data = n.to_bytes(8, "big") * (BLOB_BYTES // 8)
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def manifest(blobs: list[tuple[str, bytes]]) -> bytes:
    def descriptor(digest: str, data: bytes, media_type: str) -> dict:
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    config, *layers = blobs
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(*config, "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor(*layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers],
    }
    return json.dumps(document, sort_keys=True).encode()


def build(directory: Path, blobs: int) -> float:
    """A store of `blobs` blobs, a tenth as many manifests and tags; seconds it took."""
    start = time.perf_counter()
    store = Store(directory)
    try:
        for m in range(blobs // BLOBS_PER_MANIFEST):
            held = [blob(m * BLOBS_PER_MANIFEST + i) for i in range(BLOBS_PER_MANIFEST)]
            for digest, data in held:
                writer = store.blob_writer(digest)
                writer.write(data)
                writer.close()
                writer.commit()
            body = manifest(held)
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            store.put_manifest(digest, OCI_MANIFEST, body)
            store.set_tag(REGISTRY, f"team/app{m % REPOSITORIES}", f"v{m}", digest)
    finally:
        store.close()
    return time.perf_counter() - start


def command(args: list[str], timeout: float) -> float | None:
    """Seconds a hubcache command took; None if it ran out of time. It must succeed."""
    start = time.perf_counter()
    try:
        subprocess.run([*CLI, *args], check=True, stdout=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return time.perf_counter() - start


def first_summary(directory: Path) -> float:
    store = Store(directory)
    try:
        start = time.perf_counter()
        store.summary()
        return time.perf_counter() - start
    finally:
        store.close()


def warm_lookup(directory: Path, manifests: int) -> float:
    """The median time of one tag, manifest and blob lookup, as the data path makes them."""
    store = Store(directory)
    times = []
    try:
        for m in range(0, manifests, max(1, manifests // 500)):
            start = time.perf_counter()
            tag = store.get_tag(REGISTRY, f"team/app{m % REPOSITORIES}", f"v{m}")
            assert tag is not None
            held = store.get_manifest(tag.digest)
            assert held is not None
            with store.open_blob(blob(m * BLOBS_PER_MANIFEST)[0]) as f:  # type: ignore[union-attr]
                f.read()
            times.append(time.perf_counter() - start)
    finally:
        store.close()
    return statistics.median(times)


def first_open_unindexed(directory: Path) -> float:
    """Drop the kept indexes (as a store written before them has none) and time the first open."""
    with sqlite3.connect(directory / "content" / "cache.db") as db:
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'hc\\_%' ESCAPE '\\'").fetchall():
            db.execute(f"DROP TABLE {name}")
    start = time.perf_counter()
    Store(directory).close()
    return time.perf_counter() - start


def measure(directory: Path, blobs: int, timeout: float) -> dict[str, float | None]:
    figures: dict[str, float | None] = {"build store": build(directory, blobs)}
    where = ["--cache-dir", str(directory)]
    figures["hubcache stats"] = command(["stats", *where], timeout)
    figures["hubcache ls"] = command(["ls", *where], timeout)
    middle = blobs // BLOBS_PER_MANIFEST // 2
    figures["hubcache rm --dry-run (1 tag)"] = command(["rm", "--dry-run", *where, f"{REGISTRY}/team/app{middle % REPOSITORIES}:v{middle}"], timeout)
    figures["status page: first summary"] = first_summary(directory)
    target = blobs * BLOB_BYTES * 99 // 100
    figures["warm tag+manifest+blob lookup (median)"] = warm_lookup(directory, blobs // BLOBS_PER_MANIFEST)
    figures["prune removing 1 %"] = command(["prune", *where, "--to", str(target)], timeout)
    figures["first open of an unindexed store"] = first_open_unindexed(directory)
    return figures


def shown(seconds: float | None, timeout: float) -> str:
    if seconds is None:
        return f">{timeout:.0f} s"
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="blob counts, comma-separated (default 1000,10000)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds each command may take (default 300)")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[int, dict[str, float | None]] = {}
    root = Path(tempfile.mkdtemp(prefix="hubcache-bench-store-"))
    try:
        for n in sizes:
            results[n] = measure(root / str(n), n, args.timeout)
            shutil.rmtree(root / str(n))
            print(f"{n} blobs: " + ", ".join(f"{k} {shown(v, args.timeout)}" for k, v in results[n].items()), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.as_json:
        print(json.dumps({str(n): r for n, r in results.items()}, indent=2))
        return
    header = ["figure", *(f"{n} blobs ({n // BLOBS_PER_MANIFEST} tags)" for n in sizes)]
    header += [f"growth {a}->{b}" for a, b in pairwise(sizes)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for figure in results[sizes[0]]:
        row = [figure, *(shown(results[n][figure], args.timeout) for n in sizes)]
        for a, b in pairwise(sizes):
            x, y = results[a][figure], results[b][figure]
            row.append(f"x{y / x:.1f}" if x and y else "-")
        print("| " + " | ".join(row) + " |")
    print(f"\n{os.cpu_count()} cores; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()

"""Put a test image straight into a Store, as if it had been pulled through the proxy."""

from __future__ import annotations

from hubcache.storage.store import Store
from support.images import ImageInfo


def store_image(
    store: Store, image: ImageInfo, registry: str, repository: str, tag: str, platforms: list[str] | None = None, public: bool = True
) -> None:
    """The index (if any), the manifests of `platforms` (all by default) and their blobs, the tag,
    each digest linked to the repository, and the repository's visibility."""
    def read(digest: str) -> bytes:
        return (image.layout_dir / "blobs" / "sha256" / digest.partition(":")[2]).read_bytes()

    for p in image.platforms:
        if platforms is not None and p.platform not in platforms:
            continue
        store.put_manifest(p.manifest.digest, p.manifest.media_type, read(p.manifest.digest))
        store.link(registry, repository, p.manifest.digest)
        for blob in (p.config, *p.layers):
            writer = store.blob_writer(blob.digest)
            writer.write(read(blob.digest))
            writer.commit()
            store.link(registry, repository, blob.digest)
    store.put_manifest(image.top.digest, image.top.media_type, read(image.top.digest))
    store.link(registry, repository, image.top.digest)
    store.set_tag(registry, repository, tag, image.top.digest)
    store.set_visibility(registry, repository, public)

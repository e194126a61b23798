"""Deterministic test images written as OCI image layouts, without network.

Layers hold incompressible pseudo-random bytes (AES-CTR keystream keyed by
the seed), generated and written in chunks so a layer of any size needs only
about one chunk of memory. The same arguments always give the same digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_MANIFEST",
    "Blob",
    "ImageInfo",
    "PlatformImage",
    "RandomLayer",
    "build_image",
    "random_layer",
    "write_blob_stream",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

CHUNK = 1 << 20
_BLOCK = 512

ImageFormat = Literal["oci", "docker"]


def _keystream(seed: object) -> Iterator[bytes]:
    """Endless deterministic pseudo-random bytes for `seed`, CHUNK at a time."""
    key = hashlib.sha256(f"hubcache-layer:{seed!r}".encode()).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    zeros = bytes(CHUNK)
    while True:
        yield enc.update(zeros)


class RandomLayer(io.RawIOBase):
    """A readable stream of an uncompressed tar holding one random file.

    The tar has one regular file, `blob-<hash of seed>.bin` (mode 0644,
    uid/gid 0, mtime 0) of `size_bytes` pseudo-random bytes, and the two zero
    end blocks. `.size` is the exact length of the tar stream.
    """

    def __init__(self, size_bytes: int, seed: object) -> None:
        super().__init__()
        self.seed = seed
        tag = hashlib.sha256(repr(seed).encode()).hexdigest()[:16]
        info = tarfile.TarInfo(f"blob-{tag}.bin")
        info.size = size_bytes
        info.mode = 0o644
        info.mtime = 0
        info.uname = info.gname = "root"
        self._header = info.tobuf(format=tarfile.USTAR_FORMAT)
        pad = (-size_bytes) % _BLOCK
        self._trailer = bytes(pad + 2 * _BLOCK)
        self.content_size = size_bytes
        self.size = len(self._header) + size_bytes + len(self._trailer)
        self._parts = self._generate()
        self._pending = b""

    def _generate(self) -> Iterator[bytes]:
        yield self._header
        left = self.content_size
        for chunk in _keystream(self.seed):
            if left <= 0:
                break
            piece = chunk[:left]
            left -= len(piece)
            yield piece
        yield self._trailer

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            try:
                self._pending = next(self._parts)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def chunks(self) -> Iterator[bytes]:
        """The tar as a sequence of chunks (each at most ~CHUNK bytes)."""
        if self._pending:
            yield self._pending
            self._pending = b""
        yield from self._parts


def random_layer(size_bytes: int, seed: object) -> RandomLayer:
    """A fresh RandomLayer: an uncompressed layer tar of `size_bytes` random bytes."""
    return RandomLayer(size_bytes, seed)


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob: its digest, size and media type."""

    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def _blob_path(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def write_blob_stream(layout: Path, chunks: Iterator[bytes], media_type: str) -> Blob:
    """Write chunks to `layout/blobs/sha256/<digest>` (atomically) and return the Blob."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                h.update(c)
                f.write(c)
                size += len(c)
        digest = f"sha256:{h.hexdigest()}"
        os.replace(tmp, _blob_path(layout, digest))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Blob(digest, size, media_type)


def _write_bytes_blob(layout: Path, data: bytes, media_type: str) -> Blob:
    return write_blob_stream(layout, iter([data]), media_type)


def _gzip_chunks(chunks: Iterator[bytes], diff: hashlib._Hash) -> Iterator[bytes]:
    # wbits=31 gives a gzip wrapper with mtime 0, so output is deterministic.
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    for c in chunks:
        diff.update(c)
        out = comp.compress(c)
        if out:
            yield out
    yield comp.flush()


def _write_layer(layout: Path, size: int, seed: object, fmt: ImageFormat) -> tuple[Blob, str]:
    """Write one random layer blob; return (blob, diff_id)."""
    layer = RandomLayer(size, seed)
    if fmt == "oci":
        blob = write_blob_stream(layout, layer.chunks(), OCI_LAYER_TAR)
        return blob, blob.digest  # uncompressed: digest == diff_id
    diff = hashlib.sha256()
    blob = write_blob_stream(layout, _gzip_chunks(layer.chunks(), diff), DOCKER_LAYER_GZIP)
    return blob, f"sha256:{diff.hexdigest()}"


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=False).encode()


Platform = tuple[str, str] | tuple[str, str, str]


def _platform_key(p: Platform) -> str:
    return "/".join(p)


def _platform_dict(p: Platform) -> dict[str, str]:
    d = {"architecture": p[1], "os": p[0]}
    if len(p) > 2:
        d["variant"] = p[2]
    return d


@dataclass(frozen=True)
class PlatformImage:
    """One platform's image: manifest, config and layers."""

    platform: str  # "os/arch" or "os/arch/variant"
    manifest: Blob
    config: Blob
    layers: list[Blob]
    diff_ids: list[str]

    @property
    def blobs(self) -> list[Blob]:
        """Manifest, config and layers."""
        return [self.manifest, self.config, *self.layers]


@dataclass(frozen=True)
class ImageInfo:
    """What build_image wrote. All digests are "sha256:<hex>"."""

    ref: str
    format: ImageFormat
    platforms: list[PlatformImage]
    index: Blob | None = None  # OCI index / docker manifest list, if several platforms
    layout_dir: Path = field(default_factory=Path)

    @property
    def index_digest(self) -> str | None:
        return self.index.digest if self.index else None

    @property
    def top(self) -> Blob:
        """What the tag points at: the index if any, else the only manifest."""
        return self.index or self.platforms[0].manifest

    @property
    def manifest_digests(self) -> dict[str, str]:
        """platform -> manifest digest."""
        return {p.platform: p.manifest.digest for p in self.platforms}

    @property
    def config_digests(self) -> dict[str, str]:
        """platform -> config digest."""
        return {p.platform: p.config.digest for p in self.platforms}

    @property
    def layer_digests(self) -> dict[str, list[str]]:
        """platform -> layer digests, in manifest order."""
        return {p.platform: [b.digest for b in p.layers] for p in self.platforms}

    @property
    def diff_ids(self) -> dict[str, list[str]]:
        """platform -> diff_ids (what `docker image inspect` shows as RootFS.Layers)."""
        return {p.platform: list(p.diff_ids) for p in self.platforms}

    @property
    def blob_sizes(self) -> dict[str, int]:
        """digest -> size for every blob, the index and manifests included."""
        out = {b.digest: b.size for p in self.platforms for b in p.blobs}
        if self.index:
            out[self.index.digest] = self.index.size
        return out

    @property
    def layer_sizes(self) -> dict[str, int]:
        """layer digest -> size."""
        return {b.digest: b.size for p in self.platforms for b in p.layers}

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of all distinct blobs, index and manifests included."""
        return sum(self.blob_sizes.values())

    def platform(self, key: str) -> PlatformImage:
        """The PlatformImage for "os/arch" (or "os/arch/variant")."""
        for p in self.platforms:
            if p.platform == key:
                return p
        raise KeyError(key)


def _update_layout_index(layout: Path, ref: str, top: Blob) -> None:
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index_path = layout / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    ann = "org.opencontainers.image.ref.name"
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(ann) != ref
    ]
    index["manifests"].append(top.descriptor(annotations={ann: ref}))
    index_path.write_text(json.dumps(index, indent=2))


def build_image(
    layout_dir: Path | str,
    ref: str,
    layer_sizes: list[int],
    seed: object,
    platforms: list[Platform] | None = None,
    *,
    format: ImageFormat = "oci",
) -> ImageInfo:
    """Write a deterministic image into the OCI layout `layout_dir` under `ref`.

    `layer_sizes` are the sizes of the random file inside each layer tar (the
    blob is slightly larger: tar header and padding). One platform gives a
    single manifest; several give an index/list with one manifest per
    platform, whose layers differ (each layer's seed is derived from `seed`,
    the platform and the layer's position).

    format="oci": OCI manifest/index, uncompressed tar layers
    (application/vnd.oci.image.layer.v1.tar; digest == diff_id).
    format="docker": docker schema2 manifest/manifest list, gzip (level 1)
    layers. Both are pullable by dockerd 20.10, skopeo and containerd.

    Other refs already in the layout are kept; the same ref is replaced.
    """
    layout = Path(layout_dir)
    layout.mkdir(parents=True, exist_ok=True)
    platforms = platforms or [("linux", "amd64")]
    oci = format == "oci"
    images: list[PlatformImage] = []
    for plat in platforms:
        key = _platform_key(plat)
        layers: list[Blob] = []
        diff_ids: list[str] = []
        for i, size in enumerate(layer_sizes):
            blob, diff_id = _write_layer(layout, size, f"{seed}-{key}-{i}", format)
            layers.append(blob)
            diff_ids.append(diff_id)
        config = {
            "created": "1970-01-01T00:00:00Z",
            "architecture": plat[1],
            "os": plat[0],
            **({"variant": plat[2]} if len(plat) > 2 else {}),
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/true"],
                "Labels": {"org.hubcache.test.seed": str(seed), "org.hubcache.test.ref": ref},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": "1970-01-01T00:00:00Z", "created_by": f"hubcache test layer {i}"}
                for i in range(len(layer_sizes))
            ],
        }
        config_blob = _write_bytes_blob(layout, _canonical(config), OCI_CONFIG if oci else DOCKER_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
            "config": config_blob.descriptor(),
            "layers": [b.descriptor() for b in layers],
        }
        manifest_blob = _write_bytes_blob(layout, _canonical(manifest), OCI_MANIFEST if oci else DOCKER_MANIFEST)
        images.append(PlatformImage(key, manifest_blob, config_blob, layers, diff_ids))

    index_blob: Blob | None = None
    if len(platforms) > 1:
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX if oci else DOCKER_LIST,
            "manifests": [
                img.manifest.descriptor(platform=_platform_dict(p))
                for img, p in zip(images, platforms, strict=True)
            ],
        }
        index_blob = _write_bytes_blob(layout, _canonical(index), OCI_INDEX if oci else DOCKER_LIST)
    info = ImageInfo(ref=ref, format=format, platforms=images, index=index_blob, layout_dir=layout)
    _update_layout_index(layout, ref, info.top)
    return info

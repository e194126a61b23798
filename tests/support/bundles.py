"""Hostile bundles for the import tests: a small valid image around a bomb (a blob of zeros that a
few KB of bz2 inflate to any size) or around thousands of small JSON blobs no manifest names."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

REGISTRY = "registry.example.test"
BOMB_IMAGE = f"{REGISTRY}/evil/bomb:1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ZEROS = 8 * 1024 * 1024  # bytes of zeros per bz2 stream


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def zeros_digest(size: int) -> str:
    h, left = hashlib.sha256(), size
    while left:
        n = min(ZEROS, left)
        h.update(bytes(n))
        left -= n
    return "sha256:" + h.hexdigest()


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def image(layers: list[tuple[str, int]], name: str = BOMB_IMAGE) -> tuple[list[tuple[str, bytes]], str]:
    """The index.json, manifest and config members of an image whose layers are (digest, size)
    descriptors, and the manifest's digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s} for d, s in layers],
        }
    ).encode()
    entry = {"mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": name}}
    index = json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()
    members = [("index.json", index), (_blob_name(sha256(manifest)), manifest), (_blob_name(sha256(config)), config)]
    return members, sha256(manifest)


def bomb(path: Path, inflated: int, declared: int | None = None) -> str:
    """A .tar.bz2 of a few KB: a valid image whose one layer is `inflated` zero bytes, named by
    its true digest, declared by the manifest with size `declared` (by default the true one).
    Returns the layer's digest."""
    layer = zeros_digest(inflated)
    members, _ = image([(layer, inflated if declared is None else declared)])
    compressor = bz2.BZ2Compressor()
    with open(path, "wb") as out:
        for name, data in members:
            out.write(compressor.compress(_header(name, len(data)) + data + _padding(len(data))))
        out.write(compressor.compress(_header(_blob_name(layer), inflated)))
        zeros = bytes(ZEROS)
        for _ in range(inflated // ZEROS):
            out.write(compressor.compress(zeros))
        out.write(compressor.compress(bytes(inflated % ZEROS) + _padding(inflated) + bytes(1024)))
        out.write(compressor.flush())
    return layer


def json_flood(path: Path, count: int, size: int) -> None:
    """A .tar.gz holding a small valid image and `count` JSON blobs of about `size` bytes that no
    manifest names, each under its true digest."""
    layer = b"a layer"
    members, _ = image([(sha256(layer), len(layer))], f"{REGISTRY}/evil/flood:1")
    members.append((_blob_name(sha256(layer)), layer))
    with gzip.open(path, "wb", compresslevel=1) as out, tarfile.open(fileobj=out, mode="w|") as tar:
        for name, data in members:
            _add(tar, name, data)
        for n in range(count):
            blob = json.dumps({"n": n, "padding": "x" * size}).encode()
            _add(tar, _blob_name(sha256(blob)), blob)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)


def many_images(path: Path, count: int, extra_members: int = 0) -> list[tuple[str, str, str]]:
    """An uncompressed tar of `count` small images named {REGISTRY}/test/many:<n> (a manifest, a
    config they all share and a layer of their own each), and `extra_members` empty files outside
    the layout; (tag, manifest digest, layer digest) of each image."""
    members, entries, images = [], [], []
    for n in range(count):
        layer = f"layer {n}".encode()
        (_, index), *blobs = image([(sha256(layer), len(layer))], f"{REGISTRY}/test/many:{n}")[0]
        entries += json.loads(index)["manifests"]
        members += [*blobs, (_blob_name(sha256(layer)), layer)]
        images.append((str(n), sha256(blobs[0][1]), sha256(layer)))
    members.append(("index.json", json.dumps({"schemaVersion": 2, "manifests": entries}).encode()))
    members += [(f"extra/{n}", b"") for n in range(extra_members)]
    with tarfile.open(path, "w") as tar:
        for name, data in dict(members).items():  # the shared config once
            _add(tar, name, data)
    return images


def header_bomb(path: Path, kind: bytes, declared: int) -> None:
    """A .tar.gz of a few KB whose first member is an extended header (`kind`: b"L", a GNU long
    name; b"x", a pax header) that claims `declared` bytes, and has them: all b"a"."""
    head = bytearray(512)
    head[0:13] = b"././@LongLink"
    head[100:124] = b"0000644\0" + b"0000000\0" + b"0000000\0"
    head[124:136] = b"%011o\0" % declared
    head[136:148] = b"%011o\0" % 0
    head[156:157] = kind
    head[257:265] = b"ustar  \0"
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(bytes(head))
        chunk = b"a" * (1 << 20)
        for _ in range(declared // len(chunk)):
            out.write(chunk)
        out.write(bytes(1024))

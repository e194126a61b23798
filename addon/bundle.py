"""Bundles: images carried across an air gap as one OCI image layout in a tar file.

The file is a standard OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`), so
skopeo, podman, crane and containerd read it too (`skopeo copy oci-archive:FILE:REF ...`). Each
entry of `index.json` names its image in full (`registry/repository:tag`) in the annotations
`org.opencontainers.image.ref.name` and `io.containerd.image.name`; the name of the recording it
came from, if any, is the index's own annotation `io.hubcache.recording`. An image's referrers
(signatures, SBOMs) are carried as blobs of the layout and listed in its entry's annotation
`io.hubcache.referrers` (JSON: digest, mediaType, size, subject, and the tag-schema tag if any), so
that import links them to their subject again: the referrers API lists them, and their tags
resolve.

Import is all-or-nothing: every blob is hashed and every manifest walked before anything is
committed, so a corrupt or truncated file leaves the store as it was.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Buffer, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import manifests
from .protocol import (
    DIGEST_RE,
    MAX_MANIFEST,
    NAME_RE,
    TAG_RE,
    canonical_registry,
    hash_digest,
    hasher,
    manifest_media_type,
)
from .recording import Image, PlatformManifest, Recording, RecordingError, Referrer, referrer_tag_subject
from .store import BlobWriter, Store

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
RECORDING = "io.hubcache.recording"
PUBLIC = "io.hubcache.public"  # "true" / "false": whether the image's repository is public; absent: unknown
REFERRERS = "io.hubcache.referrers"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_BLOB_PATH = re.compile(r"blobs/(sha256|sha512)/([a-f0-9]+)")
_REFERENCE = re.compile(r"(?P<registry>[^/]+)/(?P<repository>[^:@]+)(?::(?P<tag>[^@]+)|@(?P<digest>.+))")

OnBytes = Callable[[int], None]  # called with the number of bytes just handled


class BundleError(Exception):
    """A bundle that cannot be written or read; the message is for an operator."""


@dataclass
class BundleSummary:
    images: list[str] = field(default_factory=list)
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    already_held: int = 0  # blobs the store had before an import


# export


def export(store: Store, images: list[Image], out: Path, recording: str = "", progress: OnBytes | None = None) -> BundleSummary:
    """Write `images` (their recorded platforms and blobs) to `out`, re-hashing everything read
    from the store. The file appears only when complete."""
    if not images:
        raise BundleError("nothing to export")
    missing = _missing(store, images)
    if missing:
        raise BundleError(f"the cache lacks {len(missing)} of the needed items, e.g. {', '.join(missing[:3])}")
    summary = BundleSummary(images=[i.name for i in images])
    manifest_digests = list(dict.fromkeys(d for i in images for d in i.manifest_digests()))
    blobs: dict[str, int] = {}
    for image in images:
        blobs.update(image.blobs())
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [_top_descriptor(store, image) for image in images],
        **({"annotations": {RECORDING: recording}} if recording else {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # created with the umask's permissions
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            _add_bytes(tar, "index.json", json.dumps(index, indent=1).encode())
            for digest in manifest_digests:
                manifest = store.get_manifest(digest)
                assert manifest is not None  # checked by _missing
                _add_bytes(tar, _blob_name(digest), manifest.body)
                summary.manifests += 1
            for digest, size in blobs.items():
                blob = store.open_blob(digest)
                if blob is None:
                    raise BundleError(f"blob {digest} left the cache during the export")
                with blob:
                    info = tarfile.TarInfo(_blob_name(digest))
                    info.size = os.fstat(blob.fileno()).st_size
                    if info.size != size:
                        raise BundleError(f"blob {digest} in the cache has {info.size} bytes, not {size}")
                    checked = _HashingReader(blob, digest, progress)
                    tar.addfile(info, checked)
                    checked.check()
                summary.blobs += 1
                summary.bytes += size
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return summary


def _missing(store: Store, images: list[Image]) -> list[str]:
    missing = []
    for image in images:
        if not image.manifests:
            missing.append(f"any platform of {image.name}")
        missing += [f"manifest {d}" for d in image.manifest_digests() if store.get_manifest(d) is None]
        missing += [f"blob {d}" for d in image.blobs() if not store.has_blob(d)]
    return missing


def _top_descriptor(store: Store, image: Image) -> dict:
    manifest = store.get_manifest(image.digest)
    assert manifest is not None
    public = store.visibility(image.registry, image.repository)
    annotations = {REF_NAME: image.name, CONTAINERD_NAME: image.name}
    if public is not None:  # unknown stays unknown on the other side of the gap
        annotations[PUBLIC] = str(public).lower()
    if image.referrers:
        listed = []
        for r in image.referrers.values():
            held = store.get_manifest(r.digest)
            assert held is not None  # checked by _missing
            entry = {"mediaType": r.media_type, "digest": r.digest, "size": len(held.body), "subject": r.subject}
            listed.append({**entry, **({"tag": r.tag} if r.tag else {})})
        annotations[REFERRERS] = json.dumps(listed, separators=(",", ":"))
    return {"mediaType": manifest.media_type, "digest": image.digest, "size": len(manifest.body), "annotations": annotations}


def _blob_name(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    return f"blobs/{algorithm}/{hex_digest}"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _HashingReader:
    """Reads a blob file for tarfile while hashing it: a blob that rotted on disk is never exported."""

    def __init__(self, f: BinaryIO, digest: str, progress: OnBytes | None):
        self.f, self.digest, self.progress = f, digest, progress
        self._hash = hasher(digest)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self._hash.update(data)
        if self.progress and data:
            self.progress(len(data))
        return data

    def check(self) -> None:
        if hash_digest(self._hash) != self.digest:
            raise BundleError(f"blob {self.digest} in the cache does not match its digest; run a verify")


# import


def import_bundle(store: Store, path: Path, cache_dir: Path | None = None, progress: OnBytes | None = None) -> BundleSummary:
    """Load a bundle into `store`: all of it after every digest verified, or nothing. With
    `cache_dir`, a recording named in the bundle is created (or updated) there too."""
    reader = _BundleReader(store, progress)
    recording = None
    try:
        reader.read(path)
        images = reader.walk()
        if reader.recording and cache_dir is not None:
            try:
                recording = Recording.open(cache_dir, reader.recording)
            except RecordingError as e:
                raise BundleError(f"the bundle's recording: {e}") from None
        summary = reader.commit(images)
    finally:
        reader.discard()
    if recording:
        recording.images.update({image.name: image for image in images})
        recording.save()
    return summary


class _BundleReader:
    def __init__(self, store: Store, progress: OnBytes | None):
        self.store = store
        self.progress = progress
        self.index: dict | None = None
        self.recording = ""
        self.writers: dict[str, BlobWriter] = {}  # every blob of the file, verified, uncommitted
        self.carried: set[str] = set()  # the digests of every blob the file carries
        self.documents: dict[str, bytes] = {}  # the blobs that may be manifests (small JSON)
        self.needed_blobs: dict[str, int] = {}
        self.manifests: dict[str, tuple[str, bytes]] = {}  # digest -> (media type, body)
        self.private: set[str] = set()  # names of the images the bundle marks private
        self.public: set[str] = set()  # and public; any other image's visibility is unknown

    def read(self, path: Path) -> None:
        try:
            with open(path, "rb") as raw, tarfile.open(fileobj=_CountingReader(raw, self.progress), mode="r|*") as tar:
                for member in tar:
                    self._read_member(tar, member)
        except FileNotFoundError:
            raise BundleError(f"{path}: no such file") from None
        except (tarfile.TarError, EOFError, OSError) as e:
            raise BundleError(f"{path}: not a readable tar file ({e}); nothing was imported") from None
        if self.index is None:
            raise BundleError(f"{path}: no index.json; not an OCI image layout")

    def _read_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name.removeprefix("./")
        if not member.isfile():
            return
        f = tar.extractfile(member)
        assert f is not None
        if name == "index.json":
            try:
                self.index = json.loads(f.read(MAX_MANIFEST + 1))
                self.recording = str(self.index.get("annotations", {}).get(RECORDING, ""))
            except (ValueError, AttributeError):
                raise BundleError("index.json is not a JSON object") from None
            return
        match = _BLOB_PATH.fullmatch(name)
        if not match:
            return  # not part of the layout
        digest = f"{match[1]}:{match[2]}"
        if not DIGEST_RE.fullmatch(digest):
            raise BundleError(f"{name}: not a valid digest")
        if digest in self.writers:
            return
        writer = self.store.blob_writer(digest)
        self.writers[digest] = writer
        self.carried.add(digest)
        keep = member.size <= MAX_MANIFEST
        kept = []
        while chunk := f.read(1 << 20):
            writer.write(chunk)
            if keep:
                kept.append(chunk)
        writer.close()
        if writer.write_error:
            raise BundleError(f"cannot write to the cache: {writer.write_error}")
        if not writer.verified(member.size):
            raise BundleError(f"{name}: its bytes hash to {writer.computed_digest}; the file is corrupt")
        if keep and kept and kept[0][:1] == b"{":
            self.documents[digest] = b"".join(kept)

    def walk(self) -> list[Image]:
        """Check that every image the index names is complete, and describe it."""
        assert self.index is not None
        entries = self.index.get("manifests")
        if not isinstance(entries, list) or not entries:
            raise BundleError("index.json lists no images")
        images = []
        for entry in entries:
            try:
                top = manifests.descriptor(entry)
            except manifests.ManifestError as e:
                raise BundleError(f"index.json: {e}") from None
            annotations = entry.get("annotations") or {}
            name = annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME) or ""
            image = self._image(name, top)
            self._referrers(image, annotations.get(REFERRERS))
            images.append(image)
            if annotations.get(PUBLIC) == "false":
                self.private.add(image.name)
            elif annotations.get(PUBLIC) == "true":
                self.public.add(image.name)
        return images

    def _image(self, name: str, top: manifests.Descriptor) -> Image:
        match = _REFERENCE.fullmatch(name)
        if not (
            match
            and ("." in match["registry"] or ":" in match["registry"] or match["registry"] == "localhost")
            and NAME_RE.fullmatch(match["repository"])
            and (match["digest"] or TAG_RE.fullmatch(match["tag"]))
        ):
            raise BundleError(
                f"index.json entry {top.digest} is named {name!r}, not a full image reference "
                "(registry/repository:tag); hubcache cannot tell which image it is"
            )
        if match["digest"] and match["digest"] != top.digest:
            raise BundleError(f"{name} names a digest other than its entry's {top.digest}")
        media_type, body = self._manifest(top, name)
        image = Image(canonical_registry(match["registry"]), match["repository"], match["tag"] or top.digest, top.digest, media_type)
        refs = self._references(name, body, media_type)
        if not image.is_index:
            image.manifests[top.digest] = PlatformManifest(top.digest, media_type, "", self._blobs(name, refs))
            return image
        for child in refs.children:
            if child.digest in self.documents or self.store.get_manifest(child.digest):
                child_type, child_body = self._manifest(child, name)
                blobs = self._blobs(name, self._references(name, child_body, child_type))
                image.manifests[child.digest] = PlatformManifest(child.digest, child_type, child.platform, blobs)
        if not image.manifests:
            raise BundleError(f"{name}: none of its platform manifests is in the file")
        return image

    def _referrers(self, image: Image, listed: str | None) -> None:
        """Check the referrers an entry lists (each carried whole, naming one of the image's
        manifests) and add them to `image`."""
        if not listed:
            return
        try:
            entries = json.loads(listed)
            described = [(manifests.descriptor(e), str(e["subject"]), str(e.get("tag", ""))) for e in entries]
        except (ValueError, TypeError, KeyError, AttributeError, manifests.ManifestError) as e:
            raise BundleError(f"{image.name}: its {REFERRERS} annotation cannot be read ({e})") from None
        for descriptor, subject, tag in described:
            if subject not in image.subjects():
                raise BundleError(f"{image.name}: referrer {descriptor.digest} names {subject}, not one of the image's manifests")
            if tag and (referrer_tag_subject(tag) != subject or not TAG_RE.fullmatch(tag)):
                raise BundleError(f"{image.name}: referrer {descriptor.digest} has the tag {tag!r}, not one of {subject}'s")
            media_type, body = self._manifest(descriptor, image.name)
            refs = self._references(image.name, body, media_type)
            found = manifests.referrer(descriptor.digest, media_type, body)
            if not tag and (found is None or found[0] != subject):
                raise BundleError(f"{image.name}: manifest {descriptor.digest} does not name {subject} as its subject")
            artifact_type = found[1].get("artifactType", "") if found else ""
            blobs = self._blobs(image.name, refs)
            image.referrers[descriptor.digest] = Referrer(descriptor.digest, media_type, subject, artifact_type, tag, blobs)

    def _manifest(self, descriptor: manifests.Descriptor, name: str) -> tuple[str, bytes]:
        body = self.documents.get(descriptor.digest)
        if body is None:
            held = self.store.get_manifest(descriptor.digest)
            if held is None:
                raise BundleError(f"{name}: manifest {descriptor.digest} is missing from the file")
            return held.media_type, held.body
        if len(body) != descriptor.size:
            raise BundleError(f"{name}: manifest {descriptor.digest} has {len(body)} bytes, not {descriptor.size}")
        media_type = manifest_media_type(body, descriptor.media_type)
        if media_type == "application/json":
            raise BundleError(f"{name}: manifest {descriptor.digest} has no media type")
        self.manifests[descriptor.digest] = (media_type, body)
        return media_type, body

    @staticmethod
    def _references(name: str, body: bytes, media_type: str) -> manifests.References:
        try:
            return manifests.references(body, media_type)
        except manifests.ManifestError as e:
            raise BundleError(f"{name}: a manifest cannot be read: {e}") from None

    def _blobs(self, name: str, refs: manifests.References) -> list[manifests.Descriptor]:
        for blob in refs.blobs:
            writer = self.writers.get(blob.digest)
            if writer is not None:
                if writer.size != blob.size:
                    raise BundleError(f"{name}: blob {blob.digest} has {writer.size} bytes, not {blob.size}")
                self.needed_blobs[blob.digest] = blob.size
            elif not self.store.has_blob(blob.digest):
                raise BundleError(f"{name}: blob {blob.digest} is missing from the file")
        return list(refs.blobs)

    def commit(self, images: list[Image]) -> BundleSummary:
        summary = BundleSummary(images=[i.name for i in images])
        for digest, size in self.needed_blobs.items():
            writer = self.writers.pop(digest)
            if self.store.has_blob(digest):
                writer.discard()
                summary.already_held += 1
                continue
            writer.commit()
            summary.blobs += 1
            summary.bytes += size
        for digest, (media_type, body) in self.manifests.items():
            self.store.put_manifest(digest, media_type, body)
            summary.manifests += 1
        private = {(i.registry, i.repository) for i in images if i.name in self.private}
        public = {(i.registry, i.repository) for i in images if i.name in self.public} - private
        for image in images:
            repository = (image.registry, image.repository)
            for digest in [*image.manifest_digests(), *image.blobs()]:
                # A bundle vouches only for what it carries: a digest the store holds for another
                # repository is not opened to this one by being named here.
                if digest in self.carried or self.store.linked(*repository, digest):
                    self.store.link(*repository, digest)
            known = self.store.visibility(*repository)
            if repository in private and known is not False:
                self.store.set_visibility(*repository, False)
            elif repository in public and known is None:
                self.store.set_visibility(*repository, True)  # never more open than the store knows
            elif repository not in public and known is None:
                # No mark (a skopeo or crane archive): unknown stays unknown, so upstream is still
                # asked online; offline, whoever imported it chose to serve it (access.py).
                self.store.note_imported(*repository)
            if not DIGEST_RE.fullmatch(image.reference):
                # Never confirmed by upstream here: online, the tag is revalidated on first use.
                self.store.set_tag(image.registry, image.repository, image.reference, image.digest, checked=0)
            for r in image.referrers.values():
                if r.tag:
                    self.store.set_tag(image.registry, image.repository, r.tag, r.digest, checked=0)
                media_type, body = self.manifests.get(r.digest) or self._held(r.digest)
                if found := manifests.referrer(r.digest, media_type, body):
                    self.store.add_referrers(image.registry, image.repository, found[0], [found[1]])
        return summary

    def _held(self, digest: str) -> tuple[str, bytes]:
        held = self.store.get_manifest(digest)
        assert held is not None  # walked before the commit
        return held.media_type, held.body

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.discard()
        self.writers.clear()


class _CountingReader(io.RawIOBase):
    def __init__(self, f: io.BufferedIOBase, progress: OnBytes | None):
        self.f, self.progress = f, progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        n = self.f.readinto(buffer)
        if self.progress and n:
            self.progress(n)
        return n

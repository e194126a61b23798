"""Bundles: images carried across an air gap as one OCI image layout in a tar file, which other
tools read too. Import is all-or-nothing, and a hostile file costs nothing: sizes are checked
against free space before any blob is read, and only one manifest is held in memory."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from lzma import LZMAError
from pathlib import Path
from typing import BinaryIO

from ..registry import manifests
from ..registry.protocol import (
    DIGEST_RE,
    MAX_MANIFEST,
    NAME_RE,
    TAG_RE,
    canonical_registry,
    hash_digest,
    hasher,
    manifest_media_type,
    parse_json,
)
from .recordings import Image, PlatformManifest, Recording, RecordingError, Referrer, referrer_tag_subject
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
FreeSpace = Callable[[Path], int]  # the bytes free in a folder
# A bundle's members are listed in memory (about half a KB each) before any is read: this bounds
# what a file of empty members costs, and holds 10^4 images of 20 layers.
MAX_MEMBERS = 250_000
FREE_SPACE_RESERVE = 64 * 1024 * 1024  # left free for the index and the proxy's fills
# Bytes of a member's extended header (a GNU long name or link, a pax header) read at most:
# tarfile reads one whole into memory, whatever size it claims (156 KB of xz claimed 1 GiB).
MAX_EXTENDED_HEADER = 1 << 20
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
CHUNK = 1 << 20
# Blobs and manifests stored per transaction: many per transaction is what makes a large import
# fast; few enough that the proxy's writes to the same store (fills, last use) wait only briefly.
COMMIT_ENTRIES = 1_000


class BundleError(Exception):
    """A bundle that cannot be written or read; the message is for an operator."""


class PartlyImported(Exception):
    """The store failed (`cause`: a full disk, a read-only folder) after some of the bundle's images
    were stored: `stored` of them are in the cache whole, the rest not at all."""

    def __init__(self, cause: OSError, stored: list[str], total: int) -> None:
        super().__init__(f"{cause.strerror or cause}; {len(stored)} of {total} images were stored whole, the rest not at all")
        self.cause = cause
        self.stored = stored


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


def _free_space(folder: Path) -> int:
    return shutil.disk_usage(folder).free


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A member that cannot be read (a truncated or corrupt file) is the bundle's fault."""
    try:
        yield
    except (tarfile.TarError, EOFError, LZMAError, zlib.error) as e:
        raise BundleError(f"{path}: not a readable tar file ({e})") from None



def import_bundle(
    store: Store,
    path: Path,
    cache_dir: Path | None = None,
    progress: OnBytes | None = None,
    free_space: FreeSpace = _free_space,
) -> BundleSummary:
    """Load a bundle into `store`: all of it after every digest verified, or nothing. With
    `cache_dir`, a recording named in the bundle is created (or updated) there too. `progress`
    is called with the bytes of every member read; `free_space` tells the bytes free in a folder."""
    reader = _BundleReader(store, progress, free_space)
    recording = None
    try:
        reader.read(path)
        with _reading(path):
            images = reader.walk()
            reader.load()
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


class _BoundedTarInfo(tarfile.TarInfo):
    """A member header whose extended header is refused above MAX_EXTENDED_HEADER, unread."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > MAX_EXTENDED_HEADER:
            raise tarfile.ReadError(f"an extended header of {self.size} bytes (at most {MAX_EXTENDED_HEADER})")
        return super()._proc_member(tarfile_)  # type: ignore[misc]  # private to tarfile: not in its stubs


class _BundleReader:
    """Reads a bundle in three steps, writing nothing the bundle did not declare:
    - `read` lists its members (headers only) and reads index.json;
    - `walk` reads the manifests the index names, one at a time (each checked against the size
      its descriptor names, kept in a temporary file, not in memory), and learns every blob they
      name;
    - `load` refuses any member no manifest names, then writes the blobs, each verified.
    Every member must have the size its descriptor names, so the sizes in the members' headers,
    checked against the free space before anything is read, are the declared ones."""

    def __init__(self, store: Store, progress: OnBytes | None, free_space: FreeSpace):
        self.store = store
        self.progress = progress
        self.free_space = free_space
        self.tar: tarfile.TarFile | None = None
        self.index: dict | None = None
        self.recording = ""
        self.members: dict[str, tarfile.TarInfo] = {}  # by digest: the blobs of the file (manifests too)
        self.held: set[str] = set()  # the members the store held when the file was listed
        self.writers: dict[str, BlobWriter] = {}  # verified, uncommitted: the manifests read, the blobs loaded
        self.media_types: dict[str, str] = {}  # of the manifests read from the file
        self.needed_blobs: dict[str, int] = {}  # named by a manifest, with their sizes
        self.committed: set[str] = set()  # the blobs and manifests of the file handled by commit
        self.marked: set[tuple[str, str]] = set()  # the repositories whose visibility commit noted
        self.private: set[str] = set()  # names of the images the bundle marks private
        self.public: set[str] = set()  # and public; any other image's visibility is unknown

    def read(self, path: Path) -> None:
        try:
            # Closed by discard; gz, bz2, xz: decompressed as read.
            self.tar = tarfile.open(path, mode="r:*", tarinfo=_BoundedTarInfo)  # noqa: SIM115
            with _reading(path):
                index = self._scan(path)
                if index is None:
                    raise BundleError(f"{path}: no index.json; not an OCI image layout")
                document = self._read(index, MAX_MANIFEST + 1)
        except FileNotFoundError:
            raise BundleError(f"{path}: no such file") from None
        except (tarfile.TarError, OSError) as e:
            why = " ".join(str(e).split())  # tarfile's reasons, one per compression tried, on one line
            raise BundleError(f"{path}: not a readable tar file ({why})") from None
        try:
            self.index = parse_json(document)
            self.recording = str(self.index.get("annotations", {}).get(RECORDING, ""))
        except (ValueError, AttributeError):
            raise BundleError("index.json is not a JSON object") from None

    def _scan(self, path: Path) -> tarfile.TarInfo | None:
        """Note every blob member (by header, its data unread) and return index.json's. A file whose
        blobs could not fit in the cache is refused at the first header that says so."""
        assert self.tar
        index, count, new_bytes = None, 0, 0
        while (member := self.tar.next()) is not None:
            count += 1
            if count > MAX_MEMBERS:
                raise BundleError(f"{path}: more than {MAX_MEMBERS} members; not a bundle hubcache reads")
            name = member.name.removeprefix("./")
            if not member.isfile():
                continue
            if name == "index.json":
                index = index or member
                continue
            match = _BLOB_PATH.fullmatch(name)
            if not match:
                continue  # not part of the layout
            digest = f"{match[1]}:{match[2]}"
            if not DIGEST_RE.fullmatch(digest):
                raise BundleError(f"{name}: not a valid digest")
            if digest in self.members:
                continue
            self.members[digest] = member
            if self.store.has_blob(digest):
                self.held.add(digest)
            else:
                new_bytes += member.size
                self._check_room(new_bytes, f"{path}: its blobs")
        return index

    def _check_room(self, needed: int, what: str) -> None:
        free = self.free_space(self.store.directory)
        if needed + FREE_SPACE_RESERVE > free:
            raise BundleError(f"{what} take {needed} bytes; the cache folder has {free} bytes free ({FREE_SPACE_RESERVE} kept)")

    def _read(self, member: tarfile.TarInfo, limit: int) -> bytes:
        assert self.tar
        f = self.tar.extractfile(member)
        assert f is not None
        data = f.read(limit)
        if self.progress:
            self.progress(len(data))
        return data

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
            if not isinstance(annotations, dict) or not all(isinstance(value, str) for value in annotations.values()):
                raise BundleError(f"index.json entry {top.digest}: its annotations are not an object of strings")
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
        media_type, refs = self._parsed(top, name)
        image = Image(canonical_registry(match["registry"]), match["repository"], match["tag"] or top.digest, top.digest, media_type)
        if not image.is_index:
            image.manifests[top.digest] = PlatformManifest(top.digest, media_type, "", self._blobs(name, refs))
            return image
        for child in refs.children:
            if child.digest in self.members or self.store.get_manifest(child.digest):
                child_type, child_refs = self._parsed(child, name)
                blobs = self._blobs(name, child_refs)
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
            entries = parse_json(listed)
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
        """The manifest's media type and body: read from the file (and kept there, in a
        temporary file) or held by the store already."""
        member = self.members.get(descriptor.digest)
        if member is None:
            held = self.store.get_manifest(descriptor.digest)
            if held is None:
                raise BundleError(f"{name}: manifest {descriptor.digest} is missing from the file")
            return held.media_type, held.body
        if member.size != descriptor.size:
            raise BundleError(f"{name}: manifest {descriptor.digest} has {member.size} bytes, not {descriptor.size}")
        if member.size > MAX_MANIFEST:
            raise BundleError(f"{name}: manifest {descriptor.digest} has {member.size} bytes, more than a manifest may")
        if descriptor.digest not in self.writers:
            self._load(descriptor.digest, member)
        body = self._body(descriptor.digest)
        media_type = manifest_media_type(body, descriptor.media_type)
        if media_type == "application/json":
            raise BundleError(f"{name}: manifest {descriptor.digest} has no media type")
        self.media_types[descriptor.digest] = media_type
        return media_type, body

    def _parsed(self, descriptor: manifests.Descriptor, name: str) -> tuple[str, manifests.References]:
        """The manifest's media type and what it names; its body is not kept."""
        media_type, body = self._manifest(descriptor, name)
        return media_type, self._references(name, body, media_type)

    @staticmethod
    def _references(name: str, body: bytes, media_type: str) -> manifests.References:
        try:
            return manifests.references(body, media_type)
        except manifests.ManifestError as e:
            raise BundleError(f"{name}: a manifest cannot be read: {e}") from None

    def _blobs(self, name: str, refs: manifests.References) -> list[manifests.Descriptor]:
        for blob in refs.blobs:
            member = self.members.get(blob.digest)
            if member is not None:
                if member.size != blob.size:
                    raise BundleError(f"{name}: blob {blob.digest} has {member.size} bytes, not {blob.size}")
                self.needed_blobs[blob.digest] = blob.size
            elif not self.store.has_blob(blob.digest):
                raise BundleError(f"{name}: blob {blob.digest} is missing from the file")
        return list(refs.blobs)

    def load(self) -> None:
        """Write the blobs the manifests name, once the file proved to carry nothing else (`_scan`
        checked the room for them)."""
        named = self.needed_blobs.keys() | self.media_types.keys()
        for digest, member in self.members.items():
            if digest not in named:
                raise BundleError(f"{member.name}: no manifest of the bundle names this blob")
        new = [d for d in self.needed_blobs if d not in self.writers and d not in self.held]
        for digest in sorted(new, key=lambda d: self.members[d].offset_data):  # forward only in the file
            self._load(digest, self.members[digest])

    def _load(self, digest: str, member: tarfile.TarInfo) -> None:
        """Copy a member (whose size is the one its descriptor names) to a temporary file and
        verify it."""
        assert self.tar
        f = self.tar.extractfile(member)
        assert f is not None
        writer = self.writers[digest] = self.store.blob_writer(digest)
        remaining = member.size
        while remaining and (chunk := f.read(min(CHUNK, remaining))):
            writer.write(chunk)
            remaining -= len(chunk)
            if self.progress:
                self.progress(len(chunk))
        writer.close()
        if writer.write_error:
            raise BundleError(f"cannot write to the cache: {writer.write_error}")
        if not writer.verified(member.size):
            raise BundleError(f"{member.name}: its bytes hash to {writer.computed_digest}; the file is corrupt")

    def _body(self, digest: str) -> bytes:
        """A manifest read from the file: from its temporary file, or from the store once committed."""
        writer = self.writers.get(digest)
        blob = open(writer.path, "rb") if writer else self.store.open_blob(digest)  # noqa: SIM115 (closed below)
        assert blob is not None  # committed by this import
        with blob:
            return blob.read(MAX_MANIFEST + 1)

    def commit(self, images: list[Image]) -> BundleSummary:
        """Store the images, whole images per transaction (COMMIT_ENTRIES at most, unless one image
        alone has more): a crash or a full disk midway leaves some images stored, none in part,
        and the proxy's own writes wait for one transaction at most, not for the whole file."""
        summary = BundleSummary(images=[i.name for i in images])
        private = {(i.registry, i.repository) for i in images if i.name in self.private}
        public = {(i.registry, i.repository) for i in images if i.name in self.public} - private
        chunks: list[list[Image]] = [[]]
        entries = 0
        for image in images:
            if entries >= COMMIT_ENTRIES:
                chunks.append([])
                entries = 0
            chunks[-1].append(image)
            entries += len(image.manifests) + len(image.referrers) + len(image.blobs())
        stored: list[str] = []
        for chunk in chunks:
            try:
                self._commit(chunk, summary, private, public)
            except OSError as e:
                if stored:
                    raise PartlyImported(e, stored, len(images)) from e
                raise  # nothing stored: the cache is as it was
            stored += [image.name for image in chunk]
        return summary

    def _commit(self, images: list[Image], summary: BundleSummary, private: set[tuple[str, str]], public: set[tuple[str, str]]) -> None:
        """Store `images` in one transaction: for each, its blobs and manifests before its tags."""
        with self.store.batch():
            for image in images:
                self._commit_content(image, summary)
                self._commit_names(image, private, public)

    def _commit_content(self, image: Image, summary: BundleSummary) -> None:
        for digest, size in image.blobs().items():
            if digest not in self.needed_blobs or digest in self.committed:
                continue  # held already, so not in the file's list; or stored for an earlier image
            self.committed.add(digest)
            writer = self.writers.pop(digest, None)  # none: held already, so not loaded
            if writer is None or not writer.commit():
                summary.already_held += 1
                continue
            summary.blobs += 1
            summary.bytes += size
        for digest in image.manifest_digests():
            if digest in self.media_types and digest not in self.committed:
                self.committed.add(digest)
                self.store.put_manifest(digest, self.media_types[digest], self._body(digest))
                summary.manifests += 1

    def _commit_names(self, image: Image, private: set[tuple[str, str]], public: set[tuple[str, str]]) -> None:
        repository = (image.registry, image.repository)
        for digest in [*image.manifest_digests(), *image.blobs()]:
            # A bundle vouches only for what it carries: a digest the store holds for another
            # repository is not opened to this one by being named here.
            if digest in self.members or self.store.linked(*repository, digest):
                self.store.link(*repository, digest)
        if repository not in self.marked:  # once per repository: the same for each of its images
            self.marked.add(repository)
            self._mark(repository, private, public)
        if not DIGEST_RE.fullmatch(image.reference):
            # Never confirmed by upstream here: online, the tag is revalidated on first use.
            self.store.set_tag(image.registry, image.repository, image.reference, image.digest, checked=0)
        for r in image.referrers.values():
            if r.tag:
                self.store.set_tag(image.registry, image.repository, r.tag, r.digest, checked=0)
            media_type, body = (self.media_types[r.digest], self._body(r.digest)) if r.digest in self.media_types else self._held(r.digest)
            if found := manifests.referrer(r.digest, media_type, body):
                self.store.add_referrers(image.registry, image.repository, found[0], [found[1]])

    def _mark(self, repository: tuple[str, str], private: set[tuple[str, str]], public: set[tuple[str, str]]) -> None:
        """Note the repository's visibility as the bundle marks it."""
        known = self.store.visibility(*repository)
        if repository in private and known is not False:
            self.store.set_visibility(*repository, False)
        elif repository in public and known is None:
            self.store.set_visibility(*repository, True)  # never more open than the store knows
        elif repository not in public and known is None:
            # No mark (a skopeo or crane archive): unknown stays unknown, so upstream is still
            # asked online; offline, whoever imported it chose to serve it (cache/access.py).
            self.store.note_imported(*repository)

    def _held(self, digest: str) -> tuple[str, bytes]:
        held = self.store.get_manifest(digest)
        assert held is not None  # walked before the commit
        return held.media_type, held.body

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.discard()
        self.writers.clear()
        if self.tar:
            self.tar.close()

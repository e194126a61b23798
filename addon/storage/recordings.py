"""Recordings: what a set of pulls needed, by digest, kept as a readable YAML file (a lock file for
images) in `<cache_dir>/recordings/<name>.yaml`. Nothing here knows HTTP; the `Recorder` addon feeds
it what the cache served."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from ..registry import manifests
from ..registry.manifests import Descriptor
from ..registry.protocol import DIGEST_RE
from .store import PRIVATE_FILE, Store, private_dirs

RECORDING_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
REFERRER_TAG_RE = re.compile(r"(?P<algorithm>sha256|sha512)-(?P<hex>[a-f0-9]+)\.(?:sig|att|sbom)")
FORMAT = "hubcache-recording/v1"


class RecordingError(ValueError):
    pass


@dataclass
class PlatformManifest:
    digest: str
    media_type: str
    platform: str  # "" for an image that is not an index
    blobs: list[Descriptor]  # config first, then the layers


@dataclass
class Referrer:
    """A manifest that refers to an image (or one of its platforms): a signature, an SBOM."""

    digest: str
    media_type: str
    subject: str  # the digest of the manifest it refers to
    artifact_type: str = ""
    tag: str = ""  # the tag-schema tag it was found by; "" when listed by the referrers API
    blobs: list[Descriptor] = field(default_factory=list)


def referrer_tag_subject(tag: str) -> str | None:
    """The digest a tag of the tag schema (`sha256-<hex>.sig`) refers to; None for another tag."""
    match = REFERRER_TAG_RE.fullmatch(tag)
    return f"{match['algorithm']}:{match['hex']}" if match else None


@dataclass
class Image:
    """An image reference and everything a pull of it needed."""

    registry: str
    repository: str
    reference: str  # a tag, or the digest it was pulled by
    digest: str
    media_type: str
    manifests: dict[str, PlatformManifest] = field(default_factory=dict)
    referrers: dict[str, Referrer] = field(default_factory=dict)
    pinned: bool = True  # eviction never drops it: the operator recorded it (prefetch, import)

    @property
    def name(self) -> str:
        sep = "@" if DIGEST_RE.fullmatch(self.reference) else ":"
        return f"{self.registry}/{self.repository}{sep}{self.reference}"

    @property
    def is_index(self) -> bool:
        return manifests.is_index(self.media_type)

    def blobs(self) -> dict[str, int]:
        """The blobs of its platforms and of its referrers."""
        lists = [m.blobs for m in self.manifests.values()] + [r.blobs for r in self.referrers.values()]
        return {b.digest: b.size for blobs in lists for b in blobs}

    def manifest_digests(self) -> list[str]:
        """Its own manifests, then its referrers'."""
        return [self.digest, *(d for d in self.manifests if d != self.digest), *self.referrers]

    def subjects(self) -> set[str]:
        """The digests a referrer of this image may name: the image's and its platforms'."""
        return {self.digest, *self.manifests}


def recordings_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "recordings"


def check_name(name: str) -> str:
    if not RECORDING_NAME_RE.fullmatch(name):
        raise RecordingError(
            f"invalid recording name {name!r}: use letters, digits, '.', '_' and '-' (not first)"
        )
    return name


def names(cache_dir: str | os.PathLike) -> list[str]:
    folder = recordings_dir(cache_dir)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if RECORDING_NAME_RE.fullmatch(p.stem))


def pinned(cache_dir: str | os.PathLike) -> set[str]:
    """Every digest a pinned image of some recording refers to: content that must never be
    evicted. Raises RecordingError if a recording cannot be read (then nothing may be evicted
    safely)."""
    folder = recordings_dir(cache_dir)
    return {d for name in names(cache_dir) for d in Recording.load(folder / f"{name}.yaml").digests(pinned_only=True)}


class Recording:
    def __init__(self, name: str, path: Path, images: dict[str, Image] | None = None, created: str = ""):
        self.name = check_name(name)
        self.path = path
        self.images: dict[str, Image] = images or {}
        self.created = created or _now()

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, name: str) -> Recording:
        """The named recording, or a new empty one (written on its first change)."""
        path = recordings_dir(cache_dir) / f"{check_name(name)}.yaml"
        return cls.load(path) if path.exists() else cls(name, path)

    @classmethod
    def load(cls, path: Path) -> Recording:
        try:
            data = yaml.safe_load(path.read_text())
            images = {}
            for ref, entry in (data.get("images") or {}).items():
                image = Image(
                    entry["registry"], entry["repository"], entry["reference"], entry["digest"], entry["media_type"],
                    pinned=entry.get("pinned", True) is not False,  # a file from before pins were chosen pinned all
                )
                for m in entry.get("manifests") or []:
                    blobs = [Descriptor(b["digest"], int(b["size"]), b.get("media_type", "")) for b in m["blobs"]]
                    image.manifests[m["digest"]] = PlatformManifest(m["digest"], m["media_type"], m.get("platform", ""), blobs)
                for r in entry.get("referrers") or []:
                    blobs = [Descriptor(b["digest"], int(b["size"]), b.get("media_type", "")) for b in r["blobs"]]
                    image.referrers[r["digest"]] = Referrer(
                        r["digest"], r["media_type"], r["subject"], r.get("artifact_type", ""), r.get("tag", ""), blobs
                    )
                images[ref] = image
            return cls(data["name"], path, images, str(data.get("created", "")))
        except FileNotFoundError:
            raise RecordingError(f"no recording {path.stem!r} (looked for {path})") from None
        except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as e:
            raise RecordingError(f"{path}: not a readable recording ({type(e).__name__}: {e})") from None

    def save(self) -> None:
        """Write the file atomically: a reader sees the old recording or the new one, never half."""
        data = {
            "format": FORMAT,
            "name": self.name,
            "created": self.created,
            "updated": _now(),
            "images": {ref: _image_dict(image) for ref, image in sorted(self.images.items())},
        }
        private_dirs(self.path.parent.parent, Path(self.path.parent.name))
        tmp = self.path.with_name(f".{self.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "w") as f:
                f.write(f"# hubcache recording {self.name!r}: every image below, by digest.\n")
                yaml.safe_dump(data, f, sort_keys=False, width=200)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def note_manifest(
        self,
        store: Store,
        registry: str,
        repository: str,
        reference: str,
        digest: str,
        media_type: str,
        body: bytes | None,
        pin: bool = True,
    ) -> bool:
        """Record a manifest a client was served (`body` is None for a HEAD). A digest that an
        image already recorded in this repository resolved to (dockerd resolves a tag with HEAD,
        then fetches by digest) or lists as a platform belongs to that image; anything else is an
        image of its own. `pin`: the operator chose it (the image is pinned); a client's pull
        (`pin` false) never changes a pinned image. Returns whether the recording changed."""
        if (owner := self._subject_of(store, registry, repository, reference, digest, media_type, body, pin)) is not None:
            return owner
        blobs: list[Descriptor] = []
        if body is not None and not manifests.is_index(media_type):
            try:
                blobs = list(manifests.references(body, media_type).blobs)
            except manifests.ManifestError:
                return False
        if DIGEST_RE.fullmatch(reference):
            for image in self.images.values():
                if (image.registry, image.repository) != (registry, repository) or (image.pinned and not pin):
                    continue
                if image.digest == digest:
                    if image.is_index or digest in image.manifests or body is None:
                        return False
                    image.manifests[digest] = PlatformManifest(digest, media_type, "", blobs)
                    return True
                platform = _child_platform(store, image.digest, digest) if image.is_index else None
                if platform is not None:
                    if digest in image.manifests or body is None:
                        return False
                    image.manifests[digest] = PlatformManifest(digest, media_type, platform, blobs)
                    return True
        image = Image(registry, repository, reference, digest, media_type, pinned=pin)
        previous = self.images.get(image.name)
        if previous and previous.pinned and not pin:
            return False
        if previous and previous.digest == digest and (previous.manifests or body is None or image.is_index):
            changed = pin and not previous.pinned
            previous.pinned |= pin
            return changed
        if body is not None and not image.is_index:
            image.manifests[digest] = PlatformManifest(digest, media_type, "", blobs)
        self.images[image.name] = image
        return True

    def _subject_of(
        self, store: Store, registry: str, repository: str, reference: str, digest: str, media_type: str, body: bytes | None, pin: bool
    ) -> bool | None:
        """Note a referrer of an image already recorded here (a manifest naming its `subject`, or a
        tag of the tag schema) on that image; None when the manifest is no such referrer."""
        tag_subject = referrer_tag_subject(reference)
        found = manifests.referrer(digest, media_type, body) if body is not None else None
        subject = found[0] if found else tag_subject
        if subject is None:
            return None
        owner = next(
            (i for i in self.images.values() if (i.registry, i.repository) == (registry, repository) and subject in i.subjects()),
            None,
        )
        if owner is None:
            return None
        if body is None or (owner.pinned and not pin):
            return False  # a HEAD: the GET that follows brings the body
        previous = owner.referrers.get(digest)
        tag = reference if tag_subject else (previous.tag if previous else "")
        if previous and previous.tag == tag:
            return False
        try:
            blobs = [] if manifests.is_index(media_type) else list(manifests.references(body, media_type).blobs)
        except manifests.ManifestError:
            return False
        artifact_type = found[1].get("artifactType", "") if found else ""
        owner.referrers[digest] = Referrer(digest, media_type, subject, artifact_type, tag, blobs)
        return True

    def digests(self, pinned_only: bool = False) -> set[str]:
        """Every manifest and blob digest the recording refers to (of its pinned images only)."""
        images = [i for i in self.images.values() if i.pinned or not pinned_only]
        return {d for image in images for d in [*image.manifest_digests(), *image.blobs()]}

    def missing(self, store: Store) -> list[str]:
        """The digests the recording needs that the store does not hold."""
        result = []
        for image in self.images.values():
            result += [d for d in image.manifest_digests() if store.get_manifest(d) is None]
            result += [d for d in image.blobs() if not store.has_blob(d)]
        return sorted(set(result))

    def total_size(self) -> int:
        blobs: dict[str, int] = {}
        for image in self.images.values():
            blobs.update(image.blobs())
        return sum(blobs.values())


def image_from_store(store: Store, registry: str, repository: str, reference: str) -> Image | None:
    """An image as the store holds it: the tag's digest, and every platform manifest present.
    None if the store has no manifest for the reference."""
    digest = reference
    if not DIGEST_RE.fullmatch(reference):
        entry = store.get_tag(registry, repository, reference)
        if entry is None:
            return None
        digest = entry.digest
    top = store.get_manifest(digest)
    if top is None:
        return None
    image = Image(registry, repository, reference, digest, top.media_type)
    refs = manifests.references(top.body, top.media_type)
    if not image.is_index:
        image.manifests[digest] = PlatformManifest(digest, top.media_type, "", list(refs.blobs))
    for child in refs.children:
        held = store.get_manifest(child.digest)
        if held is not None:
            blobs = manifests.references(held.body, held.media_type).blobs
            image.manifests[child.digest] = PlatformManifest(child.digest, held.media_type, child.platform, list(blobs))
    for subject in sorted(image.subjects()):
        for listed in store.referrers(registry, repository, subject) or []:
            _referrer_from_store(store, image, subject, listed["digest"], "")
        for suffix in ("sig", "att", "sbom"):
            tag = f"{subject.replace(':', '-')}.{suffix}"
            if (entry := store.get_tag(registry, repository, tag)) is not None:
                _referrer_from_store(store, image, subject, entry.digest, tag)
    return image


def _referrer_from_store(store: Store, image: Image, subject: str, digest: str, tag: str) -> None:
    """Add the referrer `digest` of `image` as the store holds it (nothing if it holds none)."""
    held = store.get_manifest(digest)
    if held is None:
        return
    try:
        blobs = [] if manifests.is_index(held.media_type) else list(manifests.references(held.body, held.media_type).blobs)
    except manifests.ManifestError:
        return
    found = manifests.referrer(digest, held.media_type, held.body)
    artifact_type = found[1].get("artifactType", "") if found else ""
    previous = image.referrers.get(digest)
    image.referrers[digest] = Referrer(digest, held.media_type, subject, artifact_type, tag or (previous.tag if previous else ""), blobs)


def _child_platform(store: Store, index_digest: str, digest: str) -> str | None:
    index = store.get_manifest(index_digest)
    if index is None:
        return None
    try:
        children = manifests.references(index.body, index.media_type).children
    except manifests.ManifestError:
        return None
    return next((c.platform for c in children if c.digest == digest), None)


def _image_dict(image: Image) -> dict:
    return {
        "registry": image.registry,
        "repository": image.repository,
        "reference": image.reference,
        "digest": image.digest,
        "media_type": image.media_type,
        "manifests": [
            {
                "digest": m.digest,
                "platform": m.platform,
                "media_type": m.media_type,
                "blobs": [{"digest": b.digest, "size": b.size, "media_type": b.media_type} for b in m.blobs],
            }
            for m in image.manifests.values()
        ],
        **({"referrers": [_referrer_dict(r) for r in image.referrers.values()]} if image.referrers else {}),
        **({} if image.pinned else {"pinned": False}),
    }


def _referrer_dict(referrer: Referrer) -> dict:
    return {
        "digest": referrer.digest,
        "subject": referrer.subject,
        "media_type": referrer.media_type,
        **({"artifact_type": referrer.artifact_type} if referrer.artifact_type else {}),
        **({"tag": referrer.tag} if referrer.tag else {}),
        "blobs": [{"digest": b.digest, "size": b.size, "media_type": b.media_type} for b in referrer.blobs],
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

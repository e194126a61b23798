"""What a manifest refers to: the platform manifests of an index, the config and layers of an image.

Recordings, export and import walk images through these references; serving never needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import DIGEST_RE, parse_json

INDEX_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)


class ManifestError(ValueError):
    """A manifest that cannot be walked: not JSON, or a reference that is not a digest."""


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str = ""
    platform: str = ""  # "os/architecture[/variant]", for the entries of an index


@dataclass(frozen=True)
class References:
    """An index has `children` (platform manifests); an image manifest has `blobs` (config first)."""

    children: tuple[Descriptor, ...] = ()
    blobs: tuple[Descriptor, ...] = ()


def is_index(media_type: str) -> bool:
    return media_type in INDEX_MEDIA_TYPES


def references(body: bytes, media_type: str) -> References:
    try:
        document = parse_json(body)
    except ValueError as e:
        raise ManifestError(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise ManifestError("not a JSON object")
    if is_index(media_type) or (not media_type and "manifests" in document):
        return References(children=tuple(descriptor(d) for d in _list(document, "manifests")))
    blobs = [descriptor(document["config"])] if "config" in document else []
    blobs += [descriptor(d) for d in _list(document, "layers")]
    return References(blobs=tuple(blobs))


def _list(document: dict, field: str) -> list:
    value = document.get(field, [])
    if not isinstance(value, list):
        raise ManifestError(f"{field!r} is not a list")
    return value


def descriptor(value: object) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestError("a descriptor is not a JSON object")
    digest, size = value.get("digest"), value.get("size")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise ManifestError(f"unsupported digest {digest!r}")
    if not isinstance(size, int) or size < 0:
        raise ManifestError(f"bad size {size!r} for {digest}")
    return Descriptor(digest, size, str(value.get("mediaType", "")), platform_name(value.get("platform")))


def platform_name(platform: object) -> str:
    if not isinstance(platform, dict):
        return ""
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    return "/".join(str(p) for p in parts if p)


def referrer(digest: str, media_type: str, body: bytes) -> tuple[str, dict] | None:
    """(subject digest, descriptor) when the manifest refers to a subject (OCI 1.1: a signature,
    an SBOM, an attestation), as the referrers API lists it; None otherwise."""
    try:
        document = parse_json(body)
    except ValueError:
        return None
    if not isinstance(document, dict) or not isinstance(subject := document.get("subject"), dict):
        return None
    try:
        subject_digest = descriptor(subject).digest
    except ManifestError:
        return None
    entry: dict = {"mediaType": media_type, "digest": digest, "size": len(body)}
    config = document.get("config")
    artifact_type = document.get("artifactType") or (config.get("mediaType") if isinstance(config, dict) else None)
    if isinstance(artifact_type, str) and artifact_type:
        entry["artifactType"] = artifact_type
    if isinstance(annotations := document.get("annotations"), dict):
        entry["annotations"] = {str(k): str(v) for k, v in annotations.items()}
    return subject_digest, entry

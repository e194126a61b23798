"""What manifests refer to, and which index entries prefetch chooses."""

import json

import pytest

from hubcache.prefetch.client import matches
from hubcache.registry import manifests

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE = "application/vnd.oci.image.manifest.v1+json"


def test_an_index_lists_its_platforms():
    body = json.dumps(
        {
            "manifests": [
                {"digest": D1, "size": 10, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"digest": D2, "size": 20, "platform": {"os": "unknown", "architecture": "unknown"}},
            ]
        }
    ).encode()
    refs = manifests.references(body, INDEX)
    assert [(c.digest, c.size, c.platform) for c in refs.children] == [(D1, 10, "linux/arm64/v8"), (D2, 20, "unknown/unknown")]
    assert refs.blobs == ()


def test_an_image_lists_config_then_layers():
    body = json.dumps({"config": {"digest": D1, "size": 1}, "layers": [{"digest": D2, "size": 2}, {"digest": D3, "size": 3}]})
    refs = manifests.references(body.encode(), IMAGE)
    assert [b.digest for b in refs.blobs] == [D1, D2, D3] and refs.children == ()


@pytest.mark.parametrize(
    "body",
    [
        b"not json", b"[]", b'{"layers": {}}', b'{"layers": [{"digest": "md5:00", "size": 1}]}',
        b'{"layers": [{"digest": "%s", "size": -1}]}' % D1.encode(),
        b"[" * 200_000 + b"]" * 200_000,  # deeper than the JSON parser goes (RecursionError)
    ],
)  # fmt: skip
def test_unreadable_manifests_are_refused(body):
    with pytest.raises(manifests.ManifestError):
        manifests.references(body, IMAGE)


@pytest.mark.parametrize(
    "platform, wanted, chosen",
    [
        ("linux/amd64", [], True),
        ("unknown/unknown", [], False),  # build attestations are not images
        ("linux/arm64/v8", ["linux/arm64"], True),
        ("linux/arm64/v8", ["linux/arm64/v8"], True),
        ("linux/arm/v7", ["linux/arm64"], False),
        ("linux/amd64", ["linux/arm64"], False),
    ],
)
def test_platform_choice(platform, wanted, chosen):
    assert matches(platform, wanted) is chosen

import hashlib
import json

import pytest

from hubcache.registry import protocol
from hubcache.registry.protocol import BadRequest, ImageReference, Kind, Route

DIGEST = "sha256:" + "a" * 64
DIGEST512 = "sha512:" + "b" * 128
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DEEP = b'{"a":' * 100_000 + b"1" + b"}" * 100_000  # deeper than the JSON parser goes (RecursionError)


class TestParseRoute:
    @pytest.mark.parametrize("path", ["/v2", "/v2/", "/v2/?"])
    def test_ping(self, path):
        assert protocol.parse_route("ghcr.io", path) == Route(Kind.PING, "ghcr.io")

    def test_manifest_by_tag(self):
        r = protocol.parse_route("ghcr.io", "/v2/library/alpine/manifests/3.20")
        assert r == Route(Kind.MANIFEST, "ghcr.io", "library/alpine", "3.20")
        assert not r.by_digest
        assert r.image == "ghcr.io/library/alpine:3.20"

    def test_manifest_by_digest(self):
        r = protocol.parse_route("ghcr.io", f"/v2/library/alpine/manifests/{DIGEST}")
        assert r == Route(Kind.MANIFEST, "ghcr.io", "library/alpine", DIGEST)
        assert r.by_digest
        assert r.image == f"ghcr.io/library/alpine@{DIGEST}"

    def test_manifest_by_sha512_digest(self):
        r = protocol.parse_route("ghcr.io", f"/v2/x/manifests/{DIGEST512}")
        assert r.reference == DIGEST512 and r.by_digest

    def test_blob(self):
        r = protocol.parse_route("ghcr.io", f"/v2/library/alpine/blobs/{DIGEST}")
        assert r == Route(Kind.BLOB, "ghcr.io", "library/alpine", DIGEST)

    def test_containerds_ns_naming_the_registry_is_taken_and_dropped(self):
        r = protocol.parse_route("registry-1.docker.io", f"/v2/a/blobs/{DIGEST}?ns=docker.io")
        assert r == Route(Kind.BLOB, "docker.io", "a", DIGEST)
        assert r.target == f"/v2/a/blobs/{DIGEST}"

    def test_the_referrers_filter_is_kept_and_rebuilt(self):
        r = protocol.parse_route("ghcr.io", f"/v2/a/referrers/{DIGEST}?artifactType=application%2Fvnd.dev.cosign%2Bjson")
        assert r.artifact_type == "application/vnd.dev.cosign+json"
        assert r.target == f"/v2/a/referrers/{DIGEST}?artifactType=application%2Fvnd.dev.cosign%2Bjson"

    @pytest.mark.parametrize(
        "path",
        [
            "/v2/?x=1",
            f"/v2/a/blobs/{DIGEST}?ns=ghcr.io",  # another registry's name
            f"/v2/a/blobs/{DIGEST}?ns=docker.io&ns=docker.io",
            "/v2/a/manifests/latest?digest=x",
            f"/v2/a/manifests/{DIGEST}?artifactType=a/b",  # only the referrers API filters
            f"/v2/a/referrers/{DIGEST}?artifactType=not-a-media-type",
            f"/v2/a/referrers/{DIGEST}?artifactType=a/b&artifactType=c/d",
        ],
    )
    def test_a_query_the_endpoint_does_not_take_is_refused(self, path):
        with pytest.raises(BadRequest) as e:
            protocol.parse_route("registry-1.docker.io", path)
        assert (e.value.code.status, e.value.code.code) == (400, "UNSUPPORTED")

    @pytest.mark.parametrize(
        "path",
        [
            # what a distribution registry cleans (and then routes elsewhere), or decodes
            "/v2/private/app/manifests/x#/../../../../library/alpine/manifests/3.20",
            "/v2/private/app/manifests/x%23/../../../../library/alpine/manifests/3.20",
            f"/v2/private/app/blobs/{DIGEST}#/../../../../library/alpine/blobs/{DIGEST}",
            "/v2/library/alpine/manifests/3.21#",
            "/v2/library/../private/app/manifests/latest",
            "/v2/library/./alpine/manifests/latest",
            "/v2//library/alpine/manifests/latest",
            "/v2/library//alpine/manifests/latest",
            "/v2/library/alpine/manifests/latest/.",
            "/v2/library/alpine/manifests/latest/..",
            "/v2/library%2Falpine/manifests/latest",
            "/v2/library/alpine/manifests/l%61test",
            "/v2/library/alpine/manifests/latest%2e",
            "/v2/library\\alpine/manifests/latest",
            "/v2/library/alpine/tags/list#/../../manifests/latest",  # not a pull, but no less unclean
            "//v2/library/alpine/manifests/latest",
            "v2/library/alpine/manifests/latest",
        ],
    )
    def test_a_target_not_in_canonical_form_is_refused(self, path):
        with pytest.raises(BadRequest) as e:
            protocol.parse_route("registry-1.docker.io", path)
        assert (e.value.code.status, e.value.code.code) == (400, "NAME_INVALID")

    @pytest.mark.parametrize(
        "path",
        ["/v2/", "/v2/library/alpine/manifests/3.20", f"/v2/library/alpine/manifests/{DIGEST}", f"/v2/library/alpine/blobs/{DIGEST}", f"/v2/a/referrers/{DIGEST}"],
    )
    def test_a_canonical_target_is_its_routes_own(self, path):
        assert protocol.parse_route("registry-1.docker.io", path).target == path

    def test_nested_name(self):
        r = protocol.parse_route("quay.io", "/v2/org/team/sub-proj/app__x/manifests/v1.0_rc-1")
        assert r == Route(Kind.MANIFEST, "quay.io", "org/team/sub-proj/app__x", "v1.0_rc-1")

    def test_name_containing_route_words(self):
        r = protocol.parse_route("quay.io", "/v2/blobs/manifests/manifests/latest")
        assert r == Route(Kind.MANIFEST, "quay.io", "blobs/manifests", "latest")

    def test_blob_of_a_repository_named_like_a_route_word(self):
        # "manifests" is a legal path component of a repository name.
        r = protocol.parse_route("quay.io", f"/v2/a/manifests/b/blobs/{DIGEST}")
        assert r == Route(Kind.BLOB, "quay.io", "a/manifests/b", DIGEST)

    @pytest.mark.parametrize(
        "path",
        [
            "/v2/library/alpine/blobs/uploads/",
            "/v2/library/alpine/blobs/uploads",
            "/v2/library/alpine/blobs/uploads/0f3c-uuid?_state=abc",
            "/v2/library/alpine/tags/list",
            "/v2/_catalog",
            "/token?service=registry.docker.io",
            "/",
            "/v2/library/alpine/manifests/a/b",
        ],
    )
    def test_other(self, path):
        r = protocol.parse_route("ghcr.io", path)
        assert r.kind is Kind.OTHER
        assert r.registry == "ghcr.io"

    @pytest.mark.parametrize("host", ["registry-1.docker.io", "index.docker.io", "Registry-1.Docker.IO"])
    def test_docker_hub_aliases_share_one_registry(self, host):
        r = protocol.parse_route(host, "/v2/library/alpine/manifests/latest")
        assert r.registry == "docker.io"
        assert r.image == "docker.io/library/alpine:latest"

    def test_other_registry_is_lowercased_not_aliased(self):
        assert protocol.parse_route("GHCR.io", "/v2/").registry == "ghcr.io"

    @pytest.mark.parametrize(
        "name",
        [
            "Library/alpine",
            "library/../alpine",
            "library/./alpine",
            "library//alpine",
            "-alpine",
            "alpine-",
            "al..pine",
            "a" * 256,
            "/".join(["abcdefghijklmnop"] * 16),  # 271 characters of valid components
        ],
    )
    def test_bad_name(self, name):
        with pytest.raises(BadRequest) as e:
            protocol.parse_route("ghcr.io", f"/v2/{name}/manifests/latest")
        assert (e.value.code.status, e.value.code.code) == (400, "NAME_INVALID")

    def test_longest_name_is_accepted(self):
        name = "a" * 255
        assert protocol.parse_route("ghcr.io", f"/v2/{name}/blobs/{DIGEST}").name == name

    @pytest.mark.parametrize(
        "digest",
        [
            "sha256:" + "a" * 63,
            "sha256:" + "a" * 65,
            "sha256:" + "A" * 64,
            "sha512:" + "a" * 64,
            "sha256:" + "g" * 64,
            "sha256",
            "latest",  # a blob is always addressed by digest
        ],
    )
    def test_bad_blob_digest(self, digest):
        with pytest.raises(BadRequest) as e:
            protocol.parse_route("ghcr.io", f"/v2/a/blobs/{digest}")
        assert (e.value.code.status, e.value.code.code) == (400, "DIGEST_INVALID")
        assert digest in e.value.message

    @pytest.mark.parametrize("digest", ["md5:" + "a" * 32, "sha384:" + "a" * 96])
    def test_unknown_algorithm(self, digest):
        with pytest.raises(BadRequest) as e:
            protocol.parse_route("ghcr.io", f"/v2/a/manifests/{digest}")
        assert (e.value.code.status, e.value.code.code) == (400, "DIGEST_INVALID")
        assert "unsupported digest algorithm" in e.value.message

    def test_manifest_reference_with_colon_is_a_digest(self):
        with pytest.raises(BadRequest) as e:
            protocol.parse_route("ghcr.io", "/v2/a/manifests/sha256:abc")
        assert e.value.code.code == "DIGEST_INVALID"

    @pytest.mark.parametrize("tag", [".hidden", "-dash", "a" * 129, "tag+build", "t@x"])
    def test_bad_tag(self, tag):
        with pytest.raises(BadRequest) as e:
            protocol.parse_route("ghcr.io", f"/v2/a/manifests/{tag}")
        assert (e.value.code.status, e.value.code.code) == (400, "MANIFEST_INVALID")

    def test_longest_tag_is_accepted(self):
        tag = "_" + "a" * 127
        assert protocol.parse_route("ghcr.io", f"/v2/a/manifests/{tag}").reference == tag


def test_check_digest():
    protocol.check_digest(DIGEST)
    protocol.check_digest(DIGEST512)
    with pytest.raises(BadRequest):
        protocol.check_digest("")


def test_digest_of_and_hasher():
    data = b"hello"
    assert protocol.digest_of(data) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert protocol.digest_of(data, "sha512") == "sha512:" + hashlib.sha512(data).hexdigest()
    h = protocol.hasher(DIGEST512)
    h.update(data)
    assert h.hexdigest() == hashlib.sha512(data).hexdigest()


class TestAccepts:
    def test_no_header_accepts_anything(self):
        assert protocol.accepts([], OCI_INDEX)
        assert protocol.accepts([""], OCI_INDEX)

    def test_exact(self):
        assert protocol.accepts([OCI_INDEX], OCI_INDEX)
        assert not protocol.accepts([DOCKER_V2], OCI_INDEX)

    def test_case_insensitive(self):
        assert protocol.accepts([OCI_INDEX.upper()], OCI_INDEX)

    def test_wildcards(self):
        assert protocol.accepts(["*/*"], OCI_INDEX)
        assert protocol.accepts(["application/*"], OCI_INDEX)
        assert not protocol.accepts(["text/*"], OCI_INDEX)

    def test_parameters_are_ignored(self):
        assert protocol.accepts([f"{OCI_INDEX}; q=0.5"], OCI_INDEX)
        assert protocol.accepts([f"{DOCKER_V2};q=0.9, */*;q=0.1"], OCI_INDEX)

    def test_q_zero_refuses(self):
        assert not protocol.accepts([f"{OCI_INDEX};q=0"], OCI_INDEX)
        assert not protocol.accepts([f"{OCI_INDEX}; q=0.000, */*;q=0"], OCI_INDEX)
        assert protocol.accepts([f"{OCI_INDEX};q=0, application/*"], OCI_INDEX)

    def test_comma_separated_list(self):
        header = f"{DOCKER_V2}, {OCI_INDEX}"
        assert protocol.accepts([header], OCI_INDEX)
        assert protocol.accepts([header], DOCKER_V2)
        assert not protocol.accepts([header], "application/vnd.oci.image.manifest.v1+json")

    def test_several_headers(self):
        headers = [DOCKER_V2, "application/vnd.docker.distribution.manifest.list.v2+json"]
        assert protocol.accepts(headers, "application/vnd.docker.distribution.manifest.list.v2+json")
        assert not protocol.accepts(headers, OCI_INDEX)


DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


@pytest.mark.parametrize(
    "accept, takes",
    [
        ([f"{DOCKER_V2}, {DOCKER_LIST}, {OCI_INDEX}"], True),  # dockerd
        ([DOCKER_LIST, f"{OCI_INDEX};q=0.5"], True),
        ([], False),  # the registry answers no Accept with one platform's manifest
        (["*/*"], False),
        (["application/*"], False),
        ([DOCKER_V2], False),
        ([f"{DOCKER_V2}, {OCI_INDEX}"], False),  # one index type: the other kind of index is never given
        ([f"{DOCKER_LIST}, {OCI_INDEX};q=0"], False),
    ],
)
def test_takes_indexes_only_with_every_index_type_named(accept, takes):
    assert protocol.takes_indexes(accept) is takes


class TestParseRange:
    def test_no_header(self):
        assert protocol.parse_range(None, 10) is None

    @pytest.mark.parametrize(
        "header, span",
        [
            ("bytes=0-", (0, 9)),
            ("bytes=4-", (4, 9)),
            ("bytes=9-", (9, 9)),
            ("bytes=2-5", (2, 5)),
            ("bytes=0-0", (0, 0)),
            ("bytes=3-3", (3, 3)),
            ("bytes=5-100", (5, 9)),  # end clamped to the last byte
            ("bytes=-3", (7, 9)),
            ("bytes=-10", (0, 9)),
            ("bytes=-100", (0, 9)),
            (" bytes=1-2 ", (1, 2)),
        ],
    )
    def test_satisfiable(self, header, span):
        assert protocol.parse_range(header, 10) == span

    @pytest.mark.parametrize(
        "header",
        [
            "bytes=10-",  # start at the size
            "bytes=11-20",
            "bytes=5-2",  # reversed
            "bytes=-0",
            "bytes=-",
            "bytes=0-1,4-5",  # multi-range
            "bytes=a-b",
            "items=0-1",
            "bytes 0-1",
            "",
        ],
    )
    def test_unsatisfiable_or_unsupported(self, header):
        with pytest.raises(BadRequest) as e:
            protocol.parse_range(header, 10)
        assert (e.value.code.status, e.value.code.code) == (416, "RANGE_INVALID")

    def test_empty_blob_has_no_satisfiable_range(self):
        for header in ("bytes=0-", "bytes=-1", "bytes=0-0"):
            with pytest.raises(BadRequest):
                protocol.parse_range(header, 0)


class TestManifestMediaType:
    def test_content_type_wins(self):
        body = json.dumps({"mediaType": DOCKER_V2}).encode()
        assert protocol.manifest_media_type(body, OCI_INDEX) == OCI_INDEX

    def test_content_type_parameters_are_dropped(self):
        assert protocol.manifest_media_type(b"{}", f"{OCI_INDEX}; charset=utf-8") == OCI_INDEX

    @pytest.mark.parametrize("ctype", ["", "application/json", "application/octet-stream", "text/plain"])
    def test_generic_content_type_falls_back_to_media_type_field(self, ctype):
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode()
        assert protocol.manifest_media_type(body, ctype) == OCI_INDEX

    def test_no_field_keeps_generic_content_type(self):
        assert protocol.manifest_media_type(b'{"schemaVersion": 2}', "text/plain") == "text/plain"

    @pytest.mark.parametrize("body", [b'{"schemaVersion": 2}', b"not json", b"[1, 2]", b'{"mediaType": 5}', b"\xff", DEEP])
    def test_nothing_usable_gives_application_json(self, body):
        assert protocol.manifest_media_type(body, "") == "application/json"


def test_json_nested_too_deeply_is_malformed_json():
    """A registry, a token service or a bundle may send it: every parse refuses it as it refuses
    any malformed JSON (ValueError), never with an exception nothing catches."""
    with pytest.raises(Exception) as refused:  # any: which one is what is tested
        protocol.parse_json(DEEP)
    assert refused.type is ValueError and "nested too deeply" in str(refused.value), refused.type
    assert protocol.token_of(DEEP) is None
    assert protocol.parse_json(b'{"a": [1]}') == {"a": [1]}


def test_error_body_shape():
    body = json.loads(protocol.error_body(protocol.ErrorCode.BLOB_UNKNOWN, "no such blob"))
    assert body == {"errors": [{"code": "BLOB_UNKNOWN", "message": "no such blob", "detail": None}]}
    detail = json.loads(protocol.error_body(protocol.ErrorCode.DENIED, "m", {"digest": DIGEST}))["errors"][0]["detail"]
    assert detail == {"digest": DIGEST}


def test_error_headers():
    h = protocol.error_headers(42)
    assert h["Content-Type"] == "application/json"
    assert h["Content-Length"] == "42"
    assert h["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_manifest_and_blob_headers():
    m = protocol.manifest_headers(DIGEST, OCI_INDEX, 123)
    assert m["Content-Type"] == OCI_INDEX
    assert m["Content-Length"] == "123"
    assert m["Docker-Content-Digest"] == DIGEST
    assert m["Etag"] == f'"{DIGEST}"'
    b = protocol.blob_headers(DIGEST, 7)
    assert b["Content-Length"] == "7"
    assert b["Docker-Content-Digest"] == DIGEST
    assert b["Accept-Ranges"] == "bytes"
    assert b["Content-Type"] == "application/octet-stream"


class TestImageReference:
    @pytest.mark.parametrize(
        "text, expected, host",
        [
            ("alpine", "docker.io/library/alpine:latest", "registry-1.docker.io"),
            ("alpine:3.20", "docker.io/library/alpine:3.20", "registry-1.docker.io"),
            ("user/app:1", "docker.io/user/app:1", "registry-1.docker.io"),
            ("index.docker.io/library/alpine:1", "docker.io/library/alpine:1", "registry-1.docker.io"),
            ("ghcr.io/org/app:v1", "ghcr.io/org/app:v1", "ghcr.io"),
            ("localhost:5000/x", "localhost:5000/x:latest", "localhost:5000"),
            ("alpine@sha256:" + "a" * 64, "docker.io/library/alpine@sha256:" + "a" * 64, "registry-1.docker.io"),
            ("alpine:3@sha256:" + "b" * 64, "docker.io/library/alpine@sha256:" + "b" * 64, "registry-1.docker.io"),
        ],
    )
    def test_normalised_like_docker(self, text, expected, host):
        ref = ImageReference.parse(text)
        assert (str(ref), ref.host) == (expected, host)

    @pytest.mark.parametrize(
        "text, message",
        [("Upper", "invalid repository name"), ("a:b!", "invalid tag"), ("a@sha1:" + "0" * 40, "unsupported digest"), ("", "invalid")],
    )
    def test_refused(self, text, message):
        with pytest.raises(ValueError, match=message):
            ImageReference.parse(text)


@pytest.mark.parametrize("path", ["//[", "//host/v2/", "/v2/a/blobs/sha256:" + "a" * 64 + "?x=//["])
def test_paths_that_look_like_urls_are_refused(path):
    """Found by fuzzing: a target starting with // once reached the URL parser as a host. Now no
    such target is parsed at all: one is unclean, the other takes a query no blob takes."""
    with pytest.raises(BadRequest) as e:
        protocol.parse_route("registry-1.docker.io", path)
    assert e.value.code.status == 400

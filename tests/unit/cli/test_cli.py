"""The operators' subcommands (stats, ls, misses, ca, setup) on real stores, and every command's
help text, through click's runner. The `hubcache` program itself (help, one-line errors,
`hubcache run`) is in tests/integration/test_cli.py."""

from __future__ import annotations

import json
import shutil
import sys
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from hubcache.cli import client_setup as clientsetup
from hubcache.cli import main
from hubcache.cli.proxy import instructions
from hubcache.registry.protocol import digest_of
from hubcache.storage.recordings import Recording
from hubcache.storage.store import Store
from support.fill import store_image
from support.images import build_image
from support.setupscript import parse

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    platforms = [("linux", "amd64"), ("linux", "arm64", "v8")]
    return build_image(tmp_path_factory.mktemp("multi"), "1", [300_000, 20_000], seed="ops", platforms=platforms)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("single"), "1", [100_000], seed="ops-single", format="docker")


def journal_line(when: datetime, kind: str, registry: str, repository: str, reference: str, outcome: str, size=None, reason=None) -> str:
    entry = {
        "time": when.isoformat(timespec="milliseconds"), "kind": kind, "registry": registry,
        "repository": repository, "reference": reference, "digest": reference if ":" in reference else None,
        "bytes": size, "outcome": outcome, "reason": reason,
    }
    return json.dumps(entry) + "\n"


@pytest.fixture
def now() -> datetime:
    """The time the test's cache was made: the journal's times and the store's are relative to it."""
    return datetime.now(UTC)


@pytest.fixture
def cache(tmp_path, multi, single, now):
    """A cache folder with multi:1 (amd64 only of its two platforms), single:1, a recording and
    a journal of four misses, one of them three days old."""
    folder = tmp_path / "cache"
    store = Store(folder)
    try:
        store_image(store, multi, "docker.io", "library/multi", "1", platforms=["linux/amd64"])
        store_image(store, single, "ghcr.io", "org/single", "1.0")
    finally:
        store.close()
    Recording.open(folder, "lab").save()
    amd64 = multi.platform("linux/amd64")
    (folder / "misses.jsonl").write_text(
        journal_line(now - timedelta(days=3), "manifest", "ghcr.io", "org/single", "1.0", "filled")
        + journal_line(now - timedelta(hours=2), "manifest", "docker.io", "library/multi", "1", "filled")
        + journal_line(now - timedelta(minutes=10), "blob", "docker.io", "library/multi", amd64.layers[0].digest, "filled", 300_000)
        + "{torn line"  # a crash mid-write
        + "\n"
        + journal_line(now - timedelta(minutes=5), "blob", "docker.io", "library/other", amd64.layers[1].digest, "failed", 20_000, "timeout")
    )
    return folder


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def sizes(platform_image) -> int:
    return sum(b.size for b in (platform_image.config, *platform_image.layers))


# stats


def test_stats_json(cache, multi, single):
    result = invoke("stats", "--json", "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    amd64 = multi.platform("linux/amd64")
    assert data["blobs"] == 3 + 2 and data["blob_bytes"] == sizes(amd64) + sizes(single.platforms[0])
    assert data["manifests"] == 2 + 1  # multi's index and amd64 manifest, single's manifest
    assert (data["tags"], data["repositories"], data["recordings"]) == (2, 2, 1)
    assert (data["misses"], data["misses_24h"]) == (4, 3)
    assert data["store_bytes"] >= data["blob_bytes"]
    assert abs(data["free_bytes"] - shutil.disk_usage(cache).free) < 2**30
    assert data["cache_dir"] == str(cache.resolve())


def test_stats_table(cache):
    result = invoke("stats", "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    assert "4 (3 in the last 24 h)" in result.stdout and "free disk space" in result.stdout
    assert "2 in 2 repositories" in result.stdout


def test_cache_folder_from_the_environment_and_the_config_file(cache, tmp_path):
    assert json.loads(invoke("stats", "--json", env={"HUBCACHE_CACHE_DIR": str(cache)}).stdout)["tags"] == 2
    config = tmp_path / "hubcache.yaml"
    config.write_text(f"cache_dir: {cache}\n")
    assert json.loads(invoke("stats", "--json", "--config", str(config)).stdout)["tags"] == 2


@pytest.mark.parametrize("command", [["stats"], ["ls"], ["misses"], ["stats", "--json"]])
def test_a_missing_cache_folder_is_one_line_and_is_not_created(tmp_path, command):
    folder = tmp_path / "nothing"
    result = invoke(*command, "--cache-dir", str(folder))
    assert result.exit_code == 1
    assert result.stderr == f"Error: no cache folder at {folder} (give --cache-dir, $HUBCACHE_CACHE_DIR or a --config with cache_dir)\n"
    assert not folder.exists()


# ls


def listed(cache, *args):
    result = invoke("ls", "--json", "--cache-dir", str(cache), *args)
    assert result.exit_code == 0, result.output
    return {f"{i['registry']}/{i['repository']}:{i['tag']}": i for i in json.loads(result.stdout)}


def test_ls_sizes_count_what_the_cache_holds_per_platform(cache, multi, single, now):
    images = listed(cache)
    assert list(images) == ["docker.io/library/multi:1", "ghcr.io/org/single:1.0"]
    amd64 = multi.platform("linux/amd64")
    m = images["docker.io/library/multi:1"]
    assert m["digest"] == multi.index_digest and m["media_type"].endswith("index.v1+json")
    assert [(p["platform"], p["digest"], p["size"], p["blobs"]) for p in m["platforms"]] == [
        ("linux/amd64", amd64.manifest.digest, sizes(amd64), 3)
    ]
    assert m["size"] == sizes(amd64) and m["complete"]
    s = images["ghcr.io/org/single:1.0"]
    assert s["platforms"][0]["platform"] == "" and s["size"] == sizes(single.platforms[0])
    assert now.timestamp() - 2 <= s["last_used"] <= time.time() + 2, "used when the cache was made"


def test_ls_counts_a_blob_shared_by_two_tags_for_each_and_a_missing_one_for_none(cache, multi):
    amd64 = multi.platform("linux/amd64")
    store = Store(cache)
    try:
        store.set_tag("docker.io", "library/multi", "latest", multi.index_digest)
        store.delete_blob(amd64.layers[0].digest)
    finally:
        store.close()
    images = listed(cache, "docker.io/*")
    assert set(images) == {"docker.io/library/multi:1", "docker.io/library/multi:latest"}
    for image in images.values():
        assert image["size"] == sizes(amd64) - amd64.layers[0].size
        assert not image["complete"] and image["platforms"][0]["missing_blobs"] == 1
    table = invoke("ls", "--cache-dir", str(cache)).stdout
    assert "(partial)" in table


@pytest.mark.parametrize(
    "pattern, names",
    [
        ("*:1", ["docker.io/library/multi:1"]),
        ("ghcr.io/org/single", ["ghcr.io/org/single:1.0"]),
        ("*/library/*", ["docker.io/library/multi:1"]),
        ("quay.io/*", []),
    ],
)
def test_ls_pattern(cache, pattern, names):
    assert list(listed(cache, pattern)) == names


def test_ls_lists_a_page_and_says_how_to_list_the_next(cache, multi):
    store = Store(cache)
    try:
        for tag in ("2", "3"):
            store.set_tag("docker.io", "library/multi", tag, multi.index_digest)
    finally:
        store.close()
    first = invoke("ls", "--json", "--cache-dir", str(cache), "--limit", "2")
    assert [i["tag"] for i in json.loads(first.stdout)] == ["1", "2"]
    assert "hubcache ls --after docker.io/library/multi:2" in first.stderr
    rest = invoke("ls", "--json", "--cache-dir", str(cache), "--limit", "2", "--after", "docker.io/library/multi:2")
    assert [f"{i['registry']}/{i['tag']}" for i in json.loads(rest.stdout)] == ["docker.io/3", "ghcr.io/1.0"]
    assert "--after" not in rest.stderr, "the last page"
    assert list(listed(cache, "--registry", "ghcr.io")) == ["ghcr.io/org/single:1.0"]
    assert list(listed(cache, "--registry", "docker.io", "*:3")) == ["docker.io/library/multi:3"]


def test_ls_table(cache, multi):
    result = invoke("ls", "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    assert "library/multi" in result.stdout and "linux/amd64" in result.stdout and multi.index_digest[:19] in result.stdout
    assert "(single)" in result.stdout
    assert "no images match 'x*'" in invoke("ls", "--cache-dir", str(cache), "x*").stdout


# verify


def test_verify_names_what_went_with_a_rotten_layer_and_fails(cache, multi):
    layer = multi.platform("linux/amd64").layers[0].digest
    store = Store(cache)
    try:
        with store.open_blob(layer) as f:
            Path(f.name).write_bytes(b"rot")
    finally:
        store.close()
    result = invoke("verify", "--cache-dir", str(cache))
    assert result.exit_code == 1
    assert "; 1 dropped with 1 manifest and 1 tag naming them" in result.stdout
    assert f"dropped {layer}: its bytes do not match" in result.stderr
    listed = json.loads(invoke("ls", "--json", "--cache-dir", str(cache)).stdout)
    assert [entry["repository"] for entry in listed] == ["org/single"], "the tag that could no longer pull is gone"
    again = invoke("verify", "--cache-dir", str(cache))
    assert again.exit_code == 0 and "0 dropped" in again.stdout


# misses


def missed(cache, *args):
    result = invoke("misses", "--json", "--cache-dir", str(cache), *args)
    assert result.exit_code == 0, result.output
    return [(e["repository"], e["outcome"], e["reason"]) for e in json.loads(result.stdout)]


def test_misses_newest_last_and_filters(cache):
    assert missed(cache) == [
        ("org/single", "filled", None), ("library/multi", "filled", None), ("library/multi", "filled", None), ("library/other", "failed", "timeout")
    ]
    assert missed(cache, "--since", "1h") == [("library/multi", "filled", None), ("library/other", "failed", "timeout")]
    assert len(missed(cache, "--since", "1d")) == 3 and len(missed(cache, "--since", "1w")) == 4
    assert missed(cache, "--registry", "ghcr.io") == [("org/single", "filled", None)]
    assert len(missed(cache, "--registry", "registry-1.docker.io")) == 3, "Docker Hub's API host names docker.io"
    assert missed(cache, "--repository", "library/m*") == [("library/multi", "filled", None)] * 2
    assert missed(cache, "--kind", "blob", "--limit", "1") == [("library/other", "failed", "timeout")]
    assert missed(cache, "--kind", "manifest", "--limit", "5") == [("org/single", "filled", None), ("library/multi", "filled", None)]


def test_misses_since_an_iso_time(cache, now):
    local = (now - timedelta(hours=1)).astimezone().replace(tzinfo=None).isoformat(timespec="minutes")
    assert len(missed(cache, "--since", local)) == 2, "a time without an offset is local time"
    utc = (now - timedelta(hours=3)).isoformat()
    assert len(missed(cache, "--since", utc)) == 3


def test_misses_table(cache):
    result = invoke("misses", "--cache-dir", str(cache), "--since", "1h")
    assert result.exit_code == 0, result.output
    assert "docker.io/library/other@sha256:" in result.stdout and "failed: timeout" in result.stdout
    assert "org/single" not in result.stdout
    assert "no misses match" in invoke("misses", "--cache-dir", str(cache), "--kind", "blob", "--registry", "ghcr.io").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--since", "yesterday"], "'yesterday' is neither an age like 1h or 2d nor an ISO time"),
        (["--since", "5y"], "'5y' is neither an age"),
        (["--kind", "tag"], "'tag' is not one of 'blob', 'manifest'"),
        (["--limit", "0"], "0 is not in the range x>=1"),
    ],
)
def test_misses_bad_options(cache, args, message):
    result = invoke("misses", "--cache-dir", str(cache), *args)
    assert result.exit_code == 2 and message in result.stderr
    assert "Traceback" not in result.output


# ca


def test_ca_generates_and_prints_the_certificate(tmp_path):
    confdir = tmp_path / "certs"
    result = invoke("ca", "--confdir", str(confdir))
    assert result.exit_code == 0, result.output
    path = (confdir / "mitmproxy-ca-cert.pem").resolve()
    assert result.stderr.strip() == str(path)
    assert result.stdout == path.read_text() and result.stdout.startswith("-----BEGIN CERTIFICATE-----")
    again = invoke("ca", "--confdir", str(confdir))
    assert again.stdout == result.stdout, "an existing CA is kept"


@pytest.mark.parametrize("command", [["ca"], ["setup", "skopeo"], ["setup", "skopeo", "--mirror", "--mirror-listen", "127.0.0.1:5443"]])
def test_ca_and_setup_make_the_ca_the_config_file_asks_for(tmp_path, command):
    config = tmp_path / "hubcache.yaml"
    config.write_text("key_size: 3072\n")
    result = invoke(*command, "--confdir", str(tmp_path / "certs"), "--config", str(config))
    assert result.exit_code == 0, result.output
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "mitmproxy-ca-cert.pem").read_bytes())
    assert isinstance(ca.public_key(), rsa.RSAPublicKey) and ca.public_key().key_size == 3072, "as `hubcache run` would make it"


def test_ca_install_without_update_ca_certificates_says_what_to_do(tmp_path):
    before = clientsetup.SYSTEM_CA.exists() and clientsetup.SYSTEM_CA.read_bytes()
    result = invoke("ca", "--confdir", str(tmp_path / "certs"), "--install", env={"PATH": str(tmp_path)})
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("Error: update-ca-certificates not found: add ") and "update-ca-trust" in last
    assert (clientsetup.SYSTEM_CA.exists() and clientsetup.SYSTEM_CA.read_bytes()) == before, "nothing was copied"


def test_ca_in_a_folder_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("")
    result = invoke("ca", "--confdir", str(tmp_path / "file" / "certs"))
    assert result.exit_code == 1 and result.stderr.startswith("Error: cannot create the CA in ")
    assert len(result.stderr.splitlines()) == 1


# setup


def setup(tmp_path, *args):
    result = invoke("setup", *args, "--confdir", str(tmp_path / "certs"))
    assert result.exit_code == 0, result.output
    return parse(result.stdout)


def test_setup_dockerd(tmp_path):
    script = setup(tmp_path, "dockerd")
    ca = (tmp_path / "certs" / "mitmproxy-ca-cert.pem").resolve()
    assert script.drop_in_environment("docker") == {"HTTPS_PROXY": "http://127.0.0.1:3128"}
    assert '  {"proxies": {"https-proxy": "http://127.0.0.1:3128"}}' in script.notes, "merged by hand, never overwritten"
    assert list(script.files) == ["/etc/systemd/system/docker.service.d/http-proxy.conf"]
    assert script.commands[:2] == [f"cp {ca} /usr/local/share/ca-certificates/hubcache.crt", "update-ca-certificates"]
    assert ca.exists()


def test_setup_proxy_from_the_options_and_the_config_file(tmp_path):
    config = tmp_path / "hubcache.yaml"
    config.write_text("listen_host: 0.0.0.0\nlisten_port: 3200\nregistries: [registry-1.docker.io, ghcr.io]\n")
    assert setup(tmp_path, "skopeo", "--config", str(config)).env["HTTPS_PROXY"] == "http://127.0.0.1:3200"
    assert setup(tmp_path, "skopeo", "--config", str(config), "--listen-port", "3300").env["HTTPS_PROXY"] == "http://127.0.0.1:3300"
    assert setup(tmp_path, "podman", "--listen-host", "10.0.0.5").env["https_proxy"] == "http://10.0.0.5:3128"
    given = setup(tmp_path, "dockerd", "--proxy", "http://u:p@cache.example.internal:3128")
    assert given.drop_in_environment("docker") == {"HTTPS_PROXY": "http://u:p@cache.example.internal:3128"}
    containerd = setup(tmp_path, "containerd", "--config", str(config))
    folders = sorted(Path(p).parent.name for p in containerd.files if p.endswith("hosts.toml"))
    assert folders == ["docker.io", "ghcr.io"]
    ghcr = tomllib.loads(containerd.files["/etc/containerd/certs.d/ghcr.io/hosts.toml"])
    assert ghcr["server"] == "https://ghcr.io"
    assert ghcr["host"]["https://ghcr.io"]["ca"] == str((tmp_path / "certs" / "mitmproxy-ca-cert.pem").resolve())


def test_setup_podman_and_skopeo_write_the_ca_under_docker_io(tmp_path):
    for client in ("podman", "skopeo"):
        script = setup(tmp_path, client)
        pem = script.files["/etc/containers/certs.d/docker.io/hubcache.crt"] + "\n"
        assert pem == (tmp_path / "certs" / "mitmproxy-ca-cert.pem").read_text()
        assert script.env == {"HTTPS_PROXY": "http://127.0.0.1:3128", "https_proxy": "http://127.0.0.1:3128"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["dockerd", "--proxy", "127.0.0.1:3128"], "'127.0.0.1:3128' is not a proxy URL like http://127.0.0.1:3128"),
        (["crio"], "'crio' is not one of"),
    ],
)
def test_setup_errors(tmp_path, args, message):
    result = invoke("setup", *args)
    assert result.exit_code == 2 and message in result.stderr


def test_setup_with_a_bad_config_file_is_one_line(tmp_path):
    config = tmp_path / "hubcache.yaml"
    config.write_text("listen_port: many\n")
    result = invoke("setup", "dockerd", "--config", str(config), "--confdir", str(tmp_path / "certs"))
    assert result.exit_code == 1 and result.stderr == f"Error: {config}: listen_port is not a number\n"


def test_the_committed_unit_is_the_one_setup_prints():
    unit = (ROOT / "scripts" / "hubcache.service").read_text()
    assert unit == clientsetup.systemd_unit(Path("/usr/local/bin/hubcache"), "127.0.0.1", 3128)
    assert "Restart=on-failure" in unit and "--cache-dir /var/cache/hubcache --confdir /etc/hubcache" in unit


def test_setup_systemd_names_this_installation(tmp_path):
    script = setup(tmp_path, "systemd", "--listen-port", "3199")
    unit = script.files["/etc/systemd/system/hubcache.service"]
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[0] == f"ExecStart={Path(sys.executable).with_name('hubcache')}"
    assert exec_start.endswith("--listen-host 127.0.0.1 --listen-port 3199")
    assert script.commands[-1] == "systemctl daemon-reload && systemctl enable --now hubcache"


def test_run_points_at_setup_and_agrees_with_it(tmp_path):
    ca = tmp_path / "certs" / "mitmproxy-ca-cert.pem"
    text = instructions("0.0.0.0", 3129, ca)
    assert f"hubcache setup CLIENT --proxy http://127.0.0.1:3129 --confdir {ca.parent}" in text
    dockerd = clientsetup.dockerd("http://127.0.0.1:3129", ca)
    for line in dockerd.files[0].content.splitlines():
        assert line.strip() in text
    assert json.dumps({"proxies": {"https-proxy": "http://127.0.0.1:3129"}}) in text
    assert f"{dockerd.commands[0]} && {dockerd.commands[1]}" in text


# help


@pytest.mark.parametrize("name", [None, *sorted(main.commands)])
def test_help_has_no_literal_backspace_marker(name):
    """click's no-rewrap marker is a line holding a backspace; written as `\\b`, it is printed."""
    result = invoke(*([name] if name else []), "--help")
    assert result.exit_code == 0
    assert "\\b" not in result.output and "\b" not in result.output


@pytest.mark.parametrize("name", sorted(main.commands))
def test_help_prints_each_example_on_its_own_line(name):
    docstring = main.commands[name].help
    examples = [line.strip() for line in docstring.partition("Examples:")[2].splitlines() if line.strip()]
    assert examples and all(line.startswith(f"hubcache {name}") for line in examples), docstring
    lines = [line.strip() for line in invoke(name, "--help").output.splitlines()]
    assert "Examples:" in lines
    for example in examples:
        assert example in lines, name


def test_stats_help_prints_its_examples_one_per_line():
    output = invoke("stats", "--help").output
    assert "\n  Examples:\n    hubcache stats\n    hubcache stats --json --cache-dir /var/cache/hubcache\n" in output


def test_rm_says_what_went_and_names_what_is_not_cached(cache, single):
    def tags() -> dict:
        store = Store(cache)
        try:
            return {key: entry.digest for key, entry in store.tags()}
        finally:
            store.close()

    before = tags()
    dry = invoke("rm", "--dry-run", "--cache-dir", str(cache), "ghcr.io/org/single:1.0")
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("would remove 1 tag, 1 manifest, ") and "  tag ghcr.io/org/single:1.0" in dry.output
    assert tags() == before
    done = invoke("rm", "--cache-dir", str(cache), "ghcr.io/org/single:1.0", "ghcr.io/org/absent:1")
    assert done.exit_code == 1
    assert done.output.startswith("removed 1 tag, 1 manifest, ")
    assert "hubcache rm: ghcr.io/org/absent:1 is not in the cache" in done.output
    assert list(tags()) == [("docker.io", "library/multi", "1")]
    store = Store(cache)
    try:
        assert not any(store.has_blob(b.digest) for b in (single.platforms[0].config, *single.platforms[0].layers))
    finally:
        store.close()
    bad = invoke("rm", "--cache-dir", str(cache), "Not An Image")
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_ls_counts_the_referrers_cached_with_an_image(cache, single):
    subject = single.platforms[0].manifest
    sbom = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/spdx+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:" + "4" * 64, "size": 2},
            "layers": [],
            "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        }
    ).encode()
    store = Store(cache)
    try:
        digest = digest_of(sbom)
        store.put_manifest(digest, "application/vnd.oci.image.manifest.v1+json", sbom)
        store.add_referrers("ghcr.io", "org/single", subject.digest, [{"digest": digest, "size": len(sbom)}])
    finally:
        store.close()
    images = listed(cache)
    assert images["ghcr.io/org/single:1.0"]["referrers"] == 1
    assert images["docker.io/library/multi:1"]["referrers"] == 0
    table = invoke("ls", "--cache-dir", str(cache))
    assert "referrers" in table.output


def test_setup_names_the_blob_servers_address_in_no_proxy(tmp_path):
    """Blobs come from the blob server's address directly once a client's NO_PROXY names it
    (`blob_listen`, or the proxy's one network address); a proxy for this machine only needs none."""
    for client in ("podman", "skopeo", "containerd"):
        script = setup(tmp_path, client, "--listen-host", "10.0.0.5")
        assert (script.env.get("NO_PROXY"), script.env.get("no_proxy")) == ("10.0.0.5", "10.0.0.5"), client
    dockerd = setup(tmp_path, "dockerd", "--listen-host", "0.0.0.0", "--blob-listen", "10.0.0.6:5001")
    assert dockerd.drop_in_environment("docker") == {"HTTPS_PROXY": "http://127.0.0.1:3128", "NO_PROXY": "10.0.0.6"}
    assert '  {"proxies": {"https-proxy": "http://127.0.0.1:3128", "no-proxy": "10.0.0.6"}}' in dockerd.notes
    containerd = setup(tmp_path, "containerd", "--listen-host", "10.0.0.5")
    assert containerd.drop_in_environment("containerd").get("NO_PROXY") == "10.0.0.5"
    for args in ([], ["--listen-host", "0.0.0.0"], ["--listen-host", "10.0.0.5", "--blob-listen", "relay"]):
        assert "NO_PROXY" not in setup(tmp_path, "skopeo", *args).env, args
def test_import_names_the_first_few_images_and_verbose_all(cache, tmp_path):
    from hubcache.storage.bundle import export
    from hubcache.storage.recordings import image_from_store

    store = Store(cache)
    try:
        tags = [f"v{n}" for n in range(7)]
        single = store.get_tag("ghcr.io", "org/single", "1.0")
        for tag in tags:
            store.set_tag("ghcr.io", "org/single", tag, single.digest)
        export(store, [image_from_store(store, "ghcr.io", "org/single", tag) for tag in tags], tmp_path / "b.tar")
    finally:
        store.close()
    brief = invoke("import", "--cache-dir", str(tmp_path / "one"), str(tmp_path / "b.tar"))
    assert brief.exit_code == 0, brief.output
    assert brief.stdout.startswith("imported 7 images: 1 manifest")
    assert brief.stdout.count("ghcr.io/org/single:") == 5 and "and 2 more (--verbose names them all)" in brief.stdout
    full = invoke("import", "--verbose", "--cache-dir", str(tmp_path / "two"), str(tmp_path / "b.tar"))
    assert full.stdout.count("ghcr.io/org/single:") == 7 and "more" not in full.stdout


def test_prefetch_shows_the_first_few_images_every_failure_and_a_summary():
    from hubcache.cli.images import _prefetch_rows, _prefetch_summary
    from hubcache.prefetch.client import Result

    results = [Result(f"app:{n}", "sha256:" + "a" * 64, fetched=2, fetched_bytes=1000, held=1) for n in range(8)]
    results.append(Result("broken:1", error="upstream said 404"))
    rows = _prefetch_rows(results, verbose=False)
    assert [r.image for r in rows] == ["app:0", "app:1", "app:2", "app:3", "app:4", "broken:1"]
    assert _prefetch_rows(results, verbose=True) == results
    assert _prefetch_summary(results, len(results) - len(rows)) == (
        "prefetched 8 images: 16 blobs fetched (8.0 kB), 8 blobs already cached; 1 failed; 3 more rows with --verbose"
    )

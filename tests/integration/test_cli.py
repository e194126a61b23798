"""The `hubcache` program: its help, its one-line errors, and `hubcache run` starting a working cache
with the embedded defaults and as the systemd unit says. The subcommands in process, through
click's runner, are in tests/unit/test_cli.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hubcache.cli import main
from support.clients import skopeo_copy
from support.pki import ca_bundle
from support.procs import Proc, free_port, wait_for_port
from support.registry import REGISTRY_NAME
from support.setupscript import parse

HUBCACHE = Path(sys.executable).with_name("hubcache")


def test_help_lists_run():
    result = subprocess.run([HUBCACHE, "--help"], capture_output=True, text=True, check=True)
    assert "run" in result.stdout
    result = subprocess.run([HUBCACHE, "run", "--help"], capture_output=True, text=True, check=True)
    assert "--cache-dir" in result.stdout and "Examples" in result.stdout


def test_bad_option_is_one_readable_line(tmp_path):
    result = subprocess.run(
        [HUBCACHE, "run", "--listen-port", str(free_port()), "--set", "tag_freshness=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "tag_freshness must be 0 or more seconds" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_defaults_and_a_config_file(tmp_path, ca, registry, multi_image):
    port = free_port()
    config = tmp_path / "hubcache.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "registries": [REGISTRY_NAME],
                "ssl_verify_upstream_trusted_ca": str(ca.cert_path),
                # Wrong on purpose: the command line below must win.
                "upstream_map": [f"{REGISTRY_NAME}=127.0.0.1:1"],
            }
        )
    )
    args = [
        str(HUBCACHE), "run", "--listen-port", str(port), "--config", str(config),
        "--set", f"upstream_map={REGISTRY_NAME}=127.0.0.1:{registry.port}",
    ]
    log = tmp_path / "run.log"
    with Proc(args, log=log, cwd=tmp_path) as proc:
        wait_for_port("127.0.0.1", port, timeout=30, log=log)
        ca_cert = tmp_path / "certs" / "mitmproxy-ca-cert.pem"
        assert ca_cert.exists(), "the CA is generated into certs/ on first start"
        assert b"BEGIN EC PRIVATE KEY" in (tmp_path / "certs" / "mitmproxy-ca.pem").read_bytes(), "hubcache's EC P-256 CA"
        assert "update-ca-certificates" in proc.log_text(), "start-up output explains dockerd's set-up"
        result = skopeo_copy(
            f"docker://{REGISTRY_NAME}/test/multi:1",
            tmp_path / "out",
            proxy=f"http://127.0.0.1:{port}",
            ca_bundle=ca_bundle([ca_cert], tmp_path / "bundle.pem"),
        )
        assert result.returncode == 0, result.stderr + proc.log_text()
    assert (tmp_path / "cache" / "misses.jsonl").exists(), "the store lives in ./cache by default"


@pytest.mark.parametrize(
    "args, message",
    [
        (["prefetch", "--set", "offline=true", "alpine"], "it cannot run with offline=true"),
        (["prefetch", "--record", "../up", "alpine"], "invalid recording name '../up'"),
        (["prefetch", "--set", "tag_freshness=-1", "alpine"], "tag_freshness must be 0 or more seconds"),
        (["export", "-o", "x.tar"], "give either IMAGES or --recording NAME"),
        (["export", "--recording", "none", "-o", "x.tar"], "no recording 'none'"),
        (["export", "alpine", "-o", "x.tar"], "docker.io/library/alpine:latest is not in the cache"),
        (["recordings", "none"], "no recording 'none'"),
        (["prune"], "say what to free"),
        (["prune", "--to", "lots"], "'lots' is not a size"),
    ],
)
def test_subcommand_errors_are_one_readable_line(tmp_path, args, message):
    result = subprocess.run([HUBCACHE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode in (1, 2)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.tar").exists()


def test_every_subcommand_has_help_with_examples():
    assert len(main.commands) >= 13
    for command in sorted(main.commands):
        result = subprocess.run([HUBCACHE, command, "--help"], capture_output=True, text=True, check=True)
        assert "Examples:" in result.stdout, command
    for command in ("run", "prefetch", "export", "import", "recordings", "prune", "verify", "stats", "ls", "misses", "watch"):
        assert "--cache-dir" in subprocess.run([HUBCACHE, command, "--help"], capture_output=True, text=True).stdout, command


def systemd_unit(*args: str) -> str:
    """The unit `hubcache setup systemd` prints."""
    result = CliRunner().invoke(main, ["setup", "systemd", *args], catch_exceptions=False)
    return parse(result.stdout).files["/etc/systemd/system/hubcache.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path):
    unit = tmp_path / "hubcache.service"
    unit.write_text(systemd_unit() + "\n")
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_units_command_line_starts_hubcache(tmp_path):
    """ExecStart as printed, with the service's folders moved under tmp_path."""
    port = free_port()
    unit = systemd_unit("--listen-port", str(port))
    command = next(line for line in unit.splitlines() if line.startswith("ExecStart=")).removeprefix("ExecStart=")
    command = command.replace("/var/cache/hubcache", str(tmp_path / "cache")).replace("/etc/hubcache", str(tmp_path / "conf"))
    log = tmp_path / "run.log"
    with Proc(command.split(), log=log, cwd=tmp_path):
        wait_for_port("127.0.0.1", port, timeout=60, log=log)
        assert (tmp_path / "conf" / "mitmproxy-ca-cert.pem").exists()
    assert (tmp_path / "cache" / "content").is_dir()


def test_rm_while_the_proxy_runs_and_the_next_pull_fills_the_image_again(hubcache, registry, multi_image, tmp_path):
    from support.clients import pull, pulled_blobs

    proxy = hubcache()
    ref = f"{REGISTRY_NAME}/test/multi:1"
    pull(proxy, ref, tmp_path / "cold")
    registry.settle()
    registry.reset_requests()
    pull(proxy, ref, tmp_path / "warm")
    registry.settle()
    assert registry.blob_gets() == [], "a warm pull is served from the cache"

    removed = subprocess.run(
        [HUBCACHE, "rm", "--cache-dir", str(proxy.cache_dir), ref], capture_output=True, text=True, timeout=60
    )
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("removed 1 tag, ")
    assert all(f"blob {digest}" in removed.stdout for digest in pulled_blobs(tmp_path / "cold"))

    registry.reset_requests()
    pull(proxy, ref, tmp_path / "again")
    assert pulled_blobs(tmp_path / "again") == pulled_blobs(tmp_path / "cold")
    registry.settle()
    assert {r.reference for r in registry.blob_gets()} == pulled_blobs(tmp_path / "cold"), "fetched from upstream again"

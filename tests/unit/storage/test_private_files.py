"""The cache folder is private whoever makes it: every command that opens it (click's runner) and
the proxy (CacheFolder with taddons) create it 0700 with every folder in it 0700 and every file
0600, and tighten a folder left open to others, saying so in one line."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from mitmproxy.test import taddons

from hubcache.cli import main
from hubcache.registry.protocol import digest_of
from hubcache.storage.folder import CacheFolder
from hubcache.storage.journal import MissJournal, Outcome
from hubcache.storage.recordings import Recording
from hubcache.storage.store import Store
from support.fill import store_image
from support.images import build_image

TIGHTENED = "was open to other users"


@pytest.fixture(autouse=True)
def umask():
    """The umask a service usually runs with: what is not made private is readable by all."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_image(tmp_path_factory.mktemp("layout"), "1", [50_000], seed="private")


def fill(folder: Path, image) -> None:
    """A cache folder holding everything a cache folder holds: the index, blob files, a manifest
    large enough to be a file of its own, a recording and the miss journal."""
    store = Store(folder)
    try:
        store_image(store, image, "docker.io", "library/private", "1")
        big = b"{" + b" " * 100_000 + b"}"
        store.put_manifest(digest_of(big), "application/vnd.oci.image.manifest.v1+json", big)
    finally:
        store.close()
    body = (image.layout_dir / "blobs" / "sha256" / image.top.digest.partition(":")[2]).read_bytes()
    store = Store(folder)
    try:
        recording = Recording.open(folder, "lab")
        recording.note_manifest(store, "docker.io", "library/private", "1", image.top.digest, image.top.media_type, body)
        recording.save()
    finally:
        store.close()
    MissJournal(folder / "misses.jsonl").record(registry="docker.io", repository="library/private", reference="1", outcome=Outcome.FILLED)


def open_to_others(folder: Path) -> list[str]:
    """Every path under `folder` (itself included) that is not 0700 (a folder) or 0600 (a file)."""
    found = []
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if mode != (0o700 if path.is_dir() else 0o600):
            found.append(f"{path.relative_to(folder.parent)} {mode:o}")
    return found


def loosen(folder: Path) -> None:
    """A folder as an earlier hubcache, or a copy with `cp -r`, left it: readable by everyone."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, image):
    """A bundle of the recording `lab`: importing it writes a recording too."""
    work = tmp_path_factory.mktemp("bundle")
    fill(work / "cache", image)
    out = work / "lab.tar"
    result = CliRunner().invoke(main, ["export", "--cache-dir", str(work / "cache"), "--recording", "lab", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def commands(bundle: Path) -> dict[str, list[str]]:
    return {
        "import": ["import", str(bundle)],
        "export": ["export", "docker.io/library/private:1", "-o", str(bundle.parent / "out.tar")],
        "prune": ["prune", "--unused-days", "30"],
        "verify": ["verify"],
        "recordings": ["recordings"],
    }


@pytest.mark.parametrize("command", ["import", "export", "prune", "verify", "recordings"])
def test_each_command_makes_the_cache_folder_private(tmp_path, bundle, command, caplog):
    folder = tmp_path / "new" / "cache"
    CliRunner().invoke(main, [*commands(bundle)[command], "--cache-dir", str(folder)])
    assert folder.is_dir()
    if command == "import":
        assert (folder / "recordings" / "lab.yaml").exists()
    assert open_to_others(folder) == []
    assert TIGHTENED not in caplog.text  # a new folder is made private, not tightened


@pytest.mark.parametrize("command", ["import", "export", "prune", "verify", "recordings"])
def test_each_command_tightens_a_folder_open_to_others_in_one_line(tmp_path, bundle, image, command, caplog):
    folder = tmp_path / "cache"
    fill(folder, image)
    loosen(folder)
    caplog.set_level(logging.INFO)
    result = CliRunner().invoke(main, [*commands(bundle)[command], "--cache-dir", str(folder)])
    assert result.exit_code == 0, result.output
    assert open_to_others(folder) == []
    [line] = [r.getMessage() for r in caplog.records if TIGHTENED in r.getMessage()]
    assert str(folder) in line and "755" in line
    # Once private, it stays quiet.
    caplog.clear()
    CliRunner().invoke(main, [*commands(bundle)[command], "--cache-dir", str(folder)])
    assert TIGHTENED not in caplog.text


def test_the_proxy_makes_its_cache_folder_and_what_it_writes_private(tmp_path, image):
    folder = tmp_path / "cache"
    addon = CacheFolder()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, cache_dir=str(folder))
        assert addon.store is not None
        store_image(addon.store, image, "docker.io", "library/private", "1")
        addon.done()
    fill(folder, image)
    assert open_to_others(folder) == []


def test_the_proxy_tightens_a_folder_open_to_others_in_one_line(tmp_path, image, caplog):
    folder = tmp_path / "cache"
    fill(folder, image)
    loosen(folder)
    addon = CacheFolder()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, cache_dir=str(folder))
        addon.done()
    assert open_to_others(folder) == []
    assert len([r for r in caplog.records if TIGHTENED in r.getMessage()]) == 1


def test_a_folder_that_cannot_be_tightened_is_still_used_with_one_line(tmp_path, image, caplog, monkeypatch):
    """A folder of another user (a shared read-only copy, say): said once, still readable."""
    folder = tmp_path / "cache"
    fill(folder, image)
    loosen(folder)
    real_chmod = os.chmod

    def not_the_owner(path, mode, *args, **kwargs):
        if Path(path) == folder:
            raise PermissionError(1, "Operation not permitted")
        return real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", not_the_owner)
    result = CliRunner().invoke(main, ["stats", "--json", "--cache-dir", str(folder)])
    assert result.exit_code == 0, result.output
    [line] = [r.getMessage() for r in caplog.records if "cannot be made private" in r.getMessage()]
    assert str(folder) in line and "Operation not permitted" in line

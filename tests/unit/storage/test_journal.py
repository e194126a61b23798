"""The miss journal is bounded whatever clients ask: rotated by size and by age, the oldest
rotations deleted, repeats of the same line held back for a while; `hubcache misses` and `stats`
read across the rotations (MissJournal directly, the policy with taddons, the CLI with click's
runner)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from hubcache.cache.policy import ImagePolicy
from hubcache.cli import main
from hubcache.observe.metrics import Metrics
from hubcache.options import CommonOptions
from hubcache.proxy.interception import Interception
from hubcache.proxy.routes import Routes
from hubcache.storage import journal as journal_module
from hubcache.storage.folder import CacheFolder
from hubcache.storage.journal import MissJournal, Outcome
from hubcache.storage.store import Store

HUB = "registry-1.docker.io"


def miss(journal: MissJournal, n: int, outcome: Outcome = Outcome.DENIED, reason: str = "deny_images rule 'docker.io/*'") -> None:
    journal.record(kind="manifest", registry="docker.io", repository=f"invented/name-{n}", reference="1", outcome=outcome, reason=reason)


def on_disk(journal: MissJournal) -> int:
    return sum(p.stat().st_size for p in journal.files() if p.exists())


def test_the_journal_is_rotated_by_size_and_keeps_only_the_newest_rotations(tmp_path):
    journal = MissJournal(tmp_path / "misses.jsonl", max_bytes=4096, keep=2, repeat_seconds=0)
    for n in range(2000):  # about 300 kB of lines, 75 times the size
        miss(journal, n)
    assert len(journal.rotations()) == 2
    line = max(len(json.dumps(e, separators=(",", ":"))) + 1 for e in journal.entries())
    assert on_disk(journal) <= 3 * (4096 + line)
    # What is kept is the newest lines, in order, across the files.
    names = [e["repository"] for e in journal.entries()]
    assert names == [f"invented/name-{n}" for n in range(2000 - len(names), 2000)]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in journal.files() if p.exists())


def test_the_journal_is_rotated_once_its_first_line_is_old(tmp_path):
    path = tmp_path / "misses.jsonl"
    old = datetime.now(UTC) - timedelta(days=2)
    path.write_text(json.dumps({"time": old.isoformat(), "repository": "old"}) + "\n")
    path.chmod(0o600)
    journal = MissJournal(path, max_age=86400, repeat_seconds=0)
    miss(journal, 1)
    rotations = journal.rotations()
    assert len(rotations) == 1, "a journal whose first line is two days old is rotated"
    [rotated] = rotations
    assert [json.loads(line)["repository"] for line in rotated.read_text().splitlines()] == ["old", "invented/name-1"]
    miss(journal, 2)  # the new file is young: no rotation
    assert len(journal.rotations()) == 1
    assert [e["repository"] for e in MissJournal(path).entries()] == ["old", "invented/name-1", "invented/name-2"]


def test_a_repeated_line_is_written_once_per_window(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(journal_module.time, "monotonic", lambda: clock[0])
    journal = MissJournal(tmp_path / "misses.jsonl", repeat_seconds=60)
    for _ in range(1000):
        miss(journal, 1)
    miss(journal, 1, Outcome.MISSING, "upstream answered 404 lately")  # another outcome is news
    miss(journal, 2)
    assert len(journal.entries()) == 3
    clock[0] += 61
    miss(journal, 1)
    assert len(journal.entries()) == 4


def test_the_lines_remembered_for_their_repeats_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "MAX_REMEMBERED", 100)
    journal = MissJournal(tmp_path / "misses.jsonl", repeat_seconds=3600)
    for n in range(101):  # the first is forgotten: its repeat is written again
        miss(journal, n)
    miss(journal, 0)
    miss(journal, 100)  # remembered: held back
    assert len(journal.entries()) == 102


def test_the_tail_reaches_into_the_last_rotation(tmp_path):
    journal = MissJournal(tmp_path / "misses.jsonl", max_bytes=4096, repeat_seconds=0)
    for n in range(30):  # a rotation after about 20
        miss(journal, n)
    assert journal.rotations() and (tmp_path / "misses.jsonl").stat().st_size < 4096
    lines = journal.tail(6000)
    assert json.loads(lines[-1])["repository"] == "invented/name-29"
    assert sum(len(line) + 1 for line in lines) > (tmp_path / "misses.jsonl").stat().st_size


@pytest.fixture
def policy(tmp_path):
    hosts = Interception()
    folder = CacheFolder()
    addon = ImagePolicy(folder, Metrics(hosts))
    routes = Routes(hosts)
    with taddons.context(CommonOptions(), folder, hosts, routes, addon) as tctx:
        tctx.options.update(cache_dir=str(tmp_path), deny_images=["docker.io/*"])
        yield tctx, (routes, addon), folder
        folder.done()


async def refused(addons: tuple[Routes, ImagePolicy], name: str) -> None:
    """A pull as mitmproxy hooks it: parsed to its route, then refused by the policy."""
    routes, addon = addons
    f = tflow.tflow(req=tutils.treq(host=HUB, port=443, scheme=b"https", path=f"/v2/{name}/manifests/1".encode(), content=b""))
    f.client_conn.sni = HUB
    routes.requestheaders(f)
    await addon.request(f)
    assert isinstance(f.response, http.Response) and f.response.status_code == 403


async def test_a_client_repeating_a_refused_pull_adds_one_line(policy):
    _, addon, folder = policy
    for _ in range(500):
        await refused(addon, "library/alpine")
    assert len(folder.journal.entries()) == 1


async def test_a_client_inventing_names_fills_no_more_than_the_rotations(policy):
    tctx, addon, folder = policy
    tctx.options.update(journal_size="8KiB", journal_keep=3)
    for n in range(400):  # about 70 kB of lines
        await refused(addon, f"invented/name-{n}")
    assert len(folder.journal.rotations()) == 3
    assert on_disk(folder.journal) <= 4 * 9 * 1024
    assert folder.journal.entries()[-1]["repository"] == "invented/name-399"


@pytest.mark.parametrize(
    "option, value", [("journal_size", "lots"), ("journal_size", "0"), ("journal_keep", -1), ("journal_rotate_days", -1), ("journal_repeat_seconds", -1)]
)
def test_bad_journal_options_are_refused(policy, option, value):
    tctx, _, folder = policy
    with pytest.raises(exceptions.OptionsError, match=option):
        tctx.configure(folder, **{option: value})


def test_misses_and_stats_read_across_the_rotations(tmp_path):
    Store(tmp_path).close()
    journal = MissJournal(tmp_path / "misses.jsonl", max_bytes=2048, repeat_seconds=0)
    for n in range(50):
        miss(journal, n)
    assert len(journal.rotations()) >= 2
    result = CliRunner().invoke(main, ["misses", "--json", "--cache-dir", str(tmp_path)], catch_exceptions=False)
    assert [e["repository"] for e in json.loads(result.output)] == [f"invented/name-{n}" for n in range(50)]
    result = CliRunner().invoke(main, ["stats", "--json", "--cache-dir", str(tmp_path)], catch_exceptions=False)
    stats = json.loads(result.output)
    assert (stats["misses"], stats["misses_24h"]) == (50, 50)

"""The configuration reference comes from the option definitions, and docs/options.md carries it unchanged."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from hubcache.cli import main
from hubcache.cli import options_table as reference

OPTIONS_DOC = Path(__file__).resolve().parents[3] / "docs" / "options.md"


def test_every_hubcache_option_is_described_and_no_mitmproxy_one():
    names = {option.name for option in reference.options()}
    assert {"cache_dir", "registries", "registry_settings", "status_listen", "offline", "blob_urls"} <= names
    assert not names & {"listen_port", "confdir", "ssl_insecure", "mode"}, "mitmproxy's own options are mitmproxy's"
    for option in reference.options():
        assert option.help and option.type, option.name


def test_the_options_doc_carries_the_generated_reference():
    assert reference.markdown() in OPTIONS_DOC.read_text(), "run `hubcache options --markdown` and paste it into docs/options.md"


def test_the_command_prints_it():
    result = CliRunner().invoke(main, ["options", "--markdown"])
    assert result.exit_code == 0
    assert result.output.strip() == reference.markdown()
    table = CliRunner().invoke(main, ["options"])
    assert table.exit_code == 0 and "registry_settings" in table.output

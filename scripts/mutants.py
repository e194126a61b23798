"""The mutation check: every guarantee hubcache makes has a test that fails when it breaks.

Each mutant below is one small, hand-written patch that breaks one guarantee of the docs. It is
applied alone to a scratch copy of the checkout (never to the checkout itself) and the tests that
guard that guarantee run against the copy: they must fail. A mutant whose tests still pass has
SURVIVED: a guarantee without a test that holds it.

Snippets are found by content, not by file and line: each must occur exactly once among the
files its pattern names (by default every addon/**/*.py), so a mutant keeps working when code
moves between modules. Leading whitespace does not count, so a snippet also survives a change of
indentation. A snippet found nowhere (or more than once) makes the mutant `stale`, and so does a
guard test that no longer exists: both are failures of this check, like a survivor, but mean the
list needs updating, not that a test is missing.

Guard tests are named by function name (`test_x`), optionally with its class and parameters
(`TestBlobs::test_x`, `test_x[param]`), and matched against the node ids collected from the
copy's tests/ folder, so they survive test files moving or being renamed.

A mutant is KILLED only when each of its guard tests, alone, fails an assertion of its own (an
AssertionError or pytest.fail in the test's call, as a plugin loaded into pytest records). A
guard that errs instead (any other exception, a fixture or teardown failing, a timeout, a crash)
makes the mutant an `error`, unless the mutant declares `hang=True` (a timeout is then how it is
noticed); a guard that passes while another kills makes it `padded` (the list names a test that
does not hold the guarantee); none killing it, SURVIVED. All but killed fail the check. A mutant
that ends in an error is run once more (a test server's hiccup under load is not its doing), and
so is a guard that does not pass on the unmutated copy; the second run's outcome counts.

The copy's addon/ is imported as `hubcache` (a `hubcache` symlink on PYTHONPATH, ahead of the
venv's editable install), in pytest and in every process the tests start (mitmdump, the blob
server): each run checks that it is. Mutants run in parallel (--jobs, one per core), each in a
copy of its own. The output of every run (the diff, pytest's output, each test's outcome) is kept
in a folder (.mutants/<time>/ unless --out), printed at the start, to audit why a mutant died.

Usage: scripts/mutants [--list] [--first] [--jobs N] [--no-baseline] [--rev REV | --worktree]
[NAME...] (see --help). Before the mutants, every guard test runs once on the unmutated copy: one
that does not pass there (twice) cannot tell a mutant from the real code, so it is left out,
reported, and fails the check.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADDON_FILES = "addon/**/*.py"
DEFAULT_TIMEOUT = 300  # seconds for one mutant's test run
TEST_TIMEOUT = 180  # seconds for one test (pytest-timeout), so a hung test fails instead of stalling


@dataclass(frozen=True)
class Edit:
    """Replace `find` (found exactly once among the files `files` names) with `replace`.
    `variants`: other (find, replace) spellings of the same code; of all spellings together,
    exactly one must be found, once."""

    find: str
    replace: str
    files: str = ADDON_FILES
    variants: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Mutant:
    name: str
    guarantee: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # guard tests: function names, optionally Class:: and [params]
    timeout: int = DEFAULT_TIMEOUT  # for the test run of one guard
    test_timeout: int = TEST_TIMEOUT  # for one test (a mutant may make a test hang)
    hang: bool = False  # a guard timing out kills this mutant: hanging is its expected symptom


def mutant(
    name: str,
    guarantee: str,
    edits: Edit | list[Edit],
    tests: list[str],
    timeout: int = DEFAULT_TIMEOUT,
    test_timeout: int = TEST_TIMEOUT,
    hang: bool = False,
) -> Mutant:
    patches = tuple(edits) if isinstance(edits, list) else (edits,)
    return Mutant(name, guarantee, patches, tuple(tests), timeout, min(test_timeout, timeout), hang)


# The mutants. Unit tests first where they guard a guarantee; integration tests where only they
# do (or to show that the whole path holds it too). While a restructuring is under way, an Edit's
# `variants` can name the other spelling of the same code.
UNIT = 120  # seconds for a mutant guarded by unit tests only
INTEGRATION = 420  # seconds for one that starts processes (mitmdump, registry, Swift, Redis)

MUTANTS: list[Mutant] = [
    # -- blob digest verification before commit
    mutant(
        "blob-commit-unverified",
        "the store commits a blob only when its bytes hash to its digest",
        Edit("if self.computed_digest != self.digest or self.write_error:", "if self.write_error:"),
        ["TestBlobs::test_wrong_bytes_are_refused", "TestBlobs::test_truncated_bytes_are_refused"],
        UNIT,
    ),
    mutant(
        "blob-verified-ignores-digest",
        "a fill counts as verified only when its bytes hash to the digest",
        Edit("return size_ok and self.computed_digest == self.digest", "return size_ok"),
        ["TestBlobs::test_wrong_bytes_are_refused", "test_a_body_that_does_not_verify_is_never_stored"],
        UNIT,
    ),
    mutant(
        "fill-commits-without-verifying",
        "a fill commits only a blob whose size and digest verified",
        Edit("if not self.writer.verified(self.size) or self.writer.write_error:", "if self.writer.write_error:"),
        ["test_a_body_that_does_not_verify_is_never_stored"],
        UNIT,
    ),
    mutant(
        "blob-unverified-end-to-end",
        "corrupt upstream bytes are never stored or completed to a client (both checks gone)",
        [
            Edit("return size_ok and self.computed_digest == self.digest", "return size_ok"),
            Edit("if self.computed_digest != self.digest or self.write_error:", "if self.write_error:"),
        ],
        ["test_a_bad_transfer_is_never_stored", "test_corrupt_cdn_bytes_are_never_stored_or_completed"],
        INTEGRATION,
    ),
    mutant(
        "blob-server-sends-last-byte-early",
        "the blob server holds a growing fill's last byte back until the fill verified and committed",
        Edit("limit = min(end, os.fstat(fd).st_size, size - 1)", "limit = min(end, os.fstat(fd).st_size)"),
        ["test_a_growing_fill_is_streamed_and_its_end_waits_for_the_commit"],
        INTEGRATION,
    ),
    # -- a fill's request off the event loop (fetcher.py)
    mutant(
        "fill-bytes-on-the-event-loop",
        "a blob fill's bytes are read on a thread of their own, not on mitmproxy's event loop",
        Edit("if flow.metadata.get(Mark.FILL) and fetcher.handles(flow):", "if False:"),
        ["test_the_body_arrives_off_the_event_loop_with_every_hook_in_order"],
        UNIT,
    ),
    mutant(
        "fetch-skips-server-connect",
        "a fill's connection goes where mitmproxy's server_connect hook says (upstream_map, connect_addr)",
        Edit("await self._run(server_hooks.ServerConnectHook(data))", "pass"),
        ["test_the_body_arrives_off_the_event_loop_with_every_hook_in_order", "test_a_fill_runs_the_hooks_mitmproxy_runs_for_a_request_in_its_order"],
        UNIT,
    ),
    mutant(
        "fetch-holds-bytes-while-upstream-pauses",
        "bytes of a fill that came are handed to its writer even while upstream sends nothing more",
        Edit(
            "data = self.sock.recv(READ_SIZE, socket.MSG_DONTWAIT if deadline is not None else 0)",
            "data = self.sock.recv(READ_SIZE)",
            variants=(
                (
                    "n = self.sock.recv_into(self._received, 0, socket.MSG_DONTWAIT if deadline is not None else 0)",
                    "n = self.sock.recv_into(self._received)",
                ),
            ),
        ),
        ["test_bytes_before_a_pause_are_handed_over_while_upstream_pauses"],
        UNIT,
    ),
    mutant(
        "fetch-accepts-a-cut-body",
        "a fill's body that ends before its Content-Length is no answer",
        Edit('raise h11.RemoteProtocolError(f"the connection closed {left - got} bytes before the end of the body")', "return"),
        ["test_a_body_cut_short_is_no_answer"],
        UNIT,
    ),
    # -- manifest digest verification
    mutant(
        "manifest-digest-not-checked",
        "a manifest from upstream that does not hash to the digest asked for (or claimed) is refused",
        Edit('if claimed and claimed.startswith(f"{algorithm}:") and claimed != digest:', "if False:"),
        ["TestManifestByDigest::test_wrong_bytes_are_refused", "test_miss_with_a_lying_digest_header_is_refused"],
        UNIT,
    ),
    mutant(
        "store-takes-any-manifest-bytes",
        "the store keeps a manifest only under the digest its bytes hash to",
        Edit('if digest_of(body, digest.partition(":")[0]) != digest:', "if False:", files="addon/**/store.py"),
        ["TestManifests::test_refuses_mismatching_bytes"],
        UNIT,
    ),
    # -- the private-access check
    mutant(
        "private-served-without-asking",
        "cached content of a private repository is served only after upstream said yes to the client's credentials",
        Edit("if known and (public is True or self._allowed.get(key, 0.0) > time.monotonic()):", "if known:"),
        ["test_private_content_is_checked_with_the_clients_own_credentials", "test_an_anonymous_client_gets_nothing_alice_cached"],
        INTEGRATION,
    ),
    mutant(
        "digest-not-tied-to-repository",
        "a digest known in one repository is not served through another's name without upstream's say",
        Edit("known = not route.by_digest or store.linked(route.registry, route.name, digest)", "known = True"),
        ["test_a_known_digest_is_not_served_through_another_repository"],
        UNIT,
    ),
    mutant(
        "private-served-when-upstream-cannot-confirm",
        "private content is refused (503) when upstream cannot answer the access check",
        Edit("if known and public is True:\n    logger.log(circuits.level(reason)", "if True:\n    logger.log(circuits.level(reason)"),
        ["test_private_content_is_refused_when_upstream_cannot_confirm"],
        UNIT,
    ),
    mutant(
        "redirect-unlocks-private",
        "only upstream's final 200 lets a client have cached content (a redirect unlocks nothing)",
        Edit("if answer.status_code != 200:", "if answer.status_code >= 400:", files="addon/**/access.py"),
        ["test_only_upstreams_final_200_lets_a_client_have_private_content"],
        INTEGRATION,
    ),
    mutant(
        "follower-joins-fill-unchecked",
        "a client joining another client's fill is served only after its own access check",
        Edit(
            "elif (state is State.CACHED or state.has_body) and (refused := await self.access.refusal(flow, route, route.reference, store)):",
            "elif False:",
        ),
        ["test_a_client_joining_a_fill_of_a_private_repository_is_checked_first"],
        INTEGRATION,
    ),
    mutant(
        "access-yes-remembered-forever",
        "upstream's yes to a client is remembered only for access_check_seconds",
        Edit("self._allowed[key] = now + ctx.options.access_check_seconds", "self._allowed[key] = now + 10**9"),
        ["test_upstreams_yes_is_remembered_for_access_check_seconds_and_asked_again_after"],
        INTEGRATION,
    ),
    mutant(
        "visibility-never-probed-again",
        "a repository made private stops being served (its visibility is probed again when old)",
        Edit("if known and public is True and time.time() - (checked or 0) >= ctx.options.visibility_check_seconds:", "if False:"),
        ["test_a_repository_made_private_stops_being_served"],
        INTEGRATION,
    ),
    mutant(
        "offline-serves-private",
        "offline, private content is served only with offline_private",
        Edit("if known and (public is True or ctx.options.offline_private):", "if known:"),
        ["test_offline_private_content_needs_the_policy", "test_offline_private_content_is_served_only_under_the_policy"],
        INTEGRATION,
    ),
    mutant(
        "local-token-serves-private",
        "a client holding hubcache's local token gets only public content",
        Edit(
            "if known and public is True:\n    return None\nreturn RegistryError(ErrorCode.UNAVAILABLE",
            "if known:\n    return None\nreturn RegistryError(ErrorCode.UNAVAILABLE",
        ),
        ["test_a_local_token_gets_a_clear_answer_for_what_is_missing_or_private"],
        UNIT,
    ),
    mutant(
        "fleet-shared-blob-served-unchecked",
        "a blob from the fleet's shared store is served only once upstream confirmed the client's access",
        Edit("await self.access.refusal(like, route, route.reference, ", "None and await self.access.refusal(like, route, route.reference, "),
        ["test_a_private_blob_one_node_cached_reaches_only_clients_upstream_allows"],
        INTEGRATION,
    ),
    mutant(
        "shared-manifest-not-rehashed",
        "a manifest read from the fleet's shared store is re-hashed before it is used",
        Edit(
            'if digest_of(body, digest.partition(":")[0]) != digest:\n    logger.warning("%s: manifest %s read back',
            'if False:\n    logger.warning("%s: manifest %s read back',
        ),
        ["test_manifest_with_wrong_bytes_is_refused"],
        INTEGRATION,
    ),
    mutant(
        "shared-tag-from-the-future-trusted",
        "a tag confirmation time from the future (in the shared store) counts as never confirmed",
        Edit("if not 0 <= shared.confirmed <= time.time() + CLOCK_SKEW:", "if False:"),
        ["test_a_tag_confirmed_in_the_future_counts_as_never_confirmed"],
        INTEGRATION,
    ),
    # -- single flight
    mutant(
        "no-single-flight",
        "concurrent misses of one blob make one upstream fetch",
        Edit("leader = fill is None\nif fill is None:", "leader = True\nif True:"),
        ["test_one_fetch_for_every_client_and_each_is_sent_to_the_growing_file"],
        INTEGRATION,
    ),
    # -- tag revalidation
    mutant(
        "stale-tag-not-revalidated",
        "a tag older than its freshness is revalidated upstream",
        Edit("time.time() - entry.checked < self.hosts.tag_freshness(flow.request.host)", "True"),
        ["test_tag_older_than_freshness_is_revalidated", "test_tag_revalidation_follows_a_moved_tag"],
        INTEGRATION,
    ),
    mutant(
        "moved-tag-served-old",
        "a tag upstream moved is served at its new digest, not the cached one",
        Edit("if current == cached.digest:", "if True:"),
        ["test_tag_moved_to_a_known_manifest", "test_tag_moved_to_an_unknown_manifest_goes_upstream", "test_tag_revalidation_follows_a_moved_tag"],
        INTEGRATION,
    ),
    # -- the blob URL signature
    mutant(
        "blob-url-signature-ignored",
        "the blob server serves only URLs the proxy signed",
        Edit("and hmac.compare_digest(", "and (lambda *_: True)("),
        ["test_only_urls_the_proxy_signed_are_served"],
        UNIT,
    ),
    mutant(
        "blob-url-signature-omits-fill",
        "the signature covers the fill file and size, so a URL cannot be pointed at another file",
        Edit('message = f"{digest}|{expires}|{fill}|{size}|{tag}".encode()', 'message = f"{digest}|{expires}|{tag}".encode()'),
        ["test_only_urls_the_proxy_signed_are_served"],
        UNIT,
    ),
    mutant(
        "blob-url-never-expires",
        "a signed blob URL expires",
        Edit("and int(expires) >= time.time()", "and True"),
        ["test_an_expired_url_is_refused"],
        UNIT,
    ),
    # -- offline never connects upstream
    mutant(
        "offline-tag-revalidated",
        "offline, a tag resolves to its last known digest without asking upstream",
        Edit("if ctx.options.offline or time.time() - entry.checked", "if time.time() - entry.checked"),
        ["test_head_by_tag_teaches_the_tag_for_later_offline_use", "test_skopeo_pulls_offline_with_upstream_stopped"],
        INTEGRATION,
    ),
    mutant(
        "offline-miss-asks-upstream",
        "offline, what the store lacks is answered at once with a 404, never asked upstream",
        Edit("if ctx.options.offline:\n    what = ", "if False:\n    what = "),
        ["test_missing_content_is_a_clear_404_and_a_journal_line", "test_a_missing_image_fails_fast_with_a_clear_message"],
        INTEGRATION,
    ),
    mutant(
        "offline-ping-relayed",
        "offline, /v2/ is answered locally",
        Edit("if ctx.options.offline:\n    return answers.version_check()", "if False:\n    return answers.version_check()"),
        ["test_ping_and_token_are_answered_locally"],
        INTEGRATION,
    ),
    mutant(
        "offline-token-relayed",
        "offline, token requests are answered locally",
        Edit("if not ctx.options.offline:\n    try:", "if True:\n    try:"),
        ["test_offline_nothing_is_asked", "test_ping_and_token_are_answered_locally"],
        UNIT,
    ),
    # -- eviction spares pinned and in-use blobs
    mutant(
        "evict-pinned",
        "eviction never touches what a recording refers to",
        Edit("if blob.digest not in keep:", "if True:"),
        [
            "test_pinned_and_recently_used_blobs_are_spared",
            "test_a_recording_pins_its_content",
            "test_prune_spares_what_a_recording_pins_and_verify_finds_it_whole",
        ],
        INTEGRATION,
    ),
    mutant(
        "evict-in-use",
        "eviction never touches a blob used in the last ten minutes",
        Edit("if now - blob.used < in_use:", "if False:"),
        ["test_pinned_and_recently_used_blobs_are_spared", "test_recently_used_blobs_are_in_use"],
        UNIT,
    ),
    mutant(
        "evict-in-use-window-zero",
        "the running proxy's eviction spares blobs used in the last ten minutes (IN_USE)",
        Edit("IN_USE = 600.0", "IN_USE = 0.0"),
        ["test_the_running_proxy_spares_blobs_used_in_the_last_ten_minutes"],
        UNIT,
    ),
    # -- the trust boundary
    mutant(
        "trust-sni-ignored",
        "a request is a registry's only when the client's SNI names the host it goes to",
        Edit('if (flow.client_conn.sni or "").lower() != host:', "if False:"),
        ["test_never_where_the_names_disagree"],
        UNIT,
    ),
    mutant(
        "trust-host-header-ignored",
        "a request is a registry's only when its Host header names the host it goes to",
        Edit("if claimed_host.lower() != host:", "if False:"),
        ["test_never_where_the_names_disagree", "test_a_host_header_naming_another_registry_is_not_that_registry"],
        INTEGRATION,
    ),
    mutant(
        "trust-plain-http-counts",
        "plain HTTP is never a registry's traffic",
        Edit(
            'if request.scheme != "https" or request.port != OWN_PORT or not self.intercepts(host):',
            "if request.port != OWN_PORT or not self.intercepts(host):",
            variants=(('if request.scheme != "https" or not self.intercepts(host):', "if not self.intercepts(host):"),),
        ),
        ["test_never_where_the_names_disagree"],
        UNIT,
    ),
    mutant(
        "trust-intercepts-sni-of-another-tunnel",
        "TLS is intercepted only when its SNI names the host the tunnel goes to",
        Edit(
            "if not (sni and sni == target.lower() and port == OWN_PORT and self.intercepts(sni)):",
            "if not (sni and port == OWN_PORT and self.intercepts(sni)):",
            variants=(("if not (sni and sni == target and self.intercepts(sni)):", "if not (sni and self.intercepts(sni)):"),),
        ),
        ["test_a_registry_sni_in_a_tunnel_to_elsewhere_is_tunnelled"],
        INTEGRATION,
    ),
    # -- the fleet lock
    mutant(
        "fleet-lock-not-taken",
        "with fleet_lock, one node fetches a blob and the others wait for it",
        Edit("if not await _in_thread(self.lock.acquire, digest, LOCK_TTL):", "if False:"),
        ["test_a_node_waits_for_the_holder_of_the_lock_and_no_longer", "test_eight_clients_on_two_nodes_pull_one_cold_image[redis]"],
        INTEGRATION,
    ),
    mutant(
        "fleet-lock-not-exclusive",
        "the fleet lock is held by one node at a time (SET NX)",
        Edit("nx=True", "nx=False", files="addon/**/s3.py"),
        ["test_only_one_of_two_nodes_takes_the_lock"],
        INTEGRATION,
    ),
    mutant(
        "fleet-waiter-does-not-wait",
        "a node waits for the lock's holder as long as the lock is held",
        Edit("if not self.usable or not await _in_thread(self.lock.held, digest):", "if True:"),
        ["test_a_node_waits_for_the_holder_of_the_lock_and_no_longer"],
        INTEGRATION,
    ),
    # -- credentials and destinations
    mutant(
        "credentials-follow-redirects",
        "credentials are never sent on a redirect to another host (a CDN)",
        Edit('target.headers.pop("authorization", None)', "pass"),
        ["test_a_cdn_redirect_is_followed_without_credentials"],
        UNIT,
    ),
    mutant(
        "account-credentials-beyond-pulls",
        "the configured account's credentials go only on pulls (GET, HEAD)",
        Edit('if host is None or request.method not in ("GET", "HEAD"):', "if host is None:"),
        ["test_never_on_anything_but_a_pull"],
        UNIT,
    ),
    mutant(
        "account-token-beyond-pull-scopes",
        "a token asked with the configured account is for pull of repositories only",
        Edit('scopes.append(f"repository:{name}:pull")', "scopes.append(item)"),
        ["test_a_token_asked_with_them_is_for_pull_only", "test_the_account_is_asked_only_for_pull_scopes"],
        INTEGRATION,
    ),
    mutant(
        "local-destinations-reachable",
        "a proxy serving a network refuses destinations on this host's loopback and link-local addresses",
        Edit("if where and refuse_local and not self._is_allowed(address, port):", "if False:"),
        ["test_serving_a_network_refuses_local_destinations", "test_a_proxy_serving_a_network_refuses_local_destinations"],
        INTEGRATION,
    ),
    mutant(
        "own-listeners-reachable",
        "hubcache's own listeners are never reachable through the proxy",
        Edit("if where and port in self._own_ports():", "if False:"),
        [
            "test_loopback_is_allowed_on_loopback_but_never_hubcaches_own_listeners",
            "test_hubcaches_own_listeners_are_not_reachable_through_the_proxy",
        ],
        INTEGRATION,
    ),
    mutant(
        "destination-not-pinned",
        "the connection goes to the address that was checked (no DNS rebinding)",
        Edit("return None if via_proxy else str(addresses[0])", "return None"),
        ["test_other_destinations_pass_and_are_pinned"],
        UNIT,
    ),
    mutant(
        "mirror-serves-any-registry",
        "the mirror endpoint serves only registries hubcache caches, never relays elsewhere",
        Edit("return name if self.hosts.is_registry(name) else None", "return name"),
        ["test_a_registry_not_cached_is_not_served", "test_anything_else_is_a_registry_error_and_no_registry_request"],
        UNIT,
    ),
    mutant(
        "mirror-relays-any-token-realm",
        "the mirror relays token requests only to realms a registry's own challenge named",
        Edit(
            'if not port or self.realms.registry(*key) is None or flow.request.method not in ("GET", "POST"):',
            'if not port or flow.request.method not in ("GET", "POST"):',
        ),
        [
            "test_no_other_realm_is_relayed_to[/hubcache/token/auth.docker.io/token]",
            "test_no_other_realm_is_relayed_to[/hubcache/token/evil.example/token]",
            "test_no_other_realm_is_relayed_to[/hubcache/token/auth.docker.io:8443/token]",
        ],
        UNIT,
    ),
    mutant(
        "policy-spares-blobs",
        "deny_images refuses every request of a repository it names, blobs included",
        Edit("if route.kind not in (Kind.MANIFEST, Kind.BLOB, Kind.REFERRERS)", "if route.kind not in (Kind.MANIFEST, Kind.REFERRERS)"),
        ["test_deny"],
        UNIT,
    ),
    mutant(
        "upstream-answer-unbounded",
        "hubcache's own answers from upstream are read up to 4 MiB, counted as the bytes arrive",
        Edit("if self.size > MAX_ANSWER:", "if False:"),
        ["test_huge_manifest_is_not_held_in_memory", "test_a_manifest_limit_counts_the_bytes_read"],
        UNIT,
    ),
    # -- the mutation check's own round: guarantees that had tests but no mutant, and promises
    # of the docs read from outside the tests (the visibility probe, HEAD of private blobs,
    # redirects, Basic-auth registries, the blob URL, the mirror's policy, Accept, the status page)
    mutant(
        "anonymous-probe-gets-account-credentials",
        "the anonymous visibility probe stays anonymous, even where registry_settings has credentials",
        Edit(
            'if flow.response or "authorization" in request.headers or is_subrequest(flow):',
            'if flow.response or "authorization" in request.headers:',
        ),
        ["test_the_anonymous_probe_stays_anonymous"],
        UNIT,
    ),
    mutant(
        "probe-carries-client-credentials",
        "the visibility probe asks without the client's credentials",
        Edit(
            'request = upstream.request_for(like, route, "HEAD")\nrequest.headers.pop("authorization", None)',
            'request = upstream.request_for(like, route, "HEAD")',
            files="addon/**/access.py",
        ),
        ["test_the_first_manifest_of_a_repository_probes_its_visibility"],
        UNIT,
    ),
    mutant(
        "probe-no-anonymous-token-counts-public",
        "a registry that answers anonymous clients with Basic auth, or refuses them a token, is private",
        Edit("if token is None:\n    return False", "if token is None:\n    return True", files="addon/**/access.py"),
        ["test_a_registry_that_lets_no_anonymous_client_in_is_private"],
        UNIT,
    ),
    mutant(
        "private-blob-head-unchecked",
        "a HEAD of a private repository's cached blob is answered only after the client's access check",
        Edit(
            'if refused := await self.access.refusal(flow, route, digest, store):\n    return refused\nself.metrics.hit("blob")\nreturn Serve(200',
            'self.metrics.hit("blob")\nreturn Serve(200',
        ),
        ["test_an_anonymous_client_gets_nothing_alice_cached"],
        INTEGRATION,
    ),
    mutant(
        "blob-url-signature-omits-expires",
        "a blob URL's expiry is signed: a client cannot extend it",
        Edit('message = f"{digest}|{expires}|{fill}|{size}|{tag}".encode()', 'message = f"{digest}|{fill}|{size}|{tag}".encode()'),
        ["test_only_urls_the_proxy_signed_are_served"],
        UNIT,
    ),
    mutant(
        "blob-url-lives-too-long",
        "a signed blob URL is valid for 10 minutes",
        Edit("URL_TTL = 600", "URL_TTL = 6000"),
        ["test_an_expired_url_is_refused"],
        UNIT,
    ),
    mutant(
        "mirror-skips-image-policy",
        "deny_images and allow_images hold for the mirror's clients too",
        Edit(
            "if flow.response or flow.error or is_subrequest(flow):",
            'if flow.response or flow.error or is_subrequest(flow) or flow.metadata.get("hubcache_mirror"):',
            files="addon/**/policy.py",
        ),
        ["test_the_image_policy_holds_through_the_mirror"],
        INTEGRATION,
    ),
    mutant(
        "accept-ignored-by-digest",
        "a manifest by digest is served from the cache only in a type the client's Accept names",
        Edit(
            "if not cached or not protocol.accepts(accept, cached.media_type):\n    return await self._ask(flow, route)\nif refused",
            "if not cached:\n    return await self._ask(flow, route)\nif refused",
        ),
        ["test_accept_excluding_the_stored_type_is_not_answered"],
        UNIT,
    ),
    mutant(
        "accept-ignored-by-tag",
        "a manifest by tag is served from the cache only in a type the client's Accept names",
        [
            Edit("if entry and manifest and protocol.accepts(accept, manifest.media_type):", "if entry and manifest:"),
            Edit("if not entry or not cached or not protocol.accepts(accept, cached.media_type):", "if not entry or not cached:"),
        ],
        ["test_accept_excluding_the_cached_type_goes_upstream_without_revalidating"],
        UNIT,
    ),
    mutant(
        "accept-ignored-on-moved-tag",
        "a tag that moved to a known manifest is served from the cache only if the client's Accept names its type",
        Edit('if moved and protocol.accepts(flow.request.headers.get_all("accept"), moved.media_type):', "if moved:"),
        ["test_tag_moved_to_a_known_manifest_of_a_type_the_client_refuses_goes_upstream"],
        UNIT,
    ),
    mutant(
        "referrers-served-unchecked",
        "a private repository's cached referrers go only to a client upstream allows",
        Edit("if refused := await self.access.refusal(flow, route, route.reference, store):\n    return refused\nwanted =", "wanted ="),
        ["test_a_private_repositorys_referrers_need_the_clients_access"],
        UNIT,
    ),
    mutant(
        "status-names-unknown-visibility",
        "the status page names a repository only once it is known to be public",
        Edit(
            "return store is not None and store.visibility(registry, repository) is True",
            "return store is not None and store.visibility(registry, repository) is not False",
        ),
        ["test_only_repositories_known_to_be_public_are_named"],
        UNIT,
    ),
    mutant(
        "status-names-private",
        "the status page shows private repositories as (private) unless status_private is on",
        Edit("if ctx.options.status_private:\n    return True", "if True:\n    return True", files="addon/**/status_page.py"),
        ["test_only_repositories_known_to_be_public_are_named", "test_the_status_page_names_no_private_repository"],
        INTEGRATION,
    ),
    mutant(
        "negative-cache-shared-between-credentials",
        "upstream's 404 is remembered per client credentials: what one account cannot see, another may",
        Edit(
            "return (token_key(flow), route.kind.value, route.registry, route.name, route.reference, accept)",
            'return ("", route.kind.value, route.registry, route.name, route.reference, accept)',
        ),
        ["test_a_404_is_remembered_for_the_same_client"],
        UNIT,
    ),
    mutant(
        "free-space-reserve-ignored",
        "a fill leaves 64 MiB of the cache folder's disk free",
        Edit("if free - promised < (size or 0) + FREE_SPACE_RESERVE:", "if free - promised < (size or 0):"),
        ["test_the_free_space_reserve_is_never_filled"],
        UNIT,
    ),
    mutant(
        "redirect-keeps-credentials-across-scheme-or-port",
        "credentials stay with their origin: a redirect to another port or to plain HTTP of the same host drops them",
        Edit(
            "if (target.scheme, target.host.lower(), target.port) != (request.scheme, request.host.lower(), request.port):",
            "if target.host.lower() != request.host.lower():",
        ),
        ["test_credentials_stay_with_the_origin_they_were_given_to"],
        UNIT,
    ),
    mutant(
        "access-check-follows-plain-http",
        "hubcache's own requests (the access check) follow redirects only to https",
        Edit('if request.scheme != "https":\n    break', "if False:\n    break"),
        ["test_a_redirect_to_plain_http_is_the_answer_not_followed"],
        UNIT,
    ),
    mutant(
        "manifest-redirect-to-plain-http-followed",
        "a manifest miss redirected to plain HTTP is left to the client, never fetched and cached",
        Edit(
            'if request.scheme != "https":\n    return response  # a manifest from plain HTTP',
            "if False:\n    return response  # a manifest from plain HTTP",
        ),
        ["test_a_redirect_to_plain_http_is_left_to_the_client"],
        UNIT,
    ),
    # docs/how-it-works.md (with "When upstream is down"), read for promises without a mutant
    mutant(
        "manifest-miss-unreachable-said-missing",
        "a manifest miss upstream cannot answer gets a registry 502 UNAVAILABLE, not a claim that it does not exist",
        Edit(
            'return RegistryError(ErrorCode.UPSTREAM_FAILED, f"{route.registry} cannot be reached: {e}")',
            'return RegistryError(ErrorCode.MANIFEST_UNKNOWN, f"{route.registry} cannot be reached: {e}")',
        ),
        ["test_unreachable_upstream_is_a_registry_error"],
        UNIT,
    ),
    mutant(
        "token-host-down-no-local-token",
        "a token host that refuses, fails or stays silent gets the client a token issued by hubcache",
        Edit(
            'logger.log(circuits.level(str(e), logging.INFO), f"{host}: {e}; token answered by hubcache (cached public content only)")',
            'logger.log(circuits.level(str(e), logging.INFO), f"{host}: {e}; token answered by hubcache (cached public content only)")\nreturn',
        ),
        ["test_a_token_host_that_cannot_answer_gets_a_local_token"],
        UNIT,
    ),
    mutant(
        "stale-tag-not-served-when-upstream-fails",
        "a tag upstream cannot revalidate (unreachable, 5xx, 429) is served from its last known manifest",
        Edit(
            "except upstream.UpstreamError as e:\n    return await self._serve_stale(flow, route, cached, str(e))\ncurrent =",
            "except upstream.UpstreamError as e:\n    return await self._ask(flow, route)\ncurrent =",
        ),
        ["test_upstream_failure_serves_stale"],
        UNIT,
    ),
    mutant(
        "offline-push-passes",
        "offline, pushes and other methods get 405 UNSUPPORTED",
        Edit('if ctx.options.offline and (route.kind is Kind.OTHER or flow.request.method not in ("GET", "HEAD")):', "if False:"),
        ["test_pushes_are_refused"],
        UNIT,
    ),
    mutant(
        "circuit-never-opens",
        "after a host's first failure, requests to it are not attempted until it answers again",
        Edit(
            "if circuit is None or (self._probing.get(key) and client.sni == self._probing[key]):\n    return None",
            "if True:\n    return None",
        ),
        [
            "test_the_first_failure_opens_the_circuit_and_later_connections_are_not_attempted",
            "test_hubcaches_own_request_to_a_host_that_is_down_is_not_started",
        ],
        UNIT,
    ),
    mutant(
        "circuit-refuses-its-probe",
        "while a host is down, its background probe still connects",
        Edit(
            "if circuit is None or (self._probing.get(key) and client.sni == self._probing[key]):\n    return None",
            "if circuit is None:\n    return None",
        ),
        ["test_only_the_probe_connects_while_the_host_is_down"],
        UNIT,
    ),
    # docs/security.md: destinations and which images
    mutant(
        "destination-link-local-reachable",
        "a proxy serving a network refuses link-local destinations (the cloud's metadata service)",
        Edit('if address.is_link_local:\n    return "a link-local address"', 'if False:\n    return "a link-local address"'),
        [
            "test_serving_a_network_refuses_local_destinations[169.254.169.254-link-local]",
            "test_serving_a_network_refuses_local_destinations[fe80::1-link-local]",
        ],
        UNIT,
    ),
    mutant(
        "destination-mapped-loopback-reachable",
        "an IPv4 loopback address written as IPv6 (::ffff:127.0.0.1) is loopback too",
        Edit(
            "if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:\n    return address.ipv4_mapped",
            "if False:\n    return address.ipv4_mapped",
        ),
        [
            "test_serving_a_network_refuses_local_destinations[::ffff:127.0.0.1-loopback]",
            "test_an_ipv6_client_is_its_slash_64_and_this_machine_has_no_share",
        ],
        UNIT,
    ),
    mutant(
        "destination-own-address-reachable",
        "a proxy serving a network refuses the addresses of this host's own interfaces",
        Edit('if _is_own(address):\n    return "an address of this host"', 'if False:\n    return "an address of this host"'),
        ["test_an_address_of_this_host_is_local"],
        UNIT,
    ),
    mutant(
        "destination-exceptions-ignored",
        "local_destinations_allowed lets the operator's exceptions through",
        Edit("return any(address in network and allowed in (None, port) for network, allowed in self._allowed)", "return False"),
        ["test_exceptions_the_operator_listed"],
        UNIT,
    ),
    mutant(
        "policy-allow-list-ignored",
        "with allow_images set, a repository it does not name is refused",
        Edit("if allowed and not any(_matches(pattern, route, tagless=True) for pattern in allowed):", "if False:"),
        ["test_allow_names_what_may_be_pulled_and_deny_wins"],
        UNIT,
    ),
    mutant(
        "policy-tag-pattern-covers-digests",
        "a deny_images pattern with a tag says nothing of requests by digest",
        Edit(
            "if route.kind is Kind.MANIFEST and not route.by_digest:\n    return fnmatchcase(route.reference, tag)\nreturn tagless",
            "if route.kind is Kind.MANIFEST and not route.by_digest:\n    return fnmatchcase(route.reference, tag)\nreturn True",
        ),
        ["test_deny"],
        UNIT,
    ),
    # docs/operating.md, "Eviction and integrity"
    mutant(
        "evict-most-recently-used-first",
        "eviction takes the least recently used blobs first",
        Edit('" ORDER BY access_time, rowid LIMIT ?"', '" ORDER BY access_time DESC, rowid DESC LIMIT ?"', files="addon/**/store.py"),
        ["test_a_read_makes_a_blob_recently_used"],
        UNIT,
    ),
    mutant(
        "evict-past-the-limit",
        "cache_size_limit evicts only until the store is under the limit",
        Edit("if not (expired or (limit is not None and total > limit)):", "if not (expired or limit is not None):"),
        ["test_least_recently_used_go_first_until_under_the_limit"],
        UNIT,
    ),
    mutant(
        "expiry-drops-recently-used",
        "expire_unused_days drops only blobs nobody pulled for that long",
        Edit("expired = max_unused is not None and now - blob.used > max_unused", "expired = max_unused is not None"),
        ["test_expiry_drops_only_what_went_unused"],
        UNIT,
    ),
    mutant(
        "evict-leaves-broken-manifests",
        "a manifest that lost a blob is dropped with every tag that led to it",
        Edit("tags = index.tags_naming(change.sql, broken)", "tags = []"),
        ["test_prune_keeps_the_tag_index_consistent"],
        UNIT,
    ),
    mutant(
        "evict-keeps-tag-of-broken-index",
        "a tag naming an index whose platform manifest was dropped is dropped too",
        Edit("broken.update(m for m in index.users(change.sql, digest, blob=False) if m not in keep)", "pass"),
        ["test_prune_keeps_the_tag_index_consistent"],
        UNIT,
    ),
    mutant(
        "verify-keeps-rotten-blob",
        "hubcache verify re-hashes every blob and drops what does not match",
        Edit("if hash_digest(h) != entry.digest:", "if False:"),
        ["test_verify_drops_what_rotted"],
        UNIT,
    ),
    mutant(
        "verify-leaves-tags-naming-rotten-blob",
        "a blob verify drops takes the manifests naming it and the tags leading to them",
        Edit(
            "return self._drop_manifests(change, index.users(change.sql, digest, blob=True), set())",
            "return Evicted()",
            files="addon/**/store.py",
        ),
        ["test_verify_drops_what_rotted"],
        UNIT,
    ),
    mutant(
        "head-answer-carries-a-body",
        "a HEAD answered by hubcache carries no body bytes (the client would read them as its next answer)",
        Edit('http.Response.make(status, body if flow.request.method != "HEAD" else b"", headers)', "http.Response.make(status, body, headers)"),
        ["test_a_head_answer_carries_no_body_but_states_its_size"],
        UNIT,
    ),
    mutant(
        "rate-limit-count-by-isdigit",
        "an odd rate-limit header (a superscript digit, thousands of digits) is left out of the metrics, not raised on",
        Edit(
            'value = decimal(response.headers.get(header, "").partition(";")[0].strip())',
            'value = int(v) if (v := response.headers.get(header, "").partition(";")[0].strip()).isdigit() else None',
        ),
        ["test_only_a_plain_rate_limit_count_is_taken"],
        UNIT,
    ),
    mutant(
        "status-listen-port-by-isdigit",
        "status_listen's port is a plain decimal: a superscript digit or thousands of digits is one readable option error",
        Edit("number = decimal(port)\nif not (colon and host)", "number = int(port) if port.isdigit() else None\nif not (colon and host)"),
        ["test_a_bad_status_listen_is_one_readable_option_error"],
        UNIT,
    ),
    mutant(
        "partial-import-unsaid",
        "an import that fails midway says how many images it stored whole",
        Edit(
            "if stored:\n    raise PartlyImported(e, stored, len(images)) from e",
            "if False:\n    raise PartlyImported(e, stored, len(images)) from e",
        ),
        ["test_a_commit_that_fails_midway_leaves_whole_images_only"],
        UNIT,
    ),
    mutant(
        "strays-named-files-removed",
        "verify removes only the content files no entry names",
        Edit("if file.relative_to(self._content) in named or not file.is_file():", "if not file.is_file():", files="addon/**/store.py"),
        ["test_verify_removes_the_files_a_crash_left_and_nothing_else"],
        UNIT,
    ),
    mutant(
        "strays-fresh-files-removed",
        "a file being moved into the store by another process is not taken for a stray",
        Edit("if file.lstat().st_mtime < cutoff:", "if True:", files="addon/**/store.py"),
        ["test_verify_removes_the_files_a_crash_left_and_nothing_else"],
        UNIT,
    ),
    mutant(
        "verify-leaves-tags-naming-rotten-manifest",
        "a manifest verify drops takes the tags leading to it",
        Edit(
            "taken = self._drop_manifests(change, [digest], set())",
            'taken = Evicted(1, 0)\nchange.delete(("manifest", digest))',
            files="addon/**/store.py",
        ),
        ["test_verify_drops_a_rotten_manifest_with_its_tag"],
        UNIT,
    ),
    # docs/options.md, "Registries" (credentials), and docs/fleet.md
    mutant(
        "account-replaces-clients-credentials",
        "clients that bring their own credentials keep them",
        Edit(
            'if flow.response or "authorization" in request.headers or is_subrequest(flow):',
            "if flow.response or is_subrequest(flow):",
        ),
        ["test_a_client_with_its_own_credentials_keeps_them"],
        UNIT,
    ),
    mutant(
        "account-realm-learned-over-http",
        "the configured account goes only to a token realm the registry named over https",
        Edit('if scheme == "bearer" and realm.scheme == "https" and realm.hostname:', 'if scheme == "bearer" and realm.hostname:'),
        ["test_a_realm_named_over_plain_http_is_not_learned"],
        UNIT,
    ),
    mutant(
        "account-token-query-kept",
        "a token request made with the account keeps only service, client_id, account and its pull scopes",
        Edit(
            "request.query = [(k, v) for k, v in request.query.items(multi=True) if k in TOKEN_QUERY] + [",
            'request.query = [(k, v) for k, v in request.query.items(multi=True) if k != "scope"] + [',
        ),
        ["test_a_token_asked_with_them_is_for_pull_only"],
        UNIT,
    ),
    mutant(
        "fleet-corrupt-blob-left-in-the-bucket",
        "a blob from the shared store that fails its check is removed from the bucket, so the next pull fetches it from upstream",
        Edit("await self._use(lambda store: store.delete_blob(digest))", "return"),
        ["test_after_a_corrupt_blob_in_the_shared_store_the_next_pull_gets_it_from_upstream"],
        INTEGRATION,
    ),
    # docs/security.md, "Private images", and docs/airgap.md, "Recordings"
    mutant(
        "access-yes-shared-between-clients",
        "upstream's yes is remembered for the token it was given to, not for every client",
        Edit("key = (token_key(flow), route.registry, route.name)", 'key = ("", route.registry, route.name)'),
        ["test_private_content_is_checked_with_the_clients_own_credentials"],
        UNIT,
    ),
    mutant(
        "recording-name-unchecked",
        "a recording's name cannot leave the recordings folder",
        Edit("if not RECORDING_NAME_RE.fullmatch(name):\n    raise RecordingError(", "if False:\n    raise RecordingError("),
        ["test_a_bad_recording_name_is_refused"],
        UNIT,
    ),
    mutant(
        "recording-pins-only-blobs",
        "a recording refers to its manifests as well as its blobs (it pins them, and reports them missing)",
        Edit(
            "return {d for image in images for d in [*image.manifest_digests(), *image.blobs()]}",
            "return {d for image in images for d in image.blobs()}",
        ),
        ["test_the_file_round_trips_and_reports_what_the_store_lacks"],
        UNIT,
    ),
    # docs/how-it-works.md: what a hit is answered with
    mutant(
        "manifest-served-with-another-type",
        "a manifest from the store is served with its own media type",
        Edit('"Content-Type": media_type,', '"Content-Type": "application/json",', files="addon/**/protocol.py"),
        ["test_miss_is_stored_then_served"],
        UNIT,
    ),
    mutant(
        "range-end-past-the-blob",
        "a Range past the blob's end is answered up to its last byte (an exact 206)",
        Edit("end = min(int(last), size - 1) if last else size - 1", "end = int(last) if last else size - 1"),
        ["TestParseRange::test_satisfiable"],
        UNIT,
    ),
    mutant(
        "range-suffix-is-the-whole-blob",
        "a suffix Range (bytes=-N) gets the blob's last N bytes",
        Edit("return max(0, size - n), size - 1", "return 0, size - 1"),
        ["TestParseRange::test_satisfiable"],
        UNIT,
    ),
    mutant(
        "range-reversed-accepted",
        "a Range that ends before it starts is unsatisfiable (416)",
        Edit("if start >= size or (last and int(last) < start):", "if start >= size:"),
        ["TestParseRange::test_unsatisfiable_or_unsupported"],
        UNIT,
    ),
    mutant(
        "bad-repository-name-routed",
        "a malformed repository name gets a registry 400 NAME_INVALID, never a route into the store",
        Edit("if not NAME_RE.fullmatch(name) or len(name) > MAX_NAME_LENGTH:", "if len(name) > MAX_NAME_LENGTH:"),
        ["test_bad_name"],
        UNIT,
    ),
    mutant(
        "bad-blob-digest-routed",
        "a blob digest of the wrong length or an unknown algorithm is a registry error, never a route into the store",
        Edit('if kind is not Kind.MANIFEST or ":" in reference:\n    check_digest(reference)', "if False:\n    check_digest(reference)"),
        ["test_bad_blob_digest", "test_unknown_algorithm"],
        UNIT,
    ),
    mutant(
        "bad-tag-routed",
        "a malformed tag is a registry 400, never a route into the store",
        Edit("elif not TAG_RE.fullmatch(reference):", "elif False:"),
        ["test_bad_tag"],
        UNIT,
    ),
    # -- canonical requests: decide only on what was parsed, send upstream only what was rebuilt
    mutant(
        "route-takes-unclean-targets",
        "a registry request whose target holds a fragment, percent-encoding, dot or empty segments is refused before anything happens",
        Edit("return path.startswith(\"/\") and not _UNCLEAN.search(path)", "return True"),
        [
            "test_a_target_not_in_canonical_form_is_refused",
            "test_an_unclean_token_request_is_refused",
        ],
        INTEGRATION,
    ),
    mutant(
        "route-takes-any-query",
        "a pull endpoint takes no query parameter but containerd's ns naming its registry (and the referrers filter)",
        Edit("raise BadRequest(ErrorCode.UNSUPPORTED_REQUEST, f\"this endpoint takes no query parameter {key}={value[:100]!r}\")", "continue"),
        ["test_a_query_the_endpoint_does_not_take_is_refused", "test_the_router_classifies_or_refuses"],
        UNIT,
    ),
    mutant(
        "passed-request-keeps-clients-target",
        "a registry request passed upstream carries the target hubcache rebuilt, not the client's",
        Edit("request.path = route.target", "pass"),
        ["test_what_goes_upstream_is_rebuilt_from_the_route"],
        UNIT,
    ),
    mutant(
        "own-request-copies-clients-target",
        "hubcache's own requests upstream are built from the route, never from the client's target",
        Edit('request = http.Request.make(method, f"https://{authority}{route.target}")', 'request = http.Request.make(method, f"https://{authority}{client.path}")'),
        ["test_request_for_builds_from_the_route_not_the_clients_target"],
        UNIT,
    ),
    mutant(
        "own-request-copies-clients-headers",
        "hubcache's own requests upstream carry only Accept, Authorization and User-Agent of the client's headers",
        Edit('del request.headers["content-length"]  # a pull has no body', "request.headers = client.headers.copy()"),
        ["test_request_for_builds_from_the_route_not_the_clients_target", "test_what_goes_upstream_is_rebuilt_from_the_route"],
        UNIT,
    ),
    mutant(
        "token-request-relayed-whole",
        "a token request is relayed rebuilt from its token fields only",
        Edit("return [(k, v) for k, v in pairs if k in TOKEN_FIELDS]", "return pairs"),
        ["test_the_token_request_is_rebuilt_from_its_token_fields"],
        UNIT,
    ),
    mutant(
        "redirect-renames-what-was-asked",
        "a redirect to another API path of the registry's own host that names something else is not followed",
        Edit("if (moved := _parsed(target)) is None or moved != _parsed(request):", "if False:"),
        [
            "test_a_redirect_to_the_same_host_that_names_something_else_is_refused",
            "test_a_redirect_that_renames_a_manifest_is_not_followed",
            "test_a_redirect_that_renames_a_blob_fails_its_fill",
        ],
        UNIT,
    ),
    mutant(
        "routes-not-noted",
        "the policy, the cache and the recorder act only on a route parsed by Routes",
        Edit("flow.metadata[Mark.ROUTE] = [route.kind.value, route.registry, route.name, route.reference, route.artifact_type]", "pass"),
        ["test_a_registry_request_is_noted_with_its_route_and_its_target_rebuilt", "test_deny"],
        UNIT,
    ),
    # -- request bodies
    mutant(
        "body-http2-unannounced-read",
        "an HTTP/2 body without a content-length on a request hubcache answers is refused at its first DATA",
        Edit("self.client_state = self.state_expect_no_body", "self.client_state = self.state_consume_request_body"),
        ["test_an_http2_body_with_or_without_a_length_is_answered_413_and_the_connection_closed"],
        UNIT,
    ),
    mutant(
        "body-chunked-waited-for",
        "a chunked body on a request hubcache answers is refused at its headers, before any of it arrives",
        Edit('return "transfer-encoding" in request.headers or length != "0"', 'return length != "0"'),
        ["test_an_http1_body_is_answered_413_and_the_connection_closed_before_it_is_read", "test_which_headers_announce_a_body"],
        UNIT,
    ),
    mutant(
        "body-on-an-early-answer-read",
        "a body on a request answered in requestheaders (the mirror's own answers) is refused, not read",
        Edit("bodies.takes_none(flow)  # answered already", "pass  # answered already"),
        ["test_a_request_answered_in_requestheaders_takes_no_body"],
        UNIT,
    ),
    mutant(
        "body-pull-read",
        "a body on a pull (GET/HEAD to a registry, or anything while offline) is refused, not read",
        Edit("bodies.takes_none(flow)\nreturn", "return"),
        ["test_what_hubcache_answers_itself_takes_no_body"],
        UNIT,
    ),
    mutant(
        "body-refused-connection-kept",
        "a client refused for a body loses its connection after the linger, however much it still sends",
        Edit("yield commands.CloseConnection(self.context.client)", "pass"),
        ["test_an_http1_body_is_answered_413_and_the_connection_closed_before_it_is_read"],
        UNIT,
    ),
    mutant(
        "body-push-without-length-buffered",
        "what hubcache passes through is streamed, also an HTTP/2 push that announces no length",
        Edit("request.stream = True", "request.stream = bodies.announces_body(request)"),
        ["test_what_hubcache_passes_through_is_streamed_whatever_the_headers_say", "test_a_push_without_a_length_is_streamed_to_the_registry"],
        INTEGRATION,
    ),
    # -- ports and circuits: a registry's own port only; recovery (a miss is worth one try)
    mutant(
        "ports-other-port-intercepted",
        "TLS to another port of a registry's name is an ordinary tunnel",
        Edit(
            "if not (sni and sni == target.lower() and port == OWN_PORT and self.intercepts(sni)):",
            "if not (sni and sni == target.lower() and self.intercepts(sni)):",
        ),
        ["test_another_port_of_a_registry_is_an_ordinary_tunnel"],
        UNIT,
    ),
    mutant(
        "ports-other-port-is-the-registry",
        "a request to another port of a registry's name never touches registry state",
        Edit(
            'if request.scheme != "https" or request.port != OWN_PORT or not self.intercepts(host):',
            'if request.scheme != "https" or not self.intercepts(host):',
        ),
        ["test_a_request_is_a_registrys_on_its_own_port_only"],
        UNIT,
    ),
    mutant(
        "ports-upstream-map-any-port",
        "upstream_map sends only a name's own port elsewhere; another port is an ordinary destination",
        Edit("return self.map.get(host.lower()) if port == OWN_PORT else None", "return self.map.get(host.lower())"),
        ["test_another_port_of_a_mapped_name_is_not_mapped"],
        UNIT,
    ),
    mutant(
        "circuit-any-port",
        "a circuit is the canonical host and port's: a failure on another port opens none",
        Edit(
            'if request.scheme != "https" or request.port != OWN_PORT or not self.hosts.intercepts(host):',
            'if request.scheme != "https" or not self.hosts.intercepts(host):',
        ),
        ["test_only_a_canonical_request_opens_a_circuit"],
        UNIT,
    ),
    mutant(
        "circuit-any-path",
        "only a request for a registry's API or a known token realm opens a circuit",
        Edit('return (host, OWN_PORT) if path.startswith("/v2/") else None', "return (host, OWN_PORT)"),
        ["test_only_a_canonical_request_opens_a_circuit"],
        UNIT,
    ),
    mutant(
        "circuit-opened-by-a-client",
        "a client's own failed connection opens no circuit: only hubcache's own requests do",
        Edit(
            "def response(self, flow: http.HTTPFlow) -> None:\n# Only what came from upstream",
            "def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:\n"
            '    self.failed(http.Request.make("GET", f"https://{_name(data.server)}/v2/"), data.server.error or "cannot connect")\n\n'
            "def response(self, flow: http.HTTPFlow) -> None:\n    # Only what came from upstream",
            files="addon/upstream/circuits.py",
        ),
        ["test_a_client_hammering_other_ports_of_a_registrys_name_cannot_fail_another_clients_cold_pull"],
        INTEGRATION,
    ),
    mutant(
        "circuit-probe-replays",
        "a probe asks the host itself (GET /v2/ or the token realm), never replays what failed",
        Edit('f"https://{key[0]}{path}")', "request.url)"),
        ["test_a_probe_asks_the_host_itself_and_one_that_fails_doubles_the_wait"],
        UNIT,
    ),
    mutant(
        "recovery-waits-for-the-background-probe",
        "a miss to a host that is down starts a probe at once and waits for it: the first cold pull after an outage succeeds",
        Edit("if not (only_upstream(flow) and await circuits.attempt(request.host, request.port)):", "if True:"),
        [
            "test_a_miss_to_a_host_that_is_down_waits_for_the_probe_and_goes_upstream_when_it_is_back",
            "test_the_first_cold_pull_after_an_outage_succeeds_and_is_cached[proxy-15s]",
        ],
        INTEGRATION,
    ),
    mutant(
        "recovery-probe-per-request",
        "one probe in flight per host: every request that needs upstream waits for the same one",
        Edit("if trial is None or trial.done():", "if True:"),
        ["test_a_request_only_upstream_can_answer_starts_one_probe_and_all_wait_for_it"],
        UNIT,
    ),
    mutant(
        "recovery-probe-unlimited",
        "while upstream stays down, requests start at most one probe a second",
        Edit("if time.monotonic() - circuit.probed_at < TRIAL_INTERVAL:", "if False:"),
        ["test_while_upstream_stays_down_a_probe_is_started_at_most_once_a_second"],
        UNIT,
    ),
    mutant(
        "recovery-cached-requests-probe",
        "a request the cache can answer never waits for a probe",
        Edit('return bool(flow.metadata.get(Mark.MISS) or flow.metadata.get(Mark.FILL))', "return True"),
        ["test_hubcaches_own_request_to_a_host_that_is_down_is_not_started"],
        UNIT,
    ),
    mutant(
        "recovery-new-repository-token-local",
        "a token for a repository the cache holds nothing of goes to the token host as a miss",
        Edit(
            "await self.upstream.send(flow, request, ctx.options.revalidate_timeout, miss=cold)",
            "await self.upstream.send(flow, request, ctx.options.revalidate_timeout, miss=False)",
        ),
        ["test_a_token_for_a_repository_the_cache_holds_nothing_of_is_asked_as_a_miss", "test_a_token_form_names_its_repositories_too"],
        UNIT,
    ),
    mutant(
        "recovery-v2-without-challenge",
        "while a registry is down, /v2/ answers with its own challenge, so clients ask for a token",
        Edit("if challenge := self.breaker.challenges.get(route.registry):", "if False:"),
        ["test_v2_answers_with_the_registrys_own_challenge"],
        UNIT,
    ),
    # Bounded state and private files: the journal, the access table, the most pulled, what
    # recordings pin, the cache folder's modes.
    mutant(
        "journal-never-rotated",
        "the miss journal is rotated once it reaches journal_size",
        Edit("if written >= self.max_bytes or self._too_old():", "if self._too_old():"),
        ["test_the_journal_is_rotated_by_size_and_keeps_only_the_newest_rotations", "test_a_client_inventing_names_fills_no_more_than_the_rotations"],
        UNIT,
    ),
    mutant(
        "journal-never-rotated-by-age",
        "the miss journal is rotated once its first line is journal_rotate_days old",
        Edit("return now - self._started >= self.max_age", "return False"),
        ["test_the_journal_is_rotated_once_its_first_line_is_old"],
        UNIT,
    ),
    mutant(
        "journal-keeps-every-rotation",
        "only the newest journal_keep rotations of the journal are kept",
        Edit("for old in rotations[: max(0, len(rotations) - self.keep)]:", "for old in []:"),
        ["test_the_journal_is_rotated_by_size_and_keeps_only_the_newest_rotations", "test_a_client_inventing_names_fills_no_more_than_the_rotations"],
        UNIT,
    ),
    mutant(
        "journal-writes-every-repeat",
        "a miss identical to one journalled within journal_repeat_seconds is not journalled again",
        Edit("if last is not None and now - last < self.repeat_seconds:", "if False:"),
        ["test_a_repeated_line_is_written_once_per_window", "test_a_client_repeating_a_refused_pull_adds_one_line"],
        UNIT,
    ),
    mutant(
        "journal-repeats-never-end",
        "a repeat is journalled again once the window passed",
        Edit("if last is not None and now - last < self.repeat_seconds:", "if last is not None:"),
        ["test_a_repeated_line_is_written_once_per_window"],
        UNIT,
    ),
    mutant(
        "journal-remembers-every-line",
        "the lines remembered to hold back their repeats are bounded",
        Edit("while len(self._written) > MAX_REMEMBERED:", "while False:"),
        ["test_the_lines_remembered_for_their_repeats_are_bounded"],
        UNIT,
    ),
    mutant(
        "journal-read-without-rotations",
        "hubcache misses, stats and the status page read across the journal's rotations",
        Edit("return [*self.rotations(), self.path]", "return [self.path]"),
        ["test_misses_and_stats_read_across_the_rotations", "test_the_tail_reaches_into_the_last_rotation"],
        UNIT,
    ),
    mutant(
        "access-table-unbounded",
        "at most MAX_ALLOWED of upstream's yeses are remembered, the oldest forgotten first",
        Edit("if until > now and len(self._allowed) <= MAX_ALLOWED:", "if until > now:"),
        ["TestAccess::test_the_yeses_remembered_are_bounded_however_many_tokens_clients_try"],
        UNIT,
    ),
    mutant(
        "access-table-keeps-expired",
        "an expired yes is forgotten",
        Edit("if until > now and len(self._allowed) <= MAX_ALLOWED:", "if len(self._allowed) <= MAX_ALLOWED:"),
        ["TestAccess::test_an_expired_yes_is_forgotten"],
        UNIT,
    ),
    mutant(
        "popular-counts-invented-names",
        "the most pulled images count only pulls that were served a manifest",
        Edit("if pull.manifests:", "if True:"),
        ["test_names_a_client_invents_never_reach_the_most_pulled"],
        UNIT,
    ),
    mutant(
        "popular-unbounded",
        "the most pulled images are bounded, keeping the most pulled",
        Edit("if len(self.popular) > 2 * POPULAR:", "if False:"),
        ["test_the_most_pulled_are_bounded_and_keep_the_most_pulled"],
        UNIT,
    ),
    mutant(
        "record-pins-client-pulls",
        "what clients pull through a proxy with record is not pinned: cache_size_limit still evicts it",
        Edit("media_type, body, ctx.options.record_pins", "media_type, body, True"),
        ["test_what_clients_pull_is_recorded_but_evicted_past_the_limit"],
        UNIT,
    ),
    mutant(
        "unpinned-images-spared",
        "eviction spares only the pinned images of recordings",
        Edit(".digests(pinned_only=True)}", ".digests()}"),
        ["test_what_clients_pull_is_recorded_but_evicted_past_the_limit", "test_a_clients_pull_never_changes_a_pinned_image"],
        UNIT,
    ),
    mutant(
        "client-pull-replaces-a-pinned-image",
        "a client's pull of a moved tag never replaces the image the operator pinned",
        Edit("if previous and previous.pinned and not pin:", "if False:"),
        ["test_a_client_pulling_a_moved_tag_leaves_the_pinned_image"],
        UNIT,
    ),
    mutant(
        "client-pull-adds-to-a-pinned-image",
        "a client's pull of another platform never adds it to the image the operator pinned",
        Edit("or (image.pinned and not pin):", ":"),
        ["test_a_clients_pull_never_changes_a_pinned_image"],
        UNIT,
    ),
    mutant(
        "operator-record-not-pinned",
        "recording an image the operator names pins one a client recorded before",
        Edit("previous.pinned |= pin", "pass"),
        ["test_an_image_a_client_pulled_is_pinned_once_the_operator_records_it"],
        UNIT,
    ),
    mutant(
        "import-does-not-pin",
        "what hubcache import brings is pinned",
        Edit("pinned: bool = True  # eviction never drops it", "pinned: bool = False  # eviction never drops it"),
        ["test_what_import_brings_is_pinned"],
        UNIT,
    ),
    mutant(
        "old-recordings-unpinned",
        "a recording written before pins were chosen still pins everything it lists",
        Edit('pinned=entry.get("pinned", True) is not False,', 'pinned=entry.get("pinned", False) is True,'),
        ["test_a_recording_from_before_pins_pins_everything"],
        UNIT,
    ),
    mutant(
        "prefetch-does-not-pin",
        "what hubcache prefetch --record fetches is pinned",
        Edit('"record_pins=true"]', ']'),
        ["test_prune_spares_what_a_recording_pins_and_verify_finds_it_whole"],
        INTEGRATION,
    ),
    mutant(
        "cache-folder-made-with-the-umask",
        "the cache folder is made 0700 by whoever makes it",
        Edit("directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)", "directory.mkdir(parents=True, exist_ok=True)"),
        ["test_each_command_makes_the_cache_folder_private"],
        UNIT,
    ),
    mutant(
        "loose-cache-folder-left-open",
        "a cache folder open to other users is tightened",
        Edit("if not mode & 0o077:", "if True:"),
        ["test_each_command_tightens_a_folder_open_to_others_in_one_line", "test_the_proxy_tightens_a_folder_open_to_others_in_one_line"],
        UNIT,
    ),
    mutant(
        "loose-folder-contents-left-open",
        "what a loose cache folder holds is tightened with it",
        Edit("os.chmod(path, private)", "pass"),
        ["test_each_command_tightens_a_folder_open_to_others_in_one_line", "test_the_proxy_tightens_a_folder_open_to_others_in_one_line"],
        UNIT,
    ),
    mutant(
        "index-made-with-the-umask",
        "the store's index (cache.db, with its -wal and -shm) is 0600",
        Edit('os.close(os.open(content / "cache.db", os.O_RDONLY | os.O_CREAT, PRIVATE_FILE))', "pass"),
        ["test_each_command_makes_the_cache_folder_private", "test_the_proxy_makes_its_cache_folder_and_what_it_writes_private"],
        UNIT,
    ),
    mutant(
        "store-files-made-with-the-umask",
        "the files and folders diskcache writes in the store are 0600/0700",
        Edit("os.chmod(os.path.join(self._directory, filename), PRIVATE_FILE)", "pass"),
        ["test_the_proxy_makes_its_cache_folder_and_what_it_writes_private"],
        UNIT,
    ),
    mutant(
        "store-folders-made-with-the-umask",
        "the folders diskcache makes in the store are 0700",
        Edit("            path.mkdir(mode=PRIVATE_DIR)\n", "            path.mkdir()\n"),
        ["test_the_proxy_makes_its_cache_folder_and_what_it_writes_private"],
        UNIT,
    ),
    mutant(
        "recordings-made-with-the-umask",
        "recordings are written 0600",
        Edit("with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), \"w\") as f:", "with open(tmp, \"w\") as f:"),
        ["test_each_command_makes_the_cache_folder_private[import]", "test_the_proxy_makes_its_cache_folder_and_what_it_writes_private"],
        UNIT,
    ),
    # -- smaller trust gaps: tags per kind, local tokens, bundle visibility, listeners, credentials
    mutant(
        "prefetch-credentials-follow-same-host",
        "prefetch drops credentials on a redirect to another scheme, host or port",
        Edit("if _origin(url) != origin:", "if urllib.parse.urlsplit(url).hostname != origin[1]:"),
        ["test_a_redirect_to_another_scheme_or_port_of_the_same_host_drops_the_credentials"],
        UNIT,
    ),
    mutant(
        "account-basic-beyond-pull-endpoints",
        "the configured account's Basic credentials go to pull endpoints only, never the catalog or tag lists",
        Edit("elif host in self._basic and (route := route_of(flow)) and route.kind in protocol.PULLS:", "elif host in self._basic:"),
        ["test_basic_goes_to_pull_endpoints_only"],
        UNIT,
    ),
    mutant(
        "listeners-of-mode-unchecked",
        "a listener added with --mode that serves a network makes local destinations refused",
        Edit("return any(_serves_network(spec) for spec in ctx.options.mode)", 'return _serves_network("regular")'),
        ["test_a_listener_added_with_mode_that_serves_a_network_refuses_local_destinations"],
        UNIT,
    ),
    mutant(
        "cloud-metadata-reachable",
        "a proxy serving a network refuses the clouds' metadata addresses outside link-local",
        Edit("if any(address in network for network in METADATA):", "if False:"),
        ["test_serving_a_network_refuses_local_destinations"],
        UNIT,
    ),
    mutant(
        "unmarked-bundle-public",
        "a bundle without io.hubcache.public leaves its repositories' visibility unknown",
        Edit("elif repository in public and known is None:", "elif known is None:"),
        ["test_a_bundle_without_the_public_mark_leaves_visibility_unknown"],
        UNIT,
    ),
    mutant(
        "unknown-visibility-exported-public",
        "a repository of unknown visibility is exported without the public mark",
        Edit("if public is not None:  # unknown stays unknown", "if True:  # unknown stays unknown"),
        ["test_an_unknown_visibility_is_exported_unmarked"],
        UNIT,
    ),
    mutant(
        "offline-unknown-visibility-served",
        "offline, content of unknown visibility is served only where an operator imported it",
        Edit("if known and public is None and await asyncio.to_thread(store.imported, route.registry, route.name):", "if known and public is None:"),
        ["test_offline_unknown_visibility_is_served_only_where_an_operator_imported_it"],
        UNIT,
    ),
    mutant(
        "local-token-unsigned",
        "a local token counts only with hubcache's own signature",
        Edit("if not hmac.compare_digest(mac, self._mac(issued, host)):", "if False:"),
        ["test_a_token_hubcache_did_not_issue_for_this_outage_is_an_ordinary_credential"],
        UNIT,
    ),
    mutant(
        "local-token-never-expires",
        "a local token counts only for the seconds the client was told",
        Edit("and issued <= now < issued + LOCAL_TOKEN_SECONDS * 1000", "and True"),
        ["test_a_token_hubcache_did_not_issue_for_this_outage_is_an_ordinary_credential"],
        UNIT,
    ),
    mutant(
        "local-token-any-registry",
        "a local token counts only at the registry of the token host it stands in for",
        Edit("host == AUTH_HOSTS.get(registry.lower())", "True"),
        ["test_a_token_hubcache_did_not_issue_for_this_outage_is_an_ordinary_credential"],
        UNIT,
    ),
    mutant(
        "local-token-outlives-outage",
        "a local token counts no more once its token host answers again",
        Edit("and self._answered.get(host, -1) < issued", "and True"),
        ["test_a_local_token_counts_no_more_once_the_token_host_answers_again"],
        UNIT,
    ),
    mutant(
        "tag-kind-ignored",
        "a client's Accept cannot re-point a multi-platform tag for clients of the other kind",
        Edit(
            'return TagKind.INDEX if protocol.takes_indexes(flow.request.headers.get_all("accept")) else TagKind.SINGLE',
            "return TagKind.INDEX",
        ),
        ["test_an_accept_without_indexes_cannot_repoint_a_multi_platform_tag"],  # the unit test's, and test_trust's with skopeo
        INTEGRATION,
    ),
    mutant(
        "tag-kind-one-index-type",
        "only a client naming every index type teaches what a tag names",
        Edit("return named >= INDEX_MEDIA_TYPES", "return bool(named & INDEX_MEDIA_TYPES)"),
        [
            "test_takes_indexes_only_with_every_index_type_named",
            "TestManifestByTag::test_an_accept_without_indexes_cannot_repoint_a_multi_platform_tag",
        ],
        UNIT,
    ),
    mutant(
        "fleet-shares-single-platform-tag",
        "the shared store gets a tag only as what it names, never one platform's manifest",
        Edit("tag = None if route.by_digest or kind is not TagKind.INDEX else", "tag = None if route.by_digest else"),
        ["TestManifestByTag::test_an_accept_without_indexes_cannot_repoint_a_multi_platform_tag"],
        UNIT,
    ),
    mutant(
        "old-tags-unreadable",
        "tags of a store from before tag kinds read as what the tag names",
        Edit('INDEX = "tag"', 'INDEX = "index-tag"'),
        ["test_a_tag_of_a_store_from_before_kinds_reads_as_what_it_names"],
        UNIT,
    ),
    # -- slow clients and hostile bundles cost bounded time, memory and disk (blob server, import)
    mutant(
        "blob-head-unbounded",
        "a blob server client has blob_head_timeout seconds for its TLS handshake and request head, however steadily it trickles them",
        Edit("deadlines.watch(request, self.head_timeout, HEAD)", "deadlines.watch(request, 1e9, HEAD)"),
        ["test_a_head_sent_slowly_is_cut_however_steady"],
        INTEGRATION,
    ),
    mutant(
        "blob-slow-heads-hold-slots",
        "connections still sending their request heads never keep a normal client of the blob server waiting",
        Edit("max_connections = 1024", "max_connections = 256"),
        ["test_slow_clients_leave_a_normal_client_its_blob"],
        INTEGRATION,
    ),
    mutant(
        "blob-slow-reader-unbounded",
        "a blob server client must read each part of its blob at blob_min_rate bytes per second",
        Edit('self._expect(self._write_time(count), f"read {count} bytes at {self.server.min_rate} bytes/s")', 'self._expect(None, "")'),
        ["test_a_reader_slower_than_the_minimum_rate_is_cut"],
        INTEGRATION,
    ),
    mutant(
        "import-free-space-unchecked",
        "hubcache import refuses a bundle whose blobs would not fit in the cache folder's free space, before reading any",
        Edit("if needed + FREE_SPACE_RESERVE > free:", "if False:"),
        ["test_a_bomb_is_refused_before_a_byte_of_it_is_written", "test_a_bundle_that_fits_in_the_free_space_imports"],
        UNIT,
    ),
    mutant(
        "import-member-larger-than-declared",
        "hubcache import refuses, unread, a blob member larger than its descriptor names",
        Edit("if member.size != blob.size:", "if False:"),
        ["test_a_member_larger_than_its_descriptor_is_refused_unread"],
        UNIT,
    ),
    mutant(
        "import-undeclared-member",
        "hubcache import refuses a blob member no manifest of the bundle names",
        Edit("if digest not in named:", "if False:"),
        ["test_a_flood_of_json_blobs_no_manifest_names_is_refused_in_bounded_memory"],
        UNIT,
    ),
    mutant(
        "import-leaves-its-files",
        "a failed import removes every file it wrote",
        Edit("for writer in self.writers.values():", "for writer in []:"),
        ["test_a_corrupt_blob_is_refused_and_nothing_changes", "test_a_flood_of_json_blobs_no_manifest_names_is_refused_in_bounded_memory"],
        UNIT,
    ),
    # -- keep fresh (watch.py)
    mutant(
        "watch-fetches-unchanged",
        "a watched tag whose digest upstream is the cached one costs one HEAD and nothing else",
        Edit("return cached != upstream_digest", "return True"),
        ["test_an_unchanged_tag_costs_one_head_and_fetches_nothing", "test_only_a_moved_or_unknown_tag_is_fetched"],
        UNIT,
    ),
    mutant(
        "watch-asks-while-circuit-open",
        "the watch asks nothing of a registry while its circuit is open",
        Edit("pause_reason(ctx.options.offline, self.circuits.down(host) is not None,", "pause_reason(ctx.options.offline, False,"),
        ["test_nothing_is_asked_while_the_registrys_circuit_is_open"],
        UNIT,
    ),
    mutant(
        "watch-asks-offline",
        "the watch asks nothing of upstream in offline mode",
        Edit('if offline:\n        return "offline"', "if False:\n        return \"offline\""),
        ["test_nothing_is_asked_offline", "test_pauses"],
        UNIT,
    ),
    mutant(
        "watch-fills-a-full-store",
        "the watch fetches nothing while the store is in the last tenth of cache_size_limit",
        Edit("if limit and stored is not None and stored >= limit * (1 - STORE_RESERVE):", "if False:"),
        ["test_nothing_is_asked_while_the_store_is_in_the_last_tenth_of_its_limit", "test_pauses"],
        UNIT,
    ),
    mutant(
        "watch-spends-the-last-pulls",
        "the watch fetches nothing from a registry that says few pulls are left",
        Edit("if left and low(left):", "if False:"),
        ["test_few_pulls_left_leaves_a_moved_tag_for_later_and_says_so_once"],
        UNIT,
    ),
    mutant(
        "watch-every-node-checks",
        "in a fleet with a lock, one node checks each watched entry per interval",
        Edit('return bool(await _in_thread(self.lock.acquire, f"watch:{entry}", ttl))', "return True"),
        ["test_in_a_fleet_one_node_checks_each_entry_per_interval", "test_two_fleet_nodes_check_a_watched_tag_once_between_them"],
        INTEGRATION,
    ),
    mutant(
        "watch-mark-without-secret",
        "only the watch's own pulls, with this process's secret, are counted as the watch's",
        Edit('secrets.compare_digest(claimed.encode("utf-8", "surrogateescape"), self.secret.encode())', "True"),
        ["test_the_watchs_mark_needs_the_secret_and_never_travels"],
        UNIT,
    ),
    mutant(
        "watch-fetches-every-platform",
        "a watch entry's platforms are the only ones fetched",
        Edit("pinned, list(entry.platforms), throttle, referrers=False)", "pinned, [], throttle, referrers=False)"),
        ["test_only_the_listed_platforms_are_fetched"],
        INTEGRATION,
    ),
    mutant(
        "watch-retag-not-pointed",
        "after a watch fetch, the tag points at the new digest: the first pull after a change is a hit",
        Edit("await self.folder.note(store.set_tag, image.registry, image.repository, image.reference, digest)", "pass"),
        ["test_a_retagged_image_is_fetched_before_anyone_asks_and_upstream_sees_heads_only_meanwhile"],
        INTEGRATION,
    ),
    mutant(
        "watch-listed-tag-unchecked",
        "a name upstream lists in tags/list becomes a request only if it is a valid tag",
        Edit("isinstance(t, str) and protocol.TAG_RE.fullmatch(t) and fnmatch", "isinstance(t, str) and fnmatch"),
        ["test_a_listed_name_that_is_no_tag_never_becomes_a_request"],
        UNIT,
    ),
    mutant(
        "watch-rate-uncapped",
        "watch_rate caps the bytes per second of a watch fetch",
        Edit("wait = self._free_at - now - 1.0", "wait = 0.0"),
        ["test_watch_rate_caps_the_bytes_per_second"],
        UNIT,
    ),
    mutant(
        "watch-counts-its-own-pulls",
        "pulls served from content the watch fetched first count clients' tag requests, not the watch's own",
        Edit("if not flow.metadata.get(Mark.ANSWERED) or flow.metadata.get(Mark.WATCH) or", "if not flow.metadata.get(Mark.ANSWERED) or"),
        ["test_a_client_pull_of_a_digest_the_watch_fetched_is_counted_once_per_tag_request"],
        UNIT,
    ),
    # The data path's decisions, error codes and journal outcomes
    mutant(
        "failed-fill-said-unknown",
        "a blob fill upstream failed answers its client 502 UNAVAILABLE, not a claim that the blob does not exist",
        Edit(
            'return RegistryError(ErrorCode.UPSTREAM_FAILED, f"{route.image}: {fill.reason}")',
            'return RegistryError(ErrorCode.BLOB_UNKNOWN, f"{route.image}: {fill.reason}")',
        ),
        ["test_silent_upstream_fails_the_fill"],
        UNIT,
    ),
    mutant(
        "access-refusal-keeps-upstreams-status",
        "upstream refusing a client's access check is a registry error whose status is its code's (a 4xx other than 401 and 404 is 403 DENIED)",
        Edit(
            "codes.get(answer.status_code, ErrorCode.DENIED)",
            "codes.get(answer.status_code, ErrorCode.UNSUPPORTED_REQUEST)",
        ),
        ["test_upstreams_refusal_is_a_registry_error_whose_status_is_its_codes"],
        UNIT,
    ),
    mutant(
        "journal-outcome-as-free-text",
        "a journal line's outcome is one of Outcome's words, its reason a field of its own",
        Edit('"outcome": outcome.value,', '"outcome": f"{outcome.value}: {reason}" if reason else outcome.value,'),
        ["test_a_404_is_remembered_for_the_same_client", "test_silent_upstream_fails_the_fill"],
        UNIT,
    ),
    # cold path
    mutant(
        "fill-queues-the-callers-buffer",
        "a fill takes the bytes handed to its sink before returning: the caller may read into the same buffer again",
        Edit("self._queue.put(bytes(data) if data else _END)", "self._queue.put(data if data else _END)"),
        ["test_on_the_event_loop_the_writer_thread_takes_them_and_the_loop_may_reuse_its_buffer"],
        UNIT,
    ),
    mutant(
        "bounded-answer-keeps-views",
        "an answer other than the blob is kept whole while the fetcher reads into its buffer again",
        Edit("self.parts.append(bytes(data))", "self.parts.append(data)"),
        ["test_a_large_answer_other_than_the_blob_is_read_whole_across_chunks"],
        UNIT,
    ),
    mutant(
        "fill-writes-after-discard",
        "bytes that reach a discarded fill (its fetch thread still running) are dropped, never written",
        Edit("if not self._discarded:", "if True:"),
        ["test_bytes_after_a_discard_go_nowhere"],
        UNIT,
    ),
    # network serving
    mutant(
        "ktls-assumed-on-every-connection",
        "a TLS body goes by sendfile(2) only on a connection whose sending OpenSSL gave the kernel (kTLS); else OpenSSL writes it",
        Edit("sock.getsockopt(SOL_TLS, TLS_TX, 64)", "pass"),
        ["test_a_socket_without_ktls_is_written_by_openssl", "test_the_log_says_how_tls_is_sent"],
        INTEGRATION,
    ),
    mutant(
        "ktls-detected-without-the-kernel",
        "kTLS is asked for and logged only where the kernel offers its tls ULP",
        Edit('offered = "tls" in ulp_file.read_text().split()', 'offered = bool(ulp_file.read_text().split())'),
        ["test_ktls_is_offered_only_by_a_kernel_listing_the_tls_ulp", "test_the_log_says_how_tls_is_sent"],
        INTEGRATION,
    ),
    mutant(
        "ktls-never-asked-for",
        "where the kernel offers kTLS, OpenSSL is asked to use it",
        Edit("context.options |= ssl.OP_ENABLE_KTLS", "context.options |= 0"),
        ["test_the_context_asks_for_ktls_only_where_offered_and_hands_out_session_tickets"],
        UNIT,
    ),
    mutant(
        "tls-sessions-not-resumable",
        "the blob server hands out TLS 1.3 session tickets, so a client's next connection resumes",
        Edit("context.num_tickets = TICKETS", "context.num_tickets = 0"),
        ["test_the_context_asks_for_ktls_only_where_offered_and_hands_out_session_tickets", "test_a_client_resumes_its_tls_session"],
        INTEGRATION,
    ),
    mutant(
        "tls-server-cipher-order",
        "the blob server takes the client's cipher order (AES-128-GCM for a Go client on AES hardware), not OpenSSL's AES-256 first",
        Edit("context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE", "context.options &= ~0"),
        ["test_the_client_chooses_the_cipher"],
        UNIT,
    ),
    mutant(
        "direct-blob-url-refused-through-the-proxy",
        "a client that sends a blob_listen URL through the proxy (no NO_PROXY) is relayed to it",
        Edit("if name == BLOB_HOST or self.blobs.is_direct(name, port) or", "if name == BLOB_HOST or"),
        ["test_the_blob_servers_listener_for_other_machines_is_reachable_alone",
         "test_blob_urls_on_an_address_of_this_machine_still_serve_clients_through_the_proxy"],
        INTEGRATION,
    ),
    mutant(
        "direct-blob-url-opens-the-whole-address",
        "only the blob_listen port of that address is relayed; the address's other ports stay refused",
        Edit("return self.direct is not None and port == self.direct[1] and", "return self.direct is not None and"),
        ["test_the_blob_servers_listener_for_other_machines_is_reachable_alone",
         "test_blob_urls_on_an_address_of_this_machine_still_serve_clients_through_the_proxy"],
        INTEGRATION,
    ),
    mutant(
        "direct-blob-url-unsigned",
        "the blob_listen listener serves only URLs the proxy signed",
        Edit("and hmac.compare_digest(", "and (lambda *_: True)("),
        ["test_a_listener_on_an_address_of_this_machine_serves_signed_urls_only",
         "test_blob_urls_on_an_address_of_this_machine_still_serve_clients_through_the_proxy"],
        INTEGRATION,
    ),
    mutant(
        "no-proxy-not-printed",
        "hubcache setup names the blob server's address in NO_PROXY, so clients fetch blobs directly",
        Edit('no_proxy = direct[0] if direct else ""', 'no_proxy = ""'),
        ["test_setup_names_the_blob_servers_address_in_no_proxy"],
        UNIT,
    ),
    mutant(
        "blob-listen-off-by-default-on-a-network-address",
        "a proxy listening on one address beyond loopback sends blobs from that address, off mitmproxy's path",
        Edit("return host, 0", "return None"),
        ["test_direct_listen", "test_setup_names_the_blob_servers_address_in_no_proxy"],
        UNIT,
    ),
    # -- mitmproxy internals (mitm/internals.py): the hooks a fill runs, its body's sink, explicit wiring
    mutant(
        "fetch-hooks-out-of-order",
        "a fill's request runs mitmproxy's hooks in the order its core runs them (requestheaders before request)",
        Edit(
            "await self._run(http_layer.HttpRequestHeadersHook(self.flow))\nawait self._run(http_layer.HttpRequestHook(self.flow))",
            "await self._run(http_layer.HttpRequestHook(self.flow))\nawait self._run(http_layer.HttpRequestHeadersHook(self.flow))",
        ),
        ["test_a_fill_runs_the_hooks_mitmproxy_runs_for_a_request_in_its_order", "test_the_body_arrives_off_the_event_loop_with_every_hook_in_order"],
        UNIT,
    ),
    mutant(
        "fetch-skips-http-connect-upstream",
        "a fill through an upstream proxy runs http_connect_upstream (upstream_auth, upstream_map), as mitmproxy's core does",
        Edit("await self._run(HttpConnectUpstreamHook(connect))", "pass"),
        ["test_so_it_does_through_an_upstream_proxy", "test_an_upstream_proxy_carries_it_with_its_credentials_to_the_mapped_address"],
        UNIT,
    ),
    mutant(
        "fetch-ignores-the-fills-sink",
        "the fetcher hands a fill's body to the sink it was given, not to whatever stream an addon set",
        Edit("if self.sink:\n    internals.take(flow, self.sink)", "pass"),
        ["test_a_sink_passed_in_takes_the_body_once_the_hooks_ran"],
        UNIT,
    ),
    mutant(
        "replay-ignores-its-sink",
        "a request through mitmproxy's core hands its body to its sink too",
        Edit("if self.sink and isinstance(hook, http_layer.HttpResponseHeadersHook):", "if False:"),
        ["test_a_replay_hands_the_body_to_its_sink"],
        UNIT,
    ),
    mutant(
        "token-realm-tables-apart",
        "the mirror and the account credentials read one token-realm table",
        Edit("UpstreamCredentials(interception, realms),", "UpstreamCredentials(interception, TokenRealms()),"),
        ["test_the_mirror_and_the_credentials_share_one_token_realm_table"],
        UNIT,
    ),
    mutant(
        "mirror-listener-not-handed-to-interception",
        "Interception tells the mirror's clients by the listener the mirror sets, handed to both by make_addons",
        Edit("interception = Interception(listener)", "interception = Interception()"),
        ["test_the_mirrors_listener_is_the_one_interception_and_the_blob_host_read"],
        UNIT,
    ),
    mutant(
        "own-requests-skip-the-breaker",
        "hubcache's own requests ask the circuit breaker make_addons hands their Upstream",
        Edit("out.circuits = circuits", "pass"),
        ["test_hubcaches_own_requests_ask_the_breaker_that_probes_through_them"],
        UNIT,
    ),
    # store scale
    mutant(
        "store-scale-tag-count-drifts",
        "the kept counts follow every change: a dropped tag is no longer counted",
        Edit("    UPDATE hc_count SET value = value - 1 WHERE name = 'tags';\n", ""),
        ["test_the_counts_follow_every_change"],
        UNIT,
    ),
    mutant(
        "store-scale-vanished-blob-still-counted",
        "a blob whose file vanished is forgotten by the counts as well as by the index",
        Edit("                    self.delete_blob(digest)\n", "                    self._cache.delete((\"blob\", digest))\n"),
        ["TestBlobs::test_open_blob_whose_file_vanished_is_a_miss"],
        UNIT,
    ),
    mutant(
        "store-scale-older-store-unindexed",
        "a store written before the indexes were kept is indexed when first opened",
        Edit(
            'rows = sql("SELECT key, raw, size, mode, filename, value FROM Cache")',
            'rows = sql("SELECT key, raw, size, mode, filename, value FROM Cache WHERE 0")',
        ),
        ["test_an_older_store_is_indexed_once_when_first_opened"],
        UNIT,
    ),
    mutant(
        "store-scale-indexed-on-every-open",
        "an older store is indexed once, not on every open",
        [Edit("if index.indexed(self._cache._sql):", "if False:"), Edit("if index.indexed(change.sql):", "if False:")],
        ["test_an_older_store_is_indexed_once_when_first_opened"],
        UNIT,
    ),
    mutant(
        "store-scale-next-page-repeats",
        "a page of tags starts after the last one shown",
        Edit('query += " AND (registry, repository, tag) > (?, ?, ?)"', 'query += " AND (registry, repository, tag) >= (?, ?, ?)"'),
        ["test_a_page_of_tags_starts_after_the_last_one_shown", "test_ls_lists_a_page_and_says_how_to_list_the_next"],
        UNIT,
    ),
    mutant(
        "store-scale-eviction-not-atomic",
        "a blob, the manifests naming it and the tags leading to them go in one transaction",
        Edit("with _as_os_error(), self._cache.transact(retry=wait):", "with _as_os_error():"),
        ["test_an_eviction_stopped_midway_changes_nothing"],
        UNIT,
    ),
    mutant(
        "store-scale-eviction-leaves-referrers",
        "no manifest or tag names an evicted blob after any slice of a pass",
        Edit("evicted = self._drop_manifests(change, index.users(change.sql, blob.digest, blob=True), keep)", "evicted = Evicted()"),
        ["test_every_slice_of_a_pass_leaves_no_manifest_naming_an_evicted_blob", "test_prune_keeps_the_tag_index_consistent"],
        UNIT,
    ),
    mutant(
        "store-scale-killed-pass-leaves-referrers",
        "a proxy killed in the middle of an eviction pass leaves every tag whole (it pulls offline) or gone",
        Edit("evicted = self._drop_manifests(change, index.users(change.sql, blob.digest, blob=True), keep)", "evicted = Evicted()"),
        ["test_a_proxy_killed_mid_pass_leaves_every_tag_whole_or_gone"],
        INTEGRATION,
    ),
    mutant(
        "store-scale-evicts-a-blob-just-read",
        "a blob read after an eviction pass chose it is spared",
        Edit(
            "FROM Cache WHERE rowid = ? AND access_time <= ?\", (blob.row, blob.used))",
            "FROM Cache WHERE rowid = ? AND ? > 0\", (blob.row, blob.used))",
        ),
        ["test_a_blob_read_after_the_pass_chose_it_is_spared"],
        UNIT,
    ),
    mutant(
        "store-scale-pass-walks-the-whole-store",
        "an eviction pass reads the least-recently-used order only as far as it evicts",
        Edit("            return  # nothing later is expired either, and the total is under the limit", "            continue"),
        ["test_a_pass_reads_the_store_only_as_far_as_it_evicts"],
        UNIT,
    ),
    mutant(
        "store-scale-eviction-on-the-event-loop",
        "the proxy's eviction runs in worker threads, never on the event loop",
        Edit("await loop.run_in_executor(self._thread, evicting.step)", "evicting.step()"),
        ["test_the_addon_evicts_off_the_event_loop_a_slice_at_a_time"],
        UNIT,
    ),
    mutant(
        "store-scale-slice-unbounded",
        "an eviction pass goes a bounded slice at a time",
        Edit("for _ in range(SLICE_BLOBS):", "while True:"),
        ["test_the_addon_evicts_off_the_event_loop_a_slice_at_a_time"],
        UNIT,
    ),
    mutant(
        "store-scale-import-names-everything",
        "hubcache import names the first few images unless --verbose",
        Edit("shown = summary.images if verbose else summary.images[:SHOWN]", "shown = summary.images"),
        ["test_import_names_the_first_few_images_and_verbose_all"],
        UNIT,
    ),
    mutant(
        "store-scale-prefetch-hides-failures",
        "hubcache prefetch shows every failed image, also past the first few",
        Edit("if i < SHOWN or r.error]", "if i < SHOWN]"),
        ["test_prefetch_shows_the_first_few_images_every_failure_and_a_summary"],
        UNIT,
    ),
    # Network listeners: attacks (the blob server's listeners, the status listener, the mirror)
    mutant(
        "listeners-head-unbounded",
        "the blob server and the status listener read a request head up to 16 KiB, and refuse a larger one with 431",
        Edit("self.rfile = _HeadReader(reader, MAX_HEAD - len(self.raw_requestline))  # type: ignore[assignment]", "self.rfile = reader"),
        [
            "test_a_huge_head_is_refused_after_reading_a_bounded_part_of_it",
            "test_what_http_server_refuses_itself_is_a_registry_error[huge-header]",
            "test_a_huge_head_is_refused_and_a_normal_one_answered",
        ],
        UNIT,
    ),
    mutant(
        "blob-url-numbers-by-isdigit",
        "a blob URL's expires and size are ASCII digits, checked before int() reads them: never a dropped connection",
        Edit(
            'if any(decimal(fields.get(name, "0")) is None for name in ("expires", "size")):',
            'if not all(fields.get(name, "0").isdigit() for name in ("expires", "size")):',
        ),
        [
            "test_a_mangled_url_is_refused_with_a_registry_error[expires-superscript]",
            "test_a_mangled_url_is_refused_with_a_registry_error[expires-5000-digits]",
        ],
        UNIT,
    ),
    mutant(
        "blob-url-duplicate-fields",
        "a blob URL names each field once: a second tag or signature is refused",
        Edit("if len(fields) != len(pairs) or not fields.keys() <= set(_QUERY):", "if not fields.keys() <= set(_QUERY):"),
        [
            "test_a_mangled_url_is_refused_with_a_registry_error[a-second-tag-first]",
            "test_a_mangled_url_is_refused_with_a_registry_error[a-second-signature-first]",
        ],
        UNIT,
    ),
    mutant(
        "blob-request-body-read-as-next-request",
        "a GET or HEAD of a blob with a body is refused and its connection closed: the body is never answered as a request",
        Edit('if "Transfer-Encoding" in headers or set(headers.get_all("Content-Length", ["0"])) != {"0"}:', "if False:"),
        [
            "test_a_body_that_hides_a_second_request_is_refused_and_the_connection_closed[GET-content-length]",
            "test_a_body_that_hides_a_second_request_is_refused_and_the_connection_closed[HEAD-chunked]",
            "test_a_connection_kept_open_agrees_with_mitmproxys_reader_on_where_the_request_ends",
        ],
        UNIT,
    ),
    mutant(
        "blob-request-malformed-head-kept",
        "a blob request whose head has a line that is no header, or a folded one, is refused and its connection closed",
        Edit('if headers.defects or headers.get_payload() or any("\\n" in value for value in headers.values()):', "if False:"),
        [
            "test_a_body_that_hides_a_second_request_is_refused_and_the_connection_closed[GET-space-before-colon]",
            "test_a_body_that_hides_a_second_request_is_refused_and_the_connection_closed[GET-obs-fold]",
            "test_a_body_that_hides_a_second_request_is_refused_and_the_connection_closed[HEAD-vertical-tab]",
        ],
        UNIT,
    ),
    mutant(
        "blob-server-refusals-in-html",
        "what http.server refuses itself (another method, HTTP/2, a malformed head) is a registry error",
        Edit("def send_error(self, code: int,", "def _send_error(self, code: int,"),
        [
            "test_what_http_server_refuses_itself_is_a_registry_error[post]",
            "test_what_http_server_refuses_itself_is_a_registry_error[http2-preface]",
        ],
        UNIT,
    ),
    mutant(
        "range-digits-unbounded",
        "a Range of more digits than int() reads is RANGE_INVALID, never a dropped connection",
        Edit('_RANGE_RE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")', '_RANGE_RE = re.compile(r"bytes=(\\d*)-(\\d*)")'),
        [
            "test_an_invalid_range_gets_a_registry_error[first-5000-digits]",
            "test_an_invalid_range_gets_a_registry_error[suffix-5000-digits]",
        ],
        UNIT,
    ),
    mutant(
        "blob-fill-name-unchecked",
        "the blob server opens only a fill's own name in the store's tmp folder, even for a signed URL",
        Edit("if blob is None and fill and _FILL_NAME.fullmatch(fill):", "if blob is None and fill:"),
        ["test_a_fill_name_that_leaves_the_tmp_folder_is_never_opened"],
        UNIT,
    ),
    mutant(
        "status-listener-no-head-deadline",
        "the status listener gives a client a bounded time for its request head, however slowly it sends it",
        Edit("head_timeout = 10.0  # seconds for a request head, however slowly it trickles in", "head_timeout = None"),
        ["test_heads_never_finished_do_not_keep_the_page_from_its_reader"],
        UNIT,
    ),
    mutant(
        "mirror-token-port-by-isdigit",
        "a mirror token path's port is ASCII digits: anything else is a registry error, never an exception",
        Edit(
            'port = 443 if not colon else int(port_text) if re.fullmatch(r"[0-9]{1,5}", port_text) else 0',
            "port = int(port_text) if port_text.isdigit() else 443",
        ),
        [
            "TestTokens::test_no_other_realm_is_relayed_to[port-superscript]",
            "TestTokens::test_no_other_realm_is_relayed_to[port-5000-digits]",
        ],
        UNIT,
    ),
    # Store scale: import
    mutant(
        "import-members-unbounded",
        "a bundle of more than MAX_MEMBERS members is refused before any member is read",
        Edit("if count > MAX_MEMBERS:", "if count > MAX_MEMBERS * 1000:"),
        ["test_a_bundle_of_more_members_than_the_bound_is_refused_unread"],
        UNIT,
    ),
    mutant(
        "import-commit-outside-transactions",
        "import stores whole images per transaction: a failure midway keeps nothing of a half-stored image",
        Edit("with self.store.batch():\n            for image in images:", "if True:\n    for image in images:"),
        ["test_a_commit_that_fails_midway_leaves_whole_images_only"],
        UNIT,
    ),
    # Warm network path: the remembered /v2/ check
    mutant(
        "ping-memory-answers-credentials",
        "a /v2/ check with credentials (docker login) always goes upstream, and its answer is never given to another client",
        Edit('return "authorization" not in request.headers', "return True"),
        ["test_a_check_with_credentials_is_neither_kept_nor_answered", "test_a_check_with_credentials_always_reaches_upstream",
         "test_an_answer_to_credentials_is_never_given_to_another_client"],
        UNIT,
    ),
    mutant(
        "ping-memory-never-forgets",
        "an anonymous /v2/ answer is given again for MEMORY seconds only, then upstream is asked again",
        Edit("return answer if self._clock() - learned < MEMORY else None", "return answer"),
        ["test_an_anonymous_answer_is_given_again_for_a_while"],
        UNIT,
    ),
    mutant(
        "ping-memory-keeps-cookies-and-every-header",
        "a remembered /v2/ answer carries only what a version check says: no cookie or other header of the one client it came to",
        [Edit('            or "set-cookie" in response.headers\n', ""),
         Edit("headers = {name: value for name in KEPT_HEADERS if (value := response.headers.get(name)) is not None}",
              "headers = dict(response.headers)")],
        ["test_only_the_version_checks_headers_travel", "test_answers_anyone_else_may_not_be_given_are_not_kept"],
        UNIT,
    ),
    mutant(
        "ping-memory-unused",
        "a warm pull's anonymous /v2/ check is answered without a round trip upstream when upstream answered one moments ago",
        Edit("if recent := self.pings.answer(flow.request):", "if recent := None:"),
        ["test_an_anonymous_check_is_answered_again_without_upstream",
         "test_a_pull_checks_the_version_upstream_once_and_a_login_every_time"],
        INTEGRATION,
    ),
    # Store scale: memory and the event loop
    mutant(
        "store-scale-sqlite-maps-the-database",
        "SQLite maps none of the store's database, in every thread's connection (each map's pages count in RSS once per map)",
        Edit("sqlite_mmap_size=MMAP_BYTES,", ""),
        ["test_every_connection_maps_none_of_the_database_and_caches_a_few_pages"],
        UNIT,
    ),
    mutant(
        "store-scale-sqlite-cache-unbounded",
        "SQLite caches at most CACHE_PAGES pages of the store per connection",
        Edit("sqlite_cache_size=CACHE_PAGES,", ""),
        ["test_every_connection_maps_none_of_the_database_and_caches_a_few_pages"],
        UNIT,
    ),
    mutant(
        "store-scale-upkeep-in-asyncio-workers",
        "every slice of every eviction pass runs in the one upkeep thread",
        Edit("await loop.run_in_executor(self._thread, evicting.step)", "await asyncio.to_thread(evicting.step)"),
        ["test_the_addon_evicts_in_one_upkeep_thread_of_its_own"],
        UNIT,
    ),
    mutant(
        "loop-lag-counts-the-sleep",
        "the probe's lag is how late its timer ran, not the time it slept",
        Edit("due = self._clock() + PROBE", "due = self._clock()"),
        ["test_the_probe_notes_how_late_its_timer_ran"],
        UNIT,
    ),
    mutant(
        "loop-lag-longest-not-kept",
        "the metrics keep the longest event loop lag since start",
        Edit("if seconds > self.longest_lag:", "if seconds:"),
        ["test_the_longest_lag_is_kept_and_lags_over_50_ms_are_counted"],
        UNIT,
    ),
    mutant(
        "loop-lag-stalls-miscounted",
        "the status page counts the lags over 50 ms, no shorter ones",
        Edit('float(sample.labels["le"]) == STALL', 'float(sample.labels["le"]) == 0.025'),
        ["test_the_longest_lag_is_kept_and_lags_over_50_ms_are_counted", "test_the_status_shows_the_event_loop_lag"],
        UNIT,
    ),
    mutant(
        "loop-lag-not-running",
        "a running proxy probes its event loop's lag",
        Edit("LoopLag(metrics),", ""),
        ["test_metrics_count_hits_misses_bytes_and_the_rate_limit"],
        INTEGRATION,
    ),
    mutant(
        "store-scale-indexing-silent",
        "indexing an older store shows its progress, a line at every tenth of its entries",
        Edit("if walked and walked % step == 0:", "if walked < 0:"),
        ["test_an_older_store_is_indexed_once_when_first_opened"],
        UNIT,
    ),
    # Listener worker threads: reused across connections, ended when idle
    mutant(
        "listeners-thread-per-connection",
        "connections one after another reuse a waiting worker thread, not a new one each",
        Edit("if not self._idle.acquire(blocking=False):", "if True:"),
        ["test_connections_one_after_another_are_served_by_one_reused_thread"],
        UNIT,
    ),
    mutant(
        "listeners-idle-workers-stay",
        "a worker thread that waited WORKER_IDLE seconds for a connection ends",
        Edit(
            "if self._idle.acquire(blocking=False):\n                    return",
            "if self._idle.acquire(blocking=False):\n                    continue",
        ),
        ["test_a_worker_without_connections_ends"],
        UNIT,
    ),
    mutant(
        "blob-tls-write-outlasts-idle",
        "a blob server TLS client that stops reading is cut within client_idle_timeout, though its writes block",
        Edit("return max(RECORD, min(BUFFER, int((idle - GRACE) * self.server.min_rate)))", "return BUFFER"),
        ["test_a_tls_reader_that_stops_is_cut_within_the_idle_timeout"],
        INTEGRATION,
    ),
    # The CA made on first start, and hubcache's addons in mitmproxy's chain
    mutant(
        "ca-rsa-on-first-start",
        "a confdir without a CA gets an EC P-256 one (a cheaper signature per handshake)",
        Edit('if key_size is None and not (confdir / f"{BASENAME}-ca.pem").exists():', "if False:"),
        ["test_a_new_confdir_gets_an_ec_ca_that_mitmproxy_loads_and_signs_with"],
        UNIT,
    ),
    mutant(
        "ca-existing-replaced",
        "a confdir that has a CA keeps it: clients trust it",
        Edit('if key_size is None and not (confdir / f"{BASENAME}-ca.pem").exists():', "if key_size is None:"),
        ["test_a_confdir_that_has_a_ca_keeps_it"],
        UNIT,
    ),
    mutant(
        "ca-key-size-ignored",
        "an operator's key_size asks mitmproxy for its RSA CA of that size",
        Edit("return decimal(sizes[-1]) if sizes else None", "return None"),
        ["test_the_key_size_is_read_from_the_settings"],
        UNIT,
    ),
    mutant(
        "run-addons-flat",
        "hubcache run adds its addons to mitmproxy's chain as one (each addon of the chain costs every event)",
        Edit("self.addons.add(Hubcache())", "self.addons.add(*Hubcache().addons)"),
        ["test_hubcache_run_adds_its_addons_to_mitmproxys_chain_as_one"],
        UNIT,
    ),
    # One client address's share of a listener's connections and of the blob server's transfers
    mutant(
        "listeners-one-address-takes-every-connection",
        "a client address holds its share of a listener's connections at most; its next one is closed at once",
        Edit("if not self._per_address.take(client_address[0], wait=False):", "if False:"),
        ["test_one_address_holds_its_share_of_the_connections_and_no_more"],
        UNIT,
    ),
    mutant(
        "listeners-address-share-never-freed",
        "a client address whose connections ended has its share again",
        Edit("self._held[address] -= 1", "self._held[address] -= 0"),
        ["test_one_address_holds_its_share_of_the_connections_and_no_more"],
        UNIT,
    ),
    mutant(
        "blob-one-address-takes-every-transfer",
        "a client address holds its share of the blob server's transfers; its further ones wait for its own",
        Edit("self._transfer_share.take(address, wait=True)", "True"),
        ["test_one_address_holds_its_share_of_the_transfers_and_the_others_are_served"],
        UNIT,
    ),
    mutant(
        "blob-network-listener-shares-nothing",
        "the blob server's network listener gives one client address a quarter of its connections",
        Edit("    max_per_address = _PlainServer.max_connections // 4\n", ""),
        ["test_one_client_address_cannot_take_every_connection_of_the_network_blob_listener"],
        INTEGRATION,
    ),
    mutant(
        "ca-command-ignores-the-config-file",
        "hubcache ca and setup make the CA that hubcache run with the same config file would",
        Edit("return make_ca(confdir, key_size(config_settings(config_file)))", "return make_ca(confdir)"),
        ["test_ca_and_setup_make_the_ca_the_config_file_asks_for"],
        UNIT,
    ),
    mutant(
        "status-network-listener-shares-nothing",
        "the status listener on an address beyond loopback gives one client address a quarter of its connections",
        Edit("server_class = _Server if address[0] in LOOPBACK_HOSTS else _NetworkServer", "server_class = _Server"),
        ["test_on_a_network_address_one_client_holds_a_quarter_of_the_connections"],
        UNIT,
    ),
    # One client's share of the proxy's connections
    mutant(
        "proxy-one-client-takes-every-connection",
        "a client beyond this machine holds client_connections of the proxy's connections; its next one is closed",
        Edit("if not self._share.take(who, wait=False):", "if False:"),
        ["test_a_client_holds_its_share_and_its_next_connection_is_closed"],
        UNIT,
    ),
    mutant(
        "proxy-one-client-takes-every-connection-real",
        "a client beyond this machine holds client_connections of the real proxy's connections; the others pull meanwhile",
        Edit("if not self._share.take(who, wait=False):", "if False:"),
        ["test_one_client_cannot_take_every_connection_of_the_proxy"],
        INTEGRATION,
    ),
    mutant(
        "proxy-client-share-never-freed",
        "a client whose connections to the proxy ended has its share again",
        Edit("if (who := self._holding.pop(client.id, None)) is not None:\n    self._share.give_back(who)", "pass"),
        ["test_a_client_holds_its_share_and_its_next_connection_is_closed"],
        UNIT,
    ),
    mutant(
        "ipv6-client-per-address",
        "an IPv6 client is its /64, on the proxy port and the blob server's listeners: another address of it shares the same share",
        Edit("return str(ipaddress.IPv6Network((ip, 64), strict=False))", "return str(ip)"),
        ["test_an_ipv6_client_is_its_slash_64_and_this_machine_has_no_share", "test_a_share_counts_an_ipv6_clients_slash_64_as_one_client"],
        UNIT,
    ),
    mutant(
        "proxy-open-files-not-raised",
        "the proxy raises its limit of open files far beyond one client's share",
        Edit("allow_files(FILES)", "pass"),
        ["test_the_proxy_may_open_files_far_beyond_one_clients_share"],
        UNIT,
    ),
    mutant(
        "fetcher-waits-with-select",
        "a fill waits for upstream on a socket of any number (select(2) refuses numbers past 1023)",
        Edit(
            "if not waiting.poll(max(0.0, deadline - time.monotonic()) * 1000):",
            "if not select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:",
        ),
        ["test_a_fill_waits_for_upstream_on_a_socket_numbered_above_1023"],
        UNIT,
    ),
    mutant(
        "store-serves-a-blob-of-another-size",
        "a blob whose file no longer has the size it verified at is never handed out: dropped, a miss",
        Edit("if verified is None or size == verified:", "if True:"),
        [
            "test_a_blob_whose_file_changed_size_is_a_miss_dropped_with_what_names_it",
            "test_a_cached_blob_cut_short_on_disk_is_fetched_again_not_served",
        ],
        INTEGRATION,
    ),
    mutant(
        "store-serves-a-changed-manifest",
        "a manifest whose bytes no longer hash to its digest is never handed out: dropped, a miss",
        Edit('if manifest is not None and digest_of(manifest.body, digest.partition(":")[0]) != digest:', "if False:"),
        ["test_a_manifest_changed_on_disk_is_a_miss_dropped_with_its_tag"],
        UNIT,
    ),
    mutant(
        "verify-reads-through-the-checks",
        "verify reports every blob that did not hash to its digest, a cut-short one too",
        Edit("blob = store.open_stored_blob(entry.digest)", "blob = store.open_blob(entry.digest)"),
        ["test_verify_drops_a_blob_cut_short"],
        UNIT,
    ),
    mutant(
        "proxy-redirects-to-a-blob-of-another-size",
        "the proxy sends a client to a cached blob only if its file is whole; else it fills it again",
        Edit(
            "found = await asyncio.to_thread(store.blob_to_answer, digest, inline_max)\n        if found is None:\n            return None",
            "found = (1 << 40, None)  # the index alone decides\nif not await asyncio.to_thread(store.has_blob, digest):\n    return None",
        ),
        ["test_a_cached_blob_cut_short_on_disk_is_fetched_again_not_served"],
        INTEGRATION,
    ),
    mutant(
        "proxy-answers-a-small-blob-unhashed",
        "a small blob the proxy answers itself is hashed again first: changed bytes are dropped, never sent",
        Edit('if digest_of(body, digest.partition(":")[0]) == digest:', "if True:"),
        ["TestSmallBlobHit::test_one_whose_bytes_changed_on_disk_is_dropped_and_fetched_again"],
        UNIT,
    ),
    mutant(
        "proxy-answers-a-small-blob-unchecked",
        "a small blob of a private repository goes only to a client upstream lets have it",
        Edit(
            "if refused := await self.access.refusal(flow, route, digest, store):\n            return refused  # what was read",
            "if False:\n    return None  # what was read",
        ),
        ["TestSmallBlobHit::test_of_a_private_repository_only_a_client_upstream_lets_have_it_gets_its_bytes"],
        UNIT,
    ),
    mutant(
        "proxy-answers-a-small-blobs-range-whole",
        "a Range request for a small blob goes to the blob server, which answers the range",
        Edit('-1 if "range" in flow.request.headers else ctx.options.blob_inline_max', "ctx.options.blob_inline_max"),
        ["TestSmallBlobHit::test_a_range_is_sent_to_the_blob_server"],
        UNIT,
    ),
    mutant(
        "negative-cache-shared-between-accepts",
        "upstream's 404 for a manifest is remembered per Accept: a client that takes an index is not told another's 404",
        Edit('accept = "" if route.kind is Kind.BLOB else protocol.accept_key(flow.request.headers.get_all("accept"))', 'accept = ""'),
        ["test_a_manifest_404_is_remembered_per_accept"],
        UNIT,
    ),
    mutant(
        "blob-url-non-ascii-signature",
        "a non-ASCII signature in a blob URL gets 403 DENIED, not a dropped connection",
        Edit('if not fields.get("signature", "").isascii():', "if False:"),
        ["test_a_mangled_url_is_refused_with_a_registry_error[signature-non-ascii]"],
        UNIT,
    ),
    mutant(
        "listener-spins-out-of-files",
        "a listener out of file descriptors pauses its accepting instead of spinning on the pending connection",
        Edit("                time.sleep(FILES_PAUSE)\n", ""),
        ["test_out_of_file_descriptors_a_listener_pauses_and_says_so_once"],
        UNIT,
    ),
    mutant(
        "blob-refusal-reset-before-read",
        "a client refused while still sending (a huge head, a body) gets its answer, not a reset that destroys it",
        Edit("        if self._refused:\n            linger(self.connection)\n", ""),
        ["test_a_refused_tls_client_still_sending_gets_its_answer"],
        UNIT,
    ),
    mutant(
        "blob-serves-http-0.9",
        "an HTTP/0.9 request gets a registry error, never a blob's bytes without a status line",
        Edit('if parsed and self.request_version == "HTTP/0.9":', "if False:"),
        ["test_what_http_server_refuses_itself_is_a_registry_error[http-0.9-signed]"],
        UNIT,
    ),
    mutant(
        "json-nested-too-deeply-uncaught",
        "JSON nested deeper than the parser goes is malformed JSON to every parse: never an exception nothing catches",
        Edit("except RecursionError:", "except ZeroDivisionError:"),
        ["test_json_nested_too_deeply_is_malformed_json"],
        UNIT,
    ),
    mutant(
        "redirect-to-no-url-uncaught",
        "a redirect to something that is no URL fails the fill with one line and a registry error",
        Edit('raise Unfollowable(f"upstream redirected {request.path[:200]} to {location[:200]!r}, which is no URL to follow") from None', "raise"),
        ["test_a_redirect_to_no_url_fails_the_fill_with_one_line", "test_a_redirect_to_no_url_is_refused"],
        UNIT,
    ),
    mutant(
        "bundle-annotations-unchecked",
        "a bundle entry whose annotations are not an object of strings is refused in one line",
        Edit("if not isinstance(annotations, dict) or not all(isinstance(value, str) for value in annotations.values()):", "if False:"),
        ["test_an_entry_whose_annotations_are_not_strings_is_refused_in_one_line"],
        UNIT,
    ),
    mutant(
        "visibility-probed-with-any-digest",
        "a repository's visibility is re-checked with what it is known to hold: no client's digest can make it private for everyone",
        Edit("if known and public is True and time.time() - (checked or 0) >= ctx.options.visibility_check_seconds:",
             "if public is True and time.time() - (checked or 0) >= ctx.options.visibility_check_seconds:"),
        ["test_a_digest_the_repository_does_not_hold_never_makes_it_private"],
        UNIT,
    ),
    mutant(
        "anonymous-redirect-read-as-private",
        "an anonymous check answered by a redirect to the blob host lets the client pull: the repository stays public",
        Edit("return status == 200 or status in protocol.REDIRECTS", "return status == 200"),
        ["test_an_anonymous_redirect_to_the_blob_host_keeps_a_repository_public"],
        UNIT,
    ),
    mutant(
        "proxy-reads-endless-heads",
        "the proxy port refuses a request head (a CONNECT's, a registry request's) over MAX_HEAD instead of buffering it without end",
        Edit("server.__class__ = _Http1Server\n                server.state = server.read_headers", "pass"),
        ["test_an_endless_connect_head_is_refused", "test_an_endless_registry_request_head_is_refused_and_a_large_one_is_read"],
        INTEGRATION,
    ),
    mutant(
        "proxy-answers-a-blob-above-the-limit",
        "blob_inline_max is the largest blob the proxy answers itself",
        Edit("if size > inline_max:", "if size > inline_max + 1:"),
        ["TestSmallBlobHit::test_the_limit_is_the_largest_blob_answered_inline"],
        UNIT,
    ),
    mutant(
        "proxy-leaves-cancelled-connections-open",
        "a connection mitmproxy cancels while its reader waits for the event lock is closed, not left open and unread",
        Edit("if io is not None and io.handler is asyncio.current_task():", "if False:"),
        ["test_a_connection_closed_while_its_reader_waits_for_the_event_lock_is_closed"],
        UNIT,
    ),
    mutant(
        "hooks-fail-open",
        "every deciding hook of hubcache's addons fails closed",
        Edit("return fail_closed(addons)", "return addons"),
        ["test_every_deciding_hook_of_hubcache_fails_closed"],
        UNIT,
    ),
    mutant(
        "failed-hook-passes-the-request",
        "a request a hook fails on is answered 500, not passed on",
        Edit('answers.error(subject, protocol.ErrorCode.INTERNAL, "hubcache failed on this request")', "pass"),
        ["test_a_request_a_hook_fails_on_is_answered_500_and_goes_nowhere"],
        UNIT,
    ),
    mutant(
        "failed-hook-connects",
        "a server connection a hook fails on is refused",
        Edit('subject.server.error = f"hubcache: {where} failed"', "pass"),
        ["test_a_server_connection_a_hook_fails_on_is_refused"],
        UNIT,
    ),
    mutant(
        "fill-room-never-rechecked",
        "a fill looks at the room left as its bytes come, not only at upstream's Content-Length",
        Edit("self.writer.keep_free(FREE_SPACE_RESERVE)", "pass"),
        ["test_a_fill_stops_keeping_bytes_once_the_folder_is_down_to_its_reserve"],
        UNIT,
    ),
    mutant(
        "fill-keeps-below-the-reserve",
        "a fill stops keeping bytes once the cache folder is down to its reserve",
        Edit("if free < reserve:", "if free < 0:"),
        ["test_a_fill_stops_keeping_bytes_once_the_folder_is_down_to_its_reserve"],
        UNIT,
    ),
    mutant(
        "proxy-head-errors-in-html",
        "a request head mitmproxy cannot read gets the registry's JSON error, not mitmproxy's page",
        Edit("if isinstance(command, commands.SendData):  # mitmproxy's page", "if False:  # mitmproxy's page"),
        [
            "test_a_head_mitmproxy_cannot_read_is_answered_with_a_registry_error[no request line]",
            "test_a_head_mitmproxy_cannot_read_is_answered_with_a_registry_error[a content-length that is no number]",
        ],
        INTEGRATION,
    ),
    mutant(
        "proxy-request-errors-in-html",
        "an error mitmproxy answers for a request (upstream unreachable) is the registry's JSON error",
        Edit("if isinstance(event, http_layer.ResponseProtocolError) and isinstance(command, commands.SendData):", "if False:"),
        [
            "test_a_request_passed_to_an_upstream_that_cannot_be_reached_gets_a_registry_error",
            "test_a_head_mitmproxy_cannot_read_is_answered_with_a_registry_error[both transfer-encoding and content-length]",
        ],
        INTEGRATION,
    ),
    mutant(
        "intercepted-tls-relays-raw-bytes",
        "inside TLS hubcache intercepted, what is not HTTP is refused, never relayed raw to the registry",
        Edit("        internals.http_after_interception(nextlayer)\n", ""),
        ["test_a_head_mitmproxy_cannot_read_is_answered_with_a_registry_error[no request line]"],
        INTEGRATION,
    ),
    mutant(
        "import-reads-extended-headers-whole",
        "hubcache import refuses an extended tar header above its bound before reading it",
        Edit("if self.type in _EXTENDED and self.size > MAX_EXTENDED_HEADER:", "if False:"),
        ["test_an_extended_header_claiming_more_than_the_bound_is_refused_unread"],
        UNIT,
    ),
    mutant(
        "import-error-in-many-lines",
        "a file that is no tar is refused in one line",
        Edit('why = " ".join(str(e).split())', "why = str(e)"),
        ["test_not_a_tar_file"],
        UNIT,
    ),
    mutant(
        "h2-server-side-unswapped",
        "an HTTP/2 client's connection is served by hubcache's HTTP/2 server side, which bounds its resets",
        Edit("            elif type(server) is http2_layer.Http2Server:\n                server.__class__ = _Http2Server\n", ""),
        ["test_a_client_resetting_streams_as_fast_as_it_opens_them_is_cut"],
        INTEGRATION,
    ),
    mutant(
        "h2-rapid-reset-never-cut",
        "a client that resets streams faster than RESETS allows gets GOAWAY and its connection closed",
        Edit("if self._allowance < 0:", "if False:"),
        ["test_a_client_resetting_streams_as_fast_as_it_opens_them_is_cut"],
        INTEGRATION,
    ),
    mutant(
        "h2-body-unframed-for-http1",
        "an HTTP/2 request body of no stated length goes chunked to an HTTP/1 registry, never as a second request",
        Edit('request.headers["transfer-encoding"] = "chunked"', "pass"),
        ["test_a_body_without_length_reaches_an_http1_registry_chunked_not_as_a_second_request"],
        INTEGRATION,
    ),
]


# -- finding and applying snippets


class Stale(Exception):
    """The mutant cannot be applied or run as written: its list entry needs updating."""


def _pattern(snippet: str) -> re.Pattern[str]:
    """`snippet` as a regex in which leading whitespace of each line does not count."""
    lines = [re.escape(line.strip()) for line in snippet.strip("\n").splitlines()]
    return re.compile(r"\n[ \t]*".join(lines))


def files_matching(tree: Path, pattern: str) -> list[Path]:
    return sorted(p for p in tree.glob(pattern) if p.is_file())


def locate(tree: Path, edit: Edit) -> tuple[Path, re.Match[str], str]:
    """The one place `edit` applies, and its replacement there; raises Stale if its snippet (or
    every variant) occurs nowhere, or more than once."""
    found = []
    for find, replace in ((edit.find, edit.replace), *edit.variants):
        regex = _pattern(find)
        for path in files_matching(tree, edit.files):
            found += [(path, m, replace) for m in regex.finditer(path.read_text())]
    if len(found) != 1:
        where = ", ".join(f"{p.relative_to(tree)}:{m.string.count(chr(10), 0, m.start()) + 1}" for p, m, _ in found)
        what = "not found" if not found else f"found {len(found)} times ({where})"
        raise Stale(f"snippet {edit.find.strip().splitlines()[0]!r} {what} in {edit.files}")
    return found[0]


def apply(tree: Path, m: Mutant) -> list[str]:
    """Apply the mutant's edits to `tree`; returns where each went (file:line)."""
    places = [locate(tree, edit) for edit in m.edits]  # all found before anything changes
    if len({(p, match.start()) for p, match, _ in places}) != len(places):
        raise Stale("two edits of one mutant match the same place")
    done = []
    # Later matches first, so earlier offsets in the same file stay valid.
    for path, match, replace in sorted(places, key=lambda place: (str(place[0]), -place[1].start())):
        text = path.read_text()
        line_start = text.rfind("\n", 0, match.start()) + 1
        before = text[line_start : match.start()]  # the match's line up to it
        indent = before[: len(before) - len(before.lstrip(" \t"))]
        replacement = replace.strip("\n").replace("\n", "\n" + indent)
        path.write_text(text[: match.start()] + replacement + text[match.end() :])
        line = text.count("\n", 0, match.start()) + 1
        done.append(f"{path.relative_to(tree)}:{line}")
        try:
            compile(path.read_text(), str(path), "exec")
        except SyntaxError as e:
            raise Stale(f"the mutated {path.relative_to(tree)} does not compile: {e}") from None
    return done


# -- guard tests


def collect(tree: Path, env: dict[str, str], python: str) -> list[str]:
    """Every test node id of the copy, unmutated."""
    proc = subprocess.run(
        [python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if proc.returncode != 0 or not ids:
        sys.exit(f"mutants: cannot collect the tests of the copy (pytest exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return ids


def select(ids: list[str], guards: tuple[str, ...]) -> dict[str, list[str]]:
    """The node ids each guard names; raises Stale for a guard that names none. A guard without
    parameters names the function, so all its parametrizations run (their ids may change from
    one import to the next, e.g. when they carry a random digest)."""
    chosen: dict[str, list[str]] = {}
    for guard in guards:
        if "[" in guard:
            matched = [node for node in ids if node.endswith("::" + guard)]
        else:
            matched = list(dict.fromkeys(node.partition("[")[0] for node in ids if node.partition("[")[0].endswith("::" + guard)))
        if not matched:
            raise Stale(f"guard test {guard!r} not found")
        chosen[guard] = matched
    return chosen


def _of(node: str, run: str) -> bool:
    """Whether the test `node` (as pytest reports it) is the node id `run` (as given to pytest)."""
    return node == run or ("[" not in run and node.partition("[")[0] == run)


# -- the scratch copy


CHECK_PLUGIN = '''\
"""Loaded by scripts/mutants into each test run. The hubcache imported must be the copy's. Each
test phase that did not simply pass is written to $HUBCACHE_MUTANTS_OUTCOMES, one JSON line with
its kind: only a test's own failed assertion (AssertionError or pytest.fail) can kill a mutant;
an exception of any other type, a fixture's failure or a timeout is not that."""
import json
import os
from pathlib import Path

import pytest

TIMEOUT = "from pytest-timeout"  # in the message of pytest-timeout's pytest.fail


def pytest_configure(config):
    import hubcache

    expected = Path(os.environ["HUBCACHE_MUTANTS_ADDON"]).resolve()
    found = Path(hubcache.__file__).resolve().parent
    if found != expected:
        raise RuntimeError(f"hubcache imported from {found}, not from the mutated copy {expected}")


def _kind(exc):
    if isinstance(exc, BaseExceptionGroup):
        kinds = {_kind(e) for e in exc.exceptions}
        return kinds.pop() if len(kinds) == 1 else "error"
    if isinstance(exc, pytest.fail.Exception):
        return "timeout" if TIMEOUT in str(exc) else "assertion"
    return "assertion" if isinstance(exc, AssertionError) else "error"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.passed and report.when != "call":
        return
    kind, message = report.outcome, ""
    if report.failed:
        kind = _kind(call.excinfo.value) if call.excinfo else "error"
        message = call.excinfo.exconly()[:400] if call.excinfo else report.longreprtext[-400:]
        if report.when != "call" and kind == "assertion":
            kind = "error"  # a fixture's assertion is not the test's
    record = {"node": item.nodeid, "when": report.when, "kind": kind, "message": message}
    with open(os.environ["HUBCACHE_MUTANTS_OUTCOMES"], "a") as f:
        f.write(json.dumps(record) + "\\n")
'''

CHECK_SCRIPT = '''\
"""Loaded by mitmdump as a script: prints where hubcache comes from, then ends mitmdump."""
import os
import hubcache

print("hubcache from", os.path.dirname(os.path.realpath(hubcache.__file__)), flush=True)
os._exit(0)
'''


class Scratch:
    """A temporary folder holding the unmutated copy (`base`) and, per job slot, one copy at a
    time to run tests in (each slot with its own `hubcache` symlink on PYTHONPATH)."""

    def __init__(self, rev: str | None, keep: bool):
        self.dir = Path(tempfile.mkdtemp(prefix="hubcache-mutants-"))
        self.keep = keep
        self.base = self.dir / "base"
        self.base.mkdir()
        if rev is None:  # the working tree's tracked files, as they are now
            listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
            for name in filter(None, listed.decode().split("\0")):
                source = ROOT / name
                if source.is_file():
                    (self.base / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, self.base / name)
        else:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(self.base)], input=archive, check=True)
        (self.dir / "check_script.py").write_text(CHECK_SCRIPT)

    def copy(self, slot: int) -> Path:
        """A fresh copy of `base` for job slot `slot` (replacing its last one)."""
        tree = self.dir / f"slot{slot}" / "tree"
        if tree.exists():
            shutil.rmtree(tree)
        shutil.copytree(self.base, tree, symlinks=True)
        return tree

    def env(self, tree: Path) -> dict[str, str]:
        """The environment of a test run of `tree`: its addon/ imported as hubcache, in pytest
        and in every process the tests start."""
        path = tree.parent / "path"  # on PYTHONPATH: `hubcache` (a symlink) and the check plugin
        path.mkdir(exist_ok=True)
        (path / "hubcache_mutants_check.py").write_text(CHECK_PLUGIN)
        link = path / "hubcache"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(tree / "addon", target_is_directory=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH", "")]))
        env["HUBCACHE_MUTANTS_ADDON"] = str(tree / "addon")
        env.setdefault("HUBCACHE_SWIFT_VENV", str(ROOT / ".venv-swift"))  # Swift is not copied
        env.pop("PYTEST_ADDOPTS", None)
        return env

    def close(self) -> None:
        if self.keep:
            print(f"mutants: scratch copies kept in {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def check_subprocesses(scratch: Scratch, python: str) -> None:
    """mitmdump, started the way the tests start it, must import the copy's hubcache too."""
    mitmdump = Path(python).with_name("mitmdump")
    tree = scratch.copy(0)
    proc = subprocess.run(
        [str(mitmdump), "-n", "-q", "-s", str(scratch.dir / "check_script.py")],
        cwd=tree,
        env=scratch.env(tree),
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"hubcache from (\S+)", proc.stdout + proc.stderr)
    if not found or Path(found.group(1)).resolve() != (tree / "addon").resolve():
        sys.exit(f"mutants: mitmdump does not import the copy's hubcache: {(proc.stdout + proc.stderr)[-2000:]}")


# -- running


@dataclass
class Result:
    """One test run: pytest's exit status (None after a timeout of the run) and each test's kind
    (passed, skipped, assertion, timeout, error) with its message."""

    status: int | None
    tests: dict[str, tuple[str, str]]

    def kind(self, run: str, stopped_early: bool) -> tuple[str, str]:
        """The kind of the node id `run` (all its parametrizations): a test without a result is an
        error (a crash), a timeout if the run timed out, or not run after pytest -x stopped."""
        found = [kind for node, kind in self.tests.items() if _of(node, run)]
        if not found:
            if self.status is None:
                return "timeout", "the run timed out before it had a result"
            if stopped_early:
                return "not run", ""
            return "error", f"no result (pytest exit status {self.status}: a crash, or it was not collected)"
        for wanted in ("error", "timeout", "assertion", "passed", "skipped"):
            for kind, message in found:
                if kind == wanted:
                    return kind, message
        return found[0]


def _read_outcomes(path: Path) -> dict[str, tuple[str, str]]:
    """Each test's kind from the plugin's lines: the call's, unless setup failed or skipped, or
    teardown failed after a call that passed."""
    phases: dict[str, dict[str, tuple[str, str]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            phases.setdefault(record["node"], {})[record["when"]] = (record["kind"], record["message"])
    kinds = {}
    for node, by_phase in phases.items():
        call = by_phase.get("call") or by_phase.get("setup") or ("error", "no call")
        teardown = by_phase.get("teardown")
        if teardown and call[0] in ("passed", "skipped"):
            call = ("error" if teardown[0] != "timeout" else "timeout", "teardown: " + teardown[1])
        kinds[node] = call
    return kinds


def run_tests(tree: Path, env: dict[str, str], python: str, nodes: list[str], timeout: int, test_timeout: int, log: Path, first: bool) -> Result:
    """Run `nodes` in `tree` (stopping at the first failure if `first`), the output going to `log`
    and each test's outcome next to it."""
    outcomes = log.with_suffix(".outcomes.jsonl")
    outcomes.unlink(missing_ok=True)
    env = {**env, "HUBCACHE_MUTANTS_OUTCOMES": str(outcomes)}
    args = [
        python,
        "-m",
        "pytest",
        *(["-x"] if first else []),
        "-q",
        "--no-header",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "-p",
        "hubcache_mutants_check",
        f"--timeout={test_timeout}",
        *nodes,
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            return Result(proc.returncode, _read_outcomes(outcomes))
        except subprocess.TimeoutExpired:
            pass
        # Timed out. The processes the tests started run in sessions of their own: note them now,
        # while they are still pytest's descendants, to end them if pytest cannot.
        started = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # pytest then tears its fixtures down, stopping them
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return Result(None, _read_outcomes(outcomes))


def _descendants(root: int) -> list[int]:
    """The pids of every process below `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Outcome:
    status: str  # killed, SURVIVED, padded, error, stale
    seconds: float
    detail: str = ""


def _diff(base: Path, tree: Path, places: list[str]) -> str:
    files = dict.fromkeys(place.rpartition(":")[0] for place in places)
    lines: list[str] = []
    for name in files:
        old, new = (base / name).read_text().splitlines(keepends=True), (tree / name).read_text().splitlines(keepends=True)
        lines += difflib.unified_diff(old, new, f"a/{name}", f"b/{name}")
    return "".join(lines)


def run_mutant(
    scratch: Scratch, slot: int, m: Mutant, ids: list[str], python: str, broken: set[str], out: Path, first: bool, run: str = ""
) -> Outcome:
    """Apply `m` to a fresh copy and run its guard tests (those in `broken`, which fail
    unmutated, excepted). Killed only when every guard (with --first: one guard, and no other
    before it) fails on an assertion of its own; with `m.hang`, a guard timing out kills it too.
    `run` names this run's files in `out` apart from another run's of the same mutant."""
    started = time.monotonic()
    try:
        guards = {guard: [n for n in nodes if n.partition("[")[0] not in broken] for guard, nodes in select(ids, m.tests).items()}
        guards = {guard: nodes for guard, nodes in guards.items() if nodes}
        if not guards:
            raise Stale("every guard test fails on the unmutated code")
        tree = scratch.copy(slot)
        places = apply(tree, m)
    except Stale as e:
        return Outcome("stale", time.monotonic() - started, str(e))
    (out / f"{m.name}.diff").write_text(_diff(scratch.base, tree, places))
    nodes = list(dict.fromkeys(n for ns in guards.values() for n in ns))
    timeout = m.timeout * (1 if first else len(guards))
    result = run_tests(tree, scratch.env(tree), python, nodes, timeout, m.test_timeout, out / f"{m.name}{run}.log", first)
    stopped_early = first and result.status == 1
    verdicts: dict[str, tuple[str, str]] = {}
    for guard, guard_nodes in guards.items():
        kinds = [result.kind(node, stopped_early) for node in guard_nodes]
        for wanted in ("error", "timeout", "assertion", "passed", "skipped", "not run"):
            if any(kind == wanted for kind, _ in kinds):
                verdicts[guard] = next((kind, message) for kind, message in kinds if kind == wanted)
                break
        if verdicts[guard][0] == "timeout":
            verdicts[guard] = ("assertion", "hung (expected)") if m.hang else ("error", verdicts[guard][1])
    seconds = time.monotonic() - started
    where = " ".join(places)
    killers = [g for g, (kind, _) in verdicts.items() if kind == "assertion"]
    errors = [f"{g}: {message.splitlines()[0] if message else kind}" for g, (kind, message) in verdicts.items() if kind == "error"]
    passing = [f"{g} ({kind})" for g, (kind, _) in verdicts.items() if kind in ("passed", "skipped")]
    if errors:
        return Outcome("error", seconds, f"{where}: {'; '.join(errors)}")
    if not killers:
        return Outcome("SURVIVED", seconds, f"{where}: {len(guards)} guard tests passed")
    if passing:
        return Outcome("padded", seconds, f"{where}: killed by {', '.join(killers)}; not by {', '.join(passing)}")
    return Outcome("killed", seconds, f"{where}: {', '.join(killers)}")


def baseline(scratch: Scratch, chosen: list[Mutant], ids: list[str], python: str, jobs: int, out: Path) -> set[str]:
    """Run every guard test of `chosen` on the unmutated copy, split by file over `jobs` runs at
    once; returns those that do not pass there (function-level node ids): they cannot tell a
    mutant from the real code."""
    nodes: list[str] = []
    for m in chosen:
        try:
            nodes += [n for ns in select(ids, m.tests).values() for n in ns if n not in nodes]
        except Stale:
            pass  # reported with the mutant
    by_file: dict[str, list[str]] = {}
    for node in nodes:
        by_file.setdefault(node.partition("::")[0], []).append(node)
    chunks: list[list[str]] = [[] for _ in range(jobs)]
    for group in sorted(by_file.values(), key=len, reverse=True):
        min(chunks, key=len).extend(group)
    chunks = [chunk for chunk in chunks if chunk]
    if not chunks:
        return set()  # no guard test was found: every mutant reports itself stale
    started = time.monotonic()

    def run(slot: int) -> Result:
        tree = scratch.copy(slot)
        return run_tests(tree, scratch.env(tree), python, chunks[slot], 60 * 60, TEST_TIMEOUT, out / f"baseline-{slot}.log", first=False)

    with ThreadPoolExecutor(len(chunks)) as pool:
        results = list(pool.map(run, range(len(chunks))))
    failing = [node for chunk, result in zip(chunks, results, strict=True) for node in chunk if result.kind(node, False)[0] != "passed"]
    broken: dict[str, str] = {}
    if failing:  # once more, alone: a test server's hiccup under load is not a broken guard
        tree = scratch.copy(0)
        again = run_tests(tree, scratch.env(tree), python, failing, 60 * 60, TEST_TIMEOUT, out / "baseline-again.log", first=False)
        for node in failing:
            kind, message = again.kind(node, stopped_early=False)
            if kind != "passed":
                broken[node.partition("[")[0]] = f"{kind}: {message.splitlines()[0] if message else ''}"
            else:
                print(f"baseline: {node} passed only on its second run (see baseline-*.log)")
    seconds = time.monotonic() - started
    if not broken:
        print(f"baseline: {len(nodes)} guard tests pass on the unmutated code ({seconds:.0f}s)", flush=True)
    else:
        print(f"baseline: {len(broken)} of {len(nodes)} guard tests do not pass on the unmutated code ({seconds:.0f}s); left out below:")
        for node, why in sorted(broken.items()):
            print(f"    {node}: {why}")
    return set(broken)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/mutants",
        description="Apply each mutant (a patch breaking one guarantee) to a scratch copy; each of its guard tests must fail an assertion.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="run only these mutants (shell patterns allowed)")
    parser.add_argument("--list", action="store_true", help="list the mutants, their guarantees and guard tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip the first run of every guard test on the unmutated copy (faster)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--rev", default="HEAD", help="the commit to copy (default HEAD)")
    source.add_argument("--worktree", action="store_true", help="copy the working tree's tracked files instead")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--first", action="store_true", help="stop at a mutant's first failing test (faster; does not check each guard)")
    mode.add_argument("--each", action="store_true", help="every guard of a mutant must kill it alone (the default)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once (default: one per core)")
    parser.add_argument("--out", type=Path, help="the folder for every run's output (default .mutants/<time> in the checkout)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    chosen = [m for m in MUTANTS if not args.names or any(fnmatch.fnmatchcase(m.name, n) for n in args.names)]
    if args.names and not chosen:
        parser.error(f"no mutant named {' '.join(args.names)} (see --list)")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.guarantee}")
            for edit in m.edits:
                print(f"    in {edit.files}: {edit.find.strip()!r} -> {edit.replace.strip()!r}")
            print(f"    guarded by: {', '.join(m.tests)}{' (a hang kills it)' if m.hang else ''}")
        return 0

    out = args.out or ROOT / ".mutants" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    print(f"mutants: the output of every run goes to {out}", flush=True)
    python = sys.executable  # the project's venv Python (scripts/mutants runs this file with it)
    started = time.monotonic()
    scratch = Scratch(None if args.worktree else args.rev, args.keep)
    counts = dict.fromkeys(("killed", "SURVIVED", "padded", "error", "stale"), 0)
    printing = threading.Lock()
    summary = (out / "summary.txt").open("w")
    try:
        check_subprocesses(scratch, python)
        ids = collect(scratch.base, scratch.env(scratch.copy(0)), python)
        broken = set() if args.no_baseline else baseline(scratch, chosen, ids, python, args.jobs, out)
        width = max(len(m.name) for m in chosen)
        slots: queue.Queue[int] = queue.Queue()
        for slot in range(args.jobs):
            slots.put(slot)

        def one(m: Mutant) -> None:
            slot = slots.get()
            try:
                outcome = run_mutant(scratch, slot, m, ids, python, broken, out, args.first)
                if outcome.status == "error":  # once more: a test server's hiccup under load is not the mutant's doing
                    first_try = outcome.detail
                    outcome = run_mutant(scratch, slot, m, ids, python, broken, out, args.first, run=".again")
                    outcome.detail += f" (second run; the first: {first_try})" if outcome.status != "error" else " (twice)"
            finally:
                slots.put(slot)
            line = f"{outcome.status:<8} {m.name:<{width}} {outcome.seconds:6.1f}s  {outcome.detail}"
            with printing:
                counts[outcome.status] += 1
                print(line, flush=True)
                summary.write(line + "\n")

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, chosen))
    finally:
        summary.close()
        scratch.close()
    total = time.monotonic() - started
    print(f"total {total:.0f}s on {args.jobs} jobs; the output of every run: {out}", file=sys.stderr)
    extra = "".join(f", {counts[k]} {label}" for k, label in (("padded", "padded"), ("error", "errors"), ("stale", "stale")) if counts[k])
    if broken:  # listed again here: a CI log is often read from its end
        extra += f", {len(broken)} guard tests failing on the unmutated code: {', '.join(sorted(broken))}"
    print(f"mutants: {counts['killed']} killed, {counts['SURVIVED']} survived{extra}")
    return 1 if counts["killed"] != len(chosen) or broken else 0


if __name__ == "__main__":
    sys.exit(main())

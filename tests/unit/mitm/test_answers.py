"""hubcache's own answers as mitmproxy will write them: a HEAD answer carries no body bytes (mitmproxy
writes whatever body an addon sets, and the client would read them as its next answer) but states
the size of the body a GET gets."""

from __future__ import annotations

import pytest
from mitmproxy.test import tflow, tutils

from hubcache.mitm import answers
from hubcache.registry.protocol import ErrorCode


def flow(method: str):
    return tflow.tflow(req=tutils.treq(method=method.encode(), path=b"/v2/"), resp=False)


@pytest.mark.parametrize(
    "decision",
    [
        answers.version_check(),
        answers.Serve(200, b'{"kept": "upstream answer"}', {"Content-Type": "application/json", "Content-Length": "27"}),
        answers.RegistryError(ErrorCode.UNSUPPORTED, "hubcache is offline: only pulls are served"),
    ],
    ids=["version-check", "serve", "error"],
)
def test_a_head_answer_carries_no_body_but_states_its_size(decision):
    got = flow("GET")
    answers.give(got, decision)
    head = flow("HEAD")
    answers.give(head, decision)
    assert got.response.raw_content
    assert head.response.raw_content == b""
    assert head.response.headers["Content-Length"] == str(len(got.response.raw_content))
    assert head.response.status_code == got.response.status_code

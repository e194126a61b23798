"""RecentPings: which version-check answers are kept, for how long, and what of them is given again."""

from mitmproxy import http

from hubcache.cache.pings import MEMORY, REGISTRIES, RecentPings
from support.cache_env import HUB, manifest_response

CHALLENGE = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'


def ping(host: str = HUB, port: int = 443, method: str = "GET", **headers: str) -> http.Request:
    request = http.Request.make(method, f"https://{host}:{port}/v2/")
    request.headers.update(headers)
    return request


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def challenge() -> http.Response:
    return manifest_response(401, b'{"errors":[]}', {"WWW-Authenticate": CHALLENGE, "Content-Type": "application/json"})


def test_an_anonymous_answer_is_given_again_for_a_while():
    clock = Clock()
    pings = RecentPings(clock)
    pings.learn(ping(), challenge())
    clock.now += MEMORY - 1
    answer = pings.answer(ping(method="HEAD"))
    assert answer is not None and answer.status == 401 and answer.headers["www-authenticate"] == CHALLENGE
    clock.now += 1
    assert pings.answer(ping()) is None


def test_only_the_version_checks_headers_travel():
    response = challenge()
    response.headers.update({"X-Request-Id": "one client's", "Strict-Transport-Security": "max-age=1"})
    pings = RecentPings()
    pings.learn(ping(), response)
    answer = pings.answer(ping())
    assert answer is not None
    assert set(answer.headers) == {"www-authenticate", "content-type", "Content-Length"}
    assert answer.body == b'{"errors":[]}' and answer.headers["Content-Length"] == "13"


def test_a_check_with_credentials_is_neither_kept_nor_answered():
    pings = RecentPings()
    pings.learn(ping(Authorization="Basic dXNlcjpwYXNz"), manifest_response(200, b"{}"))
    assert pings.answer(ping()) is None
    pings.learn(ping(), challenge())
    assert pings.answer(ping(Authorization="Bearer t")) is None
    assert pings.answer(ping()) is not None


def test_answers_anyone_else_may_not_be_given_are_not_kept():
    pings = RecentPings()
    cookie = manifest_response(200, b"{}", {"Set-Cookie": "session=one-clients"})
    for response in (cookie, manifest_response(404), manifest_response(200, b"{" * 5000)):
        pings.learn(ping(), response)
        assert pings.answer(ping()) is None
    pings.learn(ping(method="HEAD"), manifest_response(200))  # no body: not the one a GET gets
    assert pings.answer(ping()) is None


def test_each_registry_has_its_own_answer_and_the_table_is_bounded():
    pings = RecentPings()
    pings.learn(ping(), challenge())
    assert pings.answer(ping(port=5000)) is None and pings.answer(ping("ghcr.io")) is None
    for number in range(REGISTRIES):
        pings.learn(ping(f"r{number}.example"), manifest_response(200, b"{}"))
    assert pings.answer(ping()) is None  # learned first, dropped first
    assert pings.answer(ping(f"r{REGISTRIES - 1}.example")) is not None

"""Unit tests start no program: no subprocess, no forked child (no mitmdump, no blob server, no
Python helper). Each phase of a unit test, its fixtures of every scope included, runs with the
ways Python starts a program refused, and fails if it tried, even where the code under test caught
the refusal. A test that needs a process belongs in tests/integration."""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import subprocess
from collections.abc import Iterator

import pytest

# (module or class, function, position of the command line among its arguments, or None)
WAYS = [
    # every subprocess: run, check_output, Popen, os.popen, asyncio.create_subprocess_exec/shell
    (subprocess.Popen, "_execute_child", 1),
    (os, "system", 0),
    (os, "posix_spawn", 1),
    (os, "posix_spawnp", 1),
    (os, "fork", None),  # os.spawn*, multiprocessing's fork start
    (os, "forkpty", None),  # pty
    (multiprocessing.util, "spawnv_passfds", 1),  # multiprocessing's spawn and forkserver starts
]


class ProgramStarted(Exception):
    """A unit test tried to start a program."""


@contextlib.contextmanager
def programs_refused(item: pytest.Item) -> Iterator[None]:
    tried: list[str] = []

    def refuse(owner: object, name: str, command_at: int | None):
        what = f"{getattr(owner, '__name__', owner)}.{name}"

        def refused(*args, **kwargs):
            tried.append(what if command_at is None else f"{what} {args[command_at]!r}")
            raise ProgramStarted(f"{item.nodeid} started a program ({tried[-1]}): unit tests start none")

        return refused

    with pytest.MonkeyPatch.context() as patch:
        for owner, name, command_at in WAYS:
            patch.setattr(owner, name, refuse(owner, name, command_at))
        yield
    if tried:
        pytest.fail(f"started a program: {'; '.join(tried)}; unit tests start none (move it to tests/integration)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with programs_refused(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with programs_refused(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    # The last test's tear-down also ends the session's fixtures, the integration tests' included.
    with programs_refused(item) if nextitem is not None else contextlib.nullcontext():
        return (yield)


@pytest.fixture
def secret_file(tmp_path):
    """The credentials file of a registry account (`registry_settings` credentials=@FILE)."""
    path = tmp_path / "ghcr.credentials"
    path.write_text("bot:t0ken\n")
    return path

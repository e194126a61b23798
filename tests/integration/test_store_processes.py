"""The store's temporary folders (tmp/<pid>/) against real processes: a folder of a process that
died is removed when a store opens, one of a process still running is kept. The rest of the store
is in tests/unit/test_store.py."""

from __future__ import annotations

import subprocess
import sys

from hubcache.storage.store import Store


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_dead_process_temp_files_are_removed(tmp_path):
    junk = tmp_path / "tmp" / str(dead_pid()) / "fill-junk"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"partial")
    s = Store(tmp_path)
    try:
        assert not junk.parent.exists()
    finally:
        s.close()


def test_live_process_temp_files_are_kept(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = tmp_path / "tmp" / str(proc.pid) / "fill-busy"
        other.parent.mkdir(parents=True)
        other.write_bytes(b"in progress")
        Store(tmp_path).close()
        assert other.read_bytes() == b"in progress"
    finally:
        proc.kill()
        proc.wait()

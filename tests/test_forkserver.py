"""Tests for spinedxa.forkserver: when a stage starts its training processes' server early, and that the pool then
forks from that server (results do not depend on it: tests/test_train.py)."""

from __future__ import annotations

import multiprocessing.forkserver
import subprocess
import sys
import textwrap

import pytest

from spinedxa import forkserver


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Record ensure_running calls (with the preload set at the time) instead of starting a server."""
    calls: list[tuple[str, ...]] = []
    server = multiprocessing.forkserver._forkserver
    monkeypatch.setattr(server, "_preload_modules", ["__main__"])
    monkeypatch.setattr(multiprocessing.forkserver, "ensure_running",
                        lambda: calls.append(tuple(server._preload_modules)))
    return calls


@pytest.mark.parametrize(("processes", "env", "expected"), [
    (3, {}, True),
    (2, {"WORLD_SIZE": "1"}, True),
    (1, {}, False),  # one process: no pool, no server
    (0, {}, False),
    (3, {"WORLD_SIZE": "2"}, False),  # torchrun: a process per rank, no pool
])
def test_start_early_starts_the_server_only_for_a_pool(started: list, monkeypatch: pytest.MonkeyPatch,
                                                       processes: int, env: dict, expected: bool) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert forkserver.start_early("spinedxa.train", processes) is expected
    assert started == ([("spinedxa.train",)] if expected else [])


def test_a_pool_forks_from_the_server_started_early(tmp_path) -> None:
    """In a fresh interpreter: after start_early, training_pool's processes are children of that one server (its
    pid), which imported the preload module before the stage did."""
    script = textwrap.dedent("""
        import multiprocessing.forkserver as fs, os, sys
        from spinedxa import forkserver
        assert forkserver.start_early("spinedxa.forkserver", 2)
        server = fs._forkserver._forkserver_pid
        from spinedxa.runtime import training_pool
        with training_pool(2, "spinedxa.forkserver") as pool:
            parents = {pool.submit(os.getppid).result() for _ in range(4)}
        assert fs._forkserver._forkserver_pid == server, "the pool started another server"
        assert parents == {server}, (parents, server)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

"""``resctl watch``: pushed changes are drawn at once, bursts are coalesced, and the
table is still redrawn every ``--interval`` for its countdowns."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from typing import IO

import pytest

from resctl.watch import GAP, Throttle
from tests.conftest import Proc, resctl, subprocess_env

# ------------------------------------------------------------------ pure throttle


def test_a_change_after_a_quiet_spell_is_drawn_at_once() -> None:
    t = Throttle(GAP, every=60.0)
    t.drawn(100.0)
    assert t.wait(100.0) == 60.0  # nothing pending: only the periodic redraw
    t.changed()
    assert t.due(100.0 + GAP)
    assert t.wait(100.0 + GAP) == 0.0


def test_a_burst_is_coalesced_to_one_frame_per_gap() -> None:
    t = Throttle(GAP, every=60.0)
    t.drawn(10.0)
    t.changed()  # a push right after a frame waits out the gap...
    assert not t.due(10.1)
    assert t.wait(10.1) == pytest.approx(GAP - 0.1)
    t.changed()  # ...and the rest of the burst joins it
    t.changed()
    assert t.due(10.0 + GAP)
    t.drawn(10.0 + GAP)
    assert not t.pending
    assert not t.due(10.0 + GAP + 0.01)


def test_frames_are_redrawn_every_interval_without_changes() -> None:
    t = Throttle(GAP, every=2.0)
    t.drawn(0.0)
    assert not t.due(1.9)
    assert t.wait(1.5) == pytest.approx(0.5)
    assert t.due(2.0)
    t.drawn(2.0)
    assert t.wait(2.0) == 2.0


def test_no_periodic_redraw_blocks_until_a_push() -> None:
    t = Throttle(GAP)
    t.drawn(0.0)
    assert t.wait(1000.0) is None
    assert not t.due(1000.0)


# ------------------------------------------------------------------ real daemon


def _lines(stream: IO[str], into: queue.Queue[tuple[float, str]]) -> None:
    for line in stream:
        into.put((time.monotonic(), line))


def _until(lines: queue.Queue[tuple[float, str]], text: str, timeout: float) -> float:
    """When a line containing ``text`` arrived; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            at, line = lines.get(timeout=left)
        except queue.Empty:
            break
        if text in line:
            return at
    raise AssertionError(f"no line with {text!r} within {timeout}s")


@pytest.mark.slow
def test_watch_draws_a_new_pool_at_once_despite_a_long_interval(resd_proc: Proc) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "resctl", "watch", "--interval", "60", "--socket", resd_proc.socket],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        lines: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=_lines, args=(watch.stdout, lines), daemon=True).start()
        _until(lines, "resd watch", 30)  # the first frame (plain: stdout is a pipe)
        resctl(resd_proc, "pool", "create", "--name", "fresh-pool", "--cpu", "2")
        created = time.monotonic()
        seen = _until(lines, "fresh-pool", 2.0)
        assert seen - created < 2.0
        assert watch.poll() is None
    finally:
        watch.terminate()
        watch.wait(10)
        for stream in (watch.stdout, watch.stderr):
            if stream:
                stream.close()

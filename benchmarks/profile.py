"""Profiles of resd's hot path: the daemon runs under a pyinstrument profiler (see
``profiled_resd``) switched on only while client processes do reserve+release pairs.

pyinstrument is a benchmark-only dependency (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.fleet import FleetResult
from benchmarks.procs import ROOT, Daemon

MODULE = "benchmarks.profiled_resd"


def available() -> bool:
    return importlib.util.find_spec("pyinstrument") is not None


def profiled_daemon(workdir: Path, name: str, fsync: str, env: dict[str, str]) -> Daemon:
    """A Daemon whose profiler SIGUSR1/SIGUSR2 switch (``profiled`` does it)."""
    session = workdir / f"{name}.pyisession"
    return Daemon(
        workdir,
        name,
        fsync,
        env={**env, "BENCH_PROFILE_OUT": str(session)},
        module=MODULE,
    )


def profiled(
    daemon: Daemon, run: Callable[[], FleetResult], out: Path, title: str
) -> dict[str, Any]:
    """Profile ``daemon`` while ``run`` runs; write the call tree to ``out``."""
    session = Path(daemon.env["BENCH_PROFILE_OUT"])
    session.unlink(missing_ok=True)
    os.kill(daemon.pid, signal.SIGUSR1)
    fleet = run()
    os.kill(daemon.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not session.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the profiled daemon wrote no session")
        time.sleep(0.05)
    from pyinstrument.renderers import (  # type: ignore[import-not-found, unused-ignore]
        ConsoleRenderer,
    )
    from pyinstrument.session import Session  # type: ignore[import-not-found, unused-ignore]

    loaded = Session.load(str(session))
    head = f"# {title}; {fleet.rate:.0f} pairs/s while profiled\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + ConsoleRenderer(unicode=False, color=False).render(loaded))
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    return {"file": str(shown), "pairs_per_s_under_profiler": fleet.rate, "title": title}

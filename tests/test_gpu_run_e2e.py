"""GPU truth end to end: a real ``resd`` whose GPUs come from a ``gpus_file`` with live
fields (re-read every sample), a real ``resctl run --vram 20G`` whose CMD the file
then says holds 30 GiB: the lease is flagged within two sample intervals, shown by
``top --json``, and under ``overuse = terminate`` CMD is killed after the grace."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from resd.inventory import GpuDevice
from resd.nvml import device_to_json
from tests.conftest import Proc, resctl, run_argv, subprocess_env, wait_for

pytestmark = pytest.mark.slow

GiB = 1 << 30
INTERVAL = 0.2
GPU = GpuDevice(0, "GPU-e2e-0", "NVIDIA H100 80GB HBM3", 80 * GiB)


def write_usage(path: Path, processes: dict[int, int]) -> None:
    """Rewrite the GPU file atomically: resd may read it at any moment."""
    entry = device_to_json(GPU) | {"processes": {str(p): b for p, b in processes.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([entry]))
    os.replace(tmp, path)


def leases(proc: Proc) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(resctl(proc, "list", "--json").stdout)["reservations"]
    return found


def test_run_overuse_flagged_shown_and_terminated(short_tmp: Path) -> None:
    gpus = short_tmp / "gpus.json"
    write_usage(gpus, {})
    proc = Proc(
        socket=str(short_tmp / "resd.sock"),
        state_dir=str(short_tmp / "state"),
        args=["--log-level", "info", "--log-format", "json"],
        log=short_tmp / "resd.log",
        env={"RESD_GPUS_FILE": str(gpus), "RESD_GPU_SAMPLE_INTERVAL": str(INTERVAL)},
    ).start()
    run = subprocess.Popen(
        run_argv(proc, ["--vram", "20G"], ["sleep", "600"]),
        env=subprocess_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any(r["processes"] for r in leases(proc)), 15, "CMD registered")
        (lease,) = leases(proc)
        (cmd,) = lease["processes"]
        assert lease["enforcement"] == "framework" and lease["marks"] == {}

        write_usage(gpus, {cmd: 30 * GiB})
        t0 = time.monotonic()
        wait_for(lambda: "overuse" in leases(proc)[0]["marks"], 10, "the over-use flagged")
        flagged_in = time.monotonic() - t0
        snap = json.loads(resctl(proc, "top", "--json").stdout)
        (row,) = snap["rows"]
        assert row["id"] == lease["id"] and cmd in row["pids"]
        assert row["gpu_memory"] == {"0": 30 * GiB} and "overuse" in row["marks"]
        assert snap["devices"]["host"][0]["overuse"] == 10 * GiB
        status = json.loads(resctl(proc, "status", "--json").stdout)
        (host,) = [p for p in status["pools"] if p["name"] == "host"]
        assert host["marks"] == {"overuse": 1}
        # warn (the default) flags only; terminate ends it after the grace.
        assert run.poll() is None
        resctl(proc, "pool", "set", "--name", "host", "--overuse", "terminate", "--grace", "1")
        write_usage(gpus, {cmd: 10 * GiB})  # the mark comes off ...
        wait_for(lambda: leases(proc)[0]["marks"] == {}, 10, "the mark cleared")
        write_usage(gpus, {cmd: 30 * GiB})  # ... and a new over-use terminates
        # resd SIGTERMs CMD as it puts the lease in its grace: resctl reports either
        # CMD's death by SIGTERM (128 + 15) or the preemption (10), whichever it sees first.
        assert run.wait(timeout=15) in (10, 143), run.stderr.read() if run.stderr else ""
        assert leases(proc) == []
        kinds = [
            e["kind"]
            for e in json.loads(resctl(proc, "export").stdout)
            if e["reservation"] == lease["id"]
        ]
        assert kinds[:3] == ["reserved", "registered", "overuse"], kinds
        assert "preempting" in kinds and kinds[-1] in ("preempted", "released"), kinds
        print(f"flagged {flagged_in:.2f}s after the usage appeared (interval {INTERVAL}s)")
    finally:
        if run.poll() is None:
            run.kill()
        run.wait()
        if run.stderr is not None:
            run.stderr.close()
        proc.stop()

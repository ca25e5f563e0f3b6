"""On a real NVIDIA GPU (marked ``gpu``; skipped without a driver): a process that
allocates GPU memory inside ``resctl run --vram`` is attributed to its lease, and
over-use of the slice is flagged. The CMD allocates through the CUDA driver API
(libcuda via ctypes), so no framework has to be installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resd.nvml import NvmlUnavailable, PynvmlBackend
from tests.conftest import Proc, resctl, run_argv, subprocess_env, wait_for

#: allocates argv[1] MiB on the first visible device, says so, then sleeps
ALLOCATE = r"""
import ctypes, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
def ok(rc, what):
    if rc != 0:
        sys.exit(f"{what} failed: CUDA error {rc}")
ok(cuda.cuInit(0), "cuInit")
dev = ctypes.c_int()
ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p()
ok(cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev), "cuCtxCreate")
ptr = ctypes.c_uint64()
ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(int(sys.argv[1]) << 20)), "cuMemAlloc")
print("allocated", flush=True)
time.sleep(120)
"""


def _nvml_devices() -> int:
    try:
        return len(PynvmlBackend().devices())
    except NvmlUnavailable:
        return 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_nvml_devices() == 0, reason="needs a working NVIDIA driver and a GPU"),
]


def _row(proc: Proc, rid: str) -> dict[str, object]:
    snap = json.loads(resctl(proc, "top", "--json").stdout)
    return next((r for r in snap["rows"] if r["id"] == rid), {})


def test_resctl_run_cmd_is_attributed_and_overuse_flagged(short_tmp: Path) -> None:
    proc = Proc(
        socket=str(short_tmp / "resd.sock"),
        state_dir=str(short_tmp / "state"),
        args=["--log-level", "info", "--log-format", "json"],
        log=short_tmp / "resd.log",
        env={"RESD_GPU_SAMPLE_INTERVAL": "0.5"},
    ).start()
    run = subprocess.Popen(
        run_argv(
            proc, ["--pool", "host", "--vram", "1G"], [sys.executable, "-c", ALLOCATE, "1536"]
        ),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stdout is not None and run.stdout.readline().strip() == "allocated"
        leases = json.loads(resctl(proc, "list", "--json").stdout)["reservations"]
        (lease,) = [r for r in leases if r["resources"].get("vram")]
        rid = lease["id"]

        def attributed() -> bool:
            used = sum(_row(proc, rid).get("gpu_memory", {}).values())  # type: ignore[attr-defined]
            return used >= 1536 << 20

        wait_for(attributed, 30.0, "the CMD's GPU memory attributed to its lease")
        wait_for(
            lambda: "overuse" in _row(proc, rid).get("marks", {}),  # type: ignore[operator]
            10.0,
            "1.5 GiB on a 1 GiB slice flagged",
        )
        print(json.dumps(_row(proc, rid), indent=2))  # for docs/gpu.md
        print(resctl(proc, "top", "--json").stdout)
    finally:
        run.terminate()
        run.wait(timeout=30)
        proc.stop()

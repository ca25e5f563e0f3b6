"""``resctl run`` end to end against a real resd, and the new ``reserve`` flags.

Every CMD here is a small shell script; each test is bounded by subprocess
timeouts well under pytest's own.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from resctl.options import RESERVE_FLAGS, reserve_fields, reserve_fields_of
from resctl.run import command_after_dashdash, exit_status
from resd_client import Client
from resd_client.errors import InvalidError
from resd_client.protocol import PoolCreate, from_wire
from tests.conftest import Proc, resctl, subprocess_env, wait_for

GIB = 1 << 30
MODEL = "NVIDIA H100 80GB HBM3"


# ------------------------------------------------------------------ helpers


def gpu_set(n: int = 8) -> dict[str, Any]:
    return {
        "kind": "set",
        "members": [
            {
                "name": str(i),
                "capacity": 80 * GIB,
                "labels": {
                    "index": str(i),
                    "uuid": f"GPU-fake-{i}",
                    "model": MODEL,
                    "numa": str(i // 4),
                },
            }
            for i in range(n)
        ],
    }


def create_pool(proc: Proc, name: str, **changes: Any) -> None:
    spec: dict[str, Any] = {
        "name": name,
        "max_per_tenant": 0,
        "resources": {
            "gpu": gpu_set(),
            "cpu": {"capacity": 64_000},
            "memory": {"capacity": 256 * GIB},
        },
    }
    spec.update(changes)
    with Client(proc.socket) as client:
        client.call("pool.create", from_wire(PoolCreate, spec))


def run_argv(proc: Proc, *args: str) -> list[str]:
    """``resctl run --socket S ARGS`` (the socket goes before ``--``)."""
    return [sys.executable, "-m", "resctl", "run", "--socket", proc.socket, *args]


def run(proc: Proc, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        run_argv(proc, *args),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(procs: list[subprocess.Popen[str]], proc: Proc, *args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        run_argv(proc, *args),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    return p


def finish(p: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str, str]:
    stdout, stderr = p.communicate(timeout=timeout)
    return p.returncode, stdout, stderr


def listed(proc: Proc, pool: str | None = None) -> list[dict[str, Any]]:
    args = ["list", "--json"] + (["--pool", pool] if pool else [])
    reservations: list[dict[str, Any]] = json.loads(resctl(proc, *args).stdout)["reservations"]
    return reservations


def wait_listed(proc: Proc, count: int, pool: str | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal found
        found = listed(proc, pool)
        return len(found) >= count

    wait_for(enough, 15, f"{count} reservation(s)")
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def env_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def tenants(proc: Proc) -> None:
    resctl(proc, "tenant", "add", "--name", "low", "--priority", "2")
    resctl(proc, "tenant", "add", "--name", "high", "--priority", "9")


# ------------------------------------------------------------------ pure parts


def test_command_after_dashdash() -> None:
    assert command_after_dashdash(["--gpu", "1", "--", "env"], ["env"]) == ["env"]
    assert command_after_dashdash(["--", "ls", "--", "-l"], ["ls", "--", "-l"]) == [
        "ls",
        "--",
        "-l",
    ]
    with pytest.raises(InvalidError, match="put -- before"):
        command_after_dashdash(["--gpu", "1", "env"], ["env"])
    with pytest.raises(InvalidError, match="after --"):
        command_after_dashdash(["--gpu", "1", "--"], [])


def test_run_help() -> None:
    from typer.testing import CliRunner

    from resctl.main import app

    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output and "--gpu-ids" in result.output


def test_exit_status() -> None:
    assert exit_status(0) == 0
    assert exit_status(7) == 7
    assert exit_status(-signal.SIGTERM) == 143
    assert exit_status(-signal.SIGKILL) == 137


def test_reserve_fields() -> None:
    none: dict[str, Any] = dict.fromkeys(RESERVE_FLAGS)
    assert reserve_fields_of({"cpu": "2", "json_out": True}) == reserve_fields(
        **{**none, "cpu": "2"}
    ), "the shared flags picked from a command's parameters, the rest ignored"
    fields = reserve_fields(
        **{
            **none,
            "vram": "20G",
            "gpu_model": MODEL,
            "numa": "1",
            "member": ["ports=30001,30005-30009", "nic=a", "nic=b"],
            "res": ["ports=6"],
            "contiguous": ["ports"],
            "placement": "spread",
        }
    )
    assert fields == {
        "pool": "host",
        "selector": None,
        "resources": {"vram": 20 * GIB, "ports": 6},
        "members": {"ports": ["30001", "30005-30009"], "nic": ["a", "b"]},
        "contiguous": ["ports"],
        "constraints": {"model": MODEL, "numa": "1"},
        "placement": "spread",
    }
    by_label = reserve_fields(**{**none, "selector": ["zone=a"], "gpu": "1"})
    assert by_label["pool"] is None and by_label["selector"] == {"zone": "a"}
    for bad in (
        {"selector": ["zone=a"], "pool": "p", "gpu": "1"},
        {"placement": "random", "gpu": "1"},
        {"numa": "x", "gpu": "1"},
        {"member": ["gpu="]},
        {"member": ["gpu=1,,2"]},
        {"gpu": "1", "res": ["gpu=2"]},
    ):
        with pytest.raises(InvalidError):
            reserve_fields(**{**none, **bad})


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_env_of_two_gpus_and_release_on_exit(resd_proc: Proc) -> None:
    create_pool(resd_proc, "gpus")
    resctl(resd_proc, "reserve", "--pool", "gpus", "--member", "gpu=0,1,4")  # numa 0 has 2 left
    result = run(resd_proc, "--pool", "gpus", "--gpu", "2", "--cpu", "1.5", "--", "env")
    assert result.returncode == 0, result.stderr
    env = env_lines(result.stdout)
    devices = env["CUDA_VISIBLE_DEVICES"].split(",")
    assert len(set(devices)) == 2
    assert {int(d) // 4 for d in devices} in ({0}, {1})  # one NUMA node
    assert env["RESD_GPUS"] == env["CUDA_VISIBLE_DEVICES"]
    assert env["RESD_CPU"] == "1.5"
    assert env["RESD_POOL"] == "gpus"
    rid = env["RESD_RESERVATION_ID"]
    assert rid.startswith("r-") and rid in result.stderr  # the reservation line
    assert rid not in [r["id"] for r in listed(resd_proc)]
    assert len(listed(resd_proc)) == 1  # only the detached one


@pytest.mark.slow
def test_gpu_ids_as_uuids_and_vram(resd_proc: Proc) -> None:
    create_pool(resd_proc, "gpus")
    result = run(
        resd_proc, "--pool", "gpus", "--vram", "20G", "--gpu-ids", "uuid", "--quiet", "--", "env"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    env = env_lines(result.stdout)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0"
    assert env["RESD_VRAM_BYTES"] == str(20 * GIB)


@pytest.mark.slow
@pytest.mark.parametrize(("placement", "same"), [(None, True), ("spread", False)])
def test_vram_slices_binpack_and_spread(
    resd_proc: Proc, started: list[subprocess.Popen[str]], placement: str | None, same: bool
) -> None:
    create_pool(resd_proc, "gpus")
    extra = ["--placement", placement] if placement else []
    argv = ["--pool", "gpus", "--vram", "40G", "-q", *extra, "--", "sleep", "30"]
    devices = []
    for n in (1, 2, 3):
        start(started, resd_proc, *argv)
        held = wait_listed(resd_proc, n)
        assert all(r["binding"] == "session" for r in held)
        newest = max(held, key=lambda r: r["created_at"])
        devices.append(newest["members"]["gpu"])
    assert all(len(d) == 1 for d in devices)
    if same:
        assert devices[0] == devices[1] and devices[2] != devices[0]
    else:
        assert len({d[0] for d in devices}) == 3
    for p in started:
        p.send_signal(signal.SIGTERM)
    assert [finish(p)[0] for p in started] == [143, 143, 143]  # sleep killed by SIGTERM
    assert listed(resd_proc) == []


@pytest.mark.slow
def test_exit_code_passthrough(resd_proc: Proc) -> None:
    create_pool(resd_proc, "gpus")
    assert (
        run(resd_proc, "--pool", "gpus", "--gpu", "1", "--", "sh", "-c", "exit 7").returncode == 7
    )
    killed = run(resd_proc, "--pool", "gpus", "--gpu", "1", "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 143
    assert listed(resd_proc) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_are_forwarded(
    resd_proc: Proc, started: list[subprocess.Popen[str]], tmp_path: Path, sig: signal.Signals
) -> None:
    create_pool(resd_proc, "gpus")
    marker, ready = tmp_path / "marker", tmp_path / "ready"
    script = (
        f'for s in INT TERM HUP; do trap "echo $s > {marker}; exit 0" $s; done; '
        f"touch {ready}; while :; do sleep 0.05; done"
    )
    p = start(started, resd_proc, "--pool", "gpus", "--gpu", "1", "--", "sh", "-c", script)
    wait_for(ready.exists, 15, "the child to start")
    p.send_signal(sig)
    code, _, stderr = finish(p)
    assert code == 0, stderr
    assert marker.read_text().strip() == sig.name.removeprefix("SIG")
    assert listed(resd_proc) == []


@pytest.mark.slow
def test_cmd_gets_the_terminal(resd_proc: Proc) -> None:
    """On a terminal CMD is the foreground job: it can read it and Ctrl-C reaches it."""
    create_pool(resd_proc, "gpus")
    master, slave = os.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    script = "read x; echo got:$x; exec cat"
    p = subprocess.Popen(
        run_argv(resd_proc, "--pool", "gpus", "--gpu", "1", "-q", "--", "sh", "-c", script),
        env=subprocess_env(),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    output = b""

    def read_until(text: bytes, timeout: float = 15) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while text not in output and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    output += os.read(master, 4096)
                except OSError:  # EIO: the terminal has no process left
                    break
        assert text in output, output

    try:
        os.write(master, b"hello\n")
        read_until(b"got:hello")
        os.write(master, b"ping\n")
        read_until(b"ping\r\nping")  # the terminal's echo, then cat's copy: cat is running
        os.write(master, b"\x03")  # Ctrl-C: SIGINT to the foreground group, CMD's
        assert p.wait(15) == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        os.close(master)
    assert listed(resd_proc) == []


@pytest.mark.slow
def test_sigkill_of_resctl_frees_gpus_and_kills_the_child(
    resd_proc: Proc, started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    create_pool(resd_proc, "gpus")
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"
    p = start(started, resd_proc, "--pool", "gpus", "--gpu", "2", "--", "sh", "-c", script)
    wait_for(pids.exists, 15, "the child to start")
    child, grandchild = (int(x) for x in pids.read_text().split())
    assert alive(child) and alive(grandchild)
    assert len(listed(resd_proc)) == 1
    p.kill()
    p.wait(5)
    t0 = time.monotonic()
    wait_for(lambda: listed(resd_proc) == [], 2, "the session reservation to be released")
    assert time.monotonic() - t0 <= 2
    wait_for(lambda: not alive(child), 2, "CMD to die with resctl (parent-death signal)")
    wait_for(lambda: not alive(grandchild), 2, "CMD's process group to die (watchdog)")


@pytest.mark.slow
@pytest.mark.parametrize("ignores_term", [True, False])
def test_preempted_while_running(
    resd_proc: Proc, started: list[subprocess.Popen[str]], tmp_path: Path, ignores_term: bool
) -> None:
    create_pool(resd_proc, "graced", grace=1.0)
    tenants(resd_proc)
    pidfile, marker = tmp_path / "pid", tmp_path / "marker"
    on_term = f"echo TERM > {marker}" + ("" if ignores_term else "; exit 0")
    script = (
        f'trap "{on_term}" TERM; echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; '
        "while :; do sleep 0.05; done"
    )
    argv = ["--tenant", "low", "--pool", "graced", "--gpu", "4", "--", "sh", "-c", script]
    p = start(started, resd_proc, *argv)
    wait_for(pidfile.exists, 15, "the child to start")
    child = int(pidfile.read_text())
    t0 = time.monotonic()
    resctl(resd_proc, "preempt", "--tenant", "high", "--target", "low")
    code, _, stderr = finish(p)
    elapsed = time.monotonic() - t0
    assert code == 10, stderr
    assert "preempted" in stderr
    assert marker.read_text().strip() == "TERM"  # CMD got SIGTERM first
    assert not alive(child)
    assert listed(resd_proc) == []
    history = json.loads(resctl(resd_proc, "export", "--tenant", "low").stdout)
    kinds = [h["kind"] for h in history if h["kind"] != "registered"]  # CMD's pid, for GPU truth
    if ignores_term:
        assert 1.0 <= elapsed < 5, elapsed  # SIGKILLed when the 1 s grace ended
        assert "killed by SIGKILL" in stderr
        assert kinds == ["reserved", "preempting", "preempted"]
    else:
        assert elapsed < 5, elapsed
        assert "exited with status 0" in stderr
        # CMD exited within the grace and resctl released the reservation at once
        assert kinds == ["reserved", "preempting", "released"]


@pytest.mark.slow
@pytest.mark.parametrize("ignores_term", [False, True], ids=["gives-back", "ignores-term"])
def test_reclaimed_while_running(
    resd_proc: Proc, started: list[subprocess.Popen[str]], tmp_path: Path, ignores_term: bool
) -> None:
    spec = {
        "name": "p",
        "max_per_tenant": 0,
        "preemption": "lower_priority",
        "grace": 1.0,
        "resources": {"cpu": {"capacity": 8000}},
    }
    with Client(resd_proc.socket) as client:
        client.call("pool.create", from_wire(PoolCreate, spec))
    tenants(resd_proc)
    pidfile = tmp_path / "pid"
    # giving back: CMD traps the notice's SIGTERM and exits 3 (its own status)
    on_term = "" if ignores_term else "exit 3"
    script = (
        f"trap '{on_term}' TERM; echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; "
        "while :; do sleep 0.05; done"
    )
    argv = ["--tenant", "low", "--pool", "p", "--cpu", "8", "--reclaimable", "--"]
    p = start(started, resd_proc, *argv, "sh", "-c", script)
    wait_for(pidfile.exists, 15, "the child to start")
    child = int(pidfile.read_text())
    boss = run(resd_proc, "--tenant", "high", "--pool", "p", "--cpu", "8", "--", "true")
    assert boss.returncode == 0, boss.stderr
    code, _, stderr = finish(p)
    assert "reclaimed" in stderr
    assert not alive(child)
    history = json.loads(resctl(resd_proc, "export", "--tenant", "low").stdout)
    kinds = [h["kind"] for h in history if h["kind"] != "registered"]
    if ignores_term:
        assert code == 10, stderr  # SIGKILLed at the deadline: preempted
        assert "killed by SIGKILL" in stderr
        assert kinds == ["reserved", "preempting", "preempted"]
    else:
        assert code == 3, stderr  # given back in time: CMD's own status, not 10
        assert "given back in time" in stderr
        assert kinds == ["reserved", "preempting", "released"]


@pytest.mark.slow
def test_preempted_without_grace(
    resd_proc: Proc, started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    create_pool(resd_proc, "gpus")
    tenants(resd_proc)
    ready = tmp_path / "ready"
    script = f"touch {ready}; exec sleep 60"
    p = start(
        started,
        resd_proc,
        "--tenant",
        "low",
        "--pool",
        "gpus",
        "--gpu",
        "1",
        "--",
        "sh",
        "-c",
        script,
    )
    wait_for(ready.exists, 15, "the child to start")
    resctl(resd_proc, "preempt", "--tenant", "high", "--target", "low")
    code, _, stderr = finish(p)
    assert code == 10, stderr
    assert "preempted by high" in stderr
    assert "killed by SIGTERM" in stderr


@pytest.mark.slow
def test_expiry_while_running(resd_proc: Proc) -> None:
    create_pool(resd_proc, "gpus")
    t0 = time.monotonic()
    result = run(resd_proc, "--pool", "gpus", "--gpu", "1", "--ttl", "1", "--", "sleep", "30")
    assert result.returncode == 9, result.stderr
    assert "expired" in result.stderr
    assert 0.9 <= time.monotonic() - t0 < 10
    assert listed(resd_proc) == []


@pytest.mark.slow
def test_daemon_going_away_stops_cmd(
    resd_proc: Proc, started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """With reconnecting turned off (``RESD_RECONNECT=0``); for the default, where CMD
    keeps running while resctl reconnects, see ``tests/test_reconnect_e2e.py``."""
    create_pool(resd_proc, "gpus")
    ready = tmp_path / "ready"
    argv = run_argv(
        resd_proc, "--pool", "gpus", "--gpu", "1", "--", "sh", "-c", f"touch {ready}; exec sleep 60"
    )
    p = subprocess.Popen(
        argv,
        env={**subprocess_env(), "RESD_RECONNECT": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(p)
    wait_for(ready.exists, 15, "the child to start")
    assert resd_proc.stop() == 0
    code, _, stderr = finish(p)
    assert code == 12, stderr
    assert "lost the connection" in stderr


@pytest.mark.slow
def test_errors_before_cmd_starts(resd_proc: Proc, tmp_path: Path) -> None:
    create_pool(resd_proc, "gpus")
    marker = tmp_path / "ran"
    touch = ["--", "touch", str(marker)]
    insufficient = run(resd_proc, "--pool", "gpus", "--gpu", "9", *touch)
    assert insufficient.returncode == 6
    assert "insufficient" in insufficient.stderr
    no_dashdash = run(resd_proc, "--pool", "gpus", "--gpu", "1", "touch", str(marker))
    assert no_dashdash.returncode == 2 and "put -- before" in no_dashdash.stderr
    bad_flag = run(resd_proc, "--pool", "gpus", "--gpu", "1", "--placement", "random", *touch)
    assert bad_flag.returncode == 2
    both = run(resd_proc, "--pool", "gpus", "--gpu", "1", "--vram", "1G", *touch)
    assert both.returncode == 2
    assert not marker.exists()
    missing = run(resd_proc, "--pool", "gpus", "--gpu", "1", "--", "/nonexistent")
    assert missing.returncode == 127
    assert "command not found" in missing.stderr
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\ntrue\n")
    os.chmod(script, 0o644)
    not_executable = run(resd_proc, "--pool", "gpus", "--gpu", "1", "--", str(script))
    assert not_executable.returncode == 126
    assert listed(resd_proc) == []


@pytest.mark.slow
def test_reserve_placement_flags(resd_proc: Proc) -> None:
    create_pool(
        resd_proc,
        "gpus",
        labels={"zone": "a"},
        resources={
            "gpu": gpu_set(),
            "ports": {"kind": "range", "lo": 30000, "hi": 30099},
        },
    )

    def reserve(*args: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(resctl(resd_proc, "reserve", *args, "--json").stdout)
        return info

    named = reserve("--pool", "gpus", "--member", "gpu=3,5")
    assert named["members"]["gpu"] == ["3", "5"]
    numa = reserve("--pool", "gpus", "--gpu", "2", "--numa", "1")
    assert all(int(g) // 4 == 1 for g in numa["members"]["gpu"])
    model = reserve("--pool", "gpus", "--gpu", "1", "--gpu-model", MODEL)
    assert len(model["members"]["gpu"]) == 1
    wrong_model = resctl(
        resd_proc,
        "reserve",
        "--pool",
        "gpus",
        "--gpu",
        "1",
        "--gpu-model",
        "Tesla K80",
        check=False,
    )
    assert wrong_model.returncode == 6
    by_label = reserve("--selector", "zone=a", "--vram", "10G", "--placement", "spread")
    assert by_label["pool"] == "gpus" and len(by_label["members"]["gpu"]) == 1
    ports = reserve("--pool", "gpus", "--member", "ports=30001,30005-30009")
    assert ports["values"]["ports"] == [[30001, 30001], [30005, 30009]]
    run_of = reserve("--pool", "gpus", "--res", "ports=10", "--contiguous", "ports")
    [[lo, hi]] = run_of["values"]["ports"]
    assert hi - lo == 9
    line = resctl(resd_proc, "reserve", "--pool", "gpus", "--member", "gpu=7").stdout
    assert "assigned=gpu:7" in line

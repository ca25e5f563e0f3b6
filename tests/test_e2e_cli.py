"""End to end: README's resgate quick start, verbatim, with resctl against a real resd."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, Proc, resctl, subprocess_env

pytestmark = pytest.mark.slow


def quickstart_lines() -> list[list[str]]:
    """The shell lines of README's quick start block (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines = [line.strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_readme_quickstart_verbatim(resd_proc: Proc, tmp_path: object) -> None:
    lines = quickstart_lines()
    assert lines[0][:3] == ["resctl", "pool", "create"]
    watch = [line for line in lines if line[1] == "watch"]
    assert watch == [["resctl", "watch", "--interval", "2"]]
    outputs: dict[str, str] = {}
    for line in lines:
        assert line[0] == "resctl"
        if line[1] == "watch":
            continue
        result = subprocess.run(
            [sys.executable, "-m", "resctl", *line[1:]],
            env={**subprocess_env(), "RESD_SOCKET": resd_proc.socket},
            capture_output=True,
            text=True,
            timeout=30,
            cwd=str(tmp_path),
        )
        assert result.returncode == 0, (line, result.stdout, result.stderr)
        outputs[" ".join(line[1:3])] = result.stdout

    listed = json.loads(resctl(resd_proc, "list", "--json").stdout)
    assert [r["tenant"] for r in listed["reservations"]] == ["tenant2"]  # tenant1 was preempted
    assert listed["reservations"][0]["resources"] == {"cpu": 8000, "memory": 16384 << 20}
    pool = json.loads(resctl(resd_proc, "pool", "show", "--name", "pool1", "--json").stdout)
    used = {r["name"]: r["allocated"] for r in pool["resources"]}
    assert used == {"cpu": 8000, "memory": 16 << 30, "gpu": 0}
    history = json.loads(resctl(resd_proc, "export", "--format", "json").stdout)
    assert [h["kind"] for h in history] == ["reserved", "reserved", "preempted"]
    csv_text = (tmp_path / "history.csv").read_text()  # type: ignore[operator]
    assert csv_text.splitlines()[0].startswith("seq,")
    assert len(csv_text.splitlines()) == 4
    assert "cpu" in outputs["status"] and "%" in outputs["status"]
    assert "\x1b[" not in "".join(outputs.values())  # not a TTY: plain output


def test_errors_have_distinct_exit_codes(resd_proc: Proc) -> None:
    resctl(resd_proc, "pool", "create", "--name", "small", "--cpu", "2")
    resctl(resd_proc, "tenant", "add", "--name", "low", "--priority", "2")
    resctl(resd_proc, "tenant", "add", "--name", "high", "--priority", "9")
    cases = [
        (["pool", "create", "--name", "small", "--cpu", "2"], 4, "exists"),
        (["pool", "show", "--name", "nope"], 3, "not_found"),
        (["reserve", "--tenant", "low", "--pool", "small", "--cpu", "3"], 6, "insufficient"),
        (["tenant", "add", "--name", "x", "--priority", "11"], 2, "priority"),
        (["reserve", "--tenant", "low", "--pool", "small", "--cpu", "-1"], 2, "cpu"),
        (["reserve", "--tenant", "low", "--pool", "small", "--cpu", "1", "--ttl", "0"], 2, "ttl"),
        (["reserve", "--tenant", "nobody", "--pool", "small", "--cpu", "1"], 3, "nobody"),
        (["preempt", "--tenant", "low", "--target", "high"], 8, "strictly higher"),
    ]
    for args, code, text in cases:
        result = resctl(resd_proc, *args, check=False)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert text in result.stderr, (args, result.stderr)
    first = resctl(resd_proc, "reserve", "--tenant", "low", "--pool", "small", "--cpu", "1")
    rid = first.stdout.split()[0]
    second = resctl(
        resd_proc, "reserve", "--tenant", "low", "--pool", "small", "--cpu", "1", check=False
    )
    assert second.returncode == 5 and rid in second.stderr  # conflict names the existing id
    short = resctl(
        resd_proc, "reserve", "--tenant", "high", "--pool", "small", "--cpu", "1.5", check=False
    )
    assert short.returncode == 6
    assert re.search(r"shortfall", short.stderr)
    history = json.loads(resctl(resd_proc, "export", "--format", "json", "--tenant", "low").stdout)
    assert [h["kind"] for h in history] == ["denied", "reserved", "denied"]


def test_reservation_id_as_argument_and_ttl_as_given(resd_proc: Proc) -> None:
    resctl(resd_proc, "pool", "create", "--name", "ids", "--cpu", "4", "--max-per-tenant", "0")
    resctl(resd_proc, "tenant", "add", "--name", "t1")
    reserve = ["reserve", "--tenant", "t1", "--pool", "ids", "--cpu", "1"]
    short = resctl(resd_proc, *reserve, "--ttl", "250ms").stdout
    assert "ttl=250ms" in short, short  # as given, not a rounded-up 1s
    first = resctl(resd_proc, *reserve, "--ttl", "1h").stdout
    rid = first.split()[0]
    assert "ttl=1h00m" in first, first
    renewed = resctl(resd_proc, "renew", rid, "--ttl", "90.5s").stdout
    assert "ttl=90.5s" in renewed, renewed
    assert "ttl=1h00m" in resctl(resd_proc, "renew", "--id", rid, "--ttl", "1h").stdout
    assert "active" in resctl(resd_proc, "why", rid).stdout
    assert "cpu=2" in resctl(resd_proc, "resize", rid, "--cpu", "2").stdout
    both = resctl(resd_proc, "why", rid, "--id", rid, check=False)
    assert both.returncode == 2 and "not both" in both.stderr
    assert resctl(resd_proc, "release", rid).stdout.strip() == f"{rid} released"


def test_socket_before_the_command(resd_proc: Proc) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "resctl", "--socket", resd_proc.socket, "status", "--json"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "server_version" in json.loads(result.stdout)


def test_no_daemon_is_said_plainly(tmp_path: object) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "resctl", "list", "--socket", "/nonexistent/resd.sock"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 12
    assert "no resd daemon is listening" in result.stderr


def test_watch_redraws_on_pushed_changes(resd_proc: Proc) -> None:
    resctl(resd_proc, "pool", "create", "--name", "w", "--cpu", "4", "--max-per-tenant", "0")
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resctl",
            "watch",
            "--interval",
            "0",
            "--json",
            "--socket",
            resd_proc.socket,
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())
        assert first  # the initial status
        resctl(resd_proc, "reserve", "--pool", "w", "--cpu", "3")
        deadline = time.monotonic() + 10
        seen = None
        while time.monotonic() < deadline:
            frame = json.loads(watch.stdout.readline())
            pools = {p["name"]: p for p in frame["pools"]}
            cpu = {r["name"]: r for r in pools["w"]["resources"]}["cpu"]
            if cpu["allocated"] == 3000:
                seen = cpu
                break
        assert seen is not None and seen["available"] == 1000
    finally:
        watch.terminate()
        watch.wait(10)
        if watch.stdout:
            watch.stdout.close()
        if watch.stderr:
            watch.stderr.close()


def test_version_reports_both(resd_proc: Proc) -> None:
    out = resctl(resd_proc, "version").stdout
    assert "resctl" in out and "resd" in out

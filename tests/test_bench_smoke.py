"""The benchmark harness still runs: ``python -m benchmarks --smoke`` (1 s, 1 client,
small sections) against real daemons, so ``benchmarks/`` cannot rot unnoticed.

Benchmarks themselves are not part of the test suite (see docs/performance.md). The
smoke run needs only what ``.[test]`` installs: reslock, matplotlib and pyinstrument are
the ``bench`` extra, and the reslock part is skipped when reslock is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report
from benchmarks.stats import max_overlap, percentile
from tests.conftest import ROOT, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--smoke",
            "--json",
            str(out / "smoke.json"),
            "--out",
            str(out / "performance.md"),
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results: dict[str, Any] = json.loads((out / "smoke.json").read_text())
    results["_markdown"] = (out / "performance.md").read_text()
    results["_stdout"] = proc.stdout
    return results


def row(results: dict[str, Any], system: str) -> dict[str, Any]:
    (found,) = [r for r in results["throughput"] if r["system"] == system]
    return found  # type: ignore[no-any-return]


def test_limit_and_resd_are_measured_and_checked(smoke: dict[str, Any]) -> None:
    assert smoke["failed"] == []
    limit = row(smoke, "limit")
    assert limit["clients"] == 1 and limit["ops_per_s"] > 0 and limit["p99_ms"] > 0
    for fsync in ("never", "always"):
        resd = row(smoke, f"resd fsync={fsync}")
        assert resd["ops_per_s"] > 0 and resd["rt_per_s"] == 2 * resd["ops_per_s"]
        assert resd["p50_ms"] <= resd["p99_ms"]
        assert resd["checked"] is True  # unique ids, nothing left held or queued
    ratios = {r["resd"]: r for r in smoke["ratios"]}
    assert ratios["fsync=never"]["of_limit"] > 0


def test_contention_grants_never_exceed_capacity(smoke: dict[str, Any]) -> None:
    (contention,) = smoke["contention"]
    assert contention["system"].startswith("resd")
    assert contention["grants"] > 0 and contention["min_grants"] > 0
    assert 1 <= contention["max_holders_seen"] <= contention["capacity"]


def test_scale_loads_replays_and_restores(smoke: dict[str, Any]) -> None:
    scale = smoke["scale"]
    assert scale["active"] == scale["params"]["reservations"] + 1
    assert scale["queued"] == scale["params"]["waiters"]
    assert scale["log"]["records"] >= scale["params"]["log_records"]
    assert scale["restored_ok"] is True
    assert scale["restart_log_s"] > 0 and scale["restart_snapshot_s"] > 0


def test_report_is_written(smoke: dict[str, Any]) -> None:
    md = smoke["_markdown"]
    assert report.BEGIN in md and report.END in md
    assert "### Throughput and latency" in md and "### Targets" in md
    assert "resd fsync=never" in smoke["_stdout"]


def test_reslock_is_measured_when_installed(smoke: dict[str, Any]) -> None:
    pytest.importorskip("reslock")
    reslock = row(smoke, "reslock")
    assert reslock["ops_per_s"] > 0 and reslock["checked"] is True
    ratios = {r["resd"]: r for r in smoke["ratios"]}
    assert ratios["fsync=always"]["of_reslock"] > 0


def test_overlap_and_percentiles() -> None:
    assert max_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # touching ends do not overlap
    assert max_overlap([(0, 3), (1, 2), (1.5, 4)]) == 3
    assert max_overlap([]) == 0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7.0


def test_markdown_block_is_replaced_in_place(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Perf\n\nprose before\n\n{report.BEGIN}\nold\n{report.END}\n\nprose after\n")
    report.write_markdown(doc, f"{report.BEGIN}\nnew\n{report.END}")
    text = doc.read_text()
    assert "prose before" in text and "prose after" in text
    assert "new" in text and "old" not in text

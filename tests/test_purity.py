"""The pure core stays pure (STYLE: "purity enforced by a test"): the books, the
wait queue's ranking, victim choice and GPU attribution import no trio, no I/O
library and no vendor library, so the property tests exercise exactly what runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import subprocess_env

PURE = [
    "resd.pools",
    "resd.tenants",
    "resd.holdings",
    "resd.intervals",
    "resd.preemption",
    "resd.gpu_usage",
    "resd.reconcile",
    "resd.gpu_policy",
    "resd.resize",
    "resd.fairshare",
    "resd.quotas",
    "resd.scheduler",
]
# (socket and threading come with resd_client's own package, the sync client)
BANNED = ["trio", "psutil", "pynvml", "structlog"]


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_imports_no_io(module: str) -> None:
    code = (
        "import sys\n"
        f"import {module}\n"
        f"print(' '.join(sorted(m for m in {BANNED!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [], f"{module} pulls in {out.stdout.strip()}"

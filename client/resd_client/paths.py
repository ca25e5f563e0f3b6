"""Where the daemon listens and keeps state (SPEC §6), shared by daemon and clients.

User mode: socket ``$XDG_RUNTIME_DIR/resd/resd.sock`` (``/tmp/resd-$UID/resd.sock``
when that is unset), state ``$XDG_STATE_HOME/resd`` (``~/.local/state/resd``).
System mode (``resd --system``): ``/run/resd/resd.sock`` and ``/var/lib/resd``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

SYSTEM_SOCKET: Final = Path("/run/resd/resd.sock")
SYSTEM_STATE: Final = Path("/var/lib/resd")


def user_socket() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "resd" / "resd.sock"
    return Path(f"/tmp/resd-{os.getuid()}") / "resd.sock"


def user_state_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "resd"


def socket_candidates(explicit: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where a client looks, in order: ``explicit``, ``$RESD_SOCKET``, user, system."""
    if explicit:
        return [Path(explicit)]
    env = os.environ.get("RESD_SOCKET")
    if env:
        return [Path(env)]
    return [user_socket(), SYSTEM_SOCKET]

"""Whether an NVIDIA MPS control daemon serves this host (the ``mps`` enforcement level).

MPS clients find the control daemon through its socket ``control`` in the pipe
directory: ``$CUDA_MPS_PIPE_DIRECTORY``, else ``/tmp/nvidia-mps`` (NVIDIA's MPS
documentation, "CUDA_MPS_PIPE_DIRECTORY"). Only while one listens there do the
``CUDA_MPS_*`` limits that ``resctl run`` sets bind a CUDA program, so the daemon
asks ``mps_active()`` once at start. Standard library only; never raises.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

PIPE_ENV: Final = "CUDA_MPS_PIPE_DIRECTORY"
DEFAULT_PIPE_DIRECTORY: Final = "/tmp/nvidia-mps"
CONTROL: Final = "control"


def control_path(env: Mapping[str, str] = os.environ, root: Path = Path("/")) -> Path:
    """Where the control daemon's socket is, under ``root`` (``/`` but in tests)."""
    directory = env.get(PIPE_ENV) or DEFAULT_PIPE_DIRECTORY
    return root / directory.lstrip("/") / CONTROL


def mps_active(env: Mapping[str, str] = os.environ, root: Path = Path("/")) -> bool:
    """True when ``control`` exists as a socket or FIFO in the pipe directory, and a
    socket there is not stale: a left-over one that refuses connections (the daemon
    died) counts as no daemon. A socket we may not connect to still counts: it
    exists, and clients of other users may reach it.
    """
    path = control_path(env, root)
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    if stat.S_ISFIFO(mode):
        return True
    if not stat.S_ISSOCK(mode):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True
    return True


__all__ = ["DEFAULT_PIPE_DIRECTORY", "PIPE_ENV", "control_path", "mps_active"]

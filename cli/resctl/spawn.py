"""Start ``resctl run``'s CMD without running Python code between fork and exec.

resctl already has threads when it starts CMD (the resd client's reader, the push
reader), and a Popen ``preexec_fn`` runs Python code in the forked child of that
threaded process, where a lock some other thread held at fork time (the import lock,
malloc's, ctypes's loader) is held forever: the child can deadlock. So CMD is
started as a fresh, single-threaded interpreter (``python -I -S``) running
``HELPER``, which does the child's set-up and then execs CMD in place: same pid, so
the Popen's pid is CMD's pid. The process group is still made by Popen's
``process_group=0``, which CPython does in C, running no Python code in the child.

Whether the exec worked comes back on the classic close-on-exec status pipe: EOF
with nothing written means CMD is running; otherwise the helper wrote the errno and
exited, and ``start`` raises the OSError that Popen itself would have raised.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Final

#: The helper. argv: status fd, resctl's pid, terminal fd or ``-``, gate fd or
#: ``-``, ``=`` + CMD's LC_CTYPE or empty when it has none, then CMD.
#:
#: - ``PR_SET_PDEATHSIG`` = SIGKILL (Linux): CMD dies with resctl. The signal fires
#:   when the *thread* that forked exits; Popen is called from resctl's main thread,
#:   which lives for the whole run. It survives execve (except for set-user-ID,
#:   set-group-ID or file-capability binaries, where the kernel clears it; the
#:   watchdog still covers those).
#: - If resctl died before that took effect (our parent is someone else), die now.
#: - Given a gate descriptor, wait for resctl's go (one byte) before the exec: resd
#:   moves this process into the lease's cgroup meanwhile, so that nothing CMD does
#:   escapes its limits. EOF instead: resctl gave up (or died); exit.
#: - Given a terminal descriptor, make our group the foreground one (SIGTTOU blocked
#:   meanwhile, as ``resctl.run.give_terminal`` does), last, just before the exec.
#: - Undo what this interpreter's start-up changed: it ignores SIGPIPE and SIGXFSZ
#:   (ignored signals stay ignored across exec; Popen's ``restore_signals`` resets
#:   them) and may coerce a C locale by setting LC_CTYPE (PEP 538).
HELPER: Final = """
import os, signal, sys
status, parent, tty, gate, lc_ctype = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
cmd = sys.argv[6:]
os.set_inheritable(status, False)
for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
if lc_ctype:
    os.environ["LC_CTYPE"] = lc_ctype[1:]
else:
    os.environ.pop("LC_CTYPE", None)
if sys.platform.startswith("linux"):
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        prctl.restype = ctypes.c_int
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (ImportError, OSError, AttributeError):
        pass
if os.getppid() != parent:
    os.kill(os.getpid(), signal.SIGKILL)
if gate != "-":
    if os.read(int(gate), 1) != b"g":
        os._exit(127)
    os.close(int(gate))
if tty != "-":
    fd = int(tty)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    os.close(fd)
try:
    os.execvp(cmd[0], cmd)
except OSError as exc:
    os.write(status, str(exc.errno or 0).encode())
os._exit(127)
"""


def start(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    tty: int | None = None,
    before_exec: Callable[[int], object] | None = None,
) -> subprocess.Popen[bytes]:
    """Start CMD (stdio inherited) with ``env``, in its own process group, with a
    parent-death signal; with ``tty``, CMD's group gets that terminal's foreground.
    ``before_exec(pid)`` runs while the child waits at its gate, before CMD is
    exec'd in it (resctl run has resd confine it there); if it raises, CMD never
    runs and the exception propagates.

    Returns once CMD runs (the Popen's pid is CMD's). Raises OSError, as Popen does,
    when the helper cannot start or CMD cannot be exec'd (FileNotFoundError when it
    is not found); the helper is reaped then.
    """
    read_end, write_end = os.pipe()
    gate_r, gate_w = os.pipe() if before_exec is not None else (None, None)
    try:
        lc_ctype = env.get("LC_CTYPE")
        fds = tuple(fd for fd in (write_end, tty, gate_r) if fd is not None)
        helper = [
            str(write_end),
            str(os.getpid()),
            "-" if tty is None else str(tty),
            "-" if gate_r is None else str(gate_r),
        ]
        # No preexec_fn, on purpose: see the module docstring.
        child = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                HELPER,
                *helper,
                "" if lc_ctype is None else f"={lc_ctype}",
                *cmd,
            ],
            env=env,
            process_group=0,
            pass_fds=fds,
        )
    except BaseException:
        os.close(read_end)
        if gate_w is not None:
            os.close(gate_w)
        raise
    finally:
        os.close(write_end)
        if gate_r is not None:
            os.close(gate_r)
    if before_exec is not None and gate_w is not None:
        try:
            before_exec(child.pid)
            os.write(gate_w, b"g")
        except BaseException:
            os.close(gate_w)  # EOF at the gate: the helper exits without CMD
            os.close(read_end)
            child.wait()
            raise
        os.close(gate_w)
    with os.fdopen(read_end, "rb") as status:
        report = status.read()  # EOF when CMD is exec'd (close-on-exec) or the helper died
    if not report:
        return child
    child.wait()
    code = int(report) if report.isdigit() else 0
    raise OSError(code, os.strerror(code) if code else "cannot execute", cmd[0])

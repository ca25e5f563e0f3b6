"""Where a command meets the outside: its output streams, the daemon, its errors.

``Output`` owns stdout (a rich console, or raw JSON) and stderr. ``guard`` turns
every ``ResdError`` — raised by a flag parser before connecting, or returned by
the daemon — into ``resctl: <code>: <message>`` on stderr (plus an ``{"error":…}``
map on stdout with ``--json``) and exits with the error's exit code. ``connect``
opens a ``Client`` on the command's ``--socket``, or the one given before the
command (``resctl --socket S list``); a missing daemon is an ``UnavailableError``
(exit 12).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import sys
from collections.abc import Iterator
from typing import Any, Final, NoReturn

import typer
from rich.console import Console, RenderableType

from resctl.render import insufficient_lines, is_plain, json_text, make_console, quota_detail_lines
from resd_client import Client
from resd_client.errors import ErrorCode, ResdError

CLIENT_NAME: Final = "resctl"
#: ``resctl --socket S`` (given before the command), for this invocation only
_DEFAULT_SOCKET: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "resctl_default_socket", default=None
)
EXIT_INTERRUPTED: Final = 130


class Output:
    """stdout and stderr of one command; ``json`` selects machine output."""

    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode
        self.plain = is_plain(sys.stdout)
        self.console: Console = make_console(sys.stdout, self.plain)

    def show(self, *renderables: RenderableType) -> None:
        """Print human output (never in ``--json`` mode)."""
        if self.json:
            return
        if not self.plain:
            self.console.print(*renderables)
            return
        with self.console.capture() as captured:
            self.console.print(*renderables)
        sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))

    def line(self, text: str) -> None:
        """Print one plain line of human output, untouched by rich."""
        if not self.json:
            sys.stdout.write(text + "\n")

    def emit(self, value: Any, *, compact: bool = False) -> None:
        """Print a protocol value as JSON (only in ``--json`` mode)."""
        if self.json:
            sys.stdout.write(json_text(value, compact=compact) + "\n")
            sys.stdout.flush()

    def warn(self, message: str) -> None:
        sys.stderr.write(f"resctl: {message}\n")

    def error(self, exc: ResdError) -> None:
        """Report ``exc`` on stderr (and as JSON on stdout in ``--json`` mode)."""
        lines = [f"resctl: {exc.code}: {exc.message}"]
        if exc.code == ErrorCode.INSUFFICIENT:
            lines += insufficient_lines(exc.details)
        elif exc.code == ErrorCode.QUOTA_EXCEEDED:
            lines += quota_detail_lines(exc.details)
        sys.stderr.write("\n".join(lines) + "\n")
        if self.json:
            sys.stdout.write(json.dumps({"error": exc.to_wire()}, ensure_ascii=False) + "\n")

    def fail(self, exc: ResdError) -> NoReturn:
        """Report ``exc`` and exit with its exit code."""
        self.error(exc)
        raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def guard(out: Output) -> Iterator[None]:
    """Map ResdError to its report and exit code; Ctrl-C to exit 130."""
    try:
        yield
    except ResdError as exc:
        out.fail(exc)
    except KeyboardInterrupt:
        sys.stderr.write("resctl: interrupted\n")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def set_default_socket(ctx: typer.Context, socket: str | None) -> None:
    """Remember ``resctl --socket S`` (before the command) for every command of this
    invocation; forgotten when the invocation's context closes."""
    token = _DEFAULT_SOCKET.set(socket)
    ctx.call_on_close(lambda: _DEFAULT_SOCKET.reset(token))


def socket_of(socket: str | None) -> str | None:
    """The socket a command connects to: its own ``--socket``, else the one given
    before the command, else None (the client then tries ``$RESD_SOCKET``, the user
    socket and the system socket)."""
    return socket if socket is not None else _DEFAULT_SOCKET.get()


@contextlib.contextmanager
def connect(socket: str | None) -> Iterator[Client]:
    """A connected client, closed on exit. Raises UnavailableError with no daemon."""
    client = Client(socket_of(socket), name=CLIENT_NAME)
    try:
        yield client
    finally:
        client.close()

"""``resctl watch``: redraw utilization on every state change the daemon pushes.

The daemon is never polled: ``subscribe`` returns the first status, then the
client's reader thread queues a ``StateEvent`` after each change. A pushed change is
drawn at once; ``Throttle`` (pure) coalesces a burst so that frames for changes are
at least ``GAP`` apart while the latest state is always drawn eventually, and (for
the table views, whose countdowns move) asks for a redraw every ``--interval``
seconds even when nothing changed. A TTY gets a ``rich.live.Live`` display; plain
output reprints each frame; ``--json`` prints one compact line per change.

When resd restarts, the client reconnects and subscribes again by itself; watch
says so on stderr, draws the status of the new daemon, and goes on. It stops with
the ``unavailable`` error only when the client gives up reconnecting.
"""

from __future__ import annotations

import enum
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import typer
from rich.console import RenderableType
from rich.live import Live

from resctl.options import JsonOpt, SocketOpt, parse_duration
from resctl.render import status_view
from resctl.session import Output, connect, guard
from resd_client import Client, Disconnected, Reconnected
from resd_client.errors import InvalidError, UnavailableError
from resd_client.protocol import StateEvent, Status

GAP = 0.25
"""Least time between two frames drawn for pushed changes: a burst of pushes is
drawn as at most four frames a second."""


@dataclass
class Throttle:
    """Draw a change once ``interval`` seconds have passed since the last frame
    (coalescing a burst, never dropping the last change), and, when ``every`` is
    set, redraw every ``every`` seconds even without a change."""

    interval: float
    every: float | None = None
    last: float = -math.inf
    pending: bool = False

    def changed(self) -> None:
        self.pending = True

    def due(self, now: float) -> bool:
        """A change waits and ``interval`` has passed, or ``every`` has passed."""
        since = now - self.last
        if self.pending and since >= self.interval:
            return True
        return self.every is not None and since >= self.every

    def wait(self, now: float) -> float | None:
        """How long to block for the next event: forever when nothing is pending
        and there is no periodic redraw."""
        ends = []
        if self.pending:
            ends.append(self.last + self.interval)
        if self.every is not None:
            ends.append(self.last + self.every)
        if not ends:
            return None
        return max(0.0, min(ends) - now)

    def drawn(self, now: float) -> None:
        self.last = now
        self.pending = False


class Wake(enum.Enum):
    TIMEOUT = "timeout"
    CLOSED = "closed"


def next_event(client: Client, timeout: float | None) -> Any:
    """The next pushed event, ``Wake.TIMEOUT`` after ``timeout``, or ``Wake.CLOSED``."""
    for event in client.events(timeout):
        return event
    return Wake.CLOSED if client.closed else Wake.TIMEOUT


def follow(
    client: Client,
    throttle: Throttle,
    draw: Callable[[StateEvent], None],
    first: StateEvent,
    link: Callable[[Disconnected | Reconnected], StateEvent | None] = lambda _: None,
) -> NoReturn:
    """Draw ``first``, then each pushed state as the throttle allows; never returns.
    ``link(notice)`` hears of a lost and a regained connection; a state it returns
    is drawn (the daemon's after a restart).

    Raises UnavailableError when the session closes (reconnecting gave up).
    """
    state = first
    draw(state)
    throttle.drawn(time.monotonic())
    while True:
        now = time.monotonic()
        if throttle.due(now):
            draw(state)
            throttle.drawn(now)
            continue
        event = next_event(client, throttle.wait(now))
        if event is Wake.CLOSED:
            why = client.session.closed or "resd closed the connection"
            raise UnavailableError(f"{why}; watch stopped")
        if isinstance(event, Disconnected | Reconnected):
            fresh = link(event)
            if fresh is not None:
                state = fresh
                throttle.changed()
        elif isinstance(event, StateEvent):
            state = event
            throttle.changed()


@dataclass
class Followed:
    """What ``watch`` shows besides the pushed state: the daemon's status (its
    version, boot and start), renewed after a reconnection; says so on stderr."""

    client: Client
    out: Output
    status: Status

    def link(self, notice: Disconnected | Reconnected) -> StateEvent | None:
        if isinstance(notice, Disconnected):
            self.out.warn(f"lost the connection to resd ({notice.reason}); reconnecting")
            return None
        self.status = self.client.status()
        self.out.warn(f"reconnected to resd (boot {self.status.boot_id})")
        return StateEvent(pools=self.status.pools, active=self.status.active, at=time.time())


def watch(
    interval: Annotated[
        str,
        typer.Option(
            "--interval",
            metavar="SECONDS",
            help="Redraw the table this often for its countdowns (0: only on changes); "
            "pushed changes are drawn at once.",
        ),
    ] = "2",
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Live utilization, drawn when the daemon pushes a change. Ctrl-C quits."""
    out = Output(json_out)
    with guard(out):
        every = parse_duration(interval, "interval")
        if every < 0:
            raise InvalidError(
                f"interval must be 0 or more seconds, got {every:g}", {"field": "interval"}
            )
        with connect(socket) as client:
            status: Status = client.subscribe()
            first = StateEvent(pools=status.pools, active=status.active, at=time.time())
            # JSON has no countdowns: one line per (coalesced) change, nothing periodic.
            periodic = every if every > 0 and not out.json else None
            throttle = Throttle(GAP, periodic)
            seen = Followed(client, out, status)
            try:
                if out.json:
                    follow(client, throttle, lambda s: out.emit(s, compact=True), first, seen.link)
                elif out.plain:

                    def reprint(s: StateEvent) -> None:
                        _reprint(out, seen.status, s, every)

                    follow(client, throttle, reprint, first, seen.link)
                else:
                    with Live(console=out.console, auto_refresh=False) as live:

                        def redraw(s: StateEvent) -> None:
                            live.update(_frame(seen.status, s, every, plain=False), refresh=True)

                        follow(client, throttle, redraw, first, seen.link)
            except KeyboardInterrupt:
                return


def _frame(status: Status, state: StateEvent, every: float, *, plain: bool) -> RenderableType:
    now = time.time()
    also = f" and every {every:g}s" if every > 0 else ""
    heading = (
        f"resd watch  updated {time.strftime('%H:%M:%S', time.localtime(state.at))}"
        f"  (redraws on each change{also}; Ctrl-C quits)"
    )
    return status_view(
        server_version=status.server_version,
        boot_id=status.boot_id,
        started_at=status.started_at,
        pools=state.pools,
        tenants=None,
        active=state.active,
        connections=None,
        now=now,
        plain=plain,
        heading=heading,
    )


def _reprint(out: Output, status: Status, state: StateEvent, every: float) -> None:
    out.show(_frame(status, state, every, plain=True))
    out.line("")
    sys.stdout.flush()

"""structlog setup: JSON lines when stderr is not a TTY, readable console otherwise.

Keys. A line about a request carries the request's context, bound once with
``structlog.contextvars`` rather than passed on each call: ``conn`` (the connection
id), ``peer_uid`` and ``peer_pid`` (SO_PEERCRED), bound for the connection's task
by the server; ``op`` and ``request`` (the client's request id), and
``reservation`` and ``tenant`` when the request names them (``reserve`` binds the
tenant it resolved), bound for the request's task. Lines an actor logs while
handling a request's message carry the same keys although the actor may run in
its own task: an envelope carries its sender's context and the actor handles the
message inside it (``resd.actor``). A line about a reservation passes
``reservation`` and ``tenant`` itself (a key passed on the call wins over the bound
one), so a preemption victim is named as what the line is about while ``op``,
``request`` and ``peer_*`` say which request caused it. What no one request caused
(timers, the scheduling pass after a batch, the reconciler, the process watcher,
start-up) carries only what it is about.

Levels. Nothing a request does routinely is logged above debug: each request ends
with one ``handled`` or ``refused`` line (``ops.dispatch``; ``refused`` also for
frames the server could not decode), and reserving, queueing, granting,
releasing, renewing, expiring and resizing are debug lines too, as are errors a
client caused (bad input, no room, not allowed): the history (``export``) has
every change, and at info the hot path pays only for the filtered calls. Above
debug is what an operator acts on: start and stop, the configuration and what
was detected, the journal failing or recovering, snapshots, GPU sampling lost or
back, GPU over-use marks and terminations, preemptions (someone's work is
evicted by policy), resd closing connections (stalls, overflow, refusals at a
limit, at most one warning per limit every 10 s) and what is held for and
re-attached after that or a restart (``orphaned``, ``reattached``), and internal
errors (``handler_failed``, ``actor_failed``: a bug).

Rendering. JSON (``--log-format json``, or ``auto`` when stderr is not a TTY): one
object per line with ``event``, ``level`` and ``timestamp`` (ISO 8601, UTC); an
exception is rendered into the line's ``exception`` key as one string
(``format_exc_info``: the traceback's newlines are escaped inside the JSON, so a
line stays a line; ``dict_tracebacks`` was not chosen, as its frame locals could
copy attach tokens into the log). When stderr is a journald stream
(``$JOURNAL_STREAM`` names it) each line starts with the syslog priority
(``<3>`` … ``<7>``), which journald strips and stores as ``PRIORITY``, so
``journalctl -p warning`` filters by level. The console renderer prints
tracebacks over several lines, for people at a terminal.

Loggers are cached on first use, so ``configure`` must run before the daemon logs
anything.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

#: syslog priority of each log method (journald's ``PRIORITY``)
PRIORITIES = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}


def _with_priority(_logger: Any, method: str, line: Any) -> Any:
    """After the renderer: prefix the line with its syslog priority for journald."""
    return f"<{PRIORITIES.get(method, 6)}>{line}"


def is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journald stream systemd connected (``$JOURNAL_STREAM``
    is ``device:inode`` of it); False for anything else, a redirect included."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError):  # unset or malformed; a stream without a descriptor
        return False


def processors(use_json: bool, *, journal: bool = False) -> list[structlog.typing.Processor]:
    """The processor chain ``configure`` installs (tests render lines with it)."""
    chain: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        chain += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        chain.append(structlog.dev.ConsoleRenderer(colors=False))
    if journal:
        chain.append(_with_priority)
    return chain


def configure(fmt: str = "auto", level: str = "info") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    structlog.configure(
        processors=processors(use_json, journal=is_journal(sys.stderr)),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )

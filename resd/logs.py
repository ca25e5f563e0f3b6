"""structlog setup: JSON lines when stderr is not a TTY, readable console otherwise.

Context such as the reservation id is passed as keyword arguments on each line by
the actors that own it, so every line about a reservation carries its id. Routine
lines (each reserve and release) are at debug level: the history (``export``) has
every change, and at info the hot path pays nothing for logging. Loggers are
cached on first use, so ``configure`` must run before the daemon logs anything.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(fmt: str = "auto", level: str = "info") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )

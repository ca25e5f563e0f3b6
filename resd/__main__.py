"""``resd``: run the daemon in the foreground (systemd runs it the same way)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from resd.config import FSYNC_MODES, ConfigError, load
from resd.daemon import Daemon, StartupError
from resd.journal import JournalCorrupt
from resd.logs import configure
from resd_client import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resd",
        description="Host resource reservation daemon. Runs in the foreground; stop it with SIGTERM or Ctrl-C.",
    )
    parser.add_argument("--version", action="version", version=f"resd {__version__}")
    parser.add_argument(
        "--system",
        action="store_true",
        default=None,
        help="system mode: /run/resd/resd.sock and /var/lib/resd",
    )
    parser.add_argument("--socket", help="Unix socket path (default: user or system path)")
    parser.add_argument("--state-dir", help="state directory (journal and snapshots)")
    parser.add_argument(
        "--config", type=Path, help="TOML config (default /etc/resd/resd.toml in system mode)"
    )
    parser.add_argument(
        "--fsync", choices=FSYNC_MODES, help="durability of acknowledgements (default always)"
    )
    parser.add_argument(
        "--no-host-pool",
        dest="host_pool",
        action="store_false",
        default=None,
        help="do not create the discovered 'host' pool on first start",
    )
    parser.add_argument("--log-format", choices=("auto", "json", "console"))
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        config = load(
            args.config,
            overrides={
                "system": args.system,
                "socket": args.socket,
                "state_dir": args.state_dir,
                "fsync": args.fsync,
                "host_pool": args.host_pool,
                "log_format": args.log_format,
                "log_level": args.log_level,
            },
        )
    except ConfigError as exc:
        print(f"resd: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure(config.log_format, config.log_level)
    try:
        trio.run(Daemon(config).run)
    except (StartupError, JournalCorrupt) as exc:
        print(f"resd: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

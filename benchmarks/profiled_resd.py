"""``python -m benchmarks.profiled_resd [resd args]``: resd with a pyinstrument profiler
that SIGUSR1 starts and SIGUSR2 stops, saving the session to ``$BENCH_PROFILE_OUT``.

So a profile covers only the measured window, not startup, loading or shutdown. The
profiler samples the main thread (the trio loop) every 0.5 ms whatever task runs.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any


def main() -> None:
    from pyinstrument import Profiler  # type: ignore[import-not-found, unused-ignore]

    out = os.environ["BENCH_PROFILE_OUT"]
    profiler: Any = Profiler(interval=0.0005, async_mode="disabled")

    def start(signum: int, frame: FrameType | None) -> None:
        profiler.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        session = profiler.stop()
        tmp = out + ".tmp"
        session.save(tmp)
        os.replace(tmp, out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from resd.__main__ import main as resd_main

    sys.argv[0] = "resd"
    resd_main()


if __name__ == "__main__":
    main()

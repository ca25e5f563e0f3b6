"""fsync against fdatasync for the write-ahead log's access pattern: append 4 KiB to a
file, then make it durable.

    python -m benchmarks.fsync                      # 2,000 syncs each way, in the cwd
    python -m benchmarks.fsync --n 500 --dir /var/lib/resd

The file grows with every append (as a WAL segment does), so both calls must write the
new size as well as the data: what fdatasync may skip is only metadata a read does not
need (mtime). The ways are interleaved in rounds of 50 so that a change in the machine's
load during the run hits each alike (in a random order each round). For reference it also measures fdatasync of a
4 KiB overwrite inside a file that does not grow (what fdatasync costs when no size has
to be written), and fsync of the directory (what a new segment adds once).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.stats import percentile

BLOCK = b"x" * 4096
ROUND = 50


def _append(sync: Callable[[int], None]) -> Callable[[int, int], None]:
    def step(fd: int, _: int) -> None:
        os.write(fd, BLOCK)
        sync(fd)

    return step


def _overwrite(fd: int, i: int) -> None:
    os.pwrite(fd, BLOCK, (i % 256) * len(BLOCK))
    os.fdatasync(fd)


def measure(directory: Path, n: int) -> dict[str, list[float]]:
    """Seconds of each step, per way, over ``n`` steps each."""
    ways: dict[str, Callable[[int, int], None]] = {
        "append + fsync": _append(os.fsync),
        "append + fdatasync": _append(os.fdatasync),
        "overwrite + fdatasync (size unchanged)": _overwrite,
        "fsync of the directory": lambda fd, _: os.fsync(fd),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    fds: dict[str, int] = {}
    try:
        for k, name in enumerate(ways):
            if name.startswith("fsync of the directory"):
                fds[name] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                continue
            path = directory / f"fsync-probe-{k}"
            fds[name] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            if name.startswith("overwrite"):
                os.close(fds[name])  # O_APPEND would ignore pwrite's offset
                fds[name] = os.open(path, os.O_RDWR)
                os.write(fds[name], BLOCK * 256)
                os.fsync(fds[name])
        done = 0
        order = list(ways)
        while done < n:
            batch = min(ROUND, n - done)
            random.shuffle(order)
            for name in order:
                step, fd = ways[name], fds[name]
                for i in range(done, done + batch):
                    t = time.perf_counter()
                    step(fd, i)
                    times[name].append(time.perf_counter() - t)
            done += batch
    finally:
        for fd in fds.values():
            os.close(fd)
        for probe in directory.glob("fsync-probe-*"):
            probe.unlink()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="syncs each way (default 2000)")
    parser.add_argument(
        "--dir", type=Path, default=Path.cwd(), help="a directory on the file system to measure"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fsync-bench-", dir=args.dir) as tmp:
        times = measure(Path(tmp), args.n)
    st = os.statvfs(args.dir)
    print(f"{args.n} syncs each way in {args.dir} (block size {st.f_bsize})")
    print(f"{'':40} {'median µs':>10} {'p99 µs':>10} {'mean µs':>10}")
    for name, values in times.items():
        values.sort()
        median, p99 = percentile(values, 50) * 1e6, percentile(values, 99) * 1e6
        mean = sum(values) / len(values) * 1e6
        print(f"{name:40} {median:10.0f} {p99:10.0f} {mean:10.0f}")


if __name__ == "__main__":
    main()

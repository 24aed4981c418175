"""Wall time of `ddscore-jax --help` (and other argument lists), several runs, load average beside.

    python benchmarks/bench_startup.py                       # this checkout's command
    python benchmarks/bench_startup.py --before /path/to/other/bin/ddscore-jax

With ``--before``, the two commands run interleaved (before, after, before, ...), so that both
sides see the same machine load; the 1-minute load average is printed before and after. Each run
is a fresh process, as a user's is; the times are the median and the range over ``--runs``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="another ddscore-jax executable to compare with")
    p.add_argument("--after", default=shutil.which("ddscore-jax") or "",
                   help="the command measured (default: ddscore-jax on PATH)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--args", default="--help", help="arguments, space separated")
    a = p.parse_args()
    after = [a.after] if a.after else [sys.executable, "-m", "ddscore_jax.cli"]
    sides = {"after": after}
    if a.before:
        sides = {"before": [a.before], **sides}
    args = a.args.split()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    times: dict[str, list[float]] = {k: [] for k in sides}
    for cmd in sides.values():  # one warm-up each: the page cache, not the import, is cold
        _time([*cmd, *args])
    for _ in range(a.runs):
        for name, cmd in sides.items():
            times[name].append(_time([*cmd, *args]))
    for name, cmd in sides.items():
        t = times[name]
        print(f"{name:>6}: {' '.join(cmd)} {' '.join(args)}: median {statistics.median(t):.2f} s "
              f"(min {min(t):.2f}, max {max(t):.2f}, {len(t)} runs)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

"""Sandbox benchmark: cold kernel start, warm round trip of `print(1)`, first matplotlib plot.

    python benchmarks/bench_sandbox.py [--runs 100] [--starts 5] [--no-isolation]

Cold start is `Sandbox(...)` returning (kernel launched and answering), so a session's first
`run()` pays nothing more. The round trip is one `Sandbox.run("print(1)")`: execute request,
every output message, the idle status. Target: warm p50 <= 25 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatglm_core.sandbox import Sandbox  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="warm round trips to time")
    parser.add_argument("--starts", type=int, default=5, help="cold starts to time")
    parser.add_argument("--no-isolation", action="store_true", help="rlimits only, no bubblewrap")
    args = parser.parse_args()
    isolate = False if args.no_isolation else None

    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as root:
        Sandbox(root=root, isolate=isolate).close()  # imports and the bwrap probe, once per process
        starts = []
        for _ in range(args.starts):
            t = time.perf_counter()
            box = Sandbox(root=root, isolate=isolate)
            starts.append(time.perf_counter() - t)
            box.close()

        with Sandbox(root=root, isolate=isolate) as box:
            first = box.run("print(1)").elapsed
            trips = []
            for _ in range(args.runs):
                t = time.perf_counter()
                result = box.run("print(1)")
                trips.append(time.perf_counter() - t)
                assert result.text == "1\n", result
            t = time.perf_counter()
            plot = box.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])")
            plot_s = time.perf_counter() - t
            assert len(plot.images) == 1, plot
            isolation = box.isolation

    ms = 1000
    print(f"isolation: {isolation}")
    median = statistics.median(starts)
    print(f"cold start      median {median:.3f} s   max {max(starts):.3f} s   ({args.starts} starts)")
    print(f"first run       {first * ms:.1f} ms")
    print(f"warm print(1)   p50 {percentile(trips, 0.5) * ms:.1f} ms   p95 {percentile(trips, 0.95) * ms:.1f} ms"
          f"   ({args.runs} runs; target p50 <= 25 ms)")
    print(f"first plot      {plot_s:.3f} s (imports matplotlib, builds its font cache)")


if __name__ == "__main__":
    main()

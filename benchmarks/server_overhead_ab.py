"""The server's own cost per request, A/B: `hm3 serve` from another source tree (A, `--before`)
against this one (B), same model folders, same machine, alternating runs.

Each server is pinned to core 0 with one thread, the client (this process) to core 1; per model,
A and B are started once and loaded in turn, A B A B ..., at concurrency 1 and 32, `--requests`
requests per run (one in ten malformed, as in serve_bench.py); medians of the runs' texts/s, p50
and p99. Writes benchmarks/results/server_overhead_ab.json.

  git worktree add /tmp/before <commit>
  .venv/bin/python benchmarks/server_overhead_ab.py --before /tmp/before/src \\
      --models hm3-demo/merged /tmp/hm3-serve-bench/openvino-int8          # ~6 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from hm3.checkpoint import write_json_atomic  # noqa: E402
from hm3.zoo import build_zoo  # noqa: E402

from serve_bench import machine, mixed_texts, one_run, start_servers, stop_servers  # noqa: E402

RESULTS = HERE / "results" / "server_overhead_ab.json"
CONCURRENCY = (1, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the src folder of the A code")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    zoo = build_zoo(progress=False)
    texts = mixed_texts(zoo)
    result = {"machine": machine(), "before": args.before, "requests": args.requests,
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "models": {}}
    for model in args.models:
        servers = {}
        for side, source in (("A", args.before), ("B", str(HERE.parent / "src"))):
            os.environ["PYTHONPATH"] = source  # the server process imports this hm3
            servers[side] = start_servers([Path(model)], pin=True)
        runs = {side: {c: [] for c in CONCURRENCY} for side in servers}
        try:
            for _ in range(args.rounds):
                for side, started in servers.items():
                    for c in CONCURRENCY:
                        row = asyncio.run(one_run([started[0][1]], texts, c, args.requests))
                        assert row["failures"] == 0, row
                        runs[side][c].append(row)
                        print(model, side, c, {k: round(v, 1) for k, v in row.items()
                                               if k.endswith(("_s", "_ms"))}, flush=True)
        finally:
            for started in servers.values():
                stop_servers(started)
        summary = {}
        for side, by_c in runs.items():
            summary[side] = {str(c): {key: statistics.median(r[key] for r in rows)
                                      for key in ("texts_per_s", "p50_ms", "p99_ms")}
                             for c, rows in by_c.items()}
        summary["B / A"] = {str(c): {key: summary["B"][str(c)][key] / summary["A"][str(c)][key]
                                     for key in ("texts_per_s", "p50_ms", "p99_ms")}
                            for c in CONCURRENCY}
        result["models"][model] = {"summary": summary, "runs": {
            side: {str(c): rows for c, rows in by_c.items()} for side, by_c in runs.items()}}
        print(model, summary, flush=True)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["load_average_after"] = os.getloadavg()
    write_json_atomic(Path(args.output), result)


if __name__ == "__main__":
    main()

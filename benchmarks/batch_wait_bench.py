"""How long the micro-batcher waits for company: `hm3 serve --max-wait-ms` A against B.

Two `hm3 serve` processes on the demo's merged model, identical but for `--max-wait-ms` (A: 5,
the old default; B: 0, run as soon as the model is free, with every text that queued meanwhile),
pinned to core 0 with one thread each, an async httpx client on core 1; at concurrency 1, 8, 32
and 64, load runs alternate A B A B (one text per request, every tenth malformed and answered
422). Medians of texts/s, p50 and p99 per server and concurrency, and B / A.

  .venv/bin/python benchmarks/batch_wait_bench.py --model /tmp/demo-before/merged
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hm3.checkpoint import write_json_atomic
from hm3.zoo import build_zoo

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import CONCURRENCY, alternate_load, machine, mixed_texts, start_servers  # noqa: E402

RESULTS = HERE / "results" / "serve_batch_wait.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/demo-before/merged")
    parser.add_argument("--a", type=float, default=5.0, help="server A's --max-wait-ms")
    parser.add_argument("--b", type=float, default=0.0, help="server B's --max-wait-ms")
    parser.add_argument("--runs", type=int, default=3, help="load runs per server and concurrency")
    parser.add_argument("--requests", type=int, default=192, help="requests per load run")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    zoo = build_zoo(progress=False)
    texts = mixed_texts(zoo)
    result = {"machine": machine(), "model": args.model,
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    waits = {f"A wait {args.a:g} ms": args.a, f"B wait {args.b:g} ms": args.b}
    servers = {name: start_servers([Path(args.model)], pin=True, max_wait_ms=wait)[0]
               for name, wait in waits.items()}

    def save(rows):  # partial results survive a stop
        write_json_atomic(Path(args.output), {**result, "load": rows})

    rows = result["load"] = alternate_load(servers, texts, CONCURRENCY, args.runs, args.requests,
                                           on_save=save)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["load_average_after"] = os.getloadavg()
    write_json_atomic(Path(args.output), result)
    for c, row in rows.items():
        cells = " | ".join(f"{m['texts_per_s']:.1f} ({m['p50_ms']:.0f}/{m['p99_ms']:.0f})"
                           for m in row["medians"].values())
        print(f"| {c} | {cells} | {row['texts_per_s_b_over_a']:.2f}× | "
              f"{row['p99_b_over_a']:.2f}× |")


if __name__ == "__main__":
    main()

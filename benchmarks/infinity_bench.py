"""An existing classification server on the same merged model: infinity-emb against `hm3 serve`,
throughput only.

infinity-emb serves a Hugging Face classifier through a `transformers` text-classification
pipeline: ONE softmax over all K labels of the merged model, not one per task, so its answers are
wrong for a multi-task model (see docs/serving.md); only its speed is compared here. It runs
from its own venv (`benchmarks/infinity_env.sh`, CPU torch pinned) so its dependencies
(transformers 4.x, sentence-transformers, ...) stay out of hm3's.

Both servers pinned to core 0 with one thread, an async httpx client on core 1, one zoo test
text per request, concurrency 8 and 32, load runs alternating A B A B; medians.

  benchmarks/infinity_env.sh
  .venv/bin/python benchmarks/infinity_bench.py --model /tmp/demo-before/merged
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from hm3.checkpoint import write_json_atomic
from hm3.zoo import build_zoo

from common import free_port, machine, mixed_texts, stop_servers, wait_until_healthy

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results" / "serve_infinity.json"
VENV = HERE / ".venv-infinity"


def start(command: list[str], url: str, health: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DO_NOT_TRACK": "1",
           "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    process = subprocess.Popen(["taskset", "-c", "0", *command], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until_healthy(process, url, timeout_s=900, path=health)
    return process


async def one_run(url: str, body, texts: list[str], concurrency: int, requests: int) -> dict:
    """`requests` calls by `concurrency` closed-loop clients, one text per call."""
    latencies, failures = [], 0
    counter = iter(range(requests))
    async with httpx.AsyncClient(timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker():
            nonlocal failures
            for i in counter:
                start = time.perf_counter()
                response = await client.post(url, json=body(texts[i % len(texts)]))
                latencies.append(time.perf_counter() - start)
                failures += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"texts_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/demo-before/merged")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    if not (VENV / "bin" / "infinity_emb").exists():
        raise SystemExit(f"no infinity-emb in {VENV}: run benchmarks/infinity_env.sh first")
    zoo = build_zoo(progress=False)
    texts = mixed_texts(zoo)
    model = str(Path(args.model).resolve())
    served_name = "/".join(Path(model).parts[-2:])  # infinity names a local model by its path tail
    hm3_port, inf_port = free_port(), free_port()
    servers = {
        "hm3 serve (torch)": (
            [sys.executable, "-m", "hm3.cli", "serve", model, "--port", str(hm3_port),
             "--max-batch-size", "32", "--max-wait-ms", "5", "--max-length", "128",
             "--log-level", "error", "--device", "cpu"],
            f"http://127.0.0.1:{hm3_port}", "/health",
            lambda text: {"texts": [text]}, "/v1/classify"),
        "infinity-emb (torch)": (
            [str(VENV / "bin" / "infinity_emb"), "v2", "--model-id", model, "--engine", "torch",
             "--device", "cpu", "--port", str(inf_port), "--batch-size", "32",
             "--no-bettertransformer", "--log-level", "warning"],
            f"http://127.0.0.1:{inf_port}", "/health",
            lambda text: {"input": [text], "model": served_name}, "/classify"),
    }
    result = {"machine": machine(), "model": model, "load_average_before": os.getloadavg(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "infinity_emb": subprocess.run([str(VENV / "bin" / "python"), "-c",
                                              "import importlib.metadata as m; "
                                              "print(m.version('infinity_emb'))"],
                                             capture_output=True, text=True).stdout.strip()}
    processes = {}
    try:
        for name, (command, url, health, _, _) in servers.items():
            processes[name] = start(command, url, health)
        os.sched_setaffinity(0, {1})
        for name, (_, url, _, body, path) in servers.items():
            asyncio.run(one_run(url + path, body, texts, 4, 16))  # warm-up
        rows = {}
        for concurrency in (8, 32):
            found = {name: [] for name in servers}
            for _ in range(args.runs):
                for name, (_, url, _, body, path) in servers.items():  # A B A B
                    found[name].append(asyncio.run(one_run(url + path, body, texts, concurrency,
                                                           args.requests)))
                    print(f"c={concurrency} {name}: {found[name][-1]['texts_per_s']:.1f} texts/s",
                          flush=True)
            medians = {name: {key: statistics.median(r[key] for r in rs)
                              for key in ("texts_per_s", "p50_ms", "p99_ms")}
                       | {"failures": sum(r["failures"] for r in rs)}
                       for name, rs in found.items()}
            a, b = (m["texts_per_s"] for m in medians.values())
            rows[str(concurrency)] = {"medians": medians, "hm3_over_infinity": a / b,
                                      "runs": found}
        result["load"] = rows
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        stop_servers([(p, None) for p in processes.values()])
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["load_average_after"] = os.getloadavg()
    write_json_atomic(Path(args.output), result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()

"""Latency at concurrency 1, with enough requests to settle a p99: `hm3 serve` against direct
forward passes of the very same texts, the two interleaved in time.

serve_bench.py times the direct forwards in one process and the c=1 load run minutes later, each
p99 resting on the 2-4 slowest of a few hundred requests; on a shared machine that ratio moved by
up to 0.9 between runs. Here, per backend, one `hm3 serve` process and one direct process (the
same model folder, `model.logits([text])`, tokenisation included) sit on core 0 with one thread
each, the client on core 1. Every round sends the same 256 zoo test texts through both, one at a
time, the order of the two alternating from round to round (D S, S D, ...), and the backends take
turns within a round, so drift on the machine hits every side alike. Pooled over the rounds
(2048 requests per side by default) a p99 rests on about 20 requests. Per text and round the
server's time minus the direct time is its own cost (p50 / p99 of that difference).

Writes benchmarks/results/c1_latency.json and prints a table for RESULTS.md.

  .venv/bin/python benchmarks/c1_latency.py --models torch=hm3-demo/merged \\
      "openvino int8=/tmp/hm3-serve-bench/openvino-int8"                     # ~1 min per round
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from hm3.checkpoint import write_json_atomic
from hm3.zoo import build_zoo

from common import machine, mixed_texts, start_servers, stop_servers

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "c1_latency.json"
PERCENTILES = (50, 95, 99, 99.9)

# one process per model on the server's core: it reads a JSON list of texts per line and answers
# with the milliseconds of one direct forward per text (batch 1, tokenisation included)
DIRECT_CHILD = '''
import json, sys, time
import torch
torch.set_num_threads(1)
from hm3.model import load
model = load(sys.argv[1], device="cpu", max_length=128)
model.logits(["warm up"], batch_size=1)
print("ready", flush=True)
for line in sys.stdin:
    ms = []
    for text in json.loads(line):
        start = time.perf_counter()
        model.logits([text], batch_size=1)
        ms.append((time.perf_counter() - start) * 1000)
    print(json.dumps(ms), flush=True)
'''


class Direct:
    """A direct-forward process for one model folder, pinned to core 0."""

    def __init__(self, folder: Path, script: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HM3_ONNX_THREADS": "1"}
        self.process = subprocess.Popen(["taskset", "-c", "0", sys.executable, str(script),
                                         str(folder)], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise SystemExit(f"the direct process for {folder} did not start")

    def times(self, texts: list[str]) -> list[float]:
        self.process.stdin.write(json.dumps(texts) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


def served(client: httpx.Client, url: str, texts: list[str]) -> list[float]:
    """Milliseconds of one request per text, one at a time (concurrency 1), each checked."""
    ms = []
    for text in texts:
        start = time.perf_counter()
        response = client.post(url + "/v1/classify", json={"texts": [text]})
        ms.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200 or len(response.json()["results"]) != 1:
            raise SystemExit(f"{url}: {response.status_code} {response.text[:200]}")
    return ms


def summary(direct: list[list[float]], server: list[list[float]]) -> dict:
    """Pooled percentiles of both sides, their p99 ratio, the per-round p99 ratios, and the
    server's own cost (server minus direct for the same text in the same round)."""
    d, s = np.concatenate(direct), np.concatenate(server)
    per_round = [float(np.percentile(b, 99) / np.percentile(a, 99))
                 for a, b in zip(direct, server)]
    extra = s - d
    return {"requests": len(s),
            "direct_ms": {f"p{p:g}": float(np.percentile(d, p)) for p in PERCENTILES},
            "server_ms": {f"p{p:g}": float(np.percentile(s, p)) for p in PERCENTILES},
            "p99_ratio": float(np.percentile(s, 99) / np.percentile(d, 99)),
            "p95_ratio": float(np.percentile(s, 95) / np.percentile(d, 95)),
            "p99_ratio_per_round": per_round,
            "p99_ratio_rounds_median": float(np.median(per_round)),
            "server_extra_ms": {"p50": float(np.percentile(extra, 50)),
                                "p99": float(np.percentile(extra, 99))}}


def markdown(result: dict) -> str:
    header = ("| backend | direct p50 / p99 ms | server c=1 p50 / p99 ms | p99 ratio (pooled) | "
              "p99 ratio per round: median (min–max) | p95 ratio | "
              "server's own cost p50 / p99 ms |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in result["backends"].items():
        rounds = row["p99_ratio_per_round"]
        lines.append(
            f"| {name} | {row['direct_ms']['p50']:.1f} / {row['direct_ms']['p99']:.1f} | "
            f"{row['server_ms']['p50']:.1f} / {row['server_ms']['p99']:.1f} | "
            f"{row['p99_ratio']:.2f}× | {row['p99_ratio_rounds_median']:.2f}× "
            f"({min(rounds):.2f}–{max(rounds):.2f}) | {row['p95_ratio']:.2f}× | "
            f"{row['server_extra_ms']['p50']:.1f} / {row['server_extra_ms']['p99']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=FOLDER",
                        help="the backends: a name and a model or export folder each")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of 256 texts (default 8)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    if os.cpu_count() < 2 or not hasattr(os, "sched_setaffinity"):
        raise SystemExit("needs two cores to pin the servers and the client apart")
    folders = {}
    for item in args.models:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            raise SystemExit(f"--models takes NAME=FOLDER with an existing folder, got {item!r}")
        folders[name] = Path(folder)
    texts = mixed_texts(build_zoo(progress=False))
    result = {"machine": machine(), "rounds": args.rounds, "texts_per_round": len(texts),
              "load_average_before": os.getloadavg(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    script = Path("/tmp/hm3_c1_direct.py")
    script.write_text(DIRECT_CHILD)
    directs = {name: Direct(folder, script) for name, folder in folders.items()}
    servers = {name: start_servers([folder], pin=True)[0] for name, folder in folders.items()}
    os.sched_setaffinity(0, {1})
    times = {name: {"direct": [], "server": []} for name in folders}
    try:
        with httpx.Client(timeout=60) as client:
            for name, (_, url) in servers.items():
                served(client, url, texts[:16])  # warm-up
            for round_ in range(args.rounds):
                for name in folders:
                    sides = ("direct", "server") if round_ % 2 == 0 else ("server", "direct")
                    for side in sides:
                        times[name][side].append(directs[name].times(texts) if side == "direct"
                                                 else served(client, servers[name][1], texts))
                    print(f"round {round_ + 1}/{args.rounds} {name}: direct p99 "
                          f"{np.percentile(times[name]['direct'][-1], 99):.1f} ms, server p99 "
                          f"{np.percentile(times[name]['server'][-1], 99):.1f} ms", flush=True)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        stop_servers(list(servers.values()))
        for direct in directs.values():
            direct.close()
    result["backends"] = {name: summary(t["direct"], t["server"]) for name, t in times.items()}
    result["times_ms"] = times
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["load_average_after"] = os.getloadavg()
    write_json_atomic(Path(args.output), result)
    print(markdown(result))


if __name__ == "__main__":
    main()

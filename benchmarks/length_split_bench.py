"""Length-sorted sub-batches (hm3.serve.buckets) against one batch padded to its longest text.

A = one forward pass per collected batch (`classifier.predict(batch, batch_size=32)`, what
`hm3 serve --no-length-split` runs); B = the batch sorted by token length and run in sub-batches
(`predict_by_length`, `hm3 serve`'s default). Measured side by side, A B A B:
1. offline, batches of 32 mixed zoo test texts (as a busy server collects them), one thread
   pinned to core 0, tokenisation included; the answers of A and B compared (max |dp|, argmax);
2. two `hm3 serve` processes (A, B) pinned to core 0 with one thread, an async httpx client
   on core 1 at concurrency 8 and 32 (one text per request), load runs alternating A B A B.

  .venv/bin/python benchmarks/length_split_bench.py --model /tmp/demo-before/merged
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from hm3.checkpoint import write_json_atomic
from hm3.model import load
from hm3.serve.buckets import predict_by_length
from hm3.zoo import build_zoo

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import alternate_load, machine, mixed_texts, start_servers  # noqa: E402

RESULTS = HERE / "results" / "serve_length_split.json"
MODES = {"A padded batch": False, "B length-sorted sub-batches": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/demo-before/merged")
    parser.add_argument("--rounds", type=int, default=5, help="offline A B rounds (median)")
    parser.add_argument("--batches", type=int, default=4, help="batches of 32 per offline round")
    parser.add_argument("--runs", type=int, default=3, help="load runs per server and concurrency")
    parser.add_argument("--requests", type=int, default=192, help="requests per load run")
    parser.add_argument("--skip", nargs="*", default=[], choices=["offline", "load"])
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    zoo = build_zoo(progress=False)
    texts = mixed_texts(zoo)
    result = {"machine": machine(), "model": args.model, "load_average_before": os.getloadavg(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if "offline" not in args.skip:
        result["offline"] = offline(args.model, texts, args.rounds, args.batches)
        write_json_atomic(Path(args.output), result)
    if "load" not in args.skip:
        result["load"] = load_ab(args.model, texts, args.runs, args.requests)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["load_average_after"] = os.getloadavg()
    write_json_atomic(Path(args.output), result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


def offline(model_path: str, texts: list[str], rounds: int, n_batches: int) -> dict:
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    try:
        model = load(model_path, device="cpu", max_length=128)
        batches = [texts[i:i + 32] for i in range(0, 32 * n_batches, 32)]
        run = {False: lambda b: model.predict(b, batch_size=32),
               True: lambda b: predict_by_length(model, b)}
        answers = {split: [a for b in batches for a in run[split](b)] for split in (False, True)}
        rates = {name: [] for name in MODES}
        for _ in range(rounds):
            for name, split in MODES.items():
                start = time.perf_counter()
                for batch in batches:
                    run[split](batch)
                rates[name].append(32 * len(batches) / (time.perf_counter() - start))
                print(f"offline {name}: {rates[name][-1]:.1f} texts/s", flush=True)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
    diffs, same = [], []
    for a, b in zip(answers[False], answers[True]):
        for task, one in a.items():
            p, q = one["probabilities"], b[task]["probabilities"]
            diffs.append(max(abs(p[k] - q[k]) for k in p))
            same.append(one["label"] == b[task]["label"])
    medians = {name: statistics.median(r) for name, r in rates.items()}
    a, b = medians.values()
    return {"texts_per_s": medians, "runs": rates, "ratio_b_over_a": b / a,
            "max_abs_diff_probability": max(diffs), "label_agreement": sum(same) / len(same),
            "texts": 32 * len(batches)}


def load_ab(model_path: str, texts: list[str], runs: int, requests: int) -> dict:
    # --max-wait-ms 5, the server's default when this was measured (RESULTS.md §6.3)
    servers = {name: start_servers([Path(model_path)], pin=True, max_wait_ms=5.0,
                                   flags=() if split else ("--no-length-split",))[0]
               for name, split in MODES.items()}
    return alternate_load(servers, texts, (8, 32), runs, requests)

if __name__ == "__main__":
    main()

"""Serving the zoo's merged model: ONNX export accuracy and speed, and `hm3 serve` under load.

What it measures (results in benchmarks/results/serve.json, a table printed for RESULTS.md):
1. int8 accuracy: macro-F1 on every zoo task's test split of the ONNX fp32 export (equal to the
   PyTorch model's to ~1e-7 in probability) and int8 variants (what is quantised), and argmax
   agreement with fp32.
2. offline throughput (texts/s, tokenisation included) of torch / onnx fp32 / onnx int8 (and,
   where the openvino extra is installed, `--format openvino` f32 / int8) at batch
   32, padded to the longest text and in length-sorted sub-batches as the server runs them (the
   server's ceiling), and the latency of one text (batch 1); A B C A B C rounds, median.
3. `hm3 serve` under load from an async httpx client over loopback at concurrency 1/8/32/64
   (one text per request, as a guard-rail call is), texts/s and p50/p99 latency, median of runs;
   one request in ten is malformed and must get 422, every other must get 200 (failures counted);
   and the anchor: the N experts each served by the same code, the client calling all N per text.
The server (and the offline measurement) are pinned to core 0 with one thread, the client to
core 1, so the two do not compete for a core (`--no-pin` to let both use both; `--threads 2`
for two threads per backend, unpinned).

  .venv/bin/python benchmarks/serve_bench.py --model /tmp/demo-before/merged
  .venv/bin/python benchmarks/serve_bench.py --model M --quick     # smoke run, small counts
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from sklearn.metrics import f1_score

from hm3.checkpoint import write_json_atomic
from hm3.export import HEAD_ONLY, export_onnx, export_openvino
from hm3.model import load
from hm3.zoo import build_zoo, read_split

from common import calibration_texts, machine, start_servers, stop_servers

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serve.json"
CONCURRENCY = (1, 8, 32, 64)
# int8 variants measured: name -> export_onnx options
INT8 = {"int8 per-channel, head + FFN-down fp32": {},  # hm3 export's default (FP32_NODES)
        "int8 per-channel, head + last two FFN-down fp32": {
            "exclude": HEAD_ONLY + (r"layer\.[45]/output/dense", r"layer\.[45]/ffn/lin2")},
        "int8 per-channel, head fp32": {"exclude": HEAD_ONLY},
        "int8 per-channel, all": {"exclude": ()}}
CHOSEN_INT8 = "int8 per-channel, head + FFN-down fp32"
# hm3 export --format openvino, f32 and int8 (NNCF, head + FFN-down fp32, ranges from 256 of the
# zoo's calibration texts: what the merge calibrates on, never validation or test)
OPENVINO = {"openvino f32": None, "openvino int8": "int8"}
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/demo-before/merged", help="merged model folder")
    parser.add_argument("--work", default="/tmp/hm3-serve-bench", help="exports go here")
    parser.add_argument("--runs", type=int, default=3, help="load runs per concurrency (median)")
    parser.add_argument("--requests", type=int, default=192, help="requests per load run")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--re-export", action="store_true", help="export again into --work")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / ONNX Runtime threads offline and in each server (default 1; "
                             "more than 1 implies --no-pin)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0,
                        help="the servers' --max-wait-ms (default 0, hm3 serve's)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["accuracy", "offline", "load", "stack", "openvino"])
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.runs, args.requests = 1, 32
    pin = (not args.no_pin and args.threads == 1 and hasattr(os, "sched_setaffinity")
           and os.cpu_count() >= 2)
    os.environ["OMP_NUM_THREADS"] = os.environ["HM3_ONNX_THREADS"] = str(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    zoo = build_zoo(progress=False)
    tests = {task: read_split(splits["test"]) for task, splits in zoo.splits.items()}
    if args.quick:
        tests = {task: rows[:64] for task, rows in tests.items()}
    folders = {"torch": Path(args.model), "onnx fp32": work / "onnx-fp32"}
    folders.update({name: work / name.replace(" ", "-").replace(",", "").replace("+", "")
                    for name in INT8})
    openvino = importlib.util.find_spec("openvino") is not None and "openvino" not in args.skip
    if openvino:
        folders.update({name: work / name.replace(" ", "-") for name in OPENVINO})
    exports = {}
    for name, folder in folders.items():
        if name == "torch":
            continue
        if (folder / "hm3_onnx.json").is_file() and not args.re_export:
            exports[name] = json.loads((folder / "export.json").read_text())
            continue
        start = time.perf_counter()
        if name in OPENVINO:
            report = export_openvino(args.model, folder, quantize=OPENVINO[name],
                                     calibration=calibration_texts(zoo) if OPENVINO[name] else None,
                                     overwrite=True, max_length=128,  # as it is served
                                     precision="f32")  # the rows' precision (default: auto)
        else:
            report = export_onnx(args.model, folder, quantize="int8" if name in INT8 else None,
                                 overwrite=True, **INT8.get(name, {}))
        exports[name] = {**report, "seconds": round(time.perf_counter() - start, 1)}
        (folder / "export.json").write_text(json.dumps(exports[name]))
        print(f"exported {name}: {report['megabytes']:.1f} MB, max |dp| on samples "
              f"{report['max_abs_diff']:.3g}", flush=True)
    result = {"machine": machine(), "model": args.model, "pinned": pin, "threads": args.threads,
              "max_wait_ms": args.max_wait_ms, "exports": exports,
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if "accuracy" not in args.skip:
        # what to keep in fp32 is chosen on validation texts, then confirmed on test
        validation = {task: read_split(splits["validation"])[:32 if args.quick else 50]
                      for task, splits in zoo.splits.items()}
        onnx_folders = {k: v for k, v in folders.items() if k != "torch"}
        result["int8_choice_validation"] = accuracy(onnx_folders, validation)
        # the PyTorch model's scores are the demo's (report.json); ONNX fp32 matches it to 1e-6
        result["accuracy"] = accuracy(onnx_folders, tests)
        demo = Path(args.model).parent / "report.json"
        if demo.is_file():
            result["accuracy"]["torch_from_demo_report"] = {
                task: row["macro_f1"]
                for task, row in json.loads(demo.read_text())["merged"]["tasks"].items()}
        print(json.dumps(result["accuracy"]["mean_macro_f1"], indent=1), flush=True)
    texts = [text for rows in tests.values() for text, _ in rows]
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))][:256]
    backends = {"torch": folders["torch"], "onnx fp32": folders["onnx fp32"],
                "onnx int8": folders[CHOSEN_INT8]}
    backends.update({name: folders[name] for name in OPENVINO if name in folders})
    if "offline" not in args.skip:
        result["offline"] = offline(backends, texts, work, pin, rounds=2 if args.quick else 5,
                                    requests=args.requests)
        write_json_atomic(Path(args.output), result)
        print(json.dumps(result["offline"], indent=1), flush=True)
    if "load" not in args.skip:
        result["load"] = {}
        for name, folder in backends.items():
            result["load"][name] = load_test([folder], texts, args, pin)
            write_json_atomic(Path(args.output), result)  # partial results survive a stop
    if "stack" not in args.skip:
        result["stack"] = load_test(list(zoo.experts.values()), texts, args, pin)
    result["goals"] = goals(result, len(zoo.experts))
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["load_average_after"] = os.getloadavg()
    write_json_atomic(Path(args.output), result)
    print(markdown(result))


def accuracy(folders: dict[str, Path], tests: dict[str, list]) -> dict:
    """Per model and task: macro-F1 on the test split and argmax agreement with ONNX fp32."""
    predictions, scores = {}, {}
    for name, folder in folders.items():
        model = load(folder, device="cpu", max_length=128)  # as the demo scores
        predictions[name], scores[name] = {}, {}
        for task, rows in tests.items():
            group = model.group(task)
            probs = model.predict_proba([text for text, _ in rows], batch_size=32)[task]
            predicted = [group.labels[i] for i in probs.argmax(axis=1)]
            truth = [label for _, label in rows]
            predictions[name][task] = predicted
            scores[name][task] = {"macro_f1": float(f1_score(truth, predicted, average="macro",
                                                             labels=list(group.labels),
                                                             zero_division=0))}
        print(f"scored {name}", flush=True)
    for name in folders:
        for task in tests:
            same = np.mean([a == b for a, b in zip(predictions[name][task],
                                                   predictions["onnx fp32"][task])])
            scores[name][task]["agreement_with_fp32"] = float(same)
    mean = {name: float(np.mean([s["macro_f1"] for s in per_task.values()]))
            for name, per_task in scores.items()}
    return {"tasks": {task: len(rows) for task, rows in tests.items()}, "scores": scores,
            "mean_macro_f1": mean}


def offline(backends: dict[str, Path], texts: list[str], work: Path, pin: bool,
            rounds: int, requests: int) -> dict:
    """Direct calls, no server: batch 32 throughput and one-text latency, on the server's core;
    also one direct forward for each text a c=1 load run of `requests` requests sends (p50/p99,
    the like-for-like reference for the server's latency at c=1)."""
    script = work / "offline_child.py"
    script.write_text(OFFLINE_CHILD)
    (work / "texts.json").write_text(json.dumps(texts))
    command = [sys.executable, str(script), json.dumps({k: str(v) for k, v in backends.items()}),
               str(work / "texts.json"), str(rounds), str(requests)]
    env = {"OMP_NUM_THREADS": "1", "HM3_ONNX_THREADS": "1", **os.environ}
    out = subprocess.run((["taskset", "-c", "0"] if pin else []) + command, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


OFFLINE_CHILD = '''
import json, statistics, sys, time
import numpy as np
import torch
import os
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from hm3.model import load
from hm3.serve.buckets import predict_by_length
backends, texts, rounds = json.loads(sys.argv[1]), json.load(open(sys.argv[2])), int(sys.argv[3])
# the texts a c=1 load run sends, one per request (request i % 10 == 9 is malformed instead)
sent = [texts[i % len(texts)] for i in range(int(sys.argv[4])) if i % 10 != 9]
models = {name: load(path, device="cpu", max_length=128) for name, path in backends.items()}
batches = [texts[i:i + 32] for i in range(0, len(texts) - 31, 32)]
ones = texts[:32]
runs = {name: {"batch32": [], "split32": [], "one": [], "sent_p50": [], "sent_p99": []}
        for name in models}
for round_ in range(rounds + 1):          # round 0 warms up
    for name, model in models.items():     # A B C A B C: drift hits every backend alike
        start = time.perf_counter()
        for batch in batches:
            model.logits(batch, batch_size=32)
        batch_s = time.perf_counter() - start
        start = time.perf_counter()        # as the server runs a batch: length-sorted sub-batches
        for batch in batches:
            predict_by_length(model, batch)
        split_s = time.perf_counter() - start
        times = []
        for text in ones:
            t = time.perf_counter(); model.logits([text], batch_size=1)
            times.append(time.perf_counter() - t)
        each = []                          # one direct forward per text the c=1 run sends
        for text in sent:
            t = time.perf_counter(); model.logits([text], batch_size=1)
            each.append(time.perf_counter() - t)
        if round_:
            runs[name]["sent_p50"].append(float(np.percentile(each, 50)) * 1000)
            runs[name]["sent_p99"].append(float(np.percentile(each, 99)) * 1000)
            runs[name]["batch32"].append(len(batches) * 32 / batch_s)
            runs[name]["split32"].append(len(batches) * 32 / split_s)
            runs[name]["one"].append(statistics.median(times) * 1000)
print(json.dumps({name: {"batch32_texts_per_s": statistics.median(r["batch32"]),
                         "batch32_runs": r["batch32"],
                         "split32_texts_per_s": statistics.median(r["split32"]),
                         "split32_runs": r["split32"],
                         "one_text_ms": statistics.median(r["one"]), "one_text_runs": r["one"],
                         "direct_p50_ms": statistics.median(r["sent_p50"]),
                         "direct_p99_ms": statistics.median(r["sent_p99"]),
                         "direct_texts": len(sent)}
                  for name, r in runs.items()}))
'''


async def one_run(urls: list[str], texts: list[str], concurrency: int, requests: int) -> dict:
    """`requests` calls by `concurrency` closed-loop clients; each call asks every url about one
    text (all at once, as a guard stack does) -- request i % 10 == 9 is malformed JSON instead."""
    latencies, failures, bad = [], 0, 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency * len(urls) + 4)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker():
            nonlocal failures, bad
            for i in counter:
                if i % 10 == 9:
                    r = await client.post(urls[0] + "/v1/classify", content=b'{"texts": [',
                                          headers={"Content-Type": "application/json"})
                    bad += 1
                    failures += r.status_code != 422
                    continue
                body = {"texts": [texts[i % len(texts)]]}
                start = time.perf_counter()
                answers = await asyncio.gather(*(client.post(url + "/v1/classify", json=body)
                                                 for url in urls))
                latencies.append(time.perf_counter() - start)
                failures += sum(r.status_code != 200 or len(r.json()["results"]) != 1
                                for r in answers)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"texts_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "good": len(latencies), "bad": bad,
            "failures": failures}


def load_test(folders: list[Path], texts: list[str], args, pin: bool) -> dict:
    servers = start_servers(folders, pin, args.max_wait_ms)
    if pin:
        os.sched_setaffinity(0, {1})
    try:
        asyncio.run(one_run([url for _, url in servers], texts, 4, 16))  # warm-up
        rows = {}
        for concurrency in CONCURRENCY:
            runs = [asyncio.run(one_run([url for _, url in servers], texts, concurrency,
                                        args.requests // len(folders)))
                    for _ in range(args.runs)]
            rows[str(concurrency)] = {
                "texts_per_s": statistics.median(r["texts_per_s"] for r in runs),
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "failures": sum(r["failures"] for r in runs),
                "requests": sum(r["good"] + r["bad"] for r in runs),
                "bad_requests": sum(r["bad"] for r in runs), "runs": runs}
            print(f"{[f.name for f in folders]} c={concurrency}: "
                  f"{rows[str(concurrency)]['texts_per_s']:.1f} "
                  f"texts/s p50 {rows[str(concurrency)]['p50_ms']:.0f} ms "
                  f"p99 {rows[str(concurrency)]['p99_ms']:.0f} ms "
                  f"failures {rows[str(concurrency)]['failures']}", flush=True)
        metrics = [httpx.get(url + "/metrics").text for _, url in servers]
    finally:
        if pin:
            os.sched_setaffinity(0, set(range(os.cpu_count())))
        stop_servers(servers)
    return {"servers": [str(f) for f in folders], "concurrency": rows,
            "mean_batch_size": [_mean_batch(m) for m in metrics]}


def alternate_load(servers: dict[str, tuple[subprocess.Popen, str]], texts: list[str],
                   concurrencies, runs: int, requests: int, on_save=None) -> dict:
    """Load runs that alternate between the named servers (A B A B ...) at each concurrency,
    from this process pinned to core 1; the servers are stopped at the end. Per concurrency:
    each server's median texts/s, p50 and p99 and its failures, B / A ratios of the first two
    servers, and every run. `on_save(rows)` after each concurrency (partial results)."""
    os.sched_setaffinity(0, {1})
    rows = {}
    try:
        for _, url in servers.values():
            asyncio.run(one_run([url], texts, 4, 16))  # warm-up
        for concurrency in concurrencies:
            found = {name: [] for name in servers}
            for _ in range(runs):
                for name, (_, url) in servers.items():
                    found[name].append(asyncio.run(one_run([url], texts, concurrency, requests)))
                    print(f"c={concurrency} {name}: {found[name][-1]['texts_per_s']:.1f} texts/s "
                          f"p99 {found[name][-1]['p99_ms']:.0f} ms", flush=True)
            medians = {name: {key: statistics.median(r[key] for r in rs)
                              for key in ("texts_per_s", "p50_ms", "p99_ms")}
                       | {"failures": sum(r["failures"] for r in rs)}
                       for name, rs in found.items()}
            a, b = list(medians.values())[:2]
            rows[str(concurrency)] = {"medians": medians, "runs": found,
                                      "texts_per_s_b_over_a": b["texts_per_s"] / a["texts_per_s"],
                                      "p99_b_over_a": b["p99_ms"] / a["p99_ms"]}
            if on_save is not None:
                on_save(rows)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        stop_servers(list(servers.values()))
    return rows


def _mean_batch(metrics: str) -> float | None:
    values = {}
    for line in metrics.splitlines():
        for name in ("hm3_batch_size_sum", "hm3_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    count = values.get("hm3_batch_size_count")
    return values["hm3_batch_size_sum"] / count if count else None


def goals(result: dict, n_experts: int) -> dict:
    out = {}
    offline_ = result.get("offline")
    if offline_:
        base = offline_["torch"]["batch32_texts_per_s"]
        exported = [name for name in offline_ if name != "torch"]
        for name in exported:
            out[f"{name} offline x torch"] = offline_[name]["batch32_texts_per_s"] / base
        if "split32_texts_per_s" in offline_["torch"]:  # as the server runs a batch
            split = offline_["torch"]["split32_texts_per_s"]
            for name in exported:
                out[f"{name} offline sub-batches x torch"] = (
                    offline_[name]["split32_texts_per_s"] / split)
    acc = result.get("accuracy")
    if acc:
        fp32 = acc["scores"]["onnx fp32"]
        for name in [*INT8, *(n for n in OPENVINO if n in acc["scores"])]:
            out[f"{name}: worst task macro-F1 minus fp32 (points)"] = min(
                100 * (acc["scores"][name][t]["macro_f1"] - fp32[t]["macro_f1"]) for t in fp32)
    load_ = result.get("load")
    if load_ and offline_:
        for name, row in load_.items():
            ceiling = offline_[name]["batch32_texts_per_s"]
            out[f"{name}: server c=32 / offline batch-32"] = (
                row["concurrency"]["32"]["texts_per_s"] / ceiling)
            if "split32_texts_per_s" in offline_[name]:
                out[f"{name}: server c=32 / offline batch-32 in sub-batches"] = (
                    row["concurrency"]["32"]["texts_per_s"] / offline_[name]["split32_texts_per_s"])
            out[f"{name}: server p99 c=1 / one direct forward"] = (
                row["concurrency"]["1"]["p99_ms"] / offline_[name]["one_text_ms"])
            if "direct_p99_ms" in offline_[name]:  # the same texts, one direct forward each
                out[f"{name}: server p99 c=1 / direct p99 over the same texts"] = (
                    row["concurrency"]["1"]["p99_ms"] / offline_[name]["direct_p99_ms"])
        out["failures"] = sum(r["failures"] for row in load_.values()
                              for r in row["concurrency"].values())
    if load_ and result.get("stack"):
        for c in CONCURRENCY:
            out[f"merged torch server / {n_experts}-expert stack, c={c}"] = (
                load_["torch"]["concurrency"][str(c)]["texts_per_s"]
                / result["stack"]["concurrency"][str(c)]["texts_per_s"])
    return out


def markdown(result: dict) -> str:
    lines = []
    for key in ("int8_choice_validation", "accuracy"):
        if key not in result:
            continue
        acc = result[key]
        lines.append(f"{key} ({acc['tasks']} texts per task)")
        tasks = list(acc["tasks"])
        lines += ["| model | " + " | ".join(f"{t} F1 (agree)" for t in tasks) + " | mean F1 |",
                  "|---" * (len(tasks) + 2) + "|"]
        for name, per_task in acc["scores"].items():
            cells = [f"{per_task[t]['macro_f1']:.4f} ({per_task[t]['agreement_with_fp32']:.1%})"
                     for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {acc['mean_macro_f1'][name]:.4f} |")
        lines.append("")
    if "load" in result:
        lines += ["| server | offline b32 texts/s | 1 text ms | " + " | ".join(
            f"c={c} texts/s (p50/p99 ms)" for c in CONCURRENCY) + " | failures |",
                  "|---" * (len(CONCURRENCY) + 4) + "|"]
        rows = dict(result["load"])
        if "stack" in result:
            rows["4 experts (stack)"] = result["stack"]
        for name, row in rows.items():
            off = result.get("offline", {}).get(name, {})
            cells = [f"{row['concurrency'][str(c)]['texts_per_s']:.1f} "
                     f"({row['concurrency'][str(c)]['p50_ms']:.0f}/"
                     f"{row['concurrency'][str(c)]['p99_ms']:.0f})" for c in CONCURRENCY]
            lines.append(f"| {name} | {off.get('batch32_texts_per_s', float('nan')):.1f} | "
                         f"{off.get('one_text_ms', float('nan')):.1f} | " + " | ".join(cells)
                         + f" | {sum(r['failures'] for r in row['concurrency'].values())} |")
    lines += ["", json.dumps(result.get("goals", {}), indent=1)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

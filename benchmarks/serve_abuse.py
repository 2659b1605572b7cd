"""`hm3 serve` under abuse: good clients' latency with and without attackers beside them.

Two runs of the same server (a fresh process each): good traffic alone, then the same good
traffic with the attacks of issue 21 running at once: lone-surrogate texts, a 100 MB chunked
body, a task named 50 000 times, 64-text requests abandoned at once, idle and slow-header
sockets, bodies sent too slowly. Reported: the good requests' p50/p99 and failures in each run,
every attack's answers, and the server's peak RSS (VmHWM) in each run.
Results in benchmarks/results/serve_abuse.json; with --ray, of `hm3 serve --ray` (one replica on
a local Ray instance, its peak RSS that of the replica and Ray's proxy together) in
benchmarks/results/serve_abuse_ray.json.

  .venv/bin/python benchmarks/serve_abuse.py                    # the tests' tiny model
  .venv/bin/python benchmarks/serve_abuse.py --model MERGED --seconds 30
  .venv/bin/python benchmarks/serve_abuse.py --ray              # needs the ray extra
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from hm3.checkpoint import write_json_atomic

from common import free_port

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serve_abuse.json"
WORDS = ["good", "bad", "free", "win", "money", "hello", "meeting", "today", "great", "awful"]
SERVER_FLAGS = ["--max-texts", "64", "--header-timeout", "2", "--body-timeout", "3",
                "--request-timeout", "30"]


def tiny_model(root: Path) -> Path:
    """The serving tests' model: a tiny merged BERT of three tasks (built in seconds)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from hm3 import merge, parse_recipe

    from conftest import SERVED_TASKS, build_family, recipe_dict

    base, experts = build_family(root, SERVED_TASKS, multi_label=("tox",))
    merge(parse_recipe(recipe_dict(base, experts)), root / "merged", progress=False)
    return root / "merged"


def start(model: Path, extra: list[str]) -> tuple[subprocess.Popen, str, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "hm3.cli", "serve", str(model), "--port",
                                str(port), "--log-level", "error", "--device", "cpu",
                                *SERVER_FLAGS, *extra],
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.DEVNULL if extra else None,
                               stderr=subprocess.DEVNULL if extra else None)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return process, url, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serving_pids(pid: int, ray: bool) -> dict[str, int]:
    """The processes that serve, by title: `pid` itself, or under Ray its descendants that are
    Serve's replica or HTTP proxy (Ray's workers, started by the raylet the command started)."""
    if not ray:
        return {"hm3 serve": pid}
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                title = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith((b"ray::ServeReplica", b"ray::ProxyActor")):
                found[title.decode(errors="replace").split()[0]] = child
    return found


async def good_client(url: str, seed: int, until: float, latencies: list, failures: Counter):
    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while time.monotonic() < until:
            texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9)))
                     for _ in range(rng.integers(1, 5))]
            started = time.perf_counter()
            try:
                response = await client.post("/v1/classify", json={"texts": texts})
                status = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failures[str(status)] += 1


async def raw(port: int, data: bytes, wait: float = 10.0, then: bytes = b"") -> str:
    """Send `data` (then `then` slowly), return the answer's status line or what happened."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        for byte in then:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.5)
        line = await asyncio.wait_for(reader.readline(), wait)
        return line.split(b" ")[1].decode() if line else "closed"
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return "left" if wait < 0.1 else type(exc).__name__
    finally:
        writer.close()


async def chunked_flood(port: int) -> str:
    """A chunked body of up to 100 MB, sent as fast as the server reads it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\na\r\n{\"texts\":[\r\n")
        chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
        for _ in range(1600):
            writer.write(chunk)
            await writer.drain()
            if reader.at_eof() or reader._buffer:  # noqa: SLF001 - an answer has come
                break
        line = await asyncio.wait_for(reader.readline(), 10)
        return line.split(b" ")[1].decode() if line else "closed"
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def attacker(name: str, url: str, port: int, until: float, seen: Counter):
    """One attack, repeated until `until`."""
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while time.monotonic() < until:
            if name == "lone surrogate":
                body = b'{"texts": ["good film", "\\ud800", "bad"]}'
                result = (await client.post("/v1/classify", content=body)).status_code
            elif name == "task named 50000 times":
                result = (await client.post("/v1/classify", json={
                    "texts": ["good"] * 8, "tasks": ["topic"] * 50_000})).status_code
            elif name == "100 MB chunked body":
                result = await chunked_flood(port)
            elif name == "64 texts, abandoned":
                body = json.dumps({"texts": ["good film " * 20] * 64}).encode()
                result = await raw(port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body,
                                   wait=0.01)
            elif name == "slow headers":
                result = await raw(port, b"POST /v1/classify HTTP/1.1\r\n", then=b"Host: xxxxxxxx")
            elif name == "slow body":
                result = await raw(port, head + b"Content-Length: 100\r\n\r\n{", then=b'"texts"')
            elif name == "idle sockets":
                sockets = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
                await asyncio.sleep(3)
                closed = sum(reader.at_eof() for reader, _ in sockets)
                for _, writer in sockets:
                    writer.close()
                result = f"{closed}/100 closed"
            seen[str(result)] += 1
            await asyncio.sleep(0.2)


ATTACKS = ("lone surrogate", "task named 50000 times", "100 MB chunked body",
           "64 texts, abandoned", "slow headers", "slow body", "idle sockets")


async def run(url: str, port: int, seconds: float, clients: int, attacks: tuple) -> dict:
    until = time.monotonic() + seconds
    latencies, failures = [], Counter()
    seen = {name: Counter() for name in ATTACKS}
    jobs = [good_client(url, seed, until, latencies, failures) for seed in range(clients)]
    if attacks:
        jobs += [attacker(name, url, port, until, seen[name]) for name in attacks]
    await asyncio.gather(*jobs)
    ms = np.array(latencies) * 1000
    out = {"good_requests": len(latencies) + sum(failures.values()),
           "good_failed": dict(failures), "good_p50_ms": round(float(np.percentile(ms, 50)), 1),
           "good_p99_ms": round(float(np.percentile(ms, 99)), 1)}
    if attacks:
        out["attacks"] = {name: dict(seen[name]) for name in attacks}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the tests' tiny model)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per run (default 20)")
    parser.add_argument("--clients", type=int, default=8, help="good clients (default 8)")
    parser.add_argument("--attack", action="append", choices=ATTACKS,
                        help="run only this attack (repeatable; default: all at once)")
    parser.add_argument("--ray", action="store_true", help="serve with `hm3 serve --ray` (one "
                        "replica on a local Ray instance)")
    args = parser.parse_args()
    extra = ["--ray", "--replica-cpus", "1"] if args.ray else []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else tiny_model(Path(tmp))
        runs = {}
        for name, attacks in (("clean", ()), ("under attack", tuple(args.attack or ATTACKS))):
            process, url, port = start(model, extra)
            try:
                runs[name] = asyncio.run(run(url, port, args.seconds, args.clients, attacks))
                peaks = {title: peak_rss_mb(pid)
                         for title, pid in serving_pids(process.pid, args.ray).items()}
                runs[name]["peak_rss_mb"] = round(sum(peaks.values()), 1)
                if args.ray:
                    runs[name]["peak_rss_mb_by_process"] = {t: round(v, 1)
                                                            for t, v in peaks.items()}
                runs[name]["health_after"] = httpx.get(url + "/health", timeout=10).status_code
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(180)
    clean, attacked = runs["clean"], runs["under attack"]
    result = {"what": "good clients' latency alone and beside the attacks of issue 21",
              "command": "python benchmarks/serve_abuse.py " + " ".join(sys.argv[1:]),
              "model": args.model or "the serving tests' tiny merged BERT (3 tasks)",
              "server_flags": SERVER_FLAGS + extra, "seconds": args.seconds,
              "good_clients": args.clients, "machine": f"{platform.machine()}, "
              f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the end)",
              "runs": runs,
              "p99_ratio": round(attacked["good_p99_ms"] / clean["good_p99_ms"], 2),
              "rss_ratio": round(attacked["peak_rss_mb"] / clean["peak_rss_mb"], 2)}
    write_json_atomic(RESULTS.with_name("serve_abuse_ray.json") if args.ray else RESULTS, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

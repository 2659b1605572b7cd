"""What several benchmarks share: the zoo's texts, the machine a figure came from, `hm3 serve`
processes, and the plot of `hm3 check`'s agreement against labelled scores.

A benchmark run as `python benchmarks/NAME.py` has this folder on its path, so `from common
import ...` needs no set-up. Results are written with `hm3.checkpoint.write_json_atomic`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from scipy.stats import pearsonr, spearmanr

from hm3.data.calibration import text_key
from hm3.evaluate import Dataset
from hm3.serve.buckets import predict_by_length
from hm3.zoo import read_split

CALIBRATION_TEXTS = 256  # the traffic sample of `calibration_texts`


# --- the zoo's texts -----------------------------------------------------------------------------

def datasets(zoo, split: str) -> list[Dataset]:
    """Every zoo task's `split` ("validation", "test", ...) as labelled datasets, one per task."""
    out = []
    for task, files in zoo.splits.items():
        rows = read_split(files[split])
        out.append(Dataset(task, [t for t, _ in rows], [lab for _, lab in rows],
                           source=str(files[split])))
    return out


DEV_PER_TASK = 1000  # texts per task of `dev_datasets`


def dev_datasets(zoo, examples, exclude=lambda task: (), per_task: int = DEV_PER_TASK
                 ) -> list[Dataset]:
    """A second, larger validation set ("dev"): up to `per_task` labelled texts of each task's
    source (`examples(task)`, the zoo spec's reader) in none of the zoo's splits and not in
    `exclude(task)` (texts a benchmark calibrates on); a fixed random sample (seed 0). The zoos'
    validation splits (100 texts per MPNet task) cannot rank choices half a point apart; where
    a source holds more texts than the zoo split off, this adds them (a task with none left is
    left out). Never the test split's texts: for choosing, like validation."""
    out = []
    for task, files in zoo.splits.items():
        used = {text_key(text) for split in files.values() for text, _ in read_split(split)}
        used |= {text_key(text) for text in exclude(task)}
        pool = sorted({text_key(text): (text, label) for text, label in examples(task)
                       if text_key(text) not in used}.values(), key=lambda row: row[0])
        rows = random.Random(0).sample(pool, min(per_task, len(pool)))
        if rows:  # a small source may have none left
            out.append(Dataset(task, [t for t, _ in rows], [lab for _, lab in rows],
                               source=f"{task}: source texts outside the zoo's splits"))
    return out


def with_dev(validation: list[Dataset], dev: list[Dataset]) -> list[Dataset]:
    """Each task's validation split and its `dev_datasets` texts as one set ("val+dev"; a task
    with no dev texts keeps its validation split)."""
    extra = {d.task: d for d in dev}
    return [Dataset(v.task, v.texts + extra[v.task].texts, v.labels + extra[v.task].labels,
                    source=f"{v.source} + {extra[v.task].source}") if v.task in extra else v
            for v in validation]


def mixed_texts(zoo, split: str = "test", count: int = 256, seed: int = 0) -> list[str]:
    """`count` texts of every zoo task's `split`, shuffled together (seed 0: the benchmarks'
    load and speed texts)."""
    pool = [text for splits in zoo.splits.values() for text, _ in read_split(splits[split])]
    return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))][:count]


def calibration_texts(zoo) -> list[str]:
    """256 of the zoo's calibration texts, the tasks mixed, as one traffic sample (what a merge
    calibrates on, never validation or test)."""
    return mixed_texts(zoo, "calibration", CALIBRATION_TEXTS, seed=1)


# --- the machine ---------------------------------------------------------------------------------

def machine() -> dict:
    """The machine and the runtimes' versions: speed ratios between backends move with the CPU
    (its vector units) and the libraries, so results say which they came from."""
    cpu, flags = platform.processor() or platform.machine(), []
    info = Path("/proc/cpuinfo")
    if info.is_file():
        lines = info.read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("model name")), cpu)
        present = next((line.split(":", 1)[1].split() for line in lines
                        if line.startswith("flags")), [])
        flags = sorted(f for f in present if f.startswith(("avx512", "amx", "avx2", "avx_vnni")))
    versions = {}
    for package in ("torch", "onnxruntime", "openvino", "nncf", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(),
            "python": platform.python_version(), "versions": versions,
            "load_average_before": os.getloadavg()}


# --- servers -------------------------------------------------------------------------------------

def batch_speeds(models: dict, texts: list[str], rounds: int) -> dict[str, dict[str, list]]:
    """Texts per second of each model on `texts` in batches of 32, padded to the batch's longest
    text (`padded`) and in length-sorted sub-batches as `hm3 serve` runs a batch
    (`sub-batches`), tokenisation included: one warm-up round, then `rounds` rounds of A B C ...
    (drift on a shared machine hits every model alike). Returns name -> way -> one rate a
    round."""
    batches = [texts[i:i + 32] for i in range(0, len(texts), 32)]
    speed = {name: {"padded": [], "sub-batches": []} for name in models}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, model in models.items():
            started = time.perf_counter()
            for batch in batches:
                model.logits(batch, batch_size=32)
            padded = len(texts) / (time.perf_counter() - started)
            started = time.perf_counter()
            for batch in batches:
                predict_by_length(model, batch)
            if round_:
                speed[name]["padded"].append(padded)
                speed[name]["sub-batches"].append(len(texts) / (time.perf_counter() - started))
    return speed


def speed_row(runs: dict[str, list], baseline: dict[str, float], against: str) -> dict:
    """One model's `batch_speeds` entry as a results row: per way the median rate
    (`WAY_texts_per_s`), its ratio to `baseline` (way -> median rate of the model it is
    compared with; `WAY_x_AGAINST`) and every round's rate (`runs`)."""
    return {**{f"{way}_texts_per_s": round(statistics.median(r), 2) for way, r in runs.items()},
            **{f"{way}_x_{against}": round(statistics.median(r) / baseline[way], 3)
               for way, r in runs.items()},
            "runs": {way: [round(rate, 2) for rate in r] for way, r in runs.items()}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_servers(folders: list[Path], pin: bool, max_wait_ms: float = 0.0,
                  flags: tuple[str, ...] = ()) -> list[tuple[subprocess.Popen, str]]:
    """`hm3 serve` for each folder (threads from $OMP_NUM_THREADS, default 1; on core 0 when
    `pin`), once each is healthy."""
    env = {"OMP_NUM_THREADS": "1", "HM3_ONNX_THREADS": "1", **os.environ}
    servers = []
    for folder in folders:
        port = free_port()
        command = [sys.executable, "-m", "hm3.cli", "serve", str(folder), "--port", str(port),
                   "--max-batch-size", "32", "--max-wait-ms", f"{max_wait_ms:g}",
                   "--max-length", "128", "--log-level", "error", "--device", "cpu", *flags]
        process = subprocess.Popen((["taskset", "-c", "0"] if pin else []) + command, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        servers.append((process, f"http://127.0.0.1:{port}"))
    for process, url in servers:
        wait_until_healthy(process, url)
    return servers


def wait_until_healthy(process: subprocess.Popen, url: str, timeout_s: float = 300,
                       path: str = "/health") -> None:
    """Return once the server at `url` answers `path` with 200; stop the benchmark if its
    process exits or it does not come up within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not start")
        time.sleep(0.5)


def stop_servers(servers) -> None:
    """Stop (process, url) pairs: SIGTERM to all, then a kill to any still up after 60 s."""
    for process, _ in servers:
        process.send_signal(signal.SIGTERM)
    for process, _ in servers:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


# --- `hm3 check` against labels ------------------------------------------------------------------

def agreement_correlations(data: list[tuple[str, str, float, float]]) -> dict:
    """Pearson and Spearman correlation of agreement and macro-F1 change over (row, task,
    agreement, change) points."""
    if len(data) < 3:
        return {}
    agreement = np.array([p[2] for p in data])
    delta = np.array([p[3] for p in data])
    return {"points": len(data), "pearson": float(pearsonr(agreement, delta)[0]),
            "spearman": float(spearmanr(agreement, delta)[0])}


def plot_agreement(data: list[tuple[str, str, float, float]], path: Path, zoo: str, split: str,
                   stats: dict) -> None:
    """Scatter `hm3 check`'s agreement against the macro-F1 change on `split`, a colour per task,
    crosses for plain merges (rows named `plain...`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    tasks = list(dict.fromkeys(task for _, task, _, _ in data))
    colours = dict(zip(tasks, plt.get_cmap("tab10").colors))
    for name, task, agreement, delta in data:
        plain = name.startswith("plain")
        ax.scatter(agreement, delta, color=colours[task], marker="x" if plain else "o", alpha=0.75,
                   label=f"{task}, {'plain merge' if plain else 'label-free merge'}")
    title = f"{zoo}: hm3 check agreement vs labelled macro-F1 change"
    if stats:
        title += (f"\n{stats['points']} (merge, task) points; Pearson {stats['pearson']:.2f}, "
                  f"Spearman {stats['spearman']:.2f}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"argmax agreement with the expert on the task's {split} texts (no labels)")
    ax.set_ylabel(f"{split} macro-F1, merged - expert")
    ax.axhline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

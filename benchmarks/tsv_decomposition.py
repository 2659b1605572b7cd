"""TSV-Merge's per-matrix cost: each task vector's top directions from an SVD (as the paper) or
from the eigendecomposition of its smaller Gram matrix (`hm3.methods.spectrum`), on eight
random task vectors of each MPNet-base weight-matrix shape; the two alternate (A B A B ...),
medians of `--rounds`, and the relative difference of the two merges.

  .venv/bin/python benchmarks/tsv_decomposition.py
Results: benchmarks/results/tsv_decomposition.json."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from hm3.checkpoint import write_json_atomic
from hm3.methods.spectrum import _orthonormal, task_singular

RESULTS = Path(__file__).resolve().parent / "results" / "tsv_decomposition.json"
SHAPES = ((768, 768), (3072, 768), (768, 3072))  # attention, FFN up and down of MPNet-base


def by_svd(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TSV-Merge with an SVD of every task vector (no rounding-level directions here)."""
    keep = max(1, min(deltas[0].shape) // len(deltas))
    parts = [torch.linalg.svd(d.double(), full_matrices=False) for d in deltas]
    u = _orthonormal(torch.cat([p[0][:, :keep] for p in parts], 1))
    v = _orthonormal(torch.cat([p[2][:keep] for p in parts], 0).T)
    return ((u * torch.cat([p[1][:keep] for p in parts])) @ v.T).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    for shape in SHAPES:
        # a low-rank part plus noise, as fine-tuning leaves
        deltas = [torch.randn(shape[0], 32) @ torch.randn(32, shape[1]) * 1e-3
                  + torch.randn(*shape) * 1e-4 * (i + 1) for i in range(8)]
        times = {"svd": [], "gram": []}
        for _ in range(args.rounds):
            for name, merge in (("svd", by_svd), ("gram", task_singular)):
                started = time.perf_counter()
                out = merge(deltas)
                times[name].append(time.perf_counter() - started)
                if name == "svd":
                    reference = out
        rows["x".join(map(str, shape))] = {
            "svd_s": round(statistics.median(times["svd"]), 3),
            "gram_s": round(statistics.median(times["gram"]), 3),
            "relative_difference": float((out - reference).norm() / reference.norm())}
        print(shape, rows["x".join(map(str, shape))], flush=True)
    write_json_atomic(RESULTS, {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads", "experts": 8, "rows": rows})


if __name__ == "__main__":
    main()

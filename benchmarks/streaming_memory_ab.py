"""Peak memory of the plain streaming merge against the number of experts, two versions of hm3
side by side: A = the source tree given by --before (e.g. a worktree of an earlier commit), B =
this checkout. TIES 0.2 of the first N = 2, 4, 8 MPNet zoo experts, each merge in its own child
process (`benchmarks/mpnet_zoo.py`'s `timed_merge`: peak RSS from /usr/bin/time), A B per N,
--rounds rounds, medians; growth per added expert in largest tensors (the word embeddings).
Writes benchmarks/results/streaming_memory_ab.json.

  git worktree add /tmp/hm3-before COMMIT
  .venv/bin/python benchmarks/streaming_memory_ab.py --before /tmp/hm3-before/src   # ~6 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from hm3.checkpoint import write_json_atomic  # noqa: E402
from hm3.zoo import build_mpnet_zoo  # noqa: E402

from mpnet_zoo import largest_tensor_gb, recipe, timed_merge  # noqa: E402

RESULTS = HERE / "results" / "streaming_memory_ab.json"
SIZES = (2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, type=Path,
                        help="the `src` folder of the version to compare against (A)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.before / "hm3" / "__init__.py").is_file():
        parser.error(f"--before {args.before}: expected a folder holding hm3/ (a checkout's src)")
    zoo = build_mpnet_zoo(progress=False)
    tasks = list(zoo.experts)
    versions = {"A before": str(args.before.resolve()), "B this checkout": str(HERE.parent / "src")}
    runs = {v: {n: [] for n in SIZES} for v in versions}
    work = Path(tempfile.mkdtemp(prefix="hm3-streaming-ab-"))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for _ in range(args.rounds):
        for n in SIZES:
            for version, source in versions.items():
                os.environ["PYTHONPATH"] = source  # the child merge imports this hm3
                runs[version][n].append(timed_merge(recipe(zoo, tasks[:n], {}), work / f"{n}"))
                print(version, n, runs[version][n][-1], flush=True)
    largest = largest_tensor_gb(zoo)
    result = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "largest_tensor_gb": round(largest, 4), "versions": versions, "load_average_end":
              os.getloadavg()}
    for version in versions:
        peak = {n: statistics.median(r["peak_rss_gb"] for r in runs[version][n]) for n in SIZES}
        wall = {n: statistics.median(r["wall_minutes"] for r in runs[version][n]) for n in SIZES}
        result[version] = {
            "median_peak_rss_gb": peak, "median_wall_minutes": wall,
            "growth_per_expert_2_to_4": round((peak[4] - peak[2]) / 2 / largest, 3),
            "growth_per_expert_4_to_8": round((peak[8] - peak[4]) / 4 / largest, 3),
            "runs": runs[version]}
        print(version, {k: v for k, v in result[version].items() if k != "runs"})
    write_json_atomic(args.output, result)


if __name__ == "__main__":
    main()

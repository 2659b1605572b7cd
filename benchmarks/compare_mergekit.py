"""hm3 side by side with mergekit: the same merge, done by `hm3 merge` and by `mergekit-yaml`.

mergekit cannot merge classifiers with different label sets, so it gets HM3-expanded inputs,
built here independently of hm3's own code: every expert's final projection padded to the shared
K rows (zeros outside its block) and a base whose K-row head is zeros. hm3 gets the ORIGINAL
experts and expands them itself. Each merge runs as a fresh subprocess whose wall time and peak
RSS (`wait4` rusage) are measured; the two outputs are then compared tensor by tensor.

Inputs:
  synthetic  four random bert-base-size experts (BertConfig defaults, ~110M parameters) with
             2, 3, 5 and 6 labels: a seeded random base plus a small dense perturbation each
  zoo        the offline demo zoo (four all-MiniLM-L6-v2 fine-tunes), from `hm3.zoo.build_zoo`

Run with hm3's venv after `benchmarks/mergekit_env.sh`:
  .venv/bin/python benchmarks/compare_mergekit.py --inputs synthetic zoo --repeats 3 --threads 1
Every measurement goes to benchmarks/results/mergekit_compare.json (a run of fewer inputs or
methods to a name that says which, e.g. mergekit_compare_linear_task_arithmetic.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HM3 = ROOT / ".venv" / "bin" / "hm3"
TIME = "/usr/bin/time"  # GNU time
MERGEKIT_VENV = HERE / ".venv-mergekit"
RESULTS = HERE / "results"
FINAL_PROJECTIONS = ("classifier.out_proj", "classifier", "score")
SYNTHETIC_LABELS = {"alpha": 2, "beta": 3, "gamma": 5, "delta": 6}
SYNTHETIC_SIZES = {  # name -> BertConfig overrides; bert-base is BertConfig's defaults
    "bert-base": {},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 128, "vocab_size": 1000},
}
# Per-expert weights, deliberately unequal so that weighting and normalisation are exercised.
WEIGHTS = (1.0, 0.8, 1.2, 1.0)


@dataclass(frozen=True)
class Method:
    """One merge configuration, given identically to both tools."""

    label: str
    name: str
    shared: dict
    density: float | None = None


METHODS = {
    "linear": Method("linear", "linear", {"normalize": True}),
    "task_arithmetic": Method("task_arithmetic", "task_arithmetic", {"lambda": 0.7}),
    "ties-1.0": Method("ties d=1.0", "ties", {"lambda": 1.0, "normalize": True}, 1.0),
    "ties-0.5": Method("ties d=0.5", "ties", {"lambda": 1.0, "normalize": True}, 0.5),
}


@dataclass
class Inputs:
    """Original checkpoints (for hm3) and their HM3-expanded twins (for mergekit)."""

    name: str
    base: Path
    experts: dict[str, Path]
    expanded_base: Path
    expanded_experts: dict[str, Path]
    head: tuple[str, ...]  # tensor names of the final projection
    parameters: int  # per expert


@dataclass
class Run:
    seconds: float  # wall
    peak_mb: float  # peak RSS (wait4's ru_maxrss): heap plus the touched pages of mmapped inputs
    peak_anon_mb: float  # peak anonymous memory (RssAnon, sampled every 20 ms): the heap alone
    cpu_seconds: float  # user + system


# ---------------------------------------------------------------- inputs


def write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else [folder / "model.safetensors"])
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


def synthetic_inputs(folder: Path, size: str, seed: int = 0,
                     noise: float = 1e-3) -> tuple[Path, dict[str, Path]]:
    """A seeded random bare-encoder base and one sequence classifier per task around it."""
    from transformers import BertConfig, BertModel

    base_dir, experts = folder / "base", {t: folder / t for t in SYNTHETIC_LABELS}
    if (folder / "done").is_file():
        return base_dir, experts
    shutil.rmtree(folder, ignore_errors=True)
    config = BertConfig(**SYNTHETIC_SIZES[size])
    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in BertModel(config).state_dict().items()}
    base_config = {**config.to_dict(), "architectures": ["BertModel"]}
    write_model(base_dir, base, base_config)
    for i, (task, k) in enumerate(SYNTHETIC_LABELS.items()):
        gen = torch.Generator().manual_seed(seed + 1 + i)
        tensors = {}
        for name, value in base.items():
            if value.is_floating_point():
                value = value + noise * torch.randn(value.shape, generator=gen)
            tensors[f"bert.{name}"] = value
        tensors.pop("bert.embeddings.position_ids", None)  # transformers does not save it
        tensors["classifier.weight"] = 0.02 * torch.randn((k, config.hidden_size), generator=gen)
        tensors["classifier.bias"] = 0.01 * torch.randn((k,), generator=gen)
        labels = {str(j): f"{task}_{j}" for j in range(k)}
        write_model(experts[task], tensors, {
            **config.to_dict(), "architectures": ["BertForSequenceClassification"],
            "id2label": labels, "label2id": {v: int(j) for j, v in labels.items()}})
    (folder / "done").write_text("")
    return base_dir, experts


def zoo_inputs(cache_dir: Path | None) -> tuple[Path, dict[str, Path]]:
    """The demo zoo's base and experts; built first (minutes of fine-tuning) if not cached."""
    from hm3.zoo import build_zoo

    zoo = build_zoo(cache_dir=cache_dir, progress=False)
    return Path(zoo.base), {task: Path(path) for task, path in zoo.experts.items()}


def num_labels(config: dict) -> int:
    return len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))


def final_projection(tensors: dict[str, torch.Tensor], rows: int) -> tuple[str, ...]:
    for prefix in FINAL_PROJECTIONS:
        weight = tensors.get(f"{prefix}.weight")
        if weight is not None and weight.dim() == 2 and weight.shape[0] == rows:
            return tuple(n for n in (f"{prefix}.weight", f"{prefix}.bias") if n in tensors)
    raise SystemExit(f"no final projection with {rows} rows")


def expand_inputs(name: str, base_dir: Path, experts: dict[str, Path], folder: Path) -> Inputs:
    """HM3 expansion for mergekit: K-row heads, zeros outside each expert's block; a base with a
    zero head, named like the experts (a bare encoder's `encoder.x` becomes `bert.encoder.x`;
    tensors the base lacks, such as a classifier's hidden layers, are zeros)."""
    configs = {t: json.loads((d / "config.json").read_text()) for t, d in experts.items()}
    sizes = {t: num_labels(c) for t, c in configs.items()}
    total = sum(sizes.values())
    offsets, offset = {}, 0
    for task, k in sizes.items():
        offsets[task], offset = offset, offset + k
    first = read_model(next(iter(experts.values())))
    head = final_projection(first, next(iter(sizes.values())))
    parameters = sum(v.numel() for v in first.values())
    expanded_base = folder / "base"
    expanded_experts = {t: folder / t for t in experts}
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        labels = {str(offsets[t] + j): f"{t}/{label}" for t, c in configs.items()
                  for j, label in enumerate(
                      [c["id2label"][str(i)] for i in range(sizes[t])] if c.get("id2label")
                      else [f"LABEL_{i}" for i in range(sizes[t])])}
        config = {**configs[next(iter(configs))], "id2label": labels,
                  "label2id": {v: int(k) for k, v in labels.items()}}
        config.pop("num_labels", None)
        raw_base = read_model(base_dir)
        base = {}
        for key, value in first.items():
            if key in head:
                base[key] = torch.zeros((total, *value.shape[1:]), dtype=value.dtype)
                continue
            stripped = key.partition(".")[2]
            source = raw_base.get(key, raw_base.get(stripped))
            base[key] = source.to(value.dtype) if source is not None else torch.zeros_like(value)
        write_model(expanded_base, base, config)
        del raw_base, base
        for task, directory in experts.items():
            tensors = first if directory == next(iter(experts.values())) else read_model(directory)
            for key in head:
                block = tensors[key]
                padded = torch.zeros((total, *block.shape[1:]), dtype=block.dtype)
                padded[offsets[task]:offsets[task] + sizes[task]] = block
                tensors[key] = padded
            write_model(expanded_experts[task], tensors, config)
        (folder / "done").write_text("")
    return Inputs(name, base_dir, experts, expanded_base, expanded_experts, head, parameters)


# ---------------------------------------------------------------- the two tools


def hm3_recipe(inputs: Inputs, method: Method) -> dict:
    experts = []
    for (task, path), weight in zip(inputs.experts.items(), WEIGHTS):
        entry = {"model": str(path), "task": task, "weight": weight}
        if method.density is not None:
            entry["density"] = method.density
        experts.append(entry)
    return {"base": str(inputs.base), "method": method.name, "parameters": dict(method.shared),
            "experts": experts, "dtype": "float32", "seed": 0,
            "heads": "merge"}  # heads through the method too, as mergekit does with them


def mergekit_config(inputs: Inputs, method: Method) -> dict:
    models = []
    for path, weight in zip(inputs.expanded_experts.values(), WEIGHTS):
        params = {"weight": weight}
        if method.density is not None:
            params["density"] = method.density
        models.append({"model": str(path), "parameters": params})
    config = {"merge_method": method.name, "models": models, "parameters": dict(method.shared),
              "dtype": "float32", "out_dtype": "float32"}
    if method.name != "linear":  # mergekit's linear averages the listed models only, as hm3's
        config["base_model"] = str(inputs.expanded_base)
    return config


def measured(command: list[str], log: Path) -> Run:
    """Run a command in a fresh process: wall time; peak RSS and CPU time from GNU time; peak
    anonymous memory sampled from /proc (mergekit reads its inputs through safetensors' memory
    maps, and so did hm3 until 2026-11-29: RSS counts every page of them that was read).

    GNU time stands in between because Linux keeps a process's peak RSS across fork and exec: a
    child forked straight from this (large) script would report this script's RSS as its own.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    usage = log.with_suffix(".time")
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen([TIME, "-f", "%M %U %S", "-o", str(usage), *command],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
        anon = [0]
        sampler = threading.Thread(target=_sample_anon, args=(process.pid, anon), daemon=True)
        sampler.start()
        code = process.wait()
        seconds = time.perf_counter() - start
        sampler.join()
    if code:
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n" + log.read_text()[-3000:])
    max_rss_kib, user, system = usage.read_text().split()[-3:]
    return Run(seconds, int(max_rss_kib) / 1024, anon[0] / 1024, float(user) + float(system))


def _sample_anon(parent: int, peak: list[int]) -> None:
    """Follow the peak RssAnon of `parent`'s child (the measured command) until it exits."""
    children = Path(f"/proc/{parent}/task/{parent}/children")
    pid = None
    while pid is None:
        try:
            found = children.read_text().split()
        except OSError:
            return
        pid = int(found[0]) if found else None
        if pid is None:
            time.sleep(0.005)
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return
        if "RssAnon:" not in text:  # a zombie: it has exited
            return
        peak[0] = max(peak[0], int(text.split("RssAnon:")[1].split()[0]))
        time.sleep(0.02)


def warm_cache(folders: list[Path]) -> None:
    """Read the inputs once so that neither tool pays the cold-disk read."""
    for folder in folders:
        for file in folder.glob("*.safetensors"):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def run_hm3(inputs: Inputs, method: Method, work: Path, out: Path) -> Run:
    recipe = work / "hm3.yaml"
    recipe.write_text(yaml.safe_dump(hm3_recipe(inputs, method), sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    warm_cache([inputs.base, *inputs.experts.values()])
    return measured([str(HM3), "merge", str(recipe), "-o", str(out), "--no-progress"],
                    work / "hm3.log")


def run_mergekit(inputs: Inputs, method: Method, work: Path, out: Path, venv: Path) -> Run:
    config = work / "mergekit.yaml"
    config.write_text(yaml.safe_dump(mergekit_config(inputs, method), sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    warm_cache([inputs.expanded_base, *inputs.expanded_experts.values()])
    # Tokenizer copying and the model card are mergekit extras hm3 has no counterpart of (hm3
    # copies tokenizer files byte for byte; the synthetic experts have none).
    return measured([str(venv / "bin" / "mergekit-yaml"), str(config), str(out),
                     "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                    work / "mergekit.log")


def import_baseline(venv: Path, work: Path) -> dict[str, Run]:
    """What merely starting each tool costs: its imports, no tensor work."""
    return {
        "hm3": measured([str(ROOT / ".venv" / "bin" / "python"), "-c",
                         "import hm3.cli, hm3.engine"], work / "import-hm3.log"),
        "mergekit": measured([str(venv / "bin" / "python"), "-c",
                              "import mergekit.scripts.run_yaml, mergekit.merge"],
                             work / "import-mergekit.log"),
    }


def max_differences(a: Path, b: Path, head: tuple[str, ...]) -> dict:
    """Largest |a - b| over body tensors and over the head; names only one side has."""
    ta, tb = read_model(a), read_model(b)
    body = head_diff = 0.0
    for name in ta.keys() & tb.keys():
        if not ta[name].is_floating_point():
            continue
        if not ta[name].numel():
            continue
        diff = float((ta[name].double() - tb[name].double()).abs().max())
        if name in head:
            head_diff = max(head_diff, diff)
        else:
            body = max(body, diff)
    return {"body": body, "head": head_diff, "only_hm3": sorted(ta.keys() - tb.keys()),
            "only_mergekit": sorted(tb.keys() - ta.keys())}


def threshold_ties(inputs: Inputs, hm3_out: Path, mergekit_out: Path, density: float,
                   tolerance: float = 1e-5) -> dict:
    """Where TIES outputs differ in the body: are those exactly the entries at which some
    expert's |task vector| equals its top-k threshold? There "keep the k largest" is ambiguous:
    hm3 keeps the lower indices (stable sort), mergekit whatever its unstable sort puts first."""
    handles = {"hm3": safe_open(str(hm3_out / "model.safetensors"), "pt"),
               "mergekit": safe_open(str(mergekit_out / "model.safetensors"), "pt"),
               "base": safe_open(str(inputs.expanded_base / "model.safetensors"), "pt"),
               **{t: safe_open(str(d / "model.safetensors"), "pt")
                  for t, d in inputs.expanded_experts.items()}}
    differing = explained = entries = 0
    for name in handles["hm3"].keys():
        if name in inputs.head or name not in handles["mergekit"].keys():
            continue
        a, b = handles["hm3"].get_tensor(name), handles["mergekit"].get_tensor(name)
        if not a.is_floating_point():
            continue
        entries += a.numel()
        far = (a.double() - b.double()).abs() > tolerance
        if not far.any():
            continue
        base = handles["base"].get_tensor(name)
        at_threshold = torch.zeros_like(far)
        for task in inputs.expanded_experts:
            magnitude = (handles[task].get_tensor(name) - base).abs().reshape(-1).float()
            k = max(1, int(density * magnitude.numel()))
            kth = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
            at_threshold |= (magnitude == kth).reshape(far.shape)
        differing += int(far.sum())
        explained += int((far & at_threshold).sum())
    return {"tolerance": tolerance, "entries": entries, "differing": differing,
            "at_threshold_tie": explained}


# ---------------------------------------------------------------- main


def versions(venv: Path) -> dict:
    mk = subprocess.run([str(venv / "bin" / "python"), "-c",
                         "import importlib.metadata as m, torch, transformers;"
                         "print(m.version('mergekit'), torch.__version__,"
                         "transformers.__version__)"],
                        capture_output=True, text=True, check=True).stdout.split()
    from importlib.metadata import version

    import transformers
    return {"python": platform.python_version(), "hm3": version("hm3"),
            "hm3 torch": torch.__version__, "hm3 transformers": transformers.__version__,
            "mergekit": mk[0], "mergekit torch": mk[1], "mergekit transformers": mk[2],
            "nproc": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", nargs="+", choices=("synthetic", "zoo"), default=["synthetic"])
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--synthetic-size", choices=tuple(SYNTHETIC_SIZES), default="bert-base")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and method "
                        "(the median is reported)")
    parser.add_argument("--work", type=Path, default=HERE / ".work",
                        help="scratch folder for inputs and outputs (default benchmarks/.work)")
    parser.add_argument("--zoo-cache", type=Path, help="where the zoo is cached (default: "
                        "$HM3_CACHE or ~/.cache/hm3)")
    parser.add_argument("--mergekit-venv", type=Path, default=MERGEKIT_VENV)
    parser.add_argument("--threads", type=int, help="torch CPU threads of both tools "
                        "(OMP_NUM_THREADS); 1 keeps a shared machine's load from stalling "
                        "OpenMP barriers (default: torch's own choice)")
    parser.add_argument("--json", type=Path, help="write every measurement here (default: "
                        "benchmarks/results/mergekit_compare[_INPUTS][_METHODS].json, naming the "
                        "inputs and methods when not all were run)")
    args = parser.parse_args(argv)
    args.json = args.json or default_json(args.inputs, args.methods, args.synthetic_size)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if not (args.mergekit_venv / "bin" / "mergekit-yaml").is_file():
        raise SystemExit(f"no mergekit in {args.mergekit_venv}; run benchmarks/mergekit_env.sh")

    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "versions": versions(args.mergekit_venv), "weights": WEIGHTS,
              "threads": args.threads, "load_average_before": os.getloadavg(), "rows": []}
    args.work.mkdir(parents=True, exist_ok=True)
    report["import_baseline"] = {k: asdict(v) for k, v in
                                 import_baseline(args.mergekit_venv, args.work).items()}
    rows = []
    for source in args.inputs:
        if source == "synthetic":
            folder = args.work / f"synthetic-{args.synthetic_size}"
            base, experts = synthetic_inputs(folder / "original", args.synthetic_size)
            label = f"synthetic {args.synthetic_size}"
        else:
            folder = args.work / "zoo"
            base, experts = zoo_inputs(args.zoo_cache)
            label = "zoo MiniLM"
        inputs = expand_inputs(label, base, experts, folder / "expanded")
        outputs = {}
        for key in args.methods:
            method = METHODS[key]
            work = folder / "runs" / key
            work.mkdir(parents=True, exist_ok=True)
            hm3_runs, mk_runs = [], []
            for _ in range(args.repeats):  # alternate, so that drifting load hits both alike
                hm3_runs.append(run_hm3(inputs, method, work, work / "hm3-out"))
                mk_runs.append(run_mergekit(inputs, method, work, work / "mergekit-out",
                                            args.mergekit_venv))
            diff = max_differences(work / "hm3-out", work / "mergekit-out", inputs.head)
            if method.density is not None and method.density < 1 and diff["body"] > 1e-5:
                diff["ties"] = threshold_ties(inputs, work / "hm3-out", work / "mergekit-out",
                                              method.density)
            outputs[key] = work
            row = {"inputs": label, "parameters": inputs.parameters, "method": method.label,
                   "hm3_s": statistics.median(r.seconds for r in hm3_runs),
                   "mergekit_s": statistics.median(r.seconds for r in mk_runs),
                   "hm3_mb": statistics.median(r.peak_mb for r in hm3_runs),
                   "mergekit_mb": statistics.median(r.peak_mb for r in mk_runs),
                   "hm3_anon_mb": statistics.median(r.peak_anon_mb for r in hm3_runs),
                   "mergekit_anon_mb": statistics.median(r.peak_anon_mb for r in mk_runs),
                   "hm3_cpu_s": statistics.median(r.cpu_seconds for r in hm3_runs),
                   "mergekit_cpu_s": statistics.median(r.cpu_seconds for r in mk_runs),
                   "hm3_runs": [asdict(r) for r in hm3_runs],
                   "mergekit_runs": [asdict(r) for r in mk_runs], **diff}
            rows.append(row)
            print(table_line(row), flush=True)
        if "ties-0.5" in outputs and "ties-1.0" in outputs:
            # mergekit trims the EXPANDED head: with every block under half the K rows, a
            # density of 0.5 keeps all of each expert's own entries, i.e. its head is the dense one.
            check = max_differences(outputs["ties-1.0"] / "hm3-out",
                                    outputs["ties-0.5"] / "mergekit-out", inputs.head)
            report.setdefault("head_checks", {})[label] = {
                "hm3 ties d=1.0 head vs mergekit ties d=0.5 head": check["head"]}
        for work in outputs.values():
            for out in ("hm3-out", "mergekit-out"):
                shutil.rmtree(work / out, ignore_errors=True)
    report["rows"] = rows
    report["load_average_after"] = os.getloadavg()
    print()
    print(markdown(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"measurements: {args.json}")
    return 0


def default_json(inputs: list[str], methods: list[str], synthetic_size: str) -> Path:
    """results/mergekit_compare.json for every input and method, else a name saying which ran."""
    parts = []
    if set(inputs) != {"synthetic", "zoo"}:
        parts += sorted(set(inputs))
    if "synthetic" in inputs and synthetic_size != "bert-base":
        parts.append(synthetic_size)
    if set(methods) != set(METHODS):
        parts += [m.replace("-", "_").replace(".", "") for m in METHODS if m in methods]
    return RESULTS / ("_".join(["mergekit_compare", *parts]) + ".json")


HEADER = ("| inputs | method | hm3 s | mergekit s | speed ratio (mergekit/hm3) | hm3 peak MB | "
          "mergekit peak MB | memory ratio (hm3/mergekit) | max abs dw body | max abs dw head |")


def table_line(row: dict) -> str:
    return (f"| {row['inputs']} | {row['method']} | {row['hm3_s']:.2f} | {row['mergekit_s']:.2f} | "
            f"{row['mergekit_s'] / row['hm3_s']:.2f}x | {row['hm3_mb']:.0f} | "
            f"{row['mergekit_mb']:.0f} | {row['hm3_mb'] / row['mergekit_mb']:.2f} | "
            f"{row['body']:.2e} | {row['head']:.2e} |")


SECOND_HEADER = ("| inputs | method | hm3 CPU s | mergekit CPU s | CPU ratio (mergekit/hm3) | "
                 "hm3 peak anon MB | mergekit peak anon MB | anon ratio (hm3/mergekit) |")


def second_line(row: dict) -> str:
    return (f"| {row['inputs']} | {row['method']} | {row['hm3_cpu_s']:.2f} | "
            f"{row['mergekit_cpu_s']:.2f} | {row['mergekit_cpu_s'] / row['hm3_cpu_s']:.2f}x | "
            f"{row['hm3_anon_mb']:.0f} | {row['mergekit_anon_mb']:.0f} | "
            f"{row['hm3_anon_mb'] / row['mergekit_anon_mb']:.2f} |")


def markdown(report: dict) -> str:
    lines = [HEADER, "|" + " --- |" * 10]
    lines += [table_line(row) for row in report["rows"]]
    lines += ["", SECOND_HEADER, "|" + " --- |" * 8]
    lines += [second_line(row) for row in report["rows"]]
    base = report["import_baseline"]
    lines += ["", "Start-up alone (imports, no merge): "
              f"hm3 {base['hm3']['seconds']:.2f} s, peak RSS {base['hm3']['peak_mb']:.0f} MB; "
              f"mergekit {base['mergekit']['seconds']:.2f} s, "
              f"peak RSS {base['mergekit']['peak_mb']:.0f} MB."]
    for label, checks in report.get("head_checks", {}).items():
        for what, value in checks.items():
            lines.append(f"{label}: {what}: max abs diff {value:.2e}")
    for row in report["rows"]:
        if "ties" in row:
            t = row["ties"]
            lines.append(f"{row['inputs']}, {row['method']}: {t['differing']} of {t['entries']} "
                         f"body entries differ by more than {t['tolerance']:g}; "
                         f"{t['at_threshold_tie']} of them lie where an expert's |task vector| "
                         "ties with its top-k threshold")
        if row["only_hm3"] or row["only_mergekit"]:
            lines.append(f"{row['inputs']}, {row['method']}: tensors only in hm3's output "
                         f"{row['only_hm3']}, only in mergekit's {row['only_mergekit']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

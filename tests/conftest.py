"""Tiny model families built inside the tests: a base and experts fine-tuned (perturbed) from it."""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from hm3 import merge, parse_recipe

# HM3_TEST_THREADS=N runs the suite's PyTorch work on N threads (CI reruns `-m numeric` with 1
# and 2): a different thread count splits the same GEMMs into different partial sums, which is
# one of the ways another machine's float results differ from this one's.
TEST_THREADS = int(os.environ.get("HM3_TEST_THREADS", "0")) or None
if TEST_THREADS:
    torch.set_num_threads(TEST_THREADS)

WORDS = ["good", "bad", "free", "win", "money", "hello", "meeting", "today", "great", "awful",
         "what", "who", "where", "news", "sport", "market", "film", "vote", "phone", "call"]

SERVER_START_SECONDS = 600

TINY = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=66, pad_token_id=1),
    "xlm-roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=66, pad_token_id=1),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, pooler_hidden_size=32),
    "electra": dict(hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64),
    "mpnet": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=66, pad_token_id=0),
    "modernbert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                       global_attn_every_n_layers=1),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                  pad_token_id=0),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                  pad_token_id=0),
    "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                    pad_token_id=0),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0),
}


def write_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer over WORDS, built locally."""
    from transformers import BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    # transformers 5 ignores `vocab_file` here (every word would be [UNK]); pass the vocabulary
    BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)},
                      model_max_length=32).save_pretrained(folder)


def build_family(root: Path, tasks: dict[str, list[str]], model_type: str = "bert",
                 noise: float = 0.02, multi_label: tuple[str, ...] = (), seed: int = 0,
                 tokenizer: bool = True) -> tuple[Path, dict[str, Path]]:
    """Save a random tiny base (bare encoder) and one classifier per task fine-tuned from it
    (body = base + small noise, head random): the shape of a real HM3 input."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    vocab = 5 + len(WORDS)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **TINY[model_type])
    base = AutoModel.from_config(config)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    if tokenizer:
        write_tokenizer(base_dir)
    experts = {}
    for i, (task, labels) in enumerate(tasks.items()):
        expert_config = AutoConfig.for_model(
            model_type, vocab_size=vocab, **TINY[model_type],
            id2label=dict(enumerate(labels)), label2id={lab: j for j, lab in enumerate(labels)},
            problem_type="multi_label_classification" if task in multi_label
            else "single_label_classification")
        torch.manual_seed(seed + 100 + i)
        model = AutoModelForSequenceClassification.from_config(expert_config)
        body = getattr(model, model.base_model_prefix)
        body.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            for param in body.parameters():
                param.add_(noise * torch.randn_like(param))
        folder = root / task
        model.save_pretrained(folder)
        if tokenizer:
            write_tokenizer(folder)
        experts[task] = folder
    return base_dir, experts


@pytest.fixture
def family(tmp_path):
    """A BERT base and two experts: sentiment (2 labels) and topic (3 labels)."""
    return build_family(tmp_path, {"sentiment": ["negative", "positive"],
                                   "topic": ["news", "sport", "film"]})


def recipe_dict(base: Path, experts: dict[str, Path], method: str = "ties", **extra) -> dict:
    return {"base": str(base), "method": method,
            "experts": [{"model": str(path), "task": task} for task, path in experts.items()],
            **extra}


@torch.no_grad()
def spread_head(folder: Path, texts: list[str], seed: int) -> None:
    """Give an expert a head whose predictions vary over `texts`.

    A random tiny encoder's pooled output barely changes from text to text (its std is ~1% of
    its mean), so a random head predicts one class for everything. Standardising the head's
    input makes every logit ~N(0, 1) over the texts: a spread of labels, and one that a merged
    body shifts far enough to collapse, which is what re-centring must undo."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # the final projection: `classifier` (BERT), `classifier.out_proj` (RoBERTa, MPNet)
    head = getattr(model.classifier, "out_proj", model.classifier)
    seen = []
    handle = head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    model(**tokenizer(texts, padding=True, return_tensors="pt"))
    handle.remove()
    x = seen[0].double()
    mean, std = x.mean(0), x.std(0)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(head.out_features, x.shape[1], generator=generator,
                         dtype=torch.float64) / x.shape[1] ** 0.5 / std
    head.weight.copy_(weight.float())
    head.bias.copy_((-weight @ mean).float())
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def one_thread():
    """The models are tiny: handing work between threads costs more than it saves, and on a
    busy two-core machine it stalls a fit of a second into tens of seconds. HM3_TEST_THREADS
    overrides it (CI's rerun of the numeric tests on two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS or 1)
    yield
    torch.set_num_threads(threads)


# --- float tolerances, derived from the computation ---------------------------------------------
#
# Two correct float32 computations of the same logits differ: PyTorch eager and ONNX Runtime or
# OpenVINO, one SIMD kernel and another (AVX2, AVX-512, AVX-512 FP16 and AMX block the same GEMM
# differently, with or without fused multiply-add), one thread and two (each thread sums a part),
# a batch padded to 5 tokens and one padded to 9 all sum the same terms in different orders, and
# each order rounds differently. A tolerance measured on one machine's run (1e-5 because that run
# gave 3e-6) is not a bound: the suite then fails on the next CPU (issue 25: 3.05e-5 on an Intel
# Xeon with AVX-512 FP16 against atol 1e-5, in a test that passed on the AMD EPYC it was written
# on). The bound below follows the standard float error analysis instead:
#   * a dot product of n terms rounds n times, each by at most eps32/2 of the running sum; with
#     no adversary the roundings are independent, so two summation orders differ by a random
#     walk: ~ eps32 * sqrt(n) * sum_i |a_i b_i| (the worst case, n * eps32, needs adversarial
#     signs);
#   * a transformer block is a few such dot products; layer norm rescales what it receives, so
#     the relative error a block adds is of that size and `depth` blocks add up to
#     ~ eps32 * sqrt(width * depth) relative to the values they pass on;
#   * the output's last dot product turns a relative error r of its input into an absolute
#     error of at most r * sum_j |W_ij x_j| (+ its own rounding): that sum, the `magnitude`, is
#     what sets the scale - not the size of the output, which cancellation can make far smaller
#     (a standardised head's terms sum to hundreds while its logits are ~1);
#   * ROUNDING_SIGMAS covers the largest of the many outputs a test compares (4 sigma of a
#     random walk is exceeded once in ~16 000).
# A real bug moves an output by a fraction of its size, orders of magnitude above this bound
# (every test using it was checked by planting a small wrong change: it fails).
EPS32 = float(torch.finfo(torch.float32).eps)  # 2**-23, float32's relative rounding step
ROUNDING_SIGMAS = 4.0


def float32_tolerance(magnitude: float, width: int, depth: int = 1) -> float:
    """The |difference| two correct float32 computations of a value may show: ROUNDING_SIGMAS *
    eps32 * magnitude * sqrt(width * depth), for a value whose last dot product's terms sum (in
    absolute value) to `magnitude`, computed through `depth` blocks of dot products of up to
    `width` terms."""
    return ROUNDING_SIGMAS * EPS32 * float(magnitude) * math.sqrt(width * depth)


@torch.no_grad()
def logits_tolerance(model, **inputs) -> float:
    """float32_tolerance of a transformers classifier's logits on `inputs` (its tokenizer's
    output): the magnitude measured on the classification layer (max over texts and labels of
    sum_j |W_ij x_j| + |b_i|), the width the longest dot product of any linear layer or
    attention row, the depth the model's number of layers. Probabilities (softmax, sigmoid)
    move by at most half as much as the logits, so this bounds them too."""
    labels = model.config.num_labels
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = [m for m in linears if m.out_features == labels][-1]
    seen = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        model(**inputs)
    finally:
        handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).float().abs()
    terms = x @ head.weight.float().abs().T
    if head.bias is not None:
        terms = terms + head.bias.float().abs()
    width = max([m.in_features for m in linears] + [inputs["input_ids"].shape[-1]])
    depth = getattr(model.config, "num_hidden_layers", 1) or 1
    return float32_tolerance(terms.max(), width, depth)


def classifier_tolerance(classifier, texts) -> float:
    """logits_tolerance of an `hm3.load`ed PyTorch classifier on `texts`, one batch."""
    return logits_tolerance(classifier.model, **classifier.encode(texts).to(classifier.device))


def random_texts(n: int, seed: int) -> list[str]:
    """`n` distinct texts of 2 to 8 words from the tiny vocabulary."""
    rng = random.Random(seed)
    texts: dict[str, None] = {}
    while len(texts) < n:
        texts[" ".join(rng.choices(WORDS, k=rng.randint(2, 8)))] = None
    return list(texts)


# The serving and export tests' model: two single-label tasks and a multi-label one.
SERVED_TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"],
                "tox": ["insult", "threat"]}


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> Path:
    """A tiny merged model of SERVED_TASKS, built once for every test that serves or exports it
    (they only read it)."""
    root = tmp_path_factory.mktemp("served")
    base, experts = build_family(root, SERVED_TASKS, multi_label=("tox",))
    out = root / "merged"
    merge(parse_recipe(recipe_dict(base, experts)), out, progress=False)
    return out


def texts_for(seed: int, n: int, max_words: int = 6) -> list[str]:
    """`n` texts of 1 to `max_words` of WORDS, different for each seed: request texts."""
    return [" ".join(WORDS[(seed * 7 + i * 3 + k) % len(WORDS)]
                     for k in range(1 + (seed + i) % max_words)) for i in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`hm3 serve MODEL ...` in a subprocess, ready once /health answers (with `--ray`, once
    the command says its replicas are up). Its output goes to a file (`output`): Ray logs a lot,
    and a pipe nobody reads would fill and stall it."""

    def __init__(self, model: Path, *options: str):
        import httpx  # the serve extra; only the serving tests build a Server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray = "--ray" in options
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="hm3-serve-", suffix=".log")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hm3.cli", "serve", str(model), "--port", str(self.port),
             "--log-level", "warning", *options],
            stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env)
        # a start-up deadline, not a speed target: on a loaded 2-core machine importing torch and
        # warming the model up has taken over 100 s
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"hm3 serve exited {self.process.returncode}: "
                                     f"{self.output()[-4000:]}")
            try:
                if (not self.ray or "replica(s) at http" in self.output()) and \
                        httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"hm3 serve did not answer /health within {SERVER_START_SECONDS} s: "
                             f"{self.output()[-4000:]}")

    def output(self) -> str:
        """What the process has written so far."""
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, wait: float | None = None) -> int:
        """SIGTERM, then the exit status (Ray Serve shuts down in up to two minutes)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(wait or (120 if self.ray else 30))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

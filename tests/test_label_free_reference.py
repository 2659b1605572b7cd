"""LEWIS and RegMean on three experts whose calibration texts differ, against independent
reimplementations: plain transformers models, our own forward hooks (one text at a time, so no
padding to mask), and the papers' formulas in float64."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hm3 import merge, parse_recipe

from conftest import EPS32, ROUNDING_SIGMAS, WORDS, build_family, recipe_dict

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"],
         "tags": ["urgent", "spam", "personal"]}
HEAD = "classifier"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """Three experts that moved well away from the base (noise 0.035), and calibration texts per
    task drawn from different parts of the vocabulary, so each expert sees other inputs."""
    root = tmp_path_factory.mktemp("label-free-ref")
    base, experts = build_family(root, TASKS, noise=0.035)
    texts, files = {}, {}
    for i, task in enumerate(TASKS):
        rng = random.Random(i)
        words = WORDS[i * 6:(i + 1) * 6 + 2]
        texts[task] = sorted({" ".join(rng.choices(words, k=rng.randint(2, 6)))
                              for _ in range(40)})
        files[task] = root / f"{task}.txt"
        files[task].write_text("\n".join(texts[task]) + "\n")
    return base, experts, texts, {t: str(f) for t, f in files.items()}


@torch.no_grad()
def layer_inputs(model, tokenizer, texts) -> dict[str, np.ndarray]:
    """Every linear layer's input rows (one per token, or per text for the pooler), float64."""
    rows: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != HEAD:
            def hook(_m, inputs, _o, name=name):
                x = inputs[0].detach().double()
                rows.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).numpy())
            handles.append(module.register_forward_hook(hook))
    for text in texts:  # one at a time: no padding tokens to leave out
        model(**tokenizer([text], return_tensors="pt"))
    for handle in handles:
        handle.remove()
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def load(folder, num_labels=None):
    kwargs = {"num_labels": num_labels} if num_labels else {}
    return AutoModelForSequenceClassification.from_pretrained(folder, **kwargs).eval()


def weights(model) -> dict[str, np.ndarray]:
    return {name: module.weight.detach().double().numpy() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name != HEAD}


def merged_tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            out.update({k: handle.get_tensor(k).double().numpy() for k in handle.keys()})
    return out


# --- LEWIS -----------------------------------------------------------------------------------

def wanda(weight: np.ndarray, x: np.ndarray) -> float:
    """|| |W| * sqrt(mean x^2) ||_F (Wanda's importance, LEWIS's layer score)."""
    return float(np.linalg.norm(np.abs(weight) * np.sqrt((x ** 2).mean(0))))


def test_lewis_densities_follow_the_wanda_importance_moves_of_each_expert(fam, tmp_path):
    base, experts, texts, files = fam
    gamma, epsilon = 0.2, 0.9
    raw = recipe_dict(base, experts, "ties", lewis={"gamma": gamma, "epsilon": epsilon},
                      calibration={"texts": files, "batch_size": 7})
    report = merge(parse_recipe(raw), tmp_path / "out", progress=False).label_free.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(experts["sentiment"])
    base_model = load(base, num_labels=8)  # the head is not scored: its rows do not matter
    base_w = weights(base_model)
    tables = {}
    for task, folder in experts.items():
        expert = load(folder)
        expert_w = weights(expert)
        xb = layer_inputs(base_model, tokenizer, texts[task])
        xe = layer_inputs(expert, tokenizer, texts[task])
        moved = {name: abs(wanda(expert_w[name], xe[name]) - wanda(base_w[name], xb[name]))
                 for name in expert_w}
        low, high = min(moved.values()), max(moved.values())
        tables[task] = {name: gamma + (epsilon - gamma) * (v - low) / (high - low)
                        for name, v in moved.items()}
    got = report["lewis"]["densities"]
    assert set(got) == set(TASKS)
    for task, want in tables.items():
        assert set(got[task]) == set(want)
        for name, value in want.items():
            assert got[task][name] == pytest.approx(value, abs=2e-4), (task, name)
    # the activation term matters here: weights alone would rank the layers otherwise
    tasks = list(TASKS)
    assert any(tables[a] != pytest.approx(tables[b], abs=0.05) for a in tasks for b in tasks)


# --- RegMean ---------------------------------------------------------------------------------

def regmean_reference(inputs: list[dict], expert_weights: list[dict], name: str) -> np.ndarray:
    """RegMean's solution for layer `name` from each expert's input rows, in float64."""
    grams = [x[name].T @ x[name] / len(x[name]) for x in inputs]
    total = sum(grams)
    cross = sum(g @ w[name].T for g, w in zip(grams, expert_weights))
    mean = sum(w[name] for w in expert_weights) / len(expert_weights)
    ridge = 1e-6 * np.diag(total).mean()  # the documented pull toward the plain mean
    return np.linalg.solve(total + ridge * np.eye(len(total)), cross + ridge * mean.T).T


def regmean_tolerance(inputs: list[dict], expert_weights: list[dict], name: str,
                      want: np.ndarray, relative: float) -> float:
    """How far float32 rounding of the layer inputs can move RegMean's solution, measured.

    The merge batches and pads its calibration texts, this reference runs one text at a time,
    so the input rows agree only to float32 rounding (`relative`, conftest's bound without its
    safety factor), and the solve multiplies that by the Grams' conditioning, which varies from
    layer to layer (~1e4 for the encoder here, ~1e7 for the pooler, whose 40 rows per expert
    barely span its 32 inputs): no fixed tolerance fits every layer and every CPU. So the
    reference is solved again from rows perturbed by that rounding; the tolerance is
    ROUNDING_SIGMAS times the larger of two such moves, plus the rounding of the merged weight
    to float32."""
    rng = np.random.default_rng(0)
    moves = []
    for _ in range(2):
        noisy = [{name: x[name] * (1 + relative * rng.standard_normal(x[name].shape))}
                 for x in inputs]
        moves.append(np.abs(regmean_reference(noisy, expert_weights, name) - want).max())
    return ROUNDING_SIGMAS * max(moves) + EPS32 * np.abs(want).max()


@pytest.mark.numeric
def test_regmean_weights_solve_the_regression_over_each_experts_own_inputs(fam, tmp_path):
    base, experts, texts, files = fam
    raw = recipe_dict(base, experts, "ties", regmean={},
                      calibration={"texts": files, "batch_size": 5})
    out = tmp_path / "out"
    merge(parse_recipe(raw), out, progress=False)
    got = merged_tensors(out)
    tokenizer = AutoTokenizer.from_pretrained(experts["sentiment"])
    inputs, expert_weights = [], []
    for task, folder in experts.items():
        model = load(folder)
        inputs.append(layer_inputs(model, tokenizer, texts[task]))
        expert_weights.append(weights(model))
    config = model.config
    relative = EPS32 * np.sqrt(max(config.hidden_size, config.intermediate_size)
                               * config.num_hidden_layers)
    compared = 0
    for name in expert_weights[0]:
        mean = sum(w[name] for w in expert_weights) / len(expert_weights)
        want = regmean_reference(inputs, expert_weights, name)
        np.testing.assert_allclose(
            got[f"{name}.weight"], want, rtol=0, err_msg=name,
            atol=regmean_tolerance(inputs, expert_weights, name, want, relative))
        # ... and that is not the plain mean: the Grams differ between experts
        assert np.abs(want - mean).max() > 2e-3, name
        compared += 1
    assert compared == 2 * 6 + 1  # per layer: q, k, v, attention out, intermediate, out; pooler

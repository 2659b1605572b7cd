"""Every registered merge method, end to end on three tiny experts, against an independent numpy
reimplementation of its paper's formula (trim / drop, sign election, disjoint or plain sum,
normalisation, lambda), with the method's own defaults.

The random drops (DARE, DELLA) are made reproducible by replacing `torch.bernoulli` with a fixed
pattern the reference knows: a uniform draw per element index, kept where it is below the keep
probability. The reference computes the keep probabilities itself (constant for DARE, by rank for
DELLA), so a wrong probability or epsilon changes the mask and fails the comparison. That the
real draws are seeded per tensor and expert is tested in test_merge.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hm3 import merge, parse_recipe
from hm3.methods import METHODS

from conftest import build_family, recipe_dict

TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"],
         "tags": ["urgent", "spam", "personal"]}
WEIGHTS = {"sentiment": 1.0, "topic": 0.6, "tags": 1.4}  # unequal: normalisation matters
DENSITY = 0.5  # inside DELLA's [epsilon, 1 - epsilon] for its default epsilon
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
NORMALISED = {"linear", "ties", "della"}  # mergekit's defaults
MAGNITUDE = {"ties", "magnitude"}
BREADCRUMBS = {"breadcrumbs", "breadcrumbs_ties"}
DELLA = {"della", "della_linear"}
# The papers' / mergekit's defaults, written here once more on purpose (not read from the code).
GAMMA, EPSILON, LAMBDA = 0.01, 0.15, 1.0


# --- the independent reference ---------------------------------------------------------------

def uniform(shape: tuple[int, ...]) -> np.ndarray:
    """The fixed 'random' draw per element of a tensor of this shape."""
    n = int(np.prod(shape)) if shape else 1
    return np.random.default_rng(n).random(n).reshape(shape)


def fake_bernoulli(probability: torch.Tensor, generator=None, **_) -> torch.Tensor:
    draw = torch.from_numpy(uniform(tuple(probability.shape))).to(probability.dtype)
    return (draw < probability).to(probability.dtype)


def ref_magnitude(delta: np.ndarray, density: float) -> np.ndarray:
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.size))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def ref_breadcrumbs(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Model Breadcrumbs: the gamma share largest |entries| and the smallest go; density stays."""
    flat = delta.reshape(-1)
    n = flat.size
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = np.argsort(np.abs(flat), kind="stable")
    out = np.zeros_like(flat)
    chosen = order[bottom:bottom + keep]
    out[chosen] = flat[chosen]
    return out.reshape(delta.shape)


def ref_dare(delta: np.ndarray, density: float) -> np.ndarray:
    """DARE: drop with probability 1 - density, survivors divided by density."""
    drawn = uniform(delta.shape).astype(np.float32) < np.float32(density)
    return delta * drawn / density


def ref_della(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """DELLA MagPrune: keep-probability density - eps .. density + eps by |rank| within a row,
    survivors divided by their own keep probability."""
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta.reshape(delta.shape[0], -1)
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    span = max(rows.shape[1] - 1, 1)
    probability = (density - epsilon) + ranks / span * 2 * epsilon
    drawn = uniform(rows.shape).astype(np.float32) < probability.astype(np.float32)
    return (rows * drawn / probability).reshape(delta.shape)


def ref_sparsify(method: str, delta: np.ndarray, density: float) -> np.ndarray:
    if method in MAGNITUDE:
        return ref_magnitude(delta, density)
    if method in BREADCRUMBS:
        return ref_breadcrumbs(delta, density, GAMMA)
    if method in DELLA:
        return ref_della(delta, density, EPSILON)
    if method in ("dare_linear", "dare_ties"):
        return ref_dare(delta, density)
    return delta


def ref_isotropic(matrix: np.ndarray) -> np.ndarray:
    """Iso-C: the same singular vectors, every singular value replaced by their mean."""
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return s.mean() * u @ vh


def ref_polar(matrix: np.ndarray) -> np.ndarray:
    """The orthonormal polar factor M (M^T M)^(-1/2), from the eigendecomposition of M^T M (the
    code takes it from an SVD); `matrix` is tall and of full column rank here."""
    values, vectors = np.linalg.eigh(matrix.T @ matrix)
    return matrix @ (vectors / np.sqrt(values)) @ vectors.T


def ref_task_singular(matrices: list[np.ndarray]) -> np.ndarray:
    """TSV-Merge: every task vector cut to its top min(shape) // N singular directions; the
    stacked left and right singular vectors orthogonalised; each task's singular values kept."""
    keep = min(matrices[0].shape) // len(matrices)
    parts = [np.linalg.svd(m, full_matrices=False) for m in matrices]
    assert all(p[1][keep - 1] > 1e-6 * p[1][0] for p in parts)  # no direction at rounding level
    u = ref_polar(np.hstack([p[0][:, :keep] for p in parts]))
    v = ref_polar(np.hstack([p[2][:keep].T for p in parts]))
    s = np.concatenate([p[1][:keep] for p in parts])
    return u @ np.diag(s) @ v.T


def ref_combine(method: str, base: np.ndarray, deltas: list[np.ndarray], weights: list[float],
                consensus: str = "sum", role: str = "other") -> np.ndarray:
    w = np.array(weights, dtype=np.float64)
    if method in ("iso_c", "tsv"):  # per weight matrix by its spectrum, mean elsewhere, heads kept
        summed = sum(wi * d for wi, d in zip(w, deltas))
        if role == "head":
            return base + summed
        if role != "matrix":
            return base + LAMBDA * summed / w.sum()
        if method == "iso_c":
            return base + LAMBDA * ref_isotropic(summed)
        return base + LAMBDA * ref_task_singular([wi * d for wi, d in zip(w, deltas)])
    if method == "linear":  # Model Soup: the weighted mean of the models
        return sum(wi * (base + d) for wi, d in zip(w, deltas)) / w.sum()
    weighted = [wi * d for wi, d in zip(w, deltas)]
    if method in CONSENSUS:  # TIES: elect a sign per entry, mean over the models that share it
        votes = sum(weighted) if consensus == "sum" else sum(np.sign(d) for d in weighted)
        elected = np.where(votes >= 0, 1.0, -1.0)
        agree = [(np.sign(d) == elected).astype(np.float64) for d in weighted]
        mixed = sum(d * a for d, a in zip(weighted, agree))
        divisor = sum(wi * a for wi, a in zip(w, agree))
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed, divisor = sum(weighted), w.sum()
    if method in NORMALISED:
        mixed = mixed / divisor
    return base + LAMBDA * mixed


def read(folder) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name).double().numpy() for name in handle.keys()})
    return out


def reference_merge(method: str, base_dir, experts: dict, consensus: str = "sum",
                    heads: str = "merge") -> dict[str, np.ndarray]:
    """The whole merged state dict, computed from the checkpoints with numpy alone."""
    base = read(base_dir)
    models = [read(folder) for folder in experts.values()]
    tasks = list(experts)
    sizes = [len(TASKS[t]) for t in tasks]
    offsets = np.cumsum([0, *sizes])
    head_names = {"classifier.weight", "classifier.bias", "classifier.out_proj.weight",
                  "classifier.out_proj.bias"}
    out = {}
    for name, first in models[0].items():
        if name in head_names:
            rows = [m[name] for m in models]
            if heads == "whole":
                out[name] = np.concatenate(rows)
                continue
            expanded = []  # HM3: each expert's own rows, trimmed there, then placed at its offset
            for i, row in enumerate(rows):
                full = np.zeros((offsets[-1], *row.shape[1:]))
                full[offsets[i]:offsets[i + 1]] = ref_sparsify(method, row, DENSITY)
                expanded.append(full)
            out[name] = ref_combine(method, np.zeros_like(expanded[0]), expanded,
                                    [WEIGHTS[t] for t in tasks], consensus, role="head")
            continue
        stripped = name.partition(".")[2]
        # head layers the base lacks (RoBERTa's classifier.dense) start from the experts' mean
        theta0 = base.get(name, base.get(stripped))
        if theta0 is None:
            theta0 = np.mean([m[name] for m in models], axis=0)
        deltas = [ref_sparsify(method, m[name] - theta0, DENSITY) for m in models]
        role = "matrix" if first.ndim == 2 and "embed" not in name else "other"
        out[name] = ref_combine(method, theta0, deltas, [WEIGHTS[t] for t in tasks], consensus,
                                role)
    return out


# --- the tests -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("ref-bert"), TASKS, tokenizer=False)


def run(method: str, base, experts, out, heads: str = "merge", **parameters):
    raw = recipe_dict(base, experts, method, heads=heads)
    for item in raw["experts"]:
        item["weight"] = WEIGHTS[item["task"]]
        if METHODS[method].sparsifier is not None:
            item["density"] = DENSITY
    if parameters:
        raw["parameters"] = parameters
    merge(parse_recipe(raw), out, progress=False)
    return read(out)


def assert_matches(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-5, err_msg=name)


def test_the_reference_covers_every_registered_method():
    assert set(METHODS) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                            "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                            "magnitude", "iso_c", "tsv"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_three_expert_merge_matches_the_reference_with_the_methods_defaults(
        bert, tmp_path, monkeypatch, method):
    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    base, experts = bert
    got = run(method, base, experts, tmp_path / "out")
    want = reference_merge(method, base, experts)
    assert_matches(got, want)
    # the merge is not trivially the plain mean or sum, so the comparison tells methods apart
    if method != "linear":
        others = {name for name in METHODS if name != method}
        for other in others:
            if other != "linear":
                differs = any(not np.allclose(want[n], v, atol=2e-5)
                              for n, v in reference_merge(other, base, experts).items())
                assert differs, f"{method} and {other} give the same merge here"


@pytest.mark.parametrize("method", sorted(CONSENSUS))
def test_sign_election_by_count(bert, tmp_path, monkeypatch, method):
    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    base, experts = bert
    got = run(method, base, experts, tmp_path / "out", consensus="count")
    assert_matches(got, reference_merge(method, base, experts, consensus="count"))


def test_whole_heads_are_the_experts_rows_and_the_body_is_still_merged(bert, tmp_path):
    base, experts = bert
    got = run("ties", base, experts, tmp_path / "out", heads="whole")
    assert_matches(got, reference_merge("ties", base, experts, heads="whole"))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_head_layers_the_base_lacks_start_from_the_experts_mean(tmp_path, method):
    """RoBERTa's classifier.dense is in every expert but not in the bare base encoder."""
    base, experts = build_family(tmp_path / "models", TASKS, model_type="roberta",
                                 tokenizer=False)
    assert "classifier.dense.weight" not in read(base)
    got = run(method, base, experts, tmp_path / "out")
    want = reference_merge(method, base, experts)
    assert_matches(got, want)
    assert np.abs(want["classifier.dense.weight"]).max() > 0.01

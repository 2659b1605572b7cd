"""End-to-end merges of the tiny BERT family: layout, head expansion, methods, determinism, I/O."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hm3
from hm3 import Hm3Error, merge, parse_recipe
from hm3.heads import TaskGroup
from hm3.methods import METHODS
from hm3.model import group_probabilities

from conftest import build_family, classifier_tolerance, logits_tolerance, recipe_dict

TEXTS = ["good great film", "free money win win call", "who won the vote today",
         "awful meeting", "hello", "market news sport phone"]
# [CLS] word ids ... [SEP] [PAD]s: a fixed batch for comparing raw models
INPUT_IDS = torch.tensor([[2, 5, 12, 19, 3, 0, 0], [2, 7, 8, 9, 10, 11, 3], [2, 6, 3, 0, 0, 0, 0]])
ATTENTION = (INPUT_IDS != 0).long()
SENTIMENT = ("negative", "positive")
TOPIC = ("news", "sport", "film")


def merged(base, experts, tmp_path, name="out", method="ties", **extra):
    out = tmp_path / name
    report = merge(parse_recipe(recipe_dict(base, experts, method, **extra)), out, progress=False)
    assert report.path == out.resolve()
    return out


def tensors(folder):
    """Every tensor of a saved model (single file or shards)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def raw_logits(folder):
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION).logits.float()


def raw_logits_tolerance(folder) -> float:
    """conftest.logits_tolerance of `folder`'s model on INPUT_IDS."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    return logits_tolerance(model, input_ids=INPUT_IDS, attention_mask=ATTENTION)


def config(folder):
    return json.loads((folder / "config.json").read_text())


# --- layout ----------------------------------------------------------------------------------

def test_layout_offsets_and_task_slash_label_names(family, tmp_path):
    base, experts = family
    out = merged(base, experts, tmp_path)
    cfg = config(out)
    names = ["sentiment/negative", "sentiment/positive", "topic/news", "topic/sport", "topic/film"]
    assert cfg["id2label"] == {str(i): name for i, name in enumerate(names)}
    assert cfg["label2id"] == {name: i for i, name in enumerate(names)}
    assert cfg["problem_type"] == "single_label_classification"
    tasks = cfg["hm3"]["tasks"]
    assert [(t["name"], t["offset"], tuple(t["labels"]), t["multi_label"]) for t in tasks] == [
        ("sentiment", 0, SENTIMENT, False), ("topic", 2, TOPIC, False)]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 5
    assert model.classifier.weight.shape == (5, 32)


def test_layout_follows_the_recipe_order(family, tmp_path):
    base, experts = family
    reordered = {"topic": experts["topic"], "sentiment": experts["sentiment"]}
    cfg = config(merged(base, reordered, tmp_path))
    assert [(t["name"], t["offset"]) for t in cfg["hm3"]["tasks"]] == [("topic", 0),
                                                                        ("sentiment", 3)]
    assert cfg["id2label"]["3"] == "sentiment/negative"


def test_hm3_block_records_how_the_model_was_made(family, tmp_path):
    base, experts = family
    out = merged(base, experts, tmp_path, method="dare_ties", seed=7,
                 parameters={"density": 0.6, "lambda": 0.9})
    block = config(out)["hm3"]
    assert block["version"] == hm3.__version__
    assert block["method"] == "dare_ties"
    assert block["seed"] == 7
    assert block["base"] == str(base)
    assert block["parameters"] == {"normalize": False, "lambda": 0.9, "rescale": True,
                                   "consensus": "sum"}
    assert block["sources"] == [{"task": "sentiment", "model": str(experts["sentiment"])},
                                {"task": "topic", "model": str(experts["topic"])}]
    assert [e["density"] for e in block["recipe"]["experts"]] == [0.6, 0.6]
    norms = block["task_vector_norms"]
    assert set(norms) == {"sentiment", "topic"}
    assert all(0 < v < 0.5 for v in norms.values())  # small fine-tune noise


def test_tokenizer_is_copied(family, tmp_path):
    base, experts = family
    out = merged(base, experts, tmp_path)
    assert (out / "vocab.txt").read_text() == (base / "vocab.txt").read_text()
    assert AutoTokenizer.from_pretrained(out)("good film")["input_ids"] == [2, 5, 21, 3]


# --- properties of the merge -----------------------------------------------------------------

# iso_c flattens even one expert's spectrum (by design): not an identity on one expert
@pytest.mark.numeric
@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items() if not m.spectral))
def test_single_expert_at_density_one_comes_back_unchanged(family, tmp_path, method):
    base, experts = family
    one = {"topic": experts["topic"]}
    out = merged(base, one, tmp_path, method=method)
    got, want = tensors(out), tensors(experts["topic"])
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(raw_logits(out), raw_logits(experts["topic"]), rtol=0,
                               atol=raw_logits_tolerance(experts["topic"]))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della",
                                    "task_arithmetic", "iso_c"])
def test_disjoint_head_blocks_pass_untouched(family, tmp_path, method):
    base, experts = family
    head = tensors(merged(base, experts, tmp_path, method=method))
    sentiment, topic = tensors(experts["sentiment"]), tensors(experts["topic"])
    for part in ("classifier.weight", "classifier.bias"):
        assert torch.equal(head[part][:2], sentiment[part])
        assert torch.equal(head[part][2:], topic[part])


def test_linear_scales_each_head_block_by_its_weight_share(family, tmp_path):
    base, experts = family
    recipe = recipe_dict(base, experts, "linear", heads="merge")
    recipe["experts"][1]["weight"] = 3.0
    out = tmp_path / "out"
    merge(parse_recipe(recipe), out, progress=False)
    head = tensors(out)["classifier.weight"]
    torch.testing.assert_close(head[:2], tensors(experts["sentiment"])["classifier.weight"] / 4)
    torch.testing.assert_close(head[2:], tensors(experts["topic"])["classifier.weight"] * 3 / 4)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("normalize", [True, False])
def test_unsparsified_bodies_match_their_formulas_and_norms_are_recorded(family, tmp_path, method,
                                                                         normalize):
    base, experts = family
    parameters = {"normalize": normalize, **({"lambda": 0.7} if method != "linear" else {})}
    recipe = recipe_dict(base, experts, method, parameters=parameters)
    recipe["experts"][1]["weight"] = 3.0
    out = tmp_path / "out"
    merge(parse_recipe(recipe), out, progress=False)
    got = tensors(out)
    sentiment, topic = tensors(experts["sentiment"]), tensors(experts["topic"])
    divisor = 4.0 if normalize else 1.0
    checked = 0
    for name, theta0 in tensors(base).items():
        name = f"bert.{name}"
        if name not in got or not got[name].is_floating_point():
            continue
        if method == "linear":  # the weighted mean of the models
            expected = (sentiment[name] + 3 * topic[name]) / divisor
        else:  # base + lambda * the weighted task vectors
            tau = (sentiment[name] - theta0) + 3 * (topic[name] - theta0)
            expected = theta0 + 0.7 * tau / divisor
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked > 20
    # The task vectors' sizes come out as with methods that build them.
    norms = config(out)["hm3"]["task_vector_norms"]
    ties = tmp_path / "ties"
    merge(parse_recipe(recipe_dict(base, experts, "ties")), ties, progress=False)
    assert norms == pytest.approx(config(ties)["hm3"]["task_vector_norms"], rel=1e-5)


def test_head_is_trimmed_on_its_own_rows_before_expansion(family, tmp_path):
    base, experts = family
    head = tensors(merged(base, experts, tmp_path, parameters={"density": 0.25}, heads="merge"))
    for task, rows in (("sentiment", slice(0, 2)), ("topic", slice(2, 5))):
        own = tensors(experts[task])["classifier.weight"]
        block = head["classifier.weight"][rows]
        k = int(0.25 * own.numel())
        assert int((block != 0).sum()) == k
        top = torch.zeros(own.numel(), dtype=torch.bool)
        top[own.abs().flatten().topk(k).indices] = True
        assert torch.equal(block.flatten() != 0, top)
        assert torch.equal(block.flatten()[top], own.flatten()[top])


def test_two_expert_ties_body_is_the_hand_computed_disjoint_mean(family, tmp_path):
    base, experts = family
    out = merged(base, experts, tmp_path)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    theta0 = tensors(base)["encoder.layer.0.attention.self.query.weight"]
    t1 = tensors(experts["sentiment"])[name] - theta0
    t2 = tensors(experts["topic"])[name] - theta0
    agree = torch.sign(t1) == torch.sign(t2)
    # agreeing entries: their mean; disagreeing ones: the larger magnitude alone
    larger = torch.where(t1.abs() >= t2.abs(), t1, t2)
    expected = theta0 + torch.where(agree, (t1 + t2) / 2, larger)
    torch.testing.assert_close(tensors(out)[name], expected, rtol=0, atol=1e-6)


def test_dare_is_bit_identical_for_a_seed_and_differs_for_another(family, tmp_path):
    base, experts = family
    extra = dict(parameters={"density": 0.5})
    first = merged(base, experts, tmp_path, "a", method="dare_ties", seed=3, **extra)
    again = merged(base, experts, tmp_path, "b", method="dare_ties", seed=3, **extra)
    other = merged(base, experts, tmp_path, "c", method="dare_ties", seed=4, **extra)
    dense = merged(base, experts, tmp_path, "d", method="dare_ties", seed=3)
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    a, c, d = tensors(first), tensors(other), tensors(dense)
    name = "bert.encoder.layer.1.output.dense.weight"
    assert not torch.equal(a[name], c[name])
    assert not torch.equal(a[name], d[name])


def test_dare_draws_an_independent_mask_for_every_tensor(family, tmp_path):
    base, experts = family
    out = merged(base, {"topic": experts["topic"]}, tmp_path, method="dare_linear",
                 parameters={"density": 0.5})
    got, expert = tensors(out), tensors(experts["topic"])
    theta0 = tensors(base)
    kept = {}
    for part in ("query", "key", "value"):
        name = f"bert.encoder.layer.0.attention.self.{part}.weight"
        delta = expert[name] - theta0[name.removeprefix("bert.")]
        mixed = got[name] - theta0[name.removeprefix("bert.")]
        kept[part] = mixed.abs() > 1e-6
        assert abs(kept[part].float().mean().item() - 0.5) < 0.05
        torch.testing.assert_close(mixed[kept[part]], 2 * delta[kept[part]], rtol=1e-4, atol=1e-5)
    assert not torch.equal(kept["query"], kept["key"])
    assert not torch.equal(kept["key"], kept["value"])


def test_override_changes_only_the_matching_tensors(family, tmp_path):
    base, experts = family
    pattern = "*.attention.self.query.*"
    plain = tensors(merged(base, experts, tmp_path, "plain"))
    changed = tensors(merged(base, experts, tmp_path, "override",
                             overrides=[{"pattern": pattern, "density": 0.2}]))
    matching = {n for n in plain if ".attention.self.query." in n}
    assert len(matching) == 4  # weight and bias in two layers
    for name in plain:
        if name in matching:
            assert not torch.equal(plain[name], changed[name]), name
        else:
            assert torch.equal(plain[name], changed[name]), name


def test_override_restricted_to_one_expert(family, tmp_path):
    base, experts = family
    head = tensors(merged(base, experts, tmp_path, heads="merge", overrides=[
        {"pattern": "classifier.*", "density": 0.5, "experts": ["topic"]}]))
    sentiment = tensors(experts["sentiment"])["classifier.weight"]
    assert torch.equal(head["classifier.weight"][:2], sentiment)
    assert int((head["classifier.weight"][2:] != 0).sum()) == int(0.5 * 3 * 32)


def test_expert_weight_zero_removes_its_body_contribution(family, tmp_path):
    base, experts = family
    recipe = recipe_dict(base, experts, "task_arithmetic", heads="merge")
    recipe["experts"][1]["weight"] = 0.0
    out = tmp_path / "out"
    merge(parse_recipe(recipe), out, progress=False)
    got, sentiment = tensors(out), tensors(experts["sentiment"])
    name = "bert.encoder.layer.0.output.dense.weight"
    torch.testing.assert_close(got[name], sentiment[name], rtol=0, atol=1e-6)
    assert torch.count_nonzero(got["classifier.weight"][2:]) == 0


# --- output files ----------------------------------------------------------------------------

def test_sharded_output_loads_and_equals_the_unsharded_merge(family, tmp_path):
    base, experts = family
    whole = merged(base, experts, tmp_path, "whole")
    shards = merged(base, experts, tmp_path, "shards", max_shard_size=20_000)
    files = sorted(shards.glob("*.safetensors"))
    assert len(files) > 1 and not (shards / "model.safetensors").exists()
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    sharded, single = tensors(shards), tensors(whole)
    assert set(index["weight_map"]) == set(sharded) == set(single)
    for name in single:
        assert torch.equal(sharded[name], single[name]), name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in single.values())
    for file in files:  # a shard is over the limit only when it holds one big tensor
        with safe_open(str(file), framework="pt") as handle:
            names = list(handle.keys())
        size = sum(sharded[n].numel() * sharded[n].element_size() for n in names)
        assert size <= 20_000 or len(names) == 1
    assert torch.equal(raw_logits(shards), raw_logits(whole))


def test_sharded_expert_input_merges_like_a_single_file(family, tmp_path):
    base, experts = family
    whole = tensors(merged(base, experts, tmp_path, "whole"))
    model = AutoModelForSequenceClassification.from_pretrained(experts["topic"])
    resharded = tmp_path / "topic-sharded"
    model.save_pretrained(resharded, max_shard_size="20KB")
    assert (resharded / "model.safetensors.index.json").is_file()
    again = tensors(merged(base, {**experts, "topic": resharded}, tmp_path, "again"))
    for name in whole:
        assert torch.equal(whole[name], again[name]), name


def test_float16_output(family, tmp_path):
    base, experts = family
    full = merged(base, experts, tmp_path, "full")
    half = merged(base, experts, tmp_path, "half", dtype="float16")
    assert config(half)["dtype"] == "float16"
    with safe_open(str(half / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(n).get_dtype() for n in handle.keys()}
    assert dtypes == {"F16"}
    a, b = tensors(full), tensors(half)
    for name in a:
        assert torch.equal(a[name].half(), b[name]), name
    model = AutoModelForSequenceClassification.from_pretrained(half, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS, attention_mask=ATTENTION).logits
    torch.testing.assert_close(logits, raw_logits(full), rtol=0, atol=5e-3)


def test_overwrite_replaces_an_existing_output(family, tmp_path):
    base, experts = family
    out = merged(base, {"topic": experts["topic"]}, tmp_path)
    recipe = parse_recipe(recipe_dict(base, experts))
    merge(recipe, out, overwrite=True, progress=False)
    assert config(out)["hm3"]["tasks"][0]["name"] == "sentiment"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "sentiment", "topic",
                                                                 "out"])


# --- prediction ------------------------------------------------------------------------------

@pytest.mark.numeric
def test_plain_transformers_gives_the_same_logits_as_hm3(family, tmp_path):
    base, experts = family
    out = merged(base, experts, tmp_path)
    model = hm3.load(out, device="cpu")
    ours = model.logits(TEXTS, batch_size=4)
    tokenizer = AutoTokenizer.from_pretrained(out)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = np.stack([plain(**tokenizer(t, return_tensors="pt")).logits[0].numpy()
                           for t in TEXTS])
    assert ours.shape == (len(TEXTS), 5)
    # batches of 4 padded to their longest text against one text at a time: other sums
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=classifier_tolerance(model, TEXTS))


@pytest.mark.numeric
def test_merged_model_answers_each_task_like_its_expert(family, tmp_path):
    """With one expert's body (the other has weight 0), that expert's group gives its logits."""
    base, experts = family
    recipe = recipe_dict(base, experts, "task_arithmetic")
    recipe["experts"][0]["weight"] = 0.0
    out = tmp_path / "out"
    merge(parse_recipe(recipe), out, progress=False)
    topic = hm3.load(experts["topic"], device="cpu")
    merged_model = hm3.load(out, device="cpu")
    np.testing.assert_allclose(merged_model.logits(TEXTS)[:, 2:], topic.logits(TEXTS),
                               rtol=0, atol=classifier_tolerance(topic, TEXTS))


def test_predict_output_structure_and_probabilities(family, tmp_path):
    base, experts = family
    model = hm3.load(merged(base, experts, tmp_path), device="cpu")
    assert model.tasks == ["sentiment", "topic"]
    results = model.predict(TEXTS, batch_size=4, return_logits=True)
    logits = model.logits(TEXTS)
    assert len(results) == len(TEXTS)
    for row, result in enumerate(results):
        assert set(result) == {"sentiment", "topic", "logits"}
        np.testing.assert_allclose(result["logits"], logits[row], rtol=0, atol=1e-6)
        for task, labels, span in (("sentiment", SENTIMENT, slice(0, 2)),
                                   ("topic", TOPIC, slice(2, 5))):
            answer = result[task]
            assert set(answer) == {"label", "score", "probabilities"}
            assert tuple(answer["probabilities"]) == labels
            expected = torch.softmax(torch.tensor(logits[row, span], dtype=torch.float64), 0)
            np.testing.assert_allclose(list(answer["probabilities"].values()), expected.numpy(),
                                       atol=1e-6)
            assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)
            assert answer["label"] == labels[int(expected.argmax())]
            assert answer["score"] == pytest.approx(float(expected.max()), abs=1e-6)
    for task, probs in model.predict_proba(TEXTS).items():
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_group_probabilities_by_hand():
    groups = [TaskGroup("a", ("x", "y"), 0), TaskGroup("b", ("p", "q", "r"), 2),
              TaskGroup("c", ("s", "t"), 5, multi_label=True)]
    logits = np.array([[0.0, math.log(3), 7.0, 7.0, 7.0, 0.0, math.log(4)],
                       [1000.0, 0.0, -1.0, 0.0, 1.0, -2.0, 2.0]], dtype=np.float32)
    out = group_probabilities(logits, groups)
    np.testing.assert_allclose(out["a"], [[0.25, 0.75], [1.0, 0.0]], atol=1e-6)
    e = math.e
    np.testing.assert_allclose(out["b"], [[1 / 3] * 3, [1 / (1 + e + e * e), e / (1 + e + e * e),
                                                        e * e / (1 + e + e * e)]], atol=1e-6)
    np.testing.assert_allclose(out["c"], [[0.5, 0.8], [1 / (1 + e * e), 1 / (1 + e ** -2)]],
                               atol=1e-6)


def test_multi_label_expert_keeps_independent_sigmoids(tmp_path):
    labels = ["toxic", "insult", "threat", "obscene"]
    base, experts = build_family(tmp_path, {"toxicity": labels, "topic": list(TOPIC)},
                                 multi_label=("toxicity",))
    out = merged(base, experts, tmp_path)
    cfg = config(out)
    assert "problem_type" not in cfg  # mixed kinds: no single loss fits
    assert [t["multi_label"] for t in cfg["hm3"]["tasks"]] == [True, False]
    model = hm3.load(out, device="cpu")
    logits = model.logits(TEXTS)
    results = model.predict(TEXTS)
    on = set()
    for row, result in enumerate(results):
        toxicity = result["toxicity"]
        assert set(toxicity) == {"label", "probabilities"}
        p = 1 / (1 + np.exp(-logits[row, :4].astype(np.float64)))
        np.testing.assert_allclose(list(toxicity["probabilities"].values()), p, atol=1e-6)
        assert toxicity["label"] == [lab for lab, v in zip(labels, p) if v > 0.5]
        on.update(v > 0.5 for v in p)
        assert sum(result["topic"]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert on == {True, False}  # both sides of the threshold occur, so the check means something


def test_all_multi_label_experts_make_a_multi_label_model(tmp_path):
    base, experts = build_family(tmp_path, {"a": ["x", "y"], "b": ["p", "q", "r"]},
                                 multi_label=("a", "b"))
    out = merged(base, experts, tmp_path)
    assert config(out)["problem_type"] == "multi_label_classification"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.problem_type == "multi_label_classification"


def test_a_plain_classifier_loads_as_one_task(family):
    _, experts = family
    model = hm3.load(experts["topic"], device="cpu")
    assert model.tasks == ["topic"]
    assert set(model.predict(["good film"])[0]) == {"topic"}


def test_merge_into_memory_equals_the_written_merge(family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from hm3.engine import build_model, merge_into, open_sources, with_recipe

    base, experts = family
    recipe = parse_recipe(recipe_dict(base, experts, "dare_ties", parameters={"density": 0.4},
                                      seed=5))
    merge(recipe, tmp_path / "disk", progress=False)
    written = AutoModelForSequenceClassification.from_pretrained(tmp_path / "disk").state_dict()

    sources = open_sources(parse_recipe(recipe_dict(base, experts, "ties")))
    for ckpt in (sources.base, *sources.experts):
        ckpt.preload()
    model = build_model(sources)
    merge_into(model, with_recipe(sources, recipe))
    in_memory = model.state_dict()
    assert model.config.id2label[2] == "topic/news"
    for name, tensor in written.items():
        assert torch.equal(in_memory[name], tensor), name


def test_with_recipe_refuses_other_experts(family):
    from hm3.engine import open_sources, with_recipe

    base, experts = family
    sources = open_sources(parse_recipe(recipe_dict(base, experts)))
    swapped = dict(reversed(list(experts.items())))
    with pytest.raises(Hm3Error, match="same base and experts"):
        with_recipe(sources, parse_recipe(recipe_dict(base, swapped)))


@pytest.mark.parametrize("method", ["ties", "linear"])  # built task vectors / the running sum
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_task_vector_norms_are_computed_by_hand_over_the_body(tmp_path, model_type, method):
    """|tau_i| / |theta_0| over the tensors the base has (RoBERTa's classifier.dense, which the
    base lacks, is not part of it)."""
    base, experts = build_family(tmp_path / "models", {"sentiment": list(SENTIMENT),
                                                       "topic": list(TOPIC)},
                                 model_type=model_type, tokenizer=False)
    out = merged(base, experts, tmp_path, method=method)
    theta0 = {f"{model_type}.{name}": t for name, t in tensors(base).items()
              if t.is_floating_point()}
    # what the classifiers hold of the base (a RoBERTa classifier has no pooler)
    theta0 = {name: t for name, t in theta0.items() if name in tensors(experts["topic"])}
    assert "classifier.dense.weight" not in theta0
    for task, folder in experts.items():
        theta = tensors(folder)
        tau_sq = sum(float((theta[name] - t).pow(2).sum()) for name, t in theta0.items())
        base_sq = sum(float(t.pow(2).sum()) for t in theta0.values())
        assert config(out)["hm3"]["task_vector_norms"][task] == pytest.approx(
            math.sqrt(tau_sq / base_sq), rel=1e-4), task


def test_normalised_weights_under_one_still_divide_by_their_sum(family, tmp_path):
    """linear with weights 0.3 + 0.3: the weighted mean is (0.3 a + 0.3 b) / 0.6, the plain mean."""
    base, experts = family
    recipe = recipe_dict(base, experts, "linear")
    for spec in recipe["experts"]:
        spec["weight"] = 0.3
    out = tmp_path / "out"
    merge(parse_recipe(recipe), out, progress=False)
    got = tensors(out)
    sentiment, topic = tensors(experts["sentiment"]), tensors(experts["topic"])
    name = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(got[name], (sentiment[name] + topic[name]) / 2)


def test_bfloat16_experts_are_merged_not_copied(family, tmp_path):
    """A bf16 checkpoint's tensors (dtype code BF16) are floating: merged, not taken from the
    first expert as integer tensors are."""
    from safetensors.torch import save_file

    base, experts = family
    for folder in (base, *experts.values()):
        stored = tensors(folder)
        stored = {k: v.bfloat16() if v.is_floating_point() else v for k, v in stored.items()}
        prefix = "" if folder == base else "bert."
        stored[f"{prefix}embeddings.position_ids"] = torch.arange(16).unsqueeze(0)  # as older
        save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})  # BERTs keep
    out = merged(base, experts, tmp_path, method="linear")
    got = tensors(out)
    sentiment, topic = tensors(experts["sentiment"]), tensors(experts["topic"])
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(sentiment[name], topic[name])
    torch.testing.assert_close(got[name].float(),
                               (sentiment[name].float() + topic[name].float()) / 2,
                               rtol=1e-2, atol=1e-2)
    # an integer tensor is copied from the first expert, dtype and values unchanged
    assert got["bert.embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(got["bert.embeddings.position_ids"], torch.arange(16).unsqueeze(0))


def test_dare_draws_each_experts_mask_from_its_own_stream(family, tmp_path):
    """Two copies of one expert, dare_linear at density 0.5 (not normalised by default): the
    merged change is (m1 + m2) * delta / 0.5 with m_i each copy's keep-mask, so about half the
    entries must show exactly one copy's 2 delta (m1 != m2); one shared stream would give only
    0 or 4 delta."""
    import shutil

    base, experts = family
    twin = tmp_path / "twin"
    shutil.copytree(experts["topic"], twin)
    out = merged(base, {"topic": experts["topic"], "again": twin}, tmp_path, method="dare_linear",
                 parameters={"density": 0.5}, seed=1)
    name = "encoder.layer.0.intermediate.dense.weight"
    delta = tensors(experts["topic"])[f"bert.{name}"] - tensors(base)[name]
    ratio = (tensors(out)[f"bert.{name}"] - tensors(base)[name]) / delta
    ratio = ratio[delta.abs() > 1e-4]
    once = ((ratio - 2).abs() < 1e-3).float().mean()
    assert 0.3 < float(once) < 0.7  # about half the entries kept by exactly one copy


def test_dare_on_merged_heads_is_reproducible_for_a_seed(family, tmp_path):
    """`heads: merge` sparsifies the head rows too: from the seed's stream, like the body."""
    base, experts = family
    extra = dict(parameters={"density": 0.5}, heads="merge", seed=3)
    first = merged(base, experts, tmp_path, "a", method="dare_ties", **extra)
    again = merged(base, experts, tmp_path, "b", method="dare_ties", **extra)
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method, parameters", [
    ("ties", {"density": 0.2}), ("task_arithmetic", {"lambda": 0.3}), ("dare_ties", {}),
    ("linear", {})])
def test_a_head_layer_the_base_lacks_is_merged_around_the_experts_mean(tmp_path, method,
                                                                       parameters):
    """RoBERTa's classifier.dense is not in the base. Experts fine-tuned by one script start it
    from one init; their merge must stay near each of them. Task vectors taken from zeros (the
    whole weights) would trim it to a fifth of its entries (TIES 0.2) or scale it (task
    arithmetic: 0.3 x the sum)."""
    base, experts = build_family(tmp_path / "models", {"sentiment": list(SENTIMENT),
                                                       "topic": list(TOPIC)},
                                 model_type="roberta", tokenizer=False)
    shared = tensors(experts["sentiment"])
    generator = torch.Generator().manual_seed(7)
    for i, folder in enumerate(experts.values()):
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        with torch.no_grad():
            for key in ("weight", "bias"):
                start = shared[f"classifier.dense.{key}"]
                change = 0.01 * start.abs().mean() * torch.randn(start.shape, generator=generator)
                getattr(model.classifier.dense, key).copy_(start + change * (i > 0))
        model.save_pretrained(folder)
    out = merged(base, experts, tmp_path, method=method, parameters=parameters)
    got = tensors(out)["classifier.dense.weight"]
    layers = [tensors(folder)["classifier.dense.weight"] for folder in experts.values()]
    mean = sum(layers) / len(layers)
    spread = max(float((layer - mean).norm()) for layer in layers)
    # within the experts' own spread around their mean (a fifth of the entries kept would be
    # about 60% of the layer's norm away)
    assert float((got - mean).norm()) <= spread * (1 + 1e-4)
    for layer in layers:
        assert float((got - layer).norm()) < 0.05 * float(layer.norm())


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_task_vector_norms_stay_exact_over_a_tensor_of_millions_of_entries(tmp_path, method):
    """A float32 norm of 8M entries summed in one pass is 5e-4 off; the recorded norms are
    within their 6 printed decimals of the float64 sum."""
    from safetensors.torch import load_file, save_file

    base, experts = build_family(tmp_path / "models", {"sentiment": list(SENTIMENT)},
                                 tokenizer=False)
    generator = torch.Generator().manual_seed(0)
    big = torch.randn((1 << 18, 32), generator=generator)
    for folder, prefix, noise in ((base, "", 0.0), (experts["sentiment"], "bert.", 0.05)):
        stored = load_file(folder / "model.safetensors")
        stored[f"{prefix}embeddings.word_embeddings.weight"] = big + noise * torch.randn(
            big.shape, generator=generator)
        save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    out = merged(base, experts, tmp_path, method=method)
    theta0 = {f"bert.{name}": t.double() for name, t in tensors(base).items()
              if t.is_floating_point()}
    theta = tensors(experts["sentiment"])
    tau_sq = sum(float((theta[name].double() - t).pow(2).sum()) for name, t in theta0.items()
                 if name in theta)
    base_sq = sum(float(t.pow(2).sum()) for name, t in theta0.items() if name in theta)
    assert config(out)["hm3"]["task_vector_norms"]["sentiment"] == pytest.approx(
        math.sqrt(tau_sq / base_sq), abs=1e-6)

"""Each architecture, built tiny: the head found, plain loading, single-expert identity."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from hm3 import merge, parse_recipe
from hm3.engine import is_embedding, open_sources

from conftest import TINY, build_family, logits_tolerance, recipe_dict

HEADS = {
    "bert": ("classifier.weight", "classifier.bias"),
    "roberta": ("classifier.out_proj.weight", "classifier.out_proj.bias"),
    "xlm-roberta": ("classifier.out_proj.weight", "classifier.out_proj.bias"),
    "distilbert": ("classifier.weight", "classifier.bias"),
    "deberta-v2": ("classifier.weight", "classifier.bias"),
    "electra": ("classifier.out_proj.weight", "classifier.out_proj.bias"),
    "mpnet": ("classifier.out_proj.weight", "classifier.out_proj.bias"),
    "modernbert": ("classifier.weight", "classifier.bias"),
    "llama": ("score.weight", None),
    "qwen2": ("score.weight", None),
    "mistral": ("score.weight", None),
    "gpt2": ("score.weight", None),
}
# No id is 0 (the pad id of every tiny config), so decoders pool the last token of each row.
INPUT_IDS = torch.tensor([[5, 9, 12, 7, 3], [6, 8, 10, 11, 14]])
TASKS = {"sentiment": ["negative", "positive"], "topic": ["news", "sport", "film"]}


def test_every_tiny_architecture_is_covered():
    assert set(HEADS) == set(TINY)


def logits(folder):
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model, model(input_ids=INPUT_IDS).logits


@pytest.mark.numeric
@pytest.mark.parametrize("model_type", sorted(TINY))
def test_architecture_merges(tmp_path, model_type):
    base, experts = build_family(tmp_path, TASKS, model_type=model_type, tokenizer=False)

    sources = open_sources(parse_recipe(recipe_dict(base, experts)))
    weight, bias = HEADS[model_type]
    assert (sources.heads[0].weight, sources.heads[0].bias) == (weight, bias)
    head_jobs = {job.name: job.head_role for job in sources.jobs if job.head_role}
    assert head_jobs == {weight: "weight", **({bias: "bias"} if bias else {})}
    # the body is matched tensor by tensor to the bare base (`bert.x` to `x`), all of it but
    # the pooler RoBERTa's classifier does not use
    unmatched = set(sources.base.keys()) - {job.base_name for job in sources.jobs}
    assert unmatched <= {"pooler.dense.weight", "pooler.dense.bias"}

    both = tmp_path / "both"
    merge(parse_recipe(recipe_dict(base, experts)), both, progress=False)
    model, merged_logits = logits(both)
    assert model.config.num_labels == 5
    assert model.config.id2label[2] == "topic/news"
    assert merged_logits.shape == (2, 5)
    assert torch.isfinite(merged_logits).all()

    alone = tmp_path / "alone"
    merge(parse_recipe(recipe_dict(base, {"topic": experts["topic"]})), alone, progress=False)
    _, single = logits(alone)
    expert_model, expert = logits(experts["topic"])
    # base + (expert - base) rounds each weight: float32 error, not a different model
    torch.testing.assert_close(single, expert, rtol=0,
                               atol=logits_tolerance(expert_model, input_ids=INPUT_IDS))

    # the two experts' heads sit untouched in their blocks of the merged head
    merged_head = tensor(both, weight)
    assert torch.equal(merged_head[:2], tensor(experts["sentiment"], weight))
    assert torch.equal(merged_head[2:], tensor(experts["topic"], weight))


def tensor(folder, name):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return handle.get_tensor(name)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_tsv_merges_every_architecture_with_embedding_tables_averaged(tmp_path, model_type):
    """TSV-Merge (the preset's body) cuts weight matrices to their top directions; an embedding
    table (GPT-2's `wte` too) takes the mean of the task vectors, and the heads stay whole."""
    base, experts = build_family(tmp_path, TASKS, model_type=model_type, tokenizer=False)
    out = tmp_path / "tsv"
    merge(parse_recipe(recipe_dict(base, experts, "tsv")), out, progress=False)
    _, merged_logits = logits(out)
    assert merged_logits.shape == (2, 5) and torch.isfinite(merged_logits).all()
    sources = open_sources(parse_recipe(recipe_dict(base, experts, "tsv")))
    tables = [job.name for job in sources.jobs if is_embedding(job.name) and len(job.shape) == 2]
    assert tables
    for name in tables:
        mean = (tensor(experts["sentiment"], name) + tensor(experts["topic"], name)) / 2
        torch.testing.assert_close(tensor(out, name), mean)
    matrix = next(job.name for job in sources.jobs
                  if len(job.shape) == 2 and not is_embedding(job.name) and job.head_role is None
                  and job.base_name is not None)
    mean = (tensor(experts["sentiment"], matrix) + tensor(experts["topic"], matrix)) / 2
    assert not torch.allclose(tensor(out, matrix), mean)  # a matrix is not averaged
    weight, _ = HEADS[model_type]
    assert torch.equal(tensor(out, weight)[:2], tensor(experts["sentiment"], weight))

"""The multi-task classifier's own logic on a stand-in network whose logits are known by hand:
batching and order, labels and scores per task, thresholds, truncation, the task layout read
from a config."""

from __future__ import annotations

import math
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import hm3
from hm3.errors import Hm3Error
from hm3.heads import TaskGroup
from hm3.model import MultiTaskClassifier, _max_length, task_groups

from conftest import build_family, write_tokenizer

SPAM = TaskGroup("spam", ("ham", "spam"), 0)
TAGS = TaskGroup("tags", ("rude", "calm"), 2, multi_label=True)


class CountingNetwork(torch.nn.Module):
    """Logits from the token count n of each text (padding left out): [n, 4, n - 5, 0]. So a text
    of 3 tokens is spam and not rude; 5 tokens: ham, rude exactly at sigmoid 0.5; 8: ham, rude."""

    config = SimpleNamespace(max_position_embeddings=64)
    device = torch.device("cpu")

    def forward(self, input_ids, attention_mask, **_):
        n = attention_mask.sum(1).float()
        logits = torch.stack([n, torch.full_like(n, 4.0), n - 5, torch.zeros_like(n)], dim=1)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)  # WordPiece over the test words: one token per word, [CLS] and [SEP]
    return AutoTokenizer.from_pretrained(folder)


# Token counts with [CLS] and [SEP]: 8, 3, 5, 4.
TEXTS = ["good bad awful win money hello", "good", "good bad awful", "free win"]


def classifier(tokenizer, groups=(SPAM, TAGS), max_length=None):
    return MultiTaskClassifier(CountingNetwork(), tokenizer, list(groups), max_length)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32])
def test_logits_come_back_in_input_order_at_any_batch_size(tokenizer, batch_size):
    logits = classifier(tokenizer).logits(TEXTS, batch_size=batch_size)
    assert logits.dtype == np.float32
    assert logits.tolist() == [[8, 4, 3, 0], [3, 4, -2, 0], [5, 4, 0, 0], [4, 4, -1, 0]]


def test_logits_refuse_a_batch_size_below_one(tokenizer):
    with pytest.raises(Hm3Error, match=r"^batch_size must be at least 1, got 0$"):
        classifier(tokenizer).logits(TEXTS, batch_size=0)


def test_predict_gives_each_tasks_label_score_and_probabilities(tokenizer):
    results = classifier(tokenizer).predict(TEXTS, batch_size=2, return_logits=True)
    e = math.e
    # spam: softmax of [n, 4]; tags: sigmoid of [n - 5, 0], on when strictly over 0.5.
    assert results[0]["spam"] == {"label": "ham", "score": round(1 / (1 + e ** -4), 6),
                                  "probabilities": {"ham": round(1 / (1 + e ** -4), 6),
                                                    "spam": round(1 / (1 + e ** 4), 6)}}
    assert results[1]["spam"]["label"] == "spam"
    assert results[1]["spam"]["score"] == round(1 / (1 + e ** -1), 6)
    assert results[0]["tags"] == {"label": ["rude"],
                                  "probabilities": {"rude": round(1 / (1 + e ** -3), 6),
                                                    "calm": 0.5}}
    assert results[2]["tags"]["label"] == []  # 0.5 is not over the threshold 0.5
    assert results[3]["tags"]["probabilities"]["rude"] == round(1 / (1 + e), 6)
    assert results[3]["logits"] == [4.0, 4.0, -1.0, 0.0]
    assert "logits" not in classifier(tokenizer).predict(TEXTS[:1])[0]


def test_one_string_gives_one_result_and_a_list_a_list(tokenizer):
    model = classifier(tokenizer)
    one = model.predict("good bad awful")  # not three results, one per character
    assert one == model.predict(["good bad awful"])[0]
    assert set(one) == {"spam", "tags"} and one["tags"]["label"] == []
    assert model.predict(("good", "free win")) == model.predict(["good", "free win"])
    assert model.predict([]) == []
    np.testing.assert_array_equal(model.logits("good"), model.logits(["good"]))
    assert model.predict_proba("good")["spam"].shape == (1, 2)


@pytest.mark.parametrize("texts, message", [
    (["good", None], r"^texts\[1\]: expected a string, got None; "),
    (["good", "win", 3], r"^texts\[2\]: expected a string, got int 3; "),
    ([b"good"], r"^texts\[0\]: expected a string, got bytes b'good'; decode it first"),
    (b"good", r"^texts: expected a string or a list of strings, got bytes; decode it first"),
    (None, r"^texts: expected a string or a list of strings, got None$"),
    (7, r"^texts: expected a string or a list of strings, got int$"),
])
def test_texts_that_are_not_strings_are_refused_by_index(tokenizer, texts, message):
    model = classifier(tokenizer)
    for call in (model.predict, model.predict_proba, model.logits):
        with pytest.raises(Hm3Error, match=message):
            call(texts)


def test_predict_answers_only_the_tasks_asked_in_the_order_asked(tokenizer):
    model = classifier(tokenizer)
    full = model.predict(TEXTS)
    assert model.predict(TEXTS, tasks=["tags"]) == [{"tags": r["tags"]} for r in full]
    both = model.predict(TEXTS[0], tasks=["tags", "spam"])
    assert list(both) == ["tags", "spam"] and both == full[0]
    assert model.predict(TEXTS[0], tasks="spam") == {"spam": full[0]["spam"]}  # one name
    assert "logits" in model.predict(TEXTS[0], tasks=["spam"], return_logits=True)


@pytest.mark.parametrize("tasks, message", [
    (["spam", "topic", "mood"], r"^tasks: unknown task\(s\) 'topic', 'mood'; this model's tasks "
                                r"are spam, tags$"),
    ([], r"^tasks: expected at least one task name; this model's tasks are spam, tags$"),
    ([3], r"^tasks: expected task names \(strings\), got 3; this model's tasks are spam, tags$"),
])
def test_unknown_tasks_are_refused_with_the_known_ones(tokenizer, tasks, message):
    with pytest.raises(Hm3Error, match=message):
        classifier(tokenizer).predict(TEXTS, tasks=tasks)


def test_a_multi_label_task_uses_its_own_threshold(tokenizer):
    low = TaskGroup("tags", ("rude", "calm"), 2, multi_label=True, threshold=0.3)
    results = classifier(tokenizer, (SPAM, low)).predict(TEXTS)
    # sigmoid(-1) = 0.27 < 0.3 < sigmoid(0) = 0.5: calm is on everywhere, rude from 5 tokens on.
    assert [r["tags"]["label"] for r in results] == [["rude", "calm"], ["calm"], ["rude", "calm"],
                                                     ["calm"]]


def test_predict_proba_is_a_softmax_or_sigmoids_per_group(tokenizer):
    probs = classifier(tokenizer).predict_proba(TEXTS, batch_size=3)
    np.testing.assert_allclose(probs["spam"][1], [1 / (1 + math.e), 1 / (1 + math.e ** -1)])
    np.testing.assert_allclose(probs["tags"][1], [1 / (1 + math.e ** 2), 0.5])


def test_tasks_and_groups_by_name(tokenizer):
    model = classifier(tokenizer)
    assert model.tasks == ["spam", "tags"]
    assert model.group("tags") is TAGS
    with pytest.raises(Hm3Error, match=r"^this model has no task 'topic'; its tasks are spam, "
                                       r"tags$"):
        model.group("topic")


def test_texts_longer_than_max_length_are_counted_and_cut(tokenizer):
    model = classifier(tokenizer, max_length=4)
    assert model.max_length == 4
    assert model.count_truncated(TEXTS) == 2  # 8 and 5 tokens; 4 fits exactly
    assert model.encode(TEXTS)["input_ids"].shape == (4, 4)
    assert model.logits(TEXTS)[:, 0].tolist() == [4, 3, 4, 4]


def test_max_length_comes_from_the_tokenizer_else_the_model():
    config = SimpleNamespace(max_position_embeddings=66)
    assert _max_length(SimpleNamespace(model_max_length=32), config) == 32
    assert _max_length(SimpleNamespace(model_max_length=99_999), config) == 99_999
    # transformers' "no limit" is a huge number: the position embeddings decide then
    assert _max_length(SimpleNamespace(model_max_length=100_000), config) == 66
    assert _max_length(SimpleNamespace(model_max_length=int(1e30)), config) == 66
    assert _max_length(SimpleNamespace(), SimpleNamespace()) == 512
    assert _max_length(SimpleNamespace(model_max_length=None),
                       SimpleNamespace(max_position_embeddings=None)) == 512


def test_a_classifier_without_max_length_takes_the_tokenizers(tokenizer):
    assert classifier(tokenizer).max_length == 32


def test_task_groups_read_the_hm3_block_or_make_one_task():
    block = {"hm3": {"tasks": [SPAM.to_dict(), TAGS.to_dict()]}, "num_labels": 4}
    assert task_groups(block, "ignored", "m") == [SPAM, TAGS]
    plain = {"id2label": {"0": "neg", "1": "pos"}}
    assert task_groups(plain, "mood", "some/dir") == [TaskGroup("mood", ("neg", "pos"), 0)]
    assert task_groups(plain, None, "some/dir") == [TaskGroup("dir", ("neg", "pos"), 0)]
    assert task_groups(plain, None, "") == [TaskGroup("task", ("neg", "pos"), 0)]
    multi = {"num_labels": 3, "problem_type": "multi_label_classification"}
    assert task_groups(multi, "t", "m") == [
        TaskGroup("t", ("LABEL_0", "LABEL_1", "LABEL_2"), 0, multi_label=True)]


class Calls(CountingNetwork):
    """CountingNetwork that counts its forward passes."""

    calls = 0

    def forward(self, input_ids, attention_mask, **kwargs):
        self.calls += 1
        return super().forward(input_ids, attention_mask, **kwargs)


def test_predict_and_predict_proba_run_at_the_batch_size_asked(tokenizer):
    network = Calls()
    model = MultiTaskClassifier(network, tokenizer, [SPAM, TAGS])
    model.predict(TEXTS, batch_size=1)
    assert network.calls == 4
    model.predict_proba(TEXTS, batch_size=3)
    assert network.calls == 6
    many = [TEXTS[i % 4] for i in range(33)]  # the default batch size is 32
    model.predict(many)
    model.predict_proba(many)
    model.logits(many)
    assert network.calls == 12


def test_a_bad_label_table_names_the_model_it_came_from():
    with pytest.raises(Hm3Error, match=r"^my/model: config.json id2label has non-integer ids$"):
        task_groups({"id2label": {"a": "x"}}, None, "my/model")


# --- hm3.load on a real tiny classifier ---------------------------------------------------------

@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    """One tiny BERT classifier saved as safetensors, the same as pickle only, and as both."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("load")
    _, experts = build_family(root, {"mood": ["sad", "glad"]})
    folder = experts["mood"]
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    pickled, both = root / "pickled", root / "both"
    for target in (pickled, both):
        shutil.copytree(folder, target)
        torch.save(model.state_dict(), target / "pytorch_model.bin")
    for file in pickled.glob("*.safetensors"):
        file.unlink()
    return SimpleNamespace(folder=folder, pickled=pickled, both=both)


def test_load_defaults_to_cuda_when_there_is_one_and_names_the_task(expert):
    model = hm3.load(expert.folder)
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.tasks == ["mood"] and model.max_length == 32
    assert hm3.load(expert.folder, task="feeling", device="cpu").tasks == ["feeling"]


def test_load_takes_max_length_of_two_tokens_or_more(expert):
    assert hm3.load(expert.folder, device="cpu", max_length=2).max_length == 2
    with pytest.raises(Hm3Error, match=r"^max_length must be at least 2 tokens, got 1$"):
        hm3.load(expert.folder, device="cpu", max_length=1)


def test_load_refuses_pickle_only_weights_unless_allowed(expert):
    with pytest.raises(Hm3Error) as error:
        hm3.load(expert.pickled, device="cpu")
    assert str(error.value).startswith(f"{expert.pickled} has only pickle (.bin) weights")
    assert str(error.value).endswith("(allow_pickle=True in Python) if you trust it")
    want = hm3.load(expert.folder, device="cpu").logits(TEXTS)
    allowed = hm3.load(expert.pickled, device="cpu", allow_pickle=True)
    np.testing.assert_allclose(allowed.logits(TEXTS), want, rtol=0, atol=1e-6)
    # safetensors beside the pickle: nothing to refuse
    np.testing.assert_allclose(hm3.load(expert.both, device="cpu").logits(TEXTS), want,
                               rtol=0, atol=1e-6)


def test_load_of_a_hub_id_asks_for_the_revision_and_pickle_only_when_allowed(expert, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(reference, revision=None, allow_patterns=()):
        asked.append((reference, revision, "*.bin" in allow_patterns))
        return str(expert.pickled)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = hm3.load("org/mood", revision="v2", device="cpu", allow_pickle=True)
    assert asked == [("org/mood", "v2", True)] and model.tasks == ["mood"]
    with pytest.raises(Hm3Error, match="only pickle"):
        hm3.load("org/mood", device="cpu")
    assert asked[1] == ("org/mood", None, False)


@pytest.mark.parametrize("enabled", [True, False])
def test_load_leaves_the_progress_bar_setting_as_it_was(expert, enabled):
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    try:
        (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
        hm3.load(expert.folder, device="cpu")
        assert logging.is_progress_bar_enabled() is enabled
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def test_a_folder_that_is_no_classifier_fails_with_what_went_wrong(expert, tmp_path):
    folder = tmp_path / "no-weights"
    shutil.copytree(expert.folder, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(Hm3Error, match=rf"^cannot load {re.escape(str(folder))} as a sequence "
                                       "classifier: "):
        hm3.load(folder, device="cpu")


def test_a_tokenizer_without_padding_pads_with_its_end_token(expert, tmp_path):
    from transformers import BertTokenizerFast

    folder = tmp_path / "no-pad"
    shutil.copytree(expert.folder, folder)
    vocab = AutoTokenizer.from_pretrained(expert.folder).get_vocab()
    BertTokenizerFast(vocab=vocab, pad_token=None, eos_token="[SEP]",
                      model_max_length=32).save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    model = hm3.load(folder, device="cpu")
    assert model.tokenizer.pad_token == "[SEP]"
    assert model.logits(TEXTS).shape == (4, 2)  # texts of different lengths batch together


def test_a_tokenizer_without_a_limit_leaves_max_length_to_the_network():
    unlimited = SimpleNamespace(model_max_length=int(1e30))
    assert MultiTaskClassifier(CountingNetwork(), unlimited, [SPAM]).max_length == 64

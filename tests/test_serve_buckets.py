"""Length-sorted sub-batches (hm3.serve.buckets): the split itself, and the same answers as one
padded batch, in request order."""

from __future__ import annotations

import random

import pytest

from hm3 import load
from hm3.errors import Hm3Error
from hm3.serve.buckets import length_buckets, predict_by_length

from conftest import SERVED_TASKS as TASKS, WORDS


def test_split_minimises_padding_plus_a_cost_per_pass():
    lengths = [5, 100, 6, 98]
    # one pass: 16 + 4 * 100 = 416; short | long: 2 * 16 + 2 * 6 + 2 * 100 = 244 (the least);
    # 5 | 6 | long: 3 * 16 + 5 + 6 + 200 = 259
    assert length_buckets(lengths, overhead_tokens=16) == [[0, 2], [3, 1]]
    assert length_buckets(lengths, overhead_tokens=1000) == [[0, 2, 3, 1]]  # passes cost most
    assert length_buckets(lengths, overhead_tokens=0) == [[0], [2], [3], [1]]  # padding does
    assert length_buckets([7, 7, 7], overhead_tokens=0.5) == [[0, 1, 2]]  # nothing to save
    assert length_buckets([]) == []
    with pytest.raises(Hm3Error, match="overhead_tokens must be 0 or more"):
        length_buckets([1], overhead_tokens=-1)


def test_every_index_once_and_groups_sorted_by_length():
    rng = random.Random(3)
    lengths = [rng.randint(1, 128) for _ in range(32)]
    groups = length_buckets(lengths)
    assert sorted(i for group in groups for i in group) == list(range(32))
    flat = [lengths[i] for group in groups for i in group]
    assert flat == sorted(flat)
    assert len(groups) > 1


@pytest.fixture(scope="module")
def merged(served_model):
    return load(served_model, device="cpu")


def test_sub_batches_answer_as_one_padded_batch_in_request_order(merged):
    rng = random.Random(0)
    # mixed lengths, shuffled: 1 to 30 words (the tiny tokenizer truncates at 32 tokens)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 3, 12, 20, 30])))
             for _ in range(24)]
    lengths = [len(x) for x in merged.tokenizer(texts, truncation=True,
                                                max_length=merged.max_length)["input_ids"]]
    assert len(length_buckets(lengths)) > 1  # the split does split these texts
    split = predict_by_length(merged, texts)
    whole = merged.predict(texts, batch_size=len(texts))  # one pass, padded to the longest
    one_by_one = [merged.predict([text])[0] for text in texts]  # no padding at all
    assert len(split) == len(texts)
    for got, want, alone in zip(split, whole, one_by_one):
        assert list(got) == list(TASKS)
        for task in TASKS:
            assert got[task]["label"] == want[task]["label"] == alone[task]["label"]
            assert got[task]["probabilities"] == pytest.approx(want[task]["probabilities"],
                                                               abs=1e-5)
            assert got[task]["probabilities"] == pytest.approx(alone[task]["probabilities"],
                                                               abs=1e-5)
    assert predict_by_length(merged, []) == []

"""The head layout on its own (no model): task groups, label names, head finding, HM3 expansion."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from hm3.errors import Hm3Error
from hm3.heads import (
    MULTI_LABEL,
    TaskGroup,
    expand_head,
    expert_labels,
    find_head,
    is_multi_label,
    layout,
)
from hm3.recipe import HeadNames


def test_a_group_spans_its_labels_and_converts_its_threshold_to_a_logit():
    group = TaskGroup("topic", ("a", "b", "c"), 4, multi_label=True, threshold=0.8)
    assert group.stop == 7
    assert group.logit_threshold == pytest.approx(math.log(4))  # 0.8 / 0.2
    assert TaskGroup("spam", ("no", "yes"), 0).logit_threshold == 0.0


def test_a_group_round_trips_through_json():
    group = TaskGroup("topic", ("a", "b"), 3, multi_label=True, threshold=0.3)
    data = group.to_dict()
    assert data == {"name": "topic", "labels": ["a", "b"], "offset": 3, "multi_label": True,
                    "threshold": 0.3}
    assert TaskGroup.from_dict(json.loads(json.dumps(data))) == group


def test_a_hand_written_group_gets_the_defaults_and_plain_types():
    group = TaskGroup.from_dict({"name": "spam", "labels": ["ham", "spam"], "offset": "2"})
    assert group == TaskGroup("spam", ("ham", "spam"), 2, False, 0.5)
    assert type(group.offset) is int and type(group.threshold) is float
    typed = TaskGroup.from_dict({"name": "t", "labels": ["x"], "offset": 0, "multi_label": 1,
                                 "threshold": "0.25"})
    assert typed.multi_label is True and typed.threshold == 0.25


def test_expert_labels_come_in_id_order_or_as_numbered_defaults():
    config = {"id2label": {"1": "spam", "0": "ham", "10": "k", "2": "c", "3": "d", "4": "e",
                           "5": "f", "6": "g", "7": "h", "8": "i", "9": "j"}}
    assert expert_labels(config, "m") == ("ham", "spam", "c", "d", "e", "f", "g", "h", "i", "j",
                                          "k")  # 10 after 9: ids are compared as numbers
    assert expert_labels({"num_labels": 3}, "m") == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert expert_labels({}, "m") == ("LABEL_0", "LABEL_1")
    assert expert_labels({"id2label": {}, "num_labels": 1}, "m") == ("LABEL_0",)


def test_expert_labels_refuse_ids_that_are_not_0_to_k():
    with pytest.raises(Hm3Error, match=r"^m: config.json id2label has non-integer ids$"):
        expert_labels({"id2label": {"a": "x", "0": "y"}}, "m")
    with pytest.raises(Hm3Error, match=r"^m: config.json id2label ids must be 0\.\.1$"):
        expert_labels({"id2label": {"0": "x", "2": "y"}}, "m")


def test_multi_label_is_read_from_the_problem_type():
    assert MULTI_LABEL == "multi_label_classification"
    assert is_multi_label({"problem_type": MULTI_LABEL})
    assert not is_multi_label({"problem_type": "single_label_classification"})
    assert not is_multi_label({})


def test_layout_lays_the_groups_end_to_end():
    groups = layout(["a", "b", "c"], [("x", "y"), ("p", "q", "r"), ("z",)], [False, True, False])
    assert [(g.name, g.offset, g.stop, g.multi_label) for g in groups] == [
        ("a", 0, 2, False), ("b", 2, 5, True), ("c", 5, 6, False)]
    assert groups[1].labels == ("p", "q", "r") and groups[1].threshold == 0.5


SHAPES = {"classifier.dense.weight": (8, 8), "classifier.dense.bias": (8,),
          "classifier.out_proj.weight": (3, 8), "classifier.out_proj.bias": (3,),
          "score.weight": (3, 8), "pooler.weight": (3, 8), "head.weight": (3,)}


def _find(keys, num_labels, override=None):
    return find_head(set(keys), lambda name: SHAPES[name], num_labels, "m", override)


def test_find_head_takes_the_most_specific_name_with_one_row_per_label():
    assert _find(SHAPES, 3) == HeadNames("classifier.out_proj.weight", "classifier.out_proj.bias")
    # a projection with the wrong number of rows is not the head; a missing bias is None
    assert _find({"classifier.out_proj.weight", "score.weight"}, 3) == HeadNames(
        "classifier.out_proj.weight", None)
    SHAPES["classifier.weight"] = (4, 8)
    try:
        assert _find({"classifier.weight", "score.weight"}, 3) == HeadNames("score.weight")
        assert _find({"classifier.weight", "score.weight"}, 4) == HeadNames("classifier.weight")
    finally:
        del SHAPES["classifier.weight"]


def test_find_head_refuses_a_vector_or_wrong_rows_and_says_how_to_name_it():
    expected = ("m: cannot find the classification head (looked for classifier.out_proj.weight, "
                "classifier.weight, score.weight with 5 rows); name it in the recipe, e.g. "
                "`head: {weight: my_head.weight, bias: my_head.bias}`")
    with pytest.raises(Hm3Error, match=r"^" + re.escape(expected) + "$"):
        _find(SHAPES, 5)
    SHAPES["score.weight"], old = (3,), SHAPES["score.weight"]
    try:
        with pytest.raises(Hm3Error, match="cannot find"):
            _find({"score.weight"}, 3)
    finally:
        SHAPES["score.weight"] = old


def test_find_head_uses_an_override_only_when_its_tensors_exist():
    override = HeadNames("pooler.weight", None)
    assert _find(SHAPES, 5, override) is override
    assert _find(SHAPES, 3, HeadNames("head.weight", "pooler.weight")) == HeadNames(
        "head.weight", "pooler.weight")
    with pytest.raises(Hm3Error, match=r"^m: head tensor nope.bias named in the recipe does not"):
        _find(SHAPES, 3, HeadNames("pooler.weight", "nope.bias"))
    with pytest.raises(Hm3Error, match=r"^m: head tensor nope.weight named"):
        _find(SHAPES, 3, HeadNames("nope.weight", None))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_expand_head_places_the_block_among_zero_rows_in_its_dtype(dtype):
    block = torch.tensor([[1.5, -2.0], [3.0, 4.0]], dtype=dtype)
    expanded = expand_head(block, 1, 5)
    assert expanded.dtype == dtype
    assert expanded.tolist() == [[0, 0], [1.5, -2.0], [3.0, 4.0], [0, 0], [0, 0]]
    bias = expand_head(torch.tensor([7.0, 8.0], dtype=dtype), 3, 5)
    assert bias.dtype == dtype and bias.tolist() == [0, 0, 0, 7.0, 8.0]

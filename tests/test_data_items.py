"""`hm3.data.items`: the `data:` block `hm3 eval` builds from `--data TASK=FILE` and
`--expect TASK:OTHER=LABEL` items."""

import pytest

from hm3 import Hm3Error
from hm3.data.items import check_expected_heads, data_block


def test_items_add_tasks_and_cross_checks_to_a_recipe_block():
    block = {"spam": "spam.csv", "topic": {"path": "old.jsonl"}}
    out = data_block(["topic=new.jsonl"], ["spam:topic=news", "spam:mood=calm"], "body", "y",
                     block=block)
    assert out == {"spam": {"path": "spam.csv", "expect": {"topic": "news", "mood": "calm"}},
                   "topic": {"path": "new.jsonl", "text_column": "body", "label_column": "y"}}
    assert block == {"spam": "spam.csv", "topic": {"path": "old.jsonl"}}  # not changed


def test_a_limit_applies_to_every_task():
    out = data_block(["a=a.csv"], block={"b": "b.csv"}, limit=5)
    assert out == {"b": {"path": "b.csv", "limit": 5},
                   "a": {"path": "a.csv", "text_column": "text", "label_column": "label",
                         "limit": 5}}


@pytest.mark.parametrize("data, expect, message", [
    (["topic"], [], "--data expects TASK=FILE, got 'topic'"),
    (["=x.csv"], [], "--data expects TASK=FILE"),
    (["topic=x.csv"], ["topic=news"], "--expect expects TASK:OTHER=LABEL"),
    (["topic=x.csv"], ["topic:spam="], "--expect expects TASK:OTHER=LABEL"),
    (["topic=x.csv"], ["spam:topic=news"], "no --data for task 'spam'"),
])
def test_malformed_items_are_refused_with_the_form_expected(data, expect, message):
    with pytest.raises(Hm3Error, match=message):
        data_block(data, expect)


def test_a_cross_check_on_a_head_the_model_lacks_is_an_error():
    check_expected_heads(["a:b=x"], ["a", "b"])
    with pytest.raises(Hm3Error, match="the model has no task 'c'; its tasks are a, b"):
        check_expected_heads(["a:c=x"], ["a", "b"])

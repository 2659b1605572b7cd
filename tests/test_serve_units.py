"""Serving pieces on their own, no model and no server process: the micro-batcher on stop, the
policy's "at or above", the request limit on the number of texts."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from hm3.heads import TaskGroup  # noqa: E402
from hm3.serve.app import create_app  # noqa: E402
from hm3.serve.batching import MicroBatcher  # noqa: E402
from hm3.serve.options import ServeOptions  # noqa: E402
from hm3.serve.policy import TaskRule  # noqa: E402


def test_stop_finishes_the_batch_it_was_collecting():
    """The stop signal can arrive while the worker waits for a batch to fill: the texts it has
    collected are still classified, not dropped (their callers would wait for ever)."""

    async def scenario():
        batcher = MicroBatcher(lambda texts: [t.upper() for t in texts], max_batch_size=8,
                               max_wait_ms=10_000)
        await batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(["a", "b"]))
        await asyncio.sleep(0.05)  # the worker holds "a" and "b" and waits for more
        await asyncio.wait_for(batcher.stop(), 5)
        return await asyncio.wait_for(waiting, 5)

    assert asyncio.run(scenario()) == ["A", "B"]


def test_a_rule_fires_at_its_threshold_not_only_above():
    rule = TaskRule(flag=("spam",), threshold=0.9)
    assert rule.fires({"spam": 0.9, "ham": 0.1})  # the docs: "at or above"
    assert not rule.fires({"spam": 0.8999, "ham": 0.1001})
    assert TaskRule(flag=("spam",)).fires({"spam": 0.5, "ham": 0.5})


class FakeClassifier:
    """What `create_app` needs of a classifier: groups, max_length and predict."""

    groups = [TaskGroup("spam", ("ham", "spam"), 0)]
    max_length = 32

    def predict(self, texts, batch_size=32):
        return [{"spam": {"label": "ham", "score": 0.75,
                          "probabilities": {"ham": 0.75, "spam": 0.25}}} for _ in texts]


def test_a_request_of_exactly_max_texts_is_served_one_more_is_refused():
    app = create_app(FakeClassifier(), ServeOptions(max_texts=3, length_split=False))
    with TestClient(app) as client:
        answer = client.post("/v1/classify", json={"texts": ["a", "b", "c"]})
        assert answer.status_code == 200 and len(answer.json()["results"]) == 3
        answer = client.post("/v1/classify", json={"texts": ["a", "b", "c", "d"]})
        assert answer.status_code == 413
        assert "4 in one request, the limit is 3" in answer.json()["error"]


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "text/plain"},
                                     {"Content-Type": "application/x-www-form-urlencoded"}])
def test_a_body_not_sent_as_json_is_refused_saying_which_header_to_send(headers):
    app = create_app(FakeClassifier(), ServeOptions(length_split=False))
    with TestClient(app) as client:
        answer = client.post("/v1/classify", content=b'{"texts": ["a"]}', headers=headers)
        assert answer.status_code == 415
        assert "Content-Type: application/json" in answer.json()["error"]
        for content_type in ("application/json", "application/json; charset=utf-8"):
            answer = client.post("/v1/classify", content=b'{"texts": ["a"]}',
                                 headers={"Content-Type": content_type})
            assert answer.status_code == 200, answer.text


def test_a_policy_file_that_is_not_utf8_says_so(tmp_path):
    from hm3 import Hm3Error
    from hm3.serve.policy import load_policy

    path = tmp_path / "policy.yaml"
    path.write_bytes("spam:  # spam très sûr\n  flag: [spam]\n".encode("latin-1"))
    with pytest.raises(Hm3Error, match=r"policy.yaml is not UTF-8 text \(byte 0xe8"):
        load_policy(path, FakeClassifier.groups)

"""Serving pieces on their own, no model and no server process: the micro-batcher on stop, the
policy's "at or above", the request limit on the number of texts."""

from __future__ import annotations

import asyncio
import time

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


def test_a_batch_the_worker_cannot_hand_to_the_model_fails_its_callers_with_that_error():
    """The model's thread refusing the batch (its executor shut down) is not a text's failure:
    every caller of the batch gets the error at once, rather than waiting for ever, and the
    worker goes on."""

    async def scenario():
        batcher = MicroBatcher(lambda texts: [t.upper() for t in texts], max_batch_size=8)
        await batcher.start()
        batcher._executor.shutdown(wait=True)
        try:
            with pytest.raises(RuntimeError, match="shutdown"):
                await asyncio.wait_for(batcher.submit(["a", "b"]), 5)
            assert not batcher._worker.done()
        finally:
            batcher._executor = None
            batcher._stopping = True
            batcher._arrived.set()
            await asyncio.wait_for(batcher._worker, 5)

    asyncio.run(scenario())


def test_each_batch_reports_its_size_and_how_long_the_model_took():
    seen = []

    async def scenario():
        batcher = MicroBatcher(lambda texts: [t.upper() for t in texts], max_batch_size=8,
                               on_batch=lambda size, seconds: seen.append((size, seconds)))
        await batcher.start()
        started = time.perf_counter()  # the clock the batcher times with
        result = await asyncio.wait_for(batcher.submit(["a", "b", "c"]), 5)
        elapsed = time.perf_counter() - started
        await asyncio.wait_for(batcher.stop(), 5)
        return result, elapsed

    result, elapsed = asyncio.run(scenario())
    assert result == ["A", "B", "C"]
    (size, seconds), = seen
    assert size == 3 and 0 <= seconds <= elapsed


def _recording_batcher(max_batch_size: int, max_wait_ms: float):
    batches = []

    def run(texts):
        batches.append(list(texts))
        return [t.upper() for t in texts]

    return MicroBatcher(run, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms), batches


def test_a_full_second_batch_leaves_without_waiting_for_company():
    """The batcher counts the texts still queued after a batch is taken: a request of four texts
    at batch size 2 is two full batches, the second run as soon as the first is done, not after
    the (here 60 s) wait for company that only a batch short of texts takes."""

    async def scenario():
        batcher, batches = _recording_batcher(max_batch_size=2, max_wait_ms=60_000)
        await batcher.start()
        try:
            result = await asyncio.wait_for(batcher.submit(["a", "b", "c", "d"]), 20)
        finally:
            await asyncio.wait_for(batcher.stop(), 5)
        return result, batches

    result, batches = asyncio.run(scenario())
    assert result == ["A", "B", "C", "D"]
    assert batches == [["a", "b"], ["c", "d"]]


def test_a_lone_text_after_a_full_batch_waits_for_company():
    """Once a full batch has left, the count of queued texts is back to 0: the next lone text
    waits (up to max_wait) for another to join it, and the two run as one batch."""

    async def scenario():
        batcher, batches = _recording_batcher(max_batch_size=2, max_wait_ms=60_000)
        await batcher.start()
        try:
            first = await asyncio.wait_for(batcher.submit(["a", "b"]), 20)
            lone = asyncio.ensure_future(batcher.submit(["c"]))
            await asyncio.sleep(0.05)  # "c" is queued; the worker waits for company
            company = await asyncio.wait_for(batcher.submit(["d"]), 20)
            return first, await asyncio.wait_for(lone, 20), company, batches
        finally:
            await asyncio.wait_for(batcher.stop(), 5)

    first, lone, company, batches = asyncio.run(scenario())
    assert (first, lone, company) == (["A", "B"], ["C"], ["D"])
    assert batches == [["a", "b"], ["c", "d"]]


def test_the_batchers_wait_is_given_in_milliseconds_and_none_by_default():
    run = lambda texts: texts  # noqa: E731
    assert MicroBatcher(run).max_wait == 0
    assert MicroBatcher(run, max_wait_ms=5).max_wait == pytest.approx(0.005, rel=1e-12)


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

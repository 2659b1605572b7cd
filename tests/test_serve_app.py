"""The serving app in process (no model, no server process): every route, refusal and limit of
`hm3.serve.app` against a stand-in classifier whose probabilities are fixed by the words of a
text, so each answer can be written down by hand; the ASGI guards of `hm3.serve.guard` called
directly; the options, their flags and the policy file's checks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from hm3.errors import Hm3Error  # noqa: E402
from hm3.heads import TaskGroup  # noqa: E402
from hm3.serve.app import _is_json, create_app  # noqa: E402
from hm3.serve.guard import Observe, ReadBody, RequireKey, send_error, wait_for_disconnect  # noqa: E402
from hm3.serve.options import ServeOptions, add_serve_arguments  # noqa: E402
from hm3.serve.policy import TaskRule, load_policy, parse_policy  # noqa: E402
from hm3.serve.server import TOKENIZER_FILES, check_model  # noqa: E402

GROUPS = [TaskGroup("spam", ("ham", "spam"), 0),
          TaskGroup("tox", ("insult", "threat"), 2, multi_label=True)]


def answer(text: str) -> dict:
    """The stand-in's prediction: P(spam) 0.9 with the word "buy" (else 0.2), P(insult) 0.6 with
    "idiot" (else 0.1), P(threat) 0.05."""
    spam = 0.9 if "buy" in text.split() else 0.2
    insult = 0.6 if "idiot" in text.split() else 0.1
    return {"spam": {"label": "spam" if spam >= 0.5 else "ham", "score": max(spam, 1 - spam),
                     "probabilities": {"ham": 1 - spam, "spam": spam}},
            "tox": {"label": ["insult"] if insult >= 0.5 else [],
                    "probabilities": {"insult": insult, "threat": 0.05}}}


class Fake:
    """What `create_app` needs of a classifier; records each `predict` call (texts, batch size).
    A text holding `fail_on` raises; while `gate` is clear, `predict` waits for it."""

    groups = GROUPS
    max_length = 16

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[list[str], int]] = []
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    def predict(self, texts, batch_size=32):
        self.calls.append((list(texts), batch_size))
        assert self.gate.wait(10)
        if self.fail_on is not None and any(self.fail_on in t for t in texts):
            raise ValueError(f"cannot take {self.fail_on!r}")
        return [answer(t) for t in texts]


POLICY = {"spam": TaskRule(("spam",), 0.9), "tox": TaskRule(("insult", "threat"), 0.6)}


@contextlib.asynccontextmanager
async def serving(app):
    """The app started (its warm-up done) and an HTTP client on it, all in this event loop."""
    async with app.router.lifespan_context(app):
        # the app answers a crash with a JSON 500, which the test should see, not the crash
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://hm3") as client:
            yield client


def run(app, scenario):
    async def main():
        async with serving(app) as client:
            return await scenario(client)
    return asyncio.run(main())


def options(**kwargs) -> ServeOptions:
    return ServeOptions(**{"length_split": False, **kwargs})


# --- the routes ------------------------------------------------------------------------------

def test_health_ready_and_tasks_describe_the_model_and_its_limits():
    fake = Fake()
    app = create_app(fake, options(max_texts=5, max_chars=100, max_batch_size=4), name="m",
                     backend="onnx", precision="bf16", policy={"spam": POLICY["spam"]})

    async def scenario(client):
        return [(await client.get(path)).json() for path in ("/health", "/ready", "/v1/tasks")]

    health, ready, tasks = run(app, scenario)
    assert fake.calls == [(["hello"], 4)]  # the warm-up text, before ready
    assert health == {"status": "ok", "model": "m", "backend": "onnx", "precision": "bf16"}
    assert ready == {"status": "ready", "model": "m", "backend": "onnx", "precision": "bf16"}
    assert tasks == {
        "model": "m", "backend": "onnx", "precision": "bf16", "max_length": 16,
        "max_batch_size": 4,
        "limits": {"max_texts": 5, "max_chars": 100, "max_body_bytes": 2 * 1024 * 1024},
        "tasks": [{"name": "spam", "labels": ["ham", "spam"], "offset": 0, "multi_label": False,
                   "threshold": 0.5, "policy": {"flag": ["spam"], "threshold": 0.9}},
                  {"name": "tox", "labels": ["insult", "threat"], "offset": 2,
                   "multi_label": True, "threshold": 0.5}]}


def test_not_ready_before_the_warm_up_nor_after_shutdown():
    fake = Fake()
    app = create_app(fake, options())

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hm3") as client:
            before = await client.get("/ready")
            async with app.router.lifespan_context(app):
                during = await client.get("/ready")
            after = await client.get("/ready")
        return before, during, after

    before, during, after = asyncio.run(main())
    assert before.status_code == 503 and before.headers["retry-after"] == "1"
    assert before.json() == {"error": "not ready: warming up or shutting down"}
    assert during.status_code == 200
    assert after.status_code == 503


def test_classify_answers_the_tasks_asked_in_their_order_with_the_policys_verdicts():
    fake = Fake()
    app = create_app(fake, options(max_batch_size=8), name="m", policy=POLICY)
    texts = ["buy now", "hello idiot", "buy idiot", "plain"]

    async def scenario(client):
        return (await client.post("/v1/classify",
                                  json={"texts": texts, "tasks": ["tox", "spam", "tox"]})).json()

    body = run(app, scenario)
    assert fake.calls[1] == (texts, 8)  # one batch, at the server's max_batch_size
    assert body["model"] == "m"
    # P(spam) 0.9 reaches its threshold 0.9; P(insult) 0.6 reaches 0.6
    assert body["flagged"] == [["spam"], ["tox"], ["tox", "spam"], []]
    for text, result, fired in zip(texts, body["results"], body["flagged"]):
        assert list(result) == ["tox", "spam"]  # asked order, repeats once
        for task in ("tox", "spam"):
            assert result[task] == {**answer(text)[task], "flagged": task in fired}


def test_classify_without_a_policy_has_no_verdicts_and_answers_every_task():
    app = create_app(Fake(), options())

    async def scenario(client):
        return [(await client.post("/v1/classify", json={"texts": ["buy now"]})).json(),
                (await client.get("/health")).json()]

    classified, health = run(app, scenario)
    assert classified == {"model": "model", "results": [answer("buy now")]}
    assert health == {"status": "ok", "model": "model", "backend": "torch", "precision": "f32"}


def test_unknown_tasks_are_named_with_the_models_tasks():
    app = create_app(Fake(), options())

    async def scenario(client):
        return await client.post("/v1/classify", json={"texts": ["a"], "tasks": ["spam", "x"]})

    response = run(app, scenario)
    assert response.status_code == 422
    assert response.json() == {"error": "tasks: unknown task(s) 'x'; this model's tasks are "
                                        "spam, tox", "known_tasks": ["spam", "tox"]}


def test_texts_and_characters_are_limited_at_exactly_the_limit():
    app = create_app(Fake(), options(max_texts=3, max_chars=10))

    async def scenario(client):
        post = lambda texts: client.post("/v1/classify", json={"texts": texts})  # noqa: E731
        return [await post(["aaaaa", "bbbbb"]), await post(["aaaaa", "bbbbbb"]),
                await post(["a", "b", "c"]), await post(["a", "b", "c", "d"])]

    at_chars, over_chars, at_texts, over_texts = run(app, scenario)
    assert at_chars.status_code == 200 and at_texts.status_code == 200
    assert over_chars.status_code == 413
    assert over_chars.json()["error"] == ("too many characters: 11 in one request, the limit is "
                                          "10; split the request")
    assert over_texts.status_code == 413
    assert over_texts.json()["error"] == ("too many texts: 4 in one request, the limit is 3; "
                                          "split the request")


def test_a_lone_surrogate_is_refused_naming_its_text():
    app = create_app(Fake(), options(), policy=POLICY)
    body = b'{"texts": ["caf\\u00e9", "\\ud800"]}'
    moderation = b'{"input": ["\\ud800"]}'

    async def scenario(client):
        headers = {"Content-Type": "application/json"}
        return [await client.post("/v1/classify", content=body, headers=headers),
                await client.post("/v1/moderations", content=moderation, headers=headers)]

    classify, moderate = run(app, scenario)
    assert classify.status_code == 422 and classify.json()["index"] == 1
    assert classify.json()["error"].startswith("texts.1: not valid Unicode")
    assert moderate.status_code == 422 and moderate.json()["index"] == 0
    assert moderate.json()["error"].startswith("input.0: not valid Unicode")


def test_a_text_the_model_cannot_take_is_named_and_its_batch_mates_are_answered():
    fake = Fake(fail_on="bad")
    app = create_app(fake, options(), policy=POLICY)

    async def scenario(client):
        failed = await client.post("/v1/classify", json={"texts": ["good", "bad one", "fine"]})
        moderated = await client.post("/v1/moderations", json={"input": ["ok", "so bad"]})
        good = await client.post("/v1/classify", json={"texts": ["good"]})
        return failed, moderated, good

    failed, moderated, good = run(app, scenario)
    assert failed.status_code == 422
    assert failed.json() == {"error": "texts.1: the model could not classify this text "
                                      "(ValueError: cannot take 'bad')", "index": 1}
    assert moderated.json() == {"error": "input.1: the model could not classify this text "
                                         "(ValueError: cannot take 'bad')", "index": 1}
    assert good.status_code == 200


@pytest.mark.parametrize("body, message, loc", [
    ('{"texts": []}', "texts: List should have at least 1 item after validation, not 0",
     ["texts"]),
    ('{"texts": ["a"], "colour": 1}', "colour: Extra inputs are not permitted", ["colour"]),
    ('{"texts": ["a", 5]}', "texts.1: Input should be a valid string", ["texts", 1]),
    ('[]', "body: Input should be a valid dictionary or instance of ClassifyRequest", []),
    ('{"texts": ["a"], "tasks": []}', "tasks: List should have at least 1 item after "
     "validation, not 0", ["tasks"]),
])
def test_a_malformed_request_names_the_field(body, message, loc):
    app = create_app(Fake(), options())

    async def scenario(client):
        return await client.post("/v1/classify", content=body.encode(),
                                 headers={"Content-Type": "application/json"})

    response = run(app, scenario)
    assert response.status_code == 422
    assert response.json()["error"] == message
    assert [item["loc"] for item in response.json()["detail"]] == [loc]
    assert set(response.json()["detail"][0]) == {"loc", "msg", "type"}


def test_at_most_ten_problems_are_listed():
    app = create_app(Fake(), options())

    async def scenario(client):
        return await client.post("/v1/classify", json={"texts": list(range(12))})

    body = run(app, scenario).json()
    assert len(body["detail"]) == 10 and body["error"].count(";") == 9
    assert body["error"].startswith("texts.0: Input should be a valid string; texts.1:")


def test_invalid_json_is_refused_with_an_example():
    app = create_app(Fake(), options(), policy=POLICY)

    async def scenario(client):
        headers = {"Content-Type": "application/json"}
        return [await client.post("/v1/classify", content=b'{"texts": [', headers=headers),
                await client.post("/v1/moderations", content=b"{", headers=headers),
                await client.post("/v1/moderations", content=b"hello",
                                  headers={"Content-Type": "text/plain"})]

    classify, moderate, plain = run(app, scenario)
    assert classify.status_code == 422 and moderate.status_code == 422
    assert classify.json()["error"].startswith("the body is not valid JSON (")
    assert classify.json()["error"].endswith('; send {"texts": ["..."]}')
    assert moderate.json()["error"].endswith('; send {"input": "..."}')
    assert plain.status_code == 415
    assert plain.json()["error"] == ("the body must be JSON sent with the header `Content-Type: "
                                     "application/json` (got text/plain); send "
                                     '{"input": "..."}')


def test_a_large_body_is_parsed_as_well():
    app = create_app(Fake(), options(max_chars=100_000))
    text = "buy " + "x" * 70_000  # over the 64 KiB parsed in a worker thread

    async def scenario(client):
        return await client.post("/v1/classify", json={"texts": [text, "plain"]})

    response = run(app, scenario)
    assert response.status_code == 200
    assert response.json()["results"] == [answer(text), answer("plain")]


def test_a_body_without_a_content_type_is_refused():
    app = create_app(Fake(), options())

    async def scenario(client):
        return await client.post("/v1/classify", content=b'{"texts": ["a"]}')

    response = run(app, scenario)
    assert response.status_code == 415 and "(got none)" in response.json()["error"]


def test_json_media_types():
    assert _is_json("application/json")
    assert _is_json(" Application/JSON ; charset=utf-8")
    assert _is_json("application/merge-patch+json")
    assert not _is_json("text/x+json")
    assert not _is_json("application/jsonl")
    assert not _is_json("")


def test_moderations_answer_openais_shape_from_the_policy():
    app = create_app(Fake(), options(), name="m", policy=POLICY)

    async def scenario(client):
        return [(await client.post("/v1/moderations", json={"input": text})).json()
                for text in ("buy idiot", ["plain", "buy now"], [])]

    one, two, empty = run(app, scenario)
    assert one["id"].startswith("modr-") and len(one["id"]) == len("modr-") + 32
    assert one["model"] == "m"
    assert one["results"] == [{
        "flagged": True,
        "categories": {"spam/spam": True, "tox/insult": True, "tox/threat": False},
        "category_scores": {"spam/spam": 0.9, "tox/insult": 0.6, "tox/threat": 0.05}}]
    assert [r["flagged"] for r in two["results"]] == [False, True]
    assert two["results"][0]["categories"] == {"spam/spam": False, "tox/insult": False,
                                               "tox/threat": False}
    assert two["id"] != one["id"]
    assert empty == {"error": "input: give a text or a non-empty list of texts"}


def test_moderations_without_a_policy_are_not_implemented():
    app = create_app(Fake(), options())

    async def scenario(client):
        return await client.post("/v1/moderations", json={"input": "a"})

    response = run(app, scenario)
    assert response.status_code == 501 and "--policy FILE" in response.json()["error"]


def test_a_full_queue_answers_503_and_the_queue_empties_again():
    fake = Fake()
    app = create_app(fake, options(max_texts=2, max_queued_texts=3))

    async def scenario(client):
        fake.gate.clear()
        first = asyncio.ensure_future(client.post("/v1/classify", json={"texts": ["a", "b"]}))
        while len(fake.calls) < 2:  # the first request's texts are in the model
            await asyncio.sleep(0.01)
        busy = await client.post("/v1/classify", json={"texts": ["c", "d"]})
        fits = asyncio.ensure_future(client.post("/v1/classify", json={"texts": ["e"]}))
        await asyncio.sleep(0.05)
        full = await client.post("/v1/classify", json={"texts": ["h"]})  # 2 + 1 queued
        fake.gate.set()
        done = [await first, await fits]
        after = await client.post("/v1/classify", json={"texts": ["f", "g"]})
        metrics = (await client.get("/metrics")).text
        return busy, full, done, after, metrics

    busy, full, done, after, metrics = run(app, scenario)
    assert full.status_code == 503 and "(3 texts queued" in full.json()["error"]
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"] == ("the server is busy (2 texts queued, the limit is 3); retry "
                                    "shortly")
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert "hm3_queued_texts 0.0" in metrics


def test_a_request_past_its_timeout_gets_504_and_its_texts_are_not_classified():
    fake = Fake()
    app = create_app(fake, options(request_timeout=0.2))

    async def scenario(client):
        fake.gate.clear()
        first = asyncio.ensure_future(client.post("/v1/classify", json={"texts": ["a"]}))
        while len(fake.calls) < 2:
            await asyncio.sleep(0.01)
        late = await client.post("/v1/classify", json={"texts": ["b"]})  # queued behind "a"
        fake.gate.set()
        await first
        after = await client.post("/v1/classify", json={"texts": ["c"]})
        return late, after

    late, after = run(app, scenario)
    assert late.status_code == 504
    assert late.json()["error"].startswith("no answer within --request-timeout 0.2 s;")
    assert after.status_code == 200
    assert [texts for texts, _ in fake.calls] == [["hello"], ["a"], ["c"]]  # "b" was dropped


def test_an_unexpected_error_is_a_json_500_and_unknown_routes_are_json():
    class Broken(Fake):
        @property
        def max_length(self):
            raise RuntimeError("boom")

    app = create_app(Broken(), options())

    async def scenario(client):
        return [await client.get("/v1/tasks"), await client.get("/nowhere"),
                await client.get("/v1/classify"), (await client.get("/metrics")).text]

    broken, _, _, _ = run(app, scenario)
    assert broken.status_code == 500
    assert broken.json() == {"error": "internal error (RuntimeError); the server goes on: "
                                      "retry, and report it if it persists"}
    _, missing, wrong_method, metrics = run(create_app(Fake(), options()), scenario)
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert wrong_method.status_code == 405 and wrong_method.json() == {
        "error": "Method Not Allowed"}
    assert wrong_method.headers["allow"] == "POST"
    assert 'hm3_requests_total{route="other",status="404"} 1.0' in metrics
    assert 'hm3_requests_total{route="/v1/classify",status="405"} 1.0' in metrics
    assert 'hm3_requests_total{route="/v1/tasks",status="200"} 1.0' in metrics


def test_metrics_count_texts_batches_and_requests():
    app = create_app(Fake(), options())

    async def scenario(client):
        await client.post("/v1/classify", json={"texts": ["a", "b", "c"]})
        return (await client.get("/metrics")).text

    metrics = run(app, scenario)
    assert "hm3_texts_total 4.0" in metrics  # the warm-up text and three
    assert "hm3_batch_size_count 2.0" in metrics and "hm3_batch_size_sum 4.0" in metrics
    assert "hm3_batch_seconds_count 2.0" in metrics
    assert 'hm3_batch_size_bucket{le="1.0"} 1.0' in metrics  # the warm-up batch
    assert 'hm3_batch_size_bucket{le="4.0"} 2.0' in metrics
    assert 'hm3_batch_size_bucket{le="256.0"} 2.0' in metrics
    assert 'hm3_request_seconds_bucket{le="30.0"} 1.0' in metrics
    assert 'hm3_requests_total{route="/v1/classify",status="200"} 1.0' in metrics
    assert "hm3_request_seconds_count 1.0" in metrics


def test_length_split_runs_sub_batches_and_answers_in_order():
    class Tokenized(Fake):
        def tokenizer(self, texts, truncation, max_length, verbose):
            assert truncation and not verbose
            return {"input_ids": [[0] * min(len(t.split()), max_length) for t in texts]}

    fake = Tokenized()
    app = create_app(fake, ServeOptions())
    texts = ["buy", "w " * 20, "buy idiot", "w " * 19]

    async def scenario(client):
        return (await client.post("/v1/classify", json={"texts": texts})).json()

    body = run(app, scenario)
    assert body["results"] == [answer(t) for t in texts]
    # lengths 1, 16 (cut at max_length), 2, 16: two short, two long sub-batches
    assert fake.calls[1:] == [(["buy", "buy idiot"], 2), ([texts[1], texts[3]], 2)]


class Measured:
    """A classifier for `predict_by_length`: token lengths are word counts (cut at
    `max_length`); records each tokenizer and predict call."""

    max_length = 16

    def __init__(self):
        self.tokenized, self.calls = [], []

    def tokenizer(self, texts, truncation, max_length, verbose):
        self.tokenized.append((list(texts), truncation, max_length))
        return {"input_ids": [[0] * min(len(t.split()), max_length) for t in texts]}

    def predict(self, texts, batch_size):
        self.calls.append((list(texts), batch_size))
        return [t.upper() for t in texts]


def test_predict_by_length_measures_only_what_it_can_split():
    from hm3.serve.buckets import predict_by_length

    fake = Measured()
    assert predict_by_length(fake, []) == [] and fake.calls == [] and fake.tokenized == []
    assert predict_by_length(fake, ["one"]) == ["ONE"]
    assert fake.calls == [(["one"], 1)] and fake.tokenized == []
    # lengths 1 and 16 (20 words cut at 16): one pass 16 + 2 * 16 = 48 beats 17 + 32 = 49
    fake = Measured()
    texts = ["short", "w " * 20]
    assert predict_by_length(fake, texts) == [t.upper() for t in texts]
    assert fake.tokenized == [(texts, True, 16)] and fake.calls == [(texts, 2)]
    fake = Measured()  # with no cost per pass, each length its own pass
    assert predict_by_length(fake, texts[::-1], overhead_tokens=0) == [t.upper()
                                                                       for t in texts[::-1]]
    assert fake.calls == [(["short"], 1), (["w " * 20], 1)]


def test_api_keys_guard_every_route_but_liveness():
    app = create_app(Fake(), options(api_keys=("k1", "k2")))

    async def scenario(client):
        ask = lambda path, key=None: client.get(  # noqa: E731
            path, headers={"Authorization": key} if key else {})
        return [await ask("/health"), await ask("/ready"), await ask("/ready", "Bearer k2"),
                await ask("/ready", "bearer k1"), await ask("/ready", "Bearer k3"),
                await ask("/ready", "Token k1"), await ask("/ready", "Bearer  k1 ")]

    health, none, second, lower, wrong, scheme, spaced = run(app, scenario)
    assert health.status_code == 200
    assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
    assert none.json() == {"error": "missing or wrong API key: send the header "
                                    "`Authorization: Bearer KEY`"}
    assert second.status_code == 200 and lower.status_code == 200 and spaced.status_code == 200
    assert wrong.status_code == 401 and scheme.status_code == 401


def test_cors_and_docs_only_when_asked():
    def preflight(app, origin):
        async def scenario(client):
            return await client.options("/v1/classify", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "Content-Type"})
        return run(app, scenario)

    app = create_app(Fake(), options(cors_allow_origins=("http://a.example",), docs=True))
    allowed = preflight(app, "http://a.example")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://a.example"
    assert {"GET", "POST"} <= set(allowed.headers["access-control-allow-methods"].split(", "))
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")}

    async def keyed_get(client):
        return await client.options("/v1/tasks", headers={
            "Origin": "http://a.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "Authorization"})

    assert run(app, keyed_get).status_code == 200
    assert "access-control-allow-origin" not in preflight(app, "http://b.example").headers

    async def pages(client):
        return [(await client.get(p)).status_code for p in ("/docs", "/redoc", "/openapi.json")]

    assert run(app, pages) == [200, 200, 200]
    closed = create_app(Fake(), options())
    assert run(closed, pages) == [404, 404, 200]
    assert "access-control-allow-origin" not in preflight(closed, "http://a.example").headers

    async def schema(client):
        return (await client.get("/openapi.json")).json()

    document = run(closed, schema)
    assert document["info"]["title"] == "hm3" and "multi-task" in document["info"]["description"]
    body = document["paths"]["/v1/classify"]["post"]["requestBody"]
    assert body["required"] is True
    assert "texts" in body["content"]["application/json"]["schema"]["properties"]


def test_a_body_over_the_limit_is_refused():
    app = create_app(Fake(), options(max_body_bytes=100))

    async def scenario(client):
        return [await client.post("/v1/classify", json={"texts": ["a" * 200]}),
                await client.post("/v1/classify", json={"texts": ["a" * 70]})]

    over, under = run(app, scenario)
    assert over.status_code == 413 and "over the limit of 100 bytes" in over.json()["error"]
    assert under.status_code == 200


def test_the_page_is_served():
    app = create_app(Fake(), options())

    async def scenario(client):
        return await client.get("/")

    page = run(app, scenario)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "v1/tasks" in page.text  # it asks the API for the tasks


# --- the micro-batcher ------------------------------------------------------------------------

def test_batching_settings_are_checked():
    from hm3.serve.batching import MicroBatcher, check_batching

    check_batching(1, 0.0)
    with pytest.raises(Hm3Error, match="^max_batch_size must be at least 1, got 0$"):
        check_batching(0, 0.0)
    with pytest.raises(Hm3Error, match="^max_wait_ms must be 0 or more, got -0.5$"):
        MicroBatcher(lambda texts: texts, 4, -0.5)


def batched(scenario, *args, **kwargs):
    """`scenario(batcher, batches)` with a started MicroBatcher over an upper-casing model that
    records each batch; the batcher stopped after."""
    from hm3.serve.batching import MicroBatcher

    batches = []

    def model(texts):
        batches.append(list(texts))
        return [t.upper() for t in texts]

    async def main():
        batcher = MicroBatcher(model, *args, **kwargs)
        await batcher.start()
        try:
            return await scenario(batcher, batches)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_the_default_batch_is_32_texts_and_nothing_waits():
    async def scenario(batcher, batches):
        texts = [f"t{i}" for i in range(40)]
        assert await batcher.submit(texts) == [t.upper() for t in texts]
        return batches

    assert [len(b) for b in batched(scenario)] == [32, 8]


def test_a_lone_text_waits_for_mates_until_the_deadline_and_a_full_batch_does_not():
    import time

    async def lone(batcher, batches):
        start = time.perf_counter()
        assert await batcher.submit(["a"]) == ["A"]
        return time.perf_counter() - start

    assert batched(lone, max_batch_size=2, max_wait_ms=300) >= 0.25

    async def pair(batcher, batches):
        start = time.perf_counter()
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.sleep(0.05)
        assert await batcher.submit(["b"]) == ["B"] and await first == ["A"]
        return time.perf_counter() - start, batches

    seconds, batches = batched(pair, max_batch_size=2, max_wait_ms=5000)
    assert seconds < 2.5 and batches == [["a", "b"]]  # full at two: no wait for the deadline


def test_submit_is_refused_unless_the_batcher_runs():
    from hm3.serve.batching import MicroBatcher

    gate = threading.Event()

    def model(texts):
        assert gate.wait(10)
        return texts

    async def main():
        batcher = MicroBatcher(model)
        await batcher.stop()  # never started: nothing to stop
        with pytest.raises(Hm3Error, match="^the batcher is not running$"):
            await batcher.submit(["a"])
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        with pytest.raises(Hm3Error, match="^the batcher is not running$"):
            await batcher.submit(["b"])  # stopping: the worker still finishes "a"
        gate.set()
        await stopping
        with pytest.raises(Hm3Error, match="^the batcher is not running$"):
            await batcher.submit(["c"])
        return await running

    assert asyncio.run(main()) == ["a"]


# --- the guards, called as ASGI apps ---------------------------------------------------------

def events(*messages, wait: float = 0.0):
    """An ASGI `receive` giving `messages` in turn, then disconnect (after `wait` seconds each)."""
    queue = list(messages)

    async def receive():
        await asyncio.sleep(wait)
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    return receive


def chunk(data: bytes, more: bool) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


class Sent:
    """An ASGI `send` that keeps what was sent."""

    def __init__(self):
        self.messages = []

    async def __call__(self, message):
        self.messages.append(message)

    @property
    def status(self):
        return next((m["status"] for m in self.messages if m["type"] == "http.response.start"),
                    None)

    @property
    def headers(self):
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return dict(start["headers"])

    @property
    def json(self):
        return json.loads(b"".join(m.get("body", b"") for m in self.messages
                                   if m["type"] == "http.response.body"))


def echo_app(seen: list):
    """An app that reads the body, then the next event, and answers 200."""

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


HTTP = {"type": "http", "path": "/v1/classify", "headers": []}


def test_send_error_is_the_apps_json_shape():
    sent = Sent()
    asyncio.run(send_error(sent, 418, "no tea", {"Retry-After": "3"}))
    assert sent.status == 418 and sent.json == {"error": "no tea"}
    body = sent.messages[1]["body"]
    assert sent.headers == {b"content-type": b"application/json",
                            b"content-length": str(len(body)).encode(), b"retry-after": b"3"}
    assert sent.messages[1]["more_body"] is False


def test_read_body_gives_the_app_the_whole_body_once_then_the_connection():
    seen, sent = [], Sent()
    guard = ReadBody(echo_app(seen), limit=10, timeout=5, budget=100)
    asyncio.run(guard(HTTP, events(chunk(b"12345", True), chunk(b"67890", False)), sent))
    assert seen == [{"type": "http.request", "body": b"1234567890", "more_body": False},
                    {"type": "http.disconnect"}]
    assert sent.status == 200 and guard.held == 0


def test_read_body_refuses_one_byte_over_the_limit_whether_declared_or_not():
    seen, sent = [], Sent()
    guard = ReadBody(echo_app(seen), limit=10, timeout=5, budget=100)
    asyncio.run(guard(HTTP, events(chunk(b"123456", True), chunk(b"78901", False)), sent))
    assert sent.status == 413 and seen == [] and guard.held == 0
    assert sent.json == {"error": "the request body is over 10 bytes, over the limit of 10 "
                                  "bytes; send fewer or shorter texts per request"}
    assert sent.headers[b"connection"] == b"close"

    declared = Sent()
    scope = {**HTTP, "headers": [(b"content-length", b"11")]}
    asyncio.run(guard(scope, events(), declared))
    assert declared.status == 413
    assert declared.json["error"].startswith("the request body is 11 bytes, over the limit")
    at_limit = Sent()
    scope = {**HTTP, "headers": [(b"content-length", b"10")]}
    asyncio.run(guard(scope, events(chunk(b"1234567890", False)), at_limit))
    assert at_limit.status == 200


def test_read_body_times_out_a_slow_body_with_408():
    seen, sent = [], Sent()
    guard = ReadBody(echo_app(seen), limit=10, timeout=0.1, budget=100)
    asyncio.run(guard(HTTP, events(chunk(b"1", True), chunk(b"2", False), wait=0.06), sent))
    assert sent.status == 408 and seen == [] and guard.held == 0
    assert sent.json == {"error": "the request body took over 0.1 s to arrive; send it at once"}
    assert sent.headers[b"connection"] == b"close"


def test_read_body_sends_nothing_to_a_client_that_left_or_a_dead_connection():
    seen, sent = [], Sent()
    guard = ReadBody(echo_app(seen), limit=10, timeout=5, budget=100)
    asyncio.run(guard(HTTP, events(chunk(b"12", True)), sent))  # then disconnect

    async def dead():
        raise OSError("gone")

    asyncio.run(guard(HTTP, dead, sent))
    assert sent.messages == [] and seen == [] and guard.held == 0


def test_read_body_holds_at_most_its_budget():
    seen, sent = [], Sent()
    guard = ReadBody(echo_app(seen), limit=10, timeout=5, budget=10)
    guard.held = 4  # other requests' bodies
    asyncio.run(guard(HTTP, events(chunk(b"123456", False)), sent))
    assert sent.status == 200 and guard.held == 4
    refused = Sent()
    asyncio.run(guard(HTTP, events(chunk(b"1234567", False)), refused))
    assert refused.status == 503 and guard.held == 4
    assert refused.json == {"error": "the server holds too many request bodies; retry shortly"}
    assert refused.headers[b"retry-after"] == b"1"
    assert refused.headers[b"connection"] == b"close"


def test_read_body_takes_a_message_without_body_or_more_body_as_empty_and_last():
    # ASGI lets a server leave out "body" (default b"") and "more_body" (default False)
    seen, sent = [], Sent()
    guard = ReadBody(echo_app(seen), limit=10, timeout=5, budget=100)
    asyncio.run(guard(HTTP, events({"type": "http.request", "more_body": True},
                                   {"type": "http.request", "body": b"12"},
                                   {"type": "http.request", "body": b"never read"}), sent))
    assert seen == [{"type": "http.request", "body": b"12", "more_body": False},
                    {"type": "http.request", "body": b"never read"}]
    assert sent.status == 200 and guard.held == 0


def test_guards_pass_other_scopes_through():
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["type"])

    recorded = []
    lifespan = {"type": "lifespan"}
    for guard in (ReadBody(app, 1, 1, 1), RequireKey(app, ("k",)),
                  Observe(app, lambda *a: recorded.append(a), frozenset())):
        asyncio.run(guard(lifespan, events(), Sent()))
    assert calls == ["lifespan"] * 3 and recorded == []


def test_observe_records_route_and_status_whatever_answers():
    recorded = []
    observe = lambda app: Observe(app, lambda *a: recorded.append(a[:2]),  # noqa: E731
                                  frozenset({"/ok"}))

    async def answers(scope, receive, send):
        await send({"type": "http.response.start", "status": 201, "headers": []})

    async def breaks(scope, receive, send):
        raise ValueError("boom")

    async def answers_then_breaks(scope, receive, send):
        await answers(scope, receive, send)
        raise ValueError("boom")

    async def silent(scope, receive, send):
        return None

    for app, path in ((answers, "/ok"), (answers, "/nope"), (silent, "/ok")):
        asyncio.run(observe(app)({"type": "http", "path": path}, events(), Sent()))
    for app in (breaks, answers_then_breaks):
        with pytest.raises(ValueError):
            asyncio.run(observe(app)({"type": "http", "path": "/ok"}, events(), Sent()))
    assert recorded == [("/ok", 201), ("other", 201), ("/ok", 499), ("/ok", 500), ("/ok", 201)]
    timed = []
    asyncio.run(Observe(answers, lambda *a: timed.append(a[2]), frozenset())(
        {"type": "http", "path": "/"}, events(), Sent()))
    assert 0 <= timed[0] < 5  # seconds the request took


def test_wait_for_disconnect_returns_on_disconnect_only():
    given = []

    async def receive():
        given.append(len(given))
        return {"type": "http.disconnect" if len(given) == 3 else "http.request", "body": b""}

    asyncio.run(asyncio.wait_for(wait_for_disconnect(receive), 5))
    assert given == [0, 1, 2]  # read past the other events, up to the disconnect


# --- options and flags -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["max_batch_size", "max_texts", "max_chars", "max_body_bytes",
                                  "max_queued_texts", "replicas"])
def test_counts_must_be_whole_numbers_of_at_least_one(name):
    flag = name.replace("_", "-")
    for bad in (0, True, 2.0, "3"):
        with pytest.raises(Hm3Error, match=f"^--{flag} must be a whole number of at least 1, "
                                           f"got {bad!r}$".replace("(", r"\(").replace(")", r"\)")):
            ServeOptions(**{name: bad}).check()
    values = {name: 1, **({"ray": True} if name == "replicas" else {})}
    if name in ("max_texts", "max_queued_texts"):
        values = {"max_texts": 1, "max_queued_texts": 1}
    ServeOptions(**values).check()


@pytest.mark.parametrize("name, least", [("max_wait_ms", 0.0), ("drain_seconds", 0.0),
                                         ("request_timeout", None), ("header_timeout", None),
                                         ("body_timeout", None), ("replica_cpus", None)])
def test_durations_must_be_finite_and_positive_or_zero(name, least):
    flag = name.replace("_", "-")
    need = "0 or more" if least is not None else "more than 0"
    for bad in (float("inf"), float("nan"), -0.5) + ((0.0,) if least is None else ()):
        with pytest.raises(Hm3Error, match=f"^--{flag} must be a finite number, {need}, got"):
            ServeOptions(**{name: bad}).check()
    ServeOptions(**{name: 0.0 if least is not None else 0.001}).check()


def test_other_options_are_checked_naming_the_flag():
    assert ServeOptions().check() == ServeOptions()
    for port in (0, 65535):
        ServeOptions(port=port).check()
    for port in (-1, 65536):
        with pytest.raises(Hm3Error, match=rf"^--port must be in \[0, 65535\], got {port}$"):
            ServeOptions(port=port).check()
    with pytest.raises(Hm3Error, match=r"^--max-queued-texts \(9\) must be at least --max-texts "
                                       r"\(10\)"):
        ServeOptions(max_texts=10, max_queued_texts=9).check()
    ServeOptions(max_texts=10, max_queued_texts=10).check()
    with pytest.raises(Hm3Error, match="^unknown backend 'tf'; choose one of torch, onnx, "
                                       "openvino$"):
        ServeOptions(backend="tf").check()
    for backend in ("torch", "onnx", "openvino", None):
        ServeOptions(backend=backend).check()
    with pytest.raises(Hm3Error, match="^--log-level must be one of debug, info, warning, error, "
                                       "got 'loud'$"):
        ServeOptions(log_level="loud").check()
    for key in ("", "a\tb"):
        with pytest.raises(Hm3Error, match=r"^an API key must be non-empty and hold no spaces "
                                           r"\(from --api-key or \$HM3_API_KEYS\)$"):
            ServeOptions(api_keys=("good", key)).check()
    with pytest.raises(Hm3Error, match="^--replicas and --ray-address are for Ray Serve"):
        ServeOptions(ray_address="auto").check()
    ServeOptions(ray=True, replicas=3, ray_address="auto").check()


def test_the_body_limit_follows_max_chars_or_the_flag():
    assert ServeOptions(max_chars=10).body_limit == 2 * 1024 * 1024  # at least 2 MB
    assert ServeOptions().body_limit == 12 * 200_000 + 16 * 256 + 65536
    assert ServeOptions(max_body_bytes=5).body_limit == 5
    # 12 bytes a character, 16 a text, 64 KiB for the rest
    assert ServeOptions(max_chars=1_000_000, max_texts=100).body_limit == \
        12_000_000 + 1600 + 65536


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_flags_default_to_the_options_defaults():
    assert ServeOptions.from_args(parsed(), environ={}) == ServeOptions()


def test_every_flag_reaches_its_option():
    args = parsed("--host", "0.0.0.0", "--port", "9", "--backend", "onnx", "--max-batch-size",
                  "7", "--max-wait-ms", "2.5", "--max-texts", "11", "--max-chars", "999",
                  "--max-body-bytes", "5000", "--max-queued-texts", "12", "--request-timeout",
                  "3", "--header-timeout", "4", "--body-timeout", "5", "--policy", "p.yaml",
                  "--drain-seconds", "6", "--log-level", "error", "--no-length-split",
                  "--api-key", "a", "--api-key", "b", "--cors-allow-origin", "http://x",
                  "--forwarded-allow-ips", "10.0.0.1", "--docs", "--ray", "--replicas", "2",
                  "--replica-cpus", "0.5", "--ray-address", "auto")
    got = ServeOptions.from_args(args, environ={"HM3_API_KEYS": " b, c ,,"})
    assert got == ServeOptions(
        host="0.0.0.0", port=9, backend="onnx", max_batch_size=7, max_wait_ms=2.5,
        max_texts=11, max_chars=999, max_body_bytes=5000, max_queued_texts=12,
        request_timeout=3.0, header_timeout=4.0, body_timeout=5.0, policy="p.yaml",
        drain_seconds=6.0, log_level="error", length_split=False, api_keys=("a", "b", "c"),
        cors_allow_origins=("http://x",), forwarded_allow_ips=("10.0.0.1",), docs=True,
        ray=True, replicas=2, replica_cpus=0.5, ray_address="auto")
    with pytest.raises(Hm3Error, match="--max-texts must be a whole number"):
        ServeOptions.from_args(parsed("--max-texts", "0"), environ={})


def test_the_help_gives_each_flags_default():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    helps = {action.dest: action.help for action in parser._actions}
    defaults = ServeOptions()
    for name in ("host", "port", "max_batch_size", "max_texts", "max_chars", "max_queued_texts",
                 "request_timeout", "header_timeout", "body_timeout", "drain_seconds",
                 "replicas", "replica_cpus"):
        value = getattr(defaults, name)
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert f"default {shown}" in helps[name], name
    assert "default 0" in helps["max_wait_ms"] and "default 2 MB" in helps["max_body_bytes"]
    assert "HM3_API_KEYS" in helps["api_keys"]
    for name in ("backend", "policy", "length_split", "cors_allow_origins",
                 "forwarded_allow_ips", "docs", "ray", "ray_address"):
        assert helps[name], name
    with pytest.raises(SystemExit):  # an unknown level is refused by the parser
        parser.parse_args(["--log-level", "loud"])


def test_api_keys_from_the_environment_alone():
    assert ServeOptions.from_args(parsed(), environ={"HM3_API_KEYS": "k1,k2"}).api_keys == \
        ("k1", "k2")


# --- the policy file -------------------------------------------------------------------------

def test_a_policy_reads_labels_and_thresholds():
    rules = parse_policy({"spam": {"flag": "spam"}, "tox": {"flag": ["insult", "threat"],
                                                            "threshold": 1}}, GROUPS)
    assert rules == {"spam": TaskRule(("spam",), 0.5), "tox": TaskRule(("insult", "threat"), 1.0)}
    assert isinstance(rules["tox"].threshold, float)
    assert parse_policy({"spam": {"flag": ["spam"], "threshold": 0}}, GROUPS)["spam"].threshold \
        == 0.0
    assert TaskRule(("insult", "threat"), 0.6).to_dict() == {"flag": ["insult", "threat"],
                                                             "threshold": 0.6}
    rule = TaskRule(("insult", "threat"), 0.6)
    assert rule.fires({"insult": 0.1, "threat": 0.6})  # any of the labels
    assert not rule.fires({"insult": 0.59, "threat": 0.1})


@pytest.mark.parametrize("raw, message", [
    ([], "policy: expected a mapping of task -> {flag: [labels], threshold: p}, e.g. "
         "`spam: {flag: [spam]}`"),
    ({}, "policy: expected a mapping"),
    ({"ham": {"flag": ["spam"]}}, "policy: the model has no task 'ham'; its tasks are spam, tox"),
    ({"spam": ["spam"]}, "policy: spam: expected {flag: [labels], threshold: p}"),
    ({"spam": {"flag": ["spam"], "level": 1, "at": 2}},
     "policy: spam: unknown key(s) at, level; allowed: flag, threshold"),
    ({"spam": {"threshold": 0.5}}, "policy: spam: `flag` must list labels of the task (ham, "
                                   "spam), got None"),
    ({"spam": {"flag": []}}, "policy: spam: `flag` must list labels"),
    ({"spam": {"flag": ("spam",)}}, "policy: spam: `flag` must list labels"),
    ({"tox": {"flag": ["insult", "rude"]}}, "policy: tox: `flag` must list labels of the task "
                                            "(insult, threat), got ['insult', 'rude']"),
    ({"spam": {"flag": "spam", "threshold": True}},
     "policy: spam: threshold must be a probability in [0, 1], got True"),
    ({"spam": {"flag": "spam", "threshold": "0.5"}}, "policy: spam: threshold must be"),
    ({"spam": {"flag": "spam", "threshold": 1.01}}, "policy: spam: threshold must be"),
    ({"spam": {"flag": "spam", "threshold": -0.01}}, "policy: spam: threshold must be"),
])
def test_a_bad_policy_says_what_is_wrong(raw, message):
    with pytest.raises(Hm3Error) as error:
        parse_policy(raw, GROUPS)
    assert str(error.value).startswith(message)


def test_the_example_of_an_empty_policy_is_the_first_tasks_last_label():
    with pytest.raises(Hm3Error, match=r"e\.g\. `topic: \{flag: \[sport\]\}`$"):
        parse_policy(None, [TaskGroup("topic", ("news", "film", "sport"), 0)])


def test_a_policy_file_is_read_and_its_errors_name_it(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("spam: {flag: [spam], threshold: 0.8}\n")
    assert load_policy(path, GROUPS) == {"spam": TaskRule(("spam",), 0.8)}
    path.write_text("tox: {flag: [bad]}\n")
    with pytest.raises(Hm3Error, match=f"^{path}: tox: `flag`"):
        load_policy(str(path), GROUPS)
    path.write_text("spam: [unclosed\n")
    with pytest.raises(Hm3Error, match=f"^{path} is not valid YAML/JSON: "):
        load_policy(path, GROUPS)
    with pytest.raises(Hm3Error, match=f"^cannot read the policy file {tmp_path / 'no.yaml'}: "
                                       "No such file or directory$"):
        load_policy(tmp_path / "no.yaml", GROUPS)


# --- the process: what is checked before serving, and how uvicorn is run --------------------

class Loaded(Fake):
    """A loaded classifier as `check_model` sees it: a config, a tokenizer of `tokens` entries,
    and `logits` (fixed, or an exception to raise)."""

    def __init__(self, vocab=100, positions=64, tokens=100, groups=None, logits=None):
        super().__init__()
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab,
                                                            max_position_embeddings=positions))
        self.tokenizer = [0] * tokens
        if groups is not None:
            self.groups = groups
        self.logits_calls = []
        self.fixed = logits

    def logits(self, texts, batch_size):
        self.logits_calls.append((texts, batch_size))
        if isinstance(self.fixed, Exception):
            raise self.fixed
        return np.zeros((len(texts), 4)) if self.fixed is None else self.fixed


def refusal(classifier, model="m") -> str:
    with pytest.raises(Hm3Error) as error:
        check_model(classifier, model)
    return str(error.value)


@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_a_model_folder_needs_one_of_the_tokenizer_files(tmp_path, name):
    assert refusal(Loaded(), str(tmp_path)) == (
        f"{tmp_path} has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.txt, "
        "...); copy the tokenizer of the model it was trained from into the folder")
    (tmp_path / name).write_text("{}")
    check_model(Loaded(), str(tmp_path))


def test_a_tokenizer_file_must_be_a_file_and_a_hub_id_is_not_looked_at(tmp_path):
    (tmp_path / "tokenizer.json").mkdir()
    assert "has no tokenizer files" in refusal(Loaded(), str(tmp_path))
    check_model(Loaded(), str(tmp_path / "owner-model"))  # not a folder here


def test_the_tokenizer_must_fit_the_embeddings():
    assert refusal(Loaded(vocab=100, tokens=101)) == (
        "m: the tokenizer has 101 tokens but the model embeds 100: it is not this model's "
        "tokenizer")
    check_model(Loaded(vocab=100, tokens=100), "m")
    check_model(Loaded(vocab=None, tokens=1000), "m")
    bare = Loaded()
    bare.model.config = SimpleNamespace()  # a config without either size is not checked
    check_model(bare, "m")


def test_max_length_must_fit_the_positions():
    assert refusal(Loaded(positions=15)) == ("--max-length 16 is over the 15 positions m has; "
                                             "lower it")
    check_model(Loaded(positions=16), "m")
    check_model(Loaded(positions=None), "m")


def test_the_task_layout_must_tile_the_logits():
    a = TaskGroup("a", ("x", "y"), 0)
    assert refusal(Loaded(groups=[a, TaskGroup("b", ("x", "y"), 3)])) == (
        "m: the task layout is broken at task 'b' (logits 3..5, expected to start at 2); "
        "re-merge or fix the `hm3` block of config.json")
    assert "broken at task 'a' (logits 1..3, expected to start at 0)" in refusal(
        Loaded(groups=[TaskGroup("a", ("x", "y"), 1)]))
    assert "broken at task 'e'" in refusal(Loaded(groups=[a, TaskGroup("e", (), 2)]))
    assert refusal(Loaded(logits=np.zeros((2, 5)))) == (
        "m: the task layout covers 4 logits but the model gives 5; re-merge or fix the `hm3` "
        "block of config.json")


def test_a_text_of_max_length_tokens_is_run_and_must_give_finite_scores():
    loaded = Loaded()
    check_model(loaded, "m")
    assert loaded.logits_calls == [([" ".join(["hello"] * 32), "hello"], 2)]
    for bad in (np.nan, np.inf):
        logits = np.zeros((2, 4))
        logits[1, 3] = bad
        assert refusal(Loaded(logits=logits)) == ("m gives non-finite scores on a warm-up text: "
                                                  "its weights are corrupt")
    message = refusal(Loaded(logits=ValueError(" " + "x" * 300 + " ")))
    assert message == (f"m fails on a text of 16 tokens (ValueError: {'x' * 200}); if the model "
                       "has fewer positions, lower --max-length")


def test_load_backend_checks_the_kind_of_folder(monkeypatch):
    from hm3.serve import server

    calls = []

    def loading(kind, error=None):
        def load(model, **kwargs):
            calls.append((model, kwargs))
            if error is not None:
                raise error
            classifier = Fake()
            classifier.model = SimpleNamespace(kind="ONNX", **({"backend": kind} if kind else {}))
            return classifier
        monkeypatch.setattr(server, "load", load)

    loading(None)
    with pytest.raises(Hm3Error, match="^unknown backend 'tf'; choose one of torch, onnx"):
        server.load_backend("m", "tf")
    assert calls == []
    assert isinstance(server.load_backend("m", None, "cpu", 8, "bf16"), Fake)
    assert calls == [("m", {"device": "cpu", "max_length": 8, "precision": "bf16"})]
    assert isinstance(server.load_backend("m", "torch"), Fake)
    with pytest.raises(Hm3Error) as error:
        server.load_backend("m", "onnx")
    assert str(error.value) == ("m is a PyTorch model; export it first with `hm3 export m -o "
                                "MODEL-onnx --format onnx`, then serve that folder")
    loading("onnx")
    assert isinstance(server.load_backend("m", "onnx"), Fake)
    with pytest.raises(Hm3Error) as error:
        server.load_backend("m", "openvino")
    assert str(error.value) == ("m is an ONNX export; serve it with --backend onnx, or serve the "
                                "PyTorch model it was exported from")
    loading(None, OSError(" bad header\nsecond line"))
    with pytest.raises(Hm3Error, match="^cannot load m: OSError: bad header$"):
        server.load_backend("m")
    loading(None, OSError())
    with pytest.raises(Hm3Error, match="^cannot load m: OSError: $"):
        server.load_backend("m")
    loading(None, Hm3Error("its own words"))
    with pytest.raises(Hm3Error, match="^its own words$"):
        server.load_backend("m")


def test_load_checked_refuses_what_check_model_refuses(monkeypatch, tmp_path):
    from hm3.serve import server

    calls = []
    monkeypatch.setattr(server, "load", lambda model, **kwargs: calls.append(kwargs) or Loaded())
    assert isinstance(server.load_checked("m", "torch", "cpu", 8, "bf16"), Loaded)
    assert calls == [{"device": "cpu", "max_length": 8, "precision": "bf16"}]
    monkeypatch.setattr(server, "load", lambda model, **kwargs: Loaded(tokens=101))
    with pytest.raises(Hm3Error, match="the tokenizer has 101 tokens"):
        server.load_checked("m")


def test_serve_runs_uvicorn_with_the_options(monkeypatch, tmp_path, capsys):
    from hm3.serve import server

    fake = Fake()
    fake.model = SimpleNamespace(backend="onnx", precision="bf16", detected=["FP32", "BF16"])
    loaded, configs = [], []
    monkeypatch.setattr(server, "load_checked", lambda *args: loaded.append(args) or fake)

    class Recorder:
        def __init__(self, config):
            configs.append(config)

        def run(self):
            pass

    monkeypatch.setattr(server.uvicorn, "Server", Recorder)
    policy = tmp_path / "p.yaml"
    policy.write_text("spam: {flag: spam, threshold: 0.7}\n")
    chosen = ServeOptions(host="0.0.0.0", port=1234, backend="onnx", log_level="warning",
                          drain_seconds=7, forwarded_allow_ips=("10.0.0.1",), header_timeout=3,
                          policy=str(policy), length_split=False, max_texts=7)
    server.serve("some/dir/m/", chosen, device="cpu", max_length=8, precision="auto")
    assert loaded == [("some/dir/m/", "onnx", "cpu", 8, "auto")]
    assert capsys.readouterr().err == ("hm3 serve: m on onnx at bf16 (auto: this CPU lists BF16) "
                                       "precision\n")
    config = configs[0]
    assert (config.host, config.port, config.log_level) == ("0.0.0.0", 1234, "warning")
    assert config.timeout_graceful_shutdown == 7 and config.server_header is False
    assert config.proxy_headers is True and config.forwarded_allow_ips == ["10.0.0.1"]
    assert issubclass(config.http, server.H11Protocol)

    async def scenario(client):
        return (await client.get("/v1/tasks")).json()

    tasks = run(config.app, scenario)
    assert (tasks["model"], tasks["backend"], tasks["precision"]) == ("m", "onnx", "bf16")
    assert tasks["tasks"][0]["policy"] == {"flag": ["spam"], "threshold": 0.7}
    assert tasks["limits"]["max_texts"] == 7  # the options reach the app

    # what answers before the app (a late or malformed request) is counted in its metrics
    protocol = config.http.__new__(config.http)
    protocol._send_raw = lambda status, body: None
    protocol.send_400_response("bad")
    delays = []
    protocol.loop = SimpleNamespace(call_later=lambda delay, call: delays.append(delay))
    protocol.transport = SimpleNamespace(is_closing=lambda: False)
    protocol._header_timer = None
    protocol._arm_header_timer()
    assert delays == [3]  # --header-timeout

    async def metrics(client):
        return (await client.get("/metrics")).text

    assert 'hm3_requests_total{route="other",status="400"} 1.0' in run(config.app, metrics)

    fake.model = SimpleNamespace()  # a PyTorch model: no backend or precision of its own
    server.serve("m", ServeOptions())
    assert configs[1].proxy_headers is False
    tasks = run(configs[1].app, scenario)
    assert (tasks["model"], tasks["backend"], tasks["precision"]) == ("m", "torch", "f32")
    assert tasks["limits"]["max_texts"] == 256 and "policy" not in tasks["tasks"][0]
    assert capsys.readouterr().err == "hm3 serve: m on torch at f32 precision\n"
    with pytest.raises(Hm3Error, match="--port must be in"):
        server.serve("m", ServeOptions(port=-1))
    assert len(loaded) == 2


def test_the_guarded_protocol_closes_late_headers_and_answers_bad_http_with_json():
    import socket
    import time

    import uvicorn

    from hm3.serve.server import guarded_protocol

    from conftest import free_port

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    rejected = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           http=guarded_protocol(0.3, rejected.append),
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)

        def exchange(data: bytes, wait: float = 0.0) -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(10)
                start = time.monotonic()
                for part in data.split(b"|"):
                    sock.sendall(part)
                    time.sleep(wait)
                received = b""
                while chunk := sock.recv(4096):
                    received += chunk
                return received, time.monotonic() - start

        idle, waited = exchange(b"")
        assert idle == b"" and 0.25 < waited < 5  # closed at the header deadline
        slow, _ = exchange(b"GET / HTTP/1.1\r\n|Host: x\r\n|\r\n", wait=0.2)
        assert slow == b""  # the headers took 0.4 s in all
        bad, _ = exchange(b"NOT HTTP AT ALL\r\n\r\n")
        head, _, body = bad.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
        assert b"\r\nconnection: close" in head.lower()  # the client is told, then it closes
        assert json.loads(body)["error"].endswith("(malformed HTTP, or headers over the size "
                                                  "limit)")
        good, _ = exchange(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 0.5)
        assert good.startswith(b"HTTP/1.1 200") and b"\r\nok\r\n" in good  # headers in time
        assert rejected == [408, 408, 400]
    finally:
        server.should_exit = True
        thread.join(10)

"""`hm3 serve` as a server: a real process on a free port, a real HTTP client, concurrent load."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hm3 import load  # noqa: E402
from hm3.cli import main  # noqa: E402
from hm3.errors import Hm3Error  # noqa: E402
from hm3.heads import TaskGroup  # noqa: E402
from hm3.serve.batching import MicroBatcher  # noqa: E402
from hm3.serve.policy import parse_policy  # noqa: E402

from conftest import SERVED_TASKS as TASKS, Server, texts_for  # noqa: E402


@pytest.fixture(scope="module")
def merged(served_model) -> Path:
    return served_model


@pytest.fixture(scope="module")
def server(merged, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text("sentiment: {flag: [positive], threshold: 0.0}\n"
                      "topic: {flag: [news], threshold: 1.0}\n"
                      "tox: {flag: [insult, threat], threshold: 0.5}\n")
    srv = Server(merged, "--max-texts", "8", "--max-chars", "400", "--max-batch-size", "16",
                 "--max-wait-ms", "20", "--policy", str(policy))
    yield srv
    srv.stop()


def assert_matches(result: dict, expected: dict, tasks=TASKS) -> None:
    assert list(result) == list(tasks)
    for task in tasks:
        got, want = result[task], expected[task]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
        assert got["label"] == want["label"]
        if not isinstance(want["label"], list):  # single-label: one softmax over the task's labels
            assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_classify_gives_every_task_per_text_in_order(server, merged):
    texts = texts_for(1, 5)
    expected = load(merged, device="cpu").predict(texts)
    response = httpx.post(server.url + "/v1/classify", json={"texts": texts}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["results"]) == len(texts)
    for result, want in zip(body["results"], expected):
        assert_matches({t: {k: v for k, v in r.items() if k != "flagged"}
                        for t, r in result.items()}, want)
    # the policy: sentiment always fires (threshold 0), topic never (P < 1), tox by its sigmoids
    for result, fired in zip(body["results"], body["flagged"]):
        tox = max(result["tox"]["probabilities"].values()) >= 0.5
        assert fired == ["sentiment"] + (["tox"] if tox else [])
        assert result["sentiment"]["flagged"] is True and result["topic"]["flagged"] is False


def test_tasks_subset_and_layout(server):
    response = httpx.post(server.url + "/v1/classify",
                          json={"texts": ["good film"], "tasks": ["topic"]}, timeout=30)
    assert response.status_code == 200
    assert list(response.json()["results"][0]) == ["topic"]
    layout = httpx.get(server.url + "/v1/tasks").json()
    assert [t["name"] for t in layout["tasks"]] == list(TASKS)
    assert [t["labels"] for t in layout["tasks"]] == list(TASKS.values())
    assert layout["tasks"][2]["multi_label"] is True
    assert layout["max_length"] == 32  # the tiny tokenizer's limit
    assert layout["tasks"][0]["policy"] == {"flag": ["positive"], "threshold": 0.0}
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/classify" in spec["paths"]
    assert httpx.get(server.url + "/docs").status_code == 404  # off unless --docs (CDN assets)


def test_long_text_is_truncated_not_refused(server):
    text = " ".join(["good"] * 79)  # 79 tokens, past the tiny model's 32; 394 characters
    response = httpx.post(server.url + "/v1/classify", json={"texts": [text]}, timeout=30)
    assert response.status_code == 200
    assert set(response.json()["results"][0]) == set(TASKS)


def test_concurrent_clients_are_batched_and_answered_in_order(server, merged):
    before = httpx.get(server.url + "/metrics").text
    requests = [texts_for(seed, 1 + seed % 4) for seed in range(48)]
    model = load(merged, device="cpu")
    expected = [model.predict(texts) for texts in requests]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/classify", json={"texts": texts})
                                          for texts in requests))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(requests)
    for response, want in zip(responses, expected):
        results = response.json()["results"]
        assert len(results) == len(want)
        for result, one in zip(results, want):
            assert_matches({t: {k: v for k, v in r.items() if k != "flagged"}
                            for t, r in result.items()}, one)
    after = httpx.get(server.url + "/metrics").text
    batches = metric(after, "hm3_batch_size_count") - metric(before, "hm3_batch_size_count")
    texts = metric(after, "hm3_batch_size_sum") - metric(before, "hm3_batch_size_sum")
    assert texts == sum(map(len, requests))
    assert batches < texts  # some forward passes served several clients' texts
    assert metric(after, "hm3_request_seconds_count") > metric(before, "hm3_request_seconds_count")


@pytest.mark.parametrize("body, status, needle", [
    (b'{"texts": ["good"', 422, "not valid JSON"),
    (b'{"texts": "good"}', 422, "texts"),
    (b'{"text": ["good"]}', 422, "texts"),
    (b'{"texts": [1, "good"]}', 422, "texts.0"),
    (b'{"texts": []}', 422, "texts"),
    (b'{"texts": ["good"], "tasks": "topic"}', 422, "tasks"),
    (b'{"texts": ["good"], "tasks": ["topic", "spam"]}', 422, "sentiment, topic, tox"),
    (json.dumps({"texts": ["good"] * 9}).encode(), 413, "limit is 8"),
    (json.dumps({"texts": ["good " * 100]}).encode(), 413, "limit is 400"),
    (json.dumps({"texts": ["x" * 4_000_000]}).encode(), 413, "over the limit"),
])
def test_bad_requests_get_clear_errors_and_the_server_stays_up(server, body, status, needle):
    response = httpx.post(server.url + "/v1/classify", content=body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]
    assert httpx.get(server.url + "/health").status_code == 200
    ok = httpx.post(server.url + "/v1/classify", json={"texts": ["good news"]}, timeout=30)
    assert ok.status_code == 200


def test_bad_requests_mixed_into_load_lose_no_good_request(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            calls = []
            for i in range(30):
                if i % 3 == 0:
                    calls.append(client.post("/v1/classify", content=b'{"texts": [',
                                             headers={"Content-Type": "application/json"}))
                else:
                    calls.append(client.post("/v1/classify", json={"texts": texts_for(i, 2)}))
            return await asyncio.gather(*calls)

    statuses = [r.status_code for r in asyncio.run(run())]
    assert statuses == [422 if i % 3 == 0 else 200 for i in range(30)]


def test_sigterm_drains_in_flight_requests(merged):
    srv = Server(merged, "--max-wait-ms", "1500", "--max-batch-size", "64")
    answers = []
    thread = threading.Thread(target=lambda: answers.append(httpx.post(
        srv.url + "/v1/classify", json={"texts": ["good film", "bad news"]}, timeout=60)))
    thread.start()
    time.sleep(0.5)  # the request now waits in the batcher (1.5 s for company)
    srv.process.send_signal(signal.SIGTERM)
    thread.join(60)
    # uvicorn re-raises the signal once it has drained, so the exit reads as SIGTERM's
    assert srv.process.wait(60) in (0, -signal.SIGTERM)
    assert len(answers) == 1 and answers[0].status_code == 200
    assert len(answers[0].json()["results"]) == 2


def test_serve_refuses_a_bad_policy_and_a_wrong_backend(merged, tmp_path, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("spam: {flag: [spam]}\n")
    assert main(["serve", str(merged), "--policy", str(policy)]) == 2
    assert "no task 'spam'; its tasks are sentiment, topic, tox" in capsys.readouterr().err
    assert main(["serve", str(merged), "--backend", "onnx"]) == 2
    assert "hm3 export" in capsys.readouterr().err


def test_policy_checks_labels_and_thresholds():
    groups = [TaskGroup("spam", ("ham", "spam"), 0)]
    assert parse_policy({"spam": {"flag": "spam"}}, groups)["spam"].threshold == 0.5
    for bad, needle in [({"spam": {"flag": ["junk"]}}, "must list labels of the task (ham, spam)"),
                        ({"spam": {"flag": ["spam"], "threshold": 2}}, "probability in [0, 1]"),
                        ({"spam": {"flag": ["spam"], "level": 1}}, "unknown key(s) level"),
                        ([], "expected a mapping")]:
        with pytest.raises(Hm3Error, match=re.escape(needle)):
            parse_policy(bad, groups)


def test_micro_batcher_groups_concurrent_callers_and_keeps_order():
    seen = []

    def run(texts):
        seen.append(list(texts))
        return [text.upper() for text in texts]

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=4, max_wait_ms=50)
        await batcher.start()
        answers = await asyncio.gather(*(batcher.submit([f"a{i}", f"b{i}"]) for i in range(5)))
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [[f"A{i}", f"B{i}"] for i in range(5)]
    assert [len(batch) for batch in seen] == [4, 4, 2]


CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_playground_page_in_a_real_browser(server):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (the test extra has it)")
    texts = ["good film great", "free money win call now"]
    want = httpx.post(server.url + "/v1/classify", json={"texts": texts}, timeout=30).json()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("topic [news, sport, film]")
            page.click("#classify")
            sync_api.expect(page.locator("#error")).to_have_text("Type a text first.")
            page.fill("#texts", "\n".join(texts))
            page.click("#classify")
            tables = page.locator("table.result")
            sync_api.expect(tables).to_have_count(2)
            for i, table in enumerate(tables.all()):
                rows = table.locator("tr.task-row")
                assert rows.locator("td.task").all_inner_texts() == list(TASKS)
                for row, task in zip(rows.all(), TASKS):
                    answer = want["results"][i][task]
                    label = row.locator("td.label").inner_text()
                    if isinstance(answer["label"], list):  # multi-label: the labels over threshold
                        assert label == (", ".join(answer["label"]) or "(none)")
                    else:
                        assert label.startswith(answer["label"] + " (")
                    assert row.locator(".bar").count() == len(TASKS[task])
            assert page.locator(".flagged").first.inner_text().startswith("flagged: sentiment")
        finally:
            browser.close()

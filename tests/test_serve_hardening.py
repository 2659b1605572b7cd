"""`hm3 serve` under abuse: each attack of issue 21 as a regression test against a real server
process on a free port, with a real HTTP client (httpx, raw sockets, the `openai` client)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hm3.cli import main  # noqa: E402
from hm3.errors import Hm3Error  # noqa: E402
from hm3.serve.batching import MicroBatcher, TextFailed  # noqa: E402
from hm3.serve.options import ServeOptions  # noqa: E402

from conftest import WORDS, Server, texts_for  # noqa: E402

KEY, ENV_KEY = "k1-secret", "k2-from-env"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"
POLICY = ("sentiment: {flag: [positive], threshold: 0.0}\n"
          "topic: {flag: [news], threshold: 1.0}\n"
          "tox: {flag: [insult, threat], threshold: 0.5}\n")


def start_guarded(served_model, folder: Path, *extra: str) -> Server:
    """A server with keys (one from the environment), CORS for one origin, a policy, small
    per-request limits and short header / body timeouts; `extra` flags after these (`--ray`)."""
    policy = folder / "policy.yaml"
    policy.write_text(POLICY)
    old = os.environ.get("HM3_API_KEYS")
    os.environ["HM3_API_KEYS"] = ENV_KEY
    try:
        return Server(served_model, "--api-key", KEY, "--policy", str(policy), "--max-texts", "8",
                      "--max-chars", "400", "--header-timeout", "1", "--body-timeout", "1.5",
                      "--cors-allow-origin", ORIGIN, "--max-wait-ms", "5", *extra)
    finally:
        if old is None:
            del os.environ["HM3_API_KEYS"]
        else:
            os.environ["HM3_API_KEYS"] = old


def start_slow(served_model, *extra: str) -> Server:
    """A server whose batches wait 2 s for company: requests queue, time out, are abandoned;
    it trusts forwarded headers from 127.0.0.1 (the tests' own address)."""
    return Server(served_model, "--max-wait-ms", "2000", "--max-batch-size", "256",
                  "--max-texts", "8", "--max-queued-texts", "8", "--request-timeout", "1",
                  "--docs", "--forwarded-allow-ips", "127.0.0.1", *extra)


@pytest.fixture(scope="module")
def guarded(served_model, tmp_path_factory):
    srv = start_guarded(served_model, tmp_path_factory.mktemp("policy"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow(served_model):
    srv = start_slow(served_model)
    yield srv
    srv.stop()


def post(srv, path="/v1/classify", headers=AUTH, **kwargs):
    return httpx.post(srv.url + path, headers=headers, timeout=30, **kwargs)


def raw(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it or `wait` passes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        return read_all(sock, wait)


def read_all(sock: socket.socket, wait: float) -> bytes:
    sock.settimeout(wait)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():  # one chunk is enough for these bodies
        body = body.split(b"\r\n", 2)[1]
    return status, json.loads(body)


def metrics(srv) -> str:
    return httpx.get(srv.url + "/metrics", headers=AUTH, timeout=30).text


def counted(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:{{([^}}]*)}})? ([0-9.e+-]+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


# 1. isolation ------------------------------------------------------------------------------

def test_a_text_the_model_cannot_take_fails_only_its_own_request(guarded):
    good = [texts_for(seed, 3) for seed in range(6)]
    bad = b'{"texts": ["good film", "\\ud800 lone surrogate", "bad"]}'

    async def run():
        async with httpx.AsyncClient(base_url=guarded.url, headers=AUTH, timeout=60) as client:
            calls = [client.post("/v1/classify", json={"texts": texts}) for texts in good]
            calls.insert(3, client.post("/v1/classify", content=bad,
                                        headers={"Content-Type": "application/json"}))
            return await asyncio.gather(*calls)

    for attempt in range(3):
        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * 3 + [422] + [200] * 3
        assert responses[3].json()["error"].startswith("texts.1: not valid Unicode")
        assert responses[3].json()["index"] == 1
        assert all(len(r.json()["results"]) == 3 for i, r in enumerate(responses) if i != 3)


def test_the_batcher_reruns_a_failing_batch_so_batch_mates_succeed():
    runs = []

    def run(texts):
        runs.append(len(texts))
        if any("poison" in t for t in texts):
            raise ValueError("cannot tokenise")
        return [t.upper() for t in texts]

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=16, max_wait_ms=50)
        await batcher.start()
        answers = await asyncio.gather(
            *(batcher.submit([f"a{i}", f"b{i}"]) for i in range(3)),
            batcher.submit(["ok", "poison", "fine"]), return_exceptions=True)
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert answers[:3] == [[f"A{i}", f"B{i}"] for i in range(3)]
    assert isinstance(answers[3], TextFailed) and answers[3].index == 1
    assert "cannot tokenise" in str(answers[3])
    assert runs[0] == 9 and len(runs) <= 1 + 2 * 4  # one batch, then halves down to the culprit


def test_a_small_request_is_not_queued_behind_every_text_of_a_large_one():
    seen = []

    def run(texts):
        seen.append(list(texts))
        return texts

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=4, max_wait_ms=50)
        await batcher.start()
        large = asyncio.ensure_future(batcher.submit([f"L{i}" for i in range(10)]))
        await asyncio.sleep(0)
        small = await batcher.submit(["s"])
        answers = await large, small
        await batcher.stop()
        return answers

    large, small = asyncio.run(scenario())
    assert large == [f"L{i}" for i in range(10)] and small == ["s"]
    assert "s" in seen[0]  # taken in turn, not after the large request's 10 texts


# 2. real limits -----------------------------------------------------------------------------

def test_a_chunked_body_is_cut_off_at_the_limit(guarded):
    limit = ServeOptions(max_texts=8, max_chars=400).body_limit
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"x" * 65536
    sent = 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        sock.connect(("127.0.0.1", guarded.port))
        # what can be in flight once the server stops reading: our send buffer and its receive
        # buffer, which the kernel may have grown up to tcp_rmem's maximum while it read
        in_flight = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + _receive_buffer_max()
        sock.sendall(head + b'a\r\n{"texts":[\r\n')  # one chunk of 10 bytes
        try:
            while sent < 50 * limit:  # a client that would send 100 MB
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_all(sock, 10)
    # the server stopped reading soon after the limit: not the whole 50 x limit
    assert sent < limit + in_flight + len(chunk) < 50 * limit
    status, body = status_and_json(answer)
    assert status == 413 and f"limit of {limit} bytes" in body["error"]
    assert httpx.get(guarded.url + "/health").status_code == 200


def _receive_buffer_max() -> int:
    try:  # Linux: min, default and max of a TCP receive buffer
        return int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 32 * 1024 * 1024


def test_a_declared_size_over_the_limit_is_refused_before_the_body(guarded):
    answer = raw(guarded.port, (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                f"{KEY}\r\nContent-Length: 999999999\r\n\r\n").encode())
    status, body = status_and_json(answer)
    assert status == 413 and "999999999 bytes" in body["error"]


def test_emoji_within_max_chars_fit_the_default_body_limit(guarded):
    options = ServeOptions()
    escaped = json.dumps({"texts": ["\U0001F600" * options.max_chars]})  # 12 bytes a character
    assert len(escaped) <= options.body_limit
    assert ServeOptions(max_body_bytes=1000).body_limit == 1000
    response = post(guarded, json={"texts": ["\U0001F600 good" * 50, "\U0001F621" * 100]})
    assert response.status_code == 200, response.text


def test_repeated_task_names_are_answered_once(guarded):
    started = time.monotonic()
    response = post(guarded, json={"texts": texts_for(1, 8), "tasks": ["topic"] * 50_000 + ["tox"]})
    assert response.status_code == 200, response.text
    assert [list(r) for r in response.json()["results"]] == [["topic", "tox"]] * 8
    assert len(response.content) < 10_000 and time.monotonic() - started < 20


# 3. backpressure and timeouts ---------------------------------------------------------------

def test_a_full_queue_answers_503_with_retry_after(slow):
    async def run():
        async with httpx.AsyncClient(base_url=slow.url, timeout=60) as client:
            first = asyncio.ensure_future(client.post("/v1/classify",
                                                      json={"texts": texts_for(2, 8)}))
            await asyncio.sleep(0.3)  # those 8 texts now fill the queue (--max-queued-texts 8)
            second = await client.post("/v1/classify", json={"texts": ["good"]})
            return await first, second

    first, second = asyncio.run(run())
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "busy" in second.json()["error"]
    assert first.status_code == 504  # --request-timeout 1 < the 2 s batch wait


def test_a_request_past_its_timeout_gets_504_and_its_texts_are_dropped(slow):
    time.sleep(2.5)  # earlier tests' batches are done
    before = metrics_plain(slow)
    response = httpx.post(slow.url + "/v1/classify", json={"texts": ["good film"] * 3}, timeout=30)
    assert response.status_code == 504 and "--request-timeout 1" in response.json()["error"]
    time.sleep(2.5)  # the batch would have run by now
    after = metrics_plain(slow)
    assert counted(after, "hm3_texts_total") == counted(before, "hm3_texts_total")


def test_work_for_a_client_that_left_is_not_computed(slow):
    time.sleep(2.5)
    before = metrics_plain(slow)
    body = json.dumps({"texts": texts_for(3, 8)}).encode()
    with socket.create_connection(("127.0.0.1", slow.port)) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.3)  # queued, waiting for its batch; then the client goes
    time.sleep(3)
    after = metrics_plain(slow)
    assert counted(after, "hm3_texts_total") == counted(before, "hm3_texts_total")
    assert counted(after, "hm3_requests_total", route="/v1/classify", status="499") == \
        counted(before, "hm3_requests_total", route="/v1/classify", status="499") + 1
    ok = httpx.post(slow.url + "/v1/classify", json={"texts": ["good"]}, timeout=30)
    assert ok.status_code == 504 or ok.status_code == 200  # the server goes on


def metrics_plain(srv) -> str:
    return httpx.get(srv.url + "/metrics", timeout=30).text


def test_idle_and_slow_header_connections_are_closed(guarded):
    socks = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(40)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
        assert httpx.get(guarded.url + "/health", timeout=5).status_code == 200
        time.sleep(2.5)  # --header-timeout 1
        for sock in socks:
            assert read_all(sock, 2) == b""  # closed by the server without an answer
    finally:
        for sock in socks:
            sock.close()


def test_a_body_sent_too_slowly_gets_408(guarded):
    started = time.monotonic()
    answer = raw(guarded.port, (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                f"{KEY}\r\nContent-Type: application/json\r\nContent-Length: 100"
                                "\r\n\r\n{\"texts\": [").encode())
    status, body = status_and_json(answer)
    assert status == 408 and "1.5 s" in body["error"]
    assert time.monotonic() - started < 8


def test_sigterm_does_not_wait_for_a_client_still_sending(served_model):
    assert stop_while_a_client_sends(served_model) < 10  # not the 60 s drain


def stop_while_a_client_sends(served_model, *extra: str) -> float:
    """Seconds from SIGTERM to exit while a client is still sending its body, with 60 s to
    drain and to send the body (the exit status checked)."""
    srv = Server(served_model, "--drain-seconds", "60", "--body-timeout", "60", *extra)
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 1000\r\n\r\n{\"texts\": [")
        time.sleep(1)
        started = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(120) in (0, -signal.SIGTERM), srv.output()[-4000:]
    return time.monotonic() - started


# 4. fail fast at start, ready means ready ---------------------------------------------------

def copy_model(served_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(served_model, folder)
    return folder


def refused(capsys, *argv: str) -> str:
    assert main(["serve", *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hm3: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_start_refuses_what_cannot_serve(served_model, tmp_path, capsys):
    assert "--max-wait-ms must be a finite number" in refused(capsys, str(served_model),
                                                              "--max-wait-ms", "inf")
    assert "--request-timeout must be a finite number" in refused(
        capsys, str(served_model), "--request-timeout", "nan")
    assert "--max-queued-texts (4) must be at least --max-texts (8)" in refused(
        capsys, str(served_model), "--max-queued-texts", "4", "--max-texts", "8")
    assert "over the 64 positions" in refused(capsys, str(served_model), "--max-length", "100")

    no_tokenizer = copy_model(served_model, tmp_path / "a")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (no_tokenizer / name).unlink()
    assert "has no tokenizer files" in refused(capsys, str(no_tokenizer))

    other_tokenizer = copy_model(served_model, tmp_path / "b")
    from transformers import BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(f"w{i}" for i in range(40))]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(other_tokenizer)
    assert "not this model's tokenizer" in refused(capsys, str(other_tokenizer))

    layout = copy_model(served_model, tmp_path / "c")
    config = json.loads((layout / "config.json").read_text())
    config["hm3"]["tasks"][-1]["offset"] += 1  # a gap in the logits
    (layout / "config.json").write_text(json.dumps(config))
    assert "task layout" in refused(capsys, str(layout))

    corrupt = copy_model(served_model, tmp_path / "d")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "cannot load" in refused(capsys, str(corrupt))

    bad_config = copy_model(served_model, tmp_path / "e")
    (bad_config / "config.json").write_text("{not json")
    refused(capsys, str(bad_config))


def test_options_checks():
    with pytest.raises(Hm3Error, match="--max-body-bytes must be a whole number"):
        ServeOptions(max_body_bytes=0).check()
    with pytest.raises(Hm3Error, match="--replicas and --ray-address are for Ray Serve"):
        ServeOptions(replicas=2).check()
    with pytest.raises(Hm3Error, match="API key must be non-empty"):
        ServeOptions(api_keys=("a b",)).check()


def test_ready_after_warm_up_health_is_liveness(guarded):
    assert httpx.get(guarded.url + "/health").json()["status"] == "ok"  # no key needed
    assert httpx.get(guarded.url + "/ready").status_code == 401
    assert httpx.get(guarded.url + "/ready", headers=AUTH).json()["status"] == "ready"


# 5. one error shape, every status counted ---------------------------------------------------

def test_every_error_is_json_and_every_request_is_counted(guarded):
    before = metrics(guarded)
    cases = [(httpx.get(guarded.url + "/nope", headers=AUTH), 404),
             (httpx.get(guarded.url + "/v1/classify", headers=AUTH), 405),
             (post(guarded, content=b'{"texts": [',
                   headers={**AUTH, "Content-Type": "application/json"}), 422),
             (post(guarded, content=b'{"texts": ["good"]}', headers={**AUTH, "Content-Type": "x"}),
              415),
             (post(guarded, json={"texts": ["good"] * 9}), 413),
             (httpx.get(guarded.url + "/v1/tasks"), 401)]
    for response, status in cases:
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert isinstance(response.json()["error"], str)
    after = metrics(guarded)
    for status in ("401", "404", "405", "413", "415", "422"):
        assert counted(after, "hm3_requests_total", status=status) > \
            counted(before, "hm3_requests_total", status=status), status
    # the latency histogram has every request the counter has (both exclude this scrape)
    assert counted(after, "hm3_request_seconds_count") == counted(after, "hm3_requests_total")
    assert re.search(r"^# TYPE hm3_requests_total counter$", after, re.M)
    assert re.search(r"^# TYPE hm3_texts_total counter$", after, re.M)


def test_malformed_http_gets_json_and_is_counted(guarded):
    before = metrics(guarded)
    status, body = status_and_json(raw(guarded.port, b"GARBAGE\r\n\r\n"))
    assert status == 400 and "malformed HTTP" in body["error"]
    after = metrics(guarded)
    assert counted(after, "hm3_requests_total", status="400") == \
        counted(before, "hm3_requests_total", status="400") + 1


# 6. access ----------------------------------------------------------------------------------

def test_every_route_but_liveness_needs_a_key(guarded):
    for path in ("/", "/v1/tasks", "/metrics", "/openapi.json", "/ready"):
        assert httpx.get(guarded.url + path).status_code == 401, path
        assert httpx.get(guarded.url + path, headers={"Authorization": "Bearer nope"}
                         ).status_code == 401
        assert httpx.get(guarded.url + path, headers=AUTH).status_code == 200, path
    response = post(guarded, headers={"Authorization": f"Basic {KEY}"}, json={"texts": ["good"]})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    from_env = post(guarded, headers={"Authorization": f"Bearer {ENV_KEY}"},
                    json={"texts": ["good"]})
    assert from_env.status_code == 200


def test_cors_only_for_the_allowed_origin_and_docs_only_with_the_flag(guarded, slow):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(guarded.url + "/v1/classify", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(guarded.url + "/v1/classify",
                          headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    off = httpx.options(slow.url + "/v1/classify", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    assert httpx.get(guarded.url + "/docs", headers=AUTH).status_code == 404
    assert httpx.get(slow.url + "/docs").status_code == 200


def test_forwarded_headers_are_trusted_only_from_the_allowed_ips(guarded, slow):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    # a redirect (the trailing slash) is built from the scheme the server believes
    untrusted = httpx.get(guarded.url + "/v1/tasks/", headers={**AUTH, **forwarded})
    assert untrusted.status_code == 307
    assert untrusted.headers["location"] == guarded.url + "/v1/tasks"
    trusted = httpx.get(slow.url + "/v1/tasks/", headers=forwarded)
    assert trusted.headers["location"] == slow.url.replace("http:", "https:") + "/v1/tasks"


def test_a_kept_alive_connection_left_idle_is_closed(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        answer = b""
        while b"}" not in answer:  # the whole answer (its JSON body ends the response)
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert read_all(sock, 15) == b""  # closed by the server, not by our 15 s
    assert time.monotonic() - started < 10  # uvicorn's keep-alive, or --header-timeout on Ray


# 7. the OpenAI moderation API ---------------------------------------------------------------

def test_moderations_through_the_openai_client(guarded):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    texts = ["good film great", "free money win call now"]
    answer = client.moderations.create(input=texts, model="hm3")
    assert answer.model == "merged" and answer.id.startswith("modr-")
    classified = post(guarded, json={"texts": texts}).json()
    for result, want in zip(answer.results, classified["results"]):
        # OpenAI's own category names are fields of the client's types: None here
        scores = result.category_scores.model_dump(exclude_none=True)
        categories = result.categories.model_dump(exclude_none=True)
        assert set(scores) == {"sentiment/positive", "topic/news", "tox/insult", "tox/threat"}
        for name, score in scores.items():
            task, label = name.split("/")
            assert score == pytest.approx(want[task]["probabilities"][label])
        assert categories["sentiment/positive"] is True  # threshold 0
        assert categories["topic/news"] is False  # threshold 1
        assert result.flagged is True
    one = client.moderations.create(input="good film")
    assert len(one.results) == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong",
                      max_retries=0).moderations.create(input="good")
    with pytest.raises(openai.APIStatusError) as too_many:
        client.moderations.create(input=["good"] * 9)
    assert too_many.value.status_code == 413
    assert "limit is 8" in too_many.value.response.json()["error"]


def test_moderations_without_a_policy_say_how_to_get_one(slow):
    response = httpx.post(slow.url + "/v1/moderations", json={"input": "good"}, timeout=30)
    assert response.status_code == 501 and "--policy" in response.json()["error"]


def test_request_bodies_held_at_once_are_bounded():
    from hm3.serve.guard import ReadBody

    answered = []

    async def app(scope, receive, send):
        body = (await receive())["body"]
        await asyncio.sleep(0.2)  # the body is held while the request is served
        answered.append(len(body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    guard = ReadBody(app, limit=100, timeout=5, budget=150)

    async def request(size: int) -> int:
        chunks = [{"type": "http.request", "body": b"x" * (size // 2), "more_body": True},
                  {"type": "http.request", "body": b"x" * (size - size // 2), "more_body": False}]
        statuses = []

        async def receive():
            await asyncio.sleep(0.01)
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await guard({"type": "http", "path": "/v1/classify", "headers": []}, receive, send)
        return statuses[0]

    async def scenario():
        return await asyncio.gather(request(80), request(80), request(101))

    first, second, too_large = asyncio.run(scenario())
    assert sorted([first, second]) == [200, 503] and too_large == 413
    assert guard.held == 0 and answered == [80]

"""`hm3 serve --ray`: the same app on Ray Serve, tested as a server on a local one-node Ray
instance (a real process, a real HTTP client, concurrent requests).

Starting Ray and its replicas takes one to a few minutes on 2 CPU cores, so the server test is
behind the slow marker (`make test-slow`, which installs the ray extra); it skips where Ray
Serve is not installed. The argument checks below are fast and stay in the default suite.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hm3 import load
from hm3.cli import main

from conftest import SERVED_TASKS as TASKS, free_port, texts_for

httpx = pytest.importorskip("httpx")
import test_serve_hardening as hardening  # noqa: E402

RAY = ("--ray", "--replica-cpus", "0.5")  # one replica: /metrics is that replica's


def test_replicas_without_ray_is_refused(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--replicas", "2"]) == 2
    assert "add --ray" in capsys.readouterr().err


def test_app_builder_checks_its_arguments():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'hm3[ray]')")
    from hm3.errors import Hm3Error
    from hm3.serve.options import ServeOptions
    from hm3.serve.ray_app import app_builder, build

    with pytest.raises(Hm3Error, match="needs model=PATH"):
        app_builder({"replicas": "2"})
    with pytest.raises(Hm3Error, match="unknown argument.*replica_count"):
        app_builder({"model": "m", "replica_count": "2"})
    with pytest.raises(Hm3Error, match="--replicas must be a whole number of at least 1"):
        build("m", ServeOptions(replicas=0))



def test_what_cannot_serve_is_refused_before_ray_starts(served_model, tmp_path, capsys):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'hm3[ray]')")
    import ray

    no_tokenizer = hardening.copy_model(served_model, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (no_tokenizer / name).unlink()
    assert "has no tokenizer files" in hardening.refused(capsys, str(no_tokenizer), "--ray")
    policy = tmp_path / "policy.yaml"
    policy.write_text("spam: {flag: [spam]}\n")
    assert "spam" in hardening.refused(capsys, str(served_model), "--ray", "--policy", str(policy))
    assert not ray.is_initialized()


def test_the_deployment_leaves_backpressure_and_draining_to_hm3s_options():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'hm3[ray]')")
    from hm3.serve.options import ServeOptions
    from hm3.serve.ray_app import ONGOING_HEADROOM, build

    application = build("m", ServeOptions(max_queued_texts=300, drain_seconds=7, replicas=3))
    config = application._bound_deployment._deployment_config
    assert config.num_replicas == 3
    assert config.max_ongoing_requests == 300 + ONGOING_HEADROOM
    assert config.max_queued_requests == 300
    assert config.graceful_shutdown_timeout_s == 7


def test_a_first_signal_asks_for_a_clean_stop_a_second_interrupts():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'hm3[ray]')")
    import threading

    from hm3.serve.ray_app import _stop_or_interrupt

    stop = threading.Event()
    _stop_or_interrupt(stop)
    assert stop.is_set()
    with pytest.raises(KeyboardInterrupt):
        _stop_or_interrupt(stop)


@pytest.mark.slow
def test_ray_serve_answers_as_the_torch_model_under_concurrent_load(served_model, tmp_path):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'hm3[ray]')")
    model = served_model
    policy = tmp_path / "policy.yaml"
    policy.write_text("tox: {flag: [insult, threat], threshold: 0.5}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")  # Ray logs a lot: a file, not a pipe that fills
    process = subprocess.Popen(
        [sys.executable, "-m", "hm3.cli", "serve", str(model), "--ray", "--replicas", "2",
         "--replica-cpus", "0.5", "--port", str(port), "--max-batch-size", "16",
         "--max-wait-ms", "20", "--max-texts", "8", "--policy", str(policy), "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_health(process, url, tmp_path)
        torch_model = load(model, device="cpu")
        requests = [texts_for(seed, 1 + seed % 4, max_words=9) for seed in range(40)]
        expected = [torch_model.predict(texts) for texts in requests]

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                good = [client.post("/v1/classify", json={"texts": texts}) for texts in requests]
                bad = [client.post("/v1/classify", json={"texts": ["good"] * 9}),
                       client.post("/v1/classify", json={"texts": ["good"], "tasks": ["spam"]})]
                return await asyncio.gather(*good, *bad)

        *responses, too_many, unknown = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * len(requests)
        for response, want, texts in zip(responses, expected, requests):
            body = response.json()
            assert len(body["results"]) == len(texts)
            for result, one, fired in zip(body["results"], want, body["flagged"]):
                assert list(result) == list(TASKS)
                for task in TASKS:
                    assert result[task]["label"] == one[task]["label"]
                    assert result[task]["probabilities"] == pytest.approx(
                        one[task]["probabilities"], abs=1e-4)
                tox = max(one["tox"]["probabilities"].values()) >= 0.5
                assert fired == (["tox"] if tox else [])
        # the same app's errors, through Ray's proxy
        assert too_many.status_code == 413 and "limit is 8" in too_many.json()["error"]
        assert unknown.status_code == 422 and "sentiment, topic, tox" in unknown.json()["error"]
        layout = httpx.get(url + "/v1/tasks", timeout=30).json()
        assert [t["name"] for t in layout["tasks"]] == list(TASKS)
        # Ray's @serve.batch gathered texts of concurrent requests on some replica
        seen = [httpx.get(url + "/metrics", timeout=30).text for _ in range(8)]
        batches = [(metric(m, "hm3_batch_size_count"), metric(m, "hm3_batch_size_sum"))
                   for m in seen]
        assert any(texts > count > 0 for count, texts in batches), batches
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        log.close()
    # served until SIGTERM, then shut Serve and the local Ray instance down
    assert code == 0, tail(tmp_path)


@pytest.mark.slow
def test_rays_own_cli_runs_the_app_builder_with_default_batching(served_model, tmp_path):
    """`serve run CONFIG` (Ray's CLI, not hm3's) builds the deployment through `app_builder`
    from a config file's arguments, with hm3's default batching (no wait for company)."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'hm3[ray]')")
    ray_cli = Path(sys.executable).with_name("serve")
    if not ray_cli.is_file():
        pytest.skip(f"Ray's `serve` command is not beside {sys.executable}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "hm3", "route_prefix": "/",
                          "import_path": "hm3.serve.ray_app:app_builder",
                          "args": {"model": str(served_model), "replicas": 1,
                                   "replica_cpus": 0.5, "device": "cpu"}}]}))
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen([str(ray_cli), "run", str(config)], stdout=log,
                               stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                               env={**os.environ, "PYTHONUNBUFFERED": "1",
                                    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"})
    try:
        wait_for_health(process, url, tmp_path)
        torch_model = load(served_model, device="cpu")
        requests = [texts_for(seed, 1 + seed % 3, max_words=9) for seed in range(12)]

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/classify", json={"texts": texts})
                                              for texts in requests))

        for response, texts in zip(asyncio.run(run()), requests):
            assert response.status_code == 200, response.text
            want = torch_model.predict(texts)
            got = response.json()["results"]
            assert [{t: r[t]["label"] for t in TASKS} for r in got] == \
                [{t: w[t]["label"] for t in TASKS} for w in want]
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends: Ray's CLI shuts Serve down
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        log.close()


def wait_for_health(process: subprocess.Popen, url: str, folder, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"the server exited: {tail(folder)}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"no answer on /health in {timeout_s:.0f} s"
        time.sleep(1)


def tail(folder) -> str:
    return (folder / "serve.log").read_text()[-4000:]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


# Issue 21's items 1-7 under Ray Serve: the plain server's own tests (test_serve_hardening.py),
# run against `hm3 serve --ray` through Ray's proxy. Left out are the HTTP server's own duties,
# which under Ray are its proxy's: header timeouts, the JSON body of a 400 for malformed HTTP, and
# not waiting at SIGTERM for a client still sending (see the tests after these).

@pytest.fixture(scope="module")
def guarded(served_model, tmp_path_factory):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'hm3[ray]')")
    srv = hardening.start_guarded(served_model, tmp_path_factory.mktemp("policy"), *RAY)
    yield srv
    assert srv.stop() == 0, srv.output()[-4000:]


@pytest.fixture(scope="module")
def slow(served_model):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'hm3[ray]')")
    srv = hardening.start_slow(served_model, *RAY)
    yield srv
    assert srv.stop() == 0, srv.output()[-4000:]


def on_ray(test):
    """`test` of test_serve_hardening.py, collected here too (slow) with this module's servers."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return test(*args, **kwargs)

    return pytest.mark.slow(run)


for _test in (
        hardening.test_a_text_the_model_cannot_take_fails_only_its_own_request,  # 1
        hardening.test_a_chunked_body_is_cut_off_at_the_limit,  # 2
        hardening.test_a_declared_size_over_the_limit_is_refused_before_the_body,
        hardening.test_emoji_within_max_chars_fit_the_default_body_limit,
        hardening.test_repeated_task_names_are_answered_once,
        hardening.test_a_full_queue_answers_503_with_retry_after,  # 3
        hardening.test_a_request_past_its_timeout_gets_504_and_its_texts_are_dropped,
        hardening.test_work_for_a_client_that_left_is_not_computed,
        hardening.test_a_body_sent_too_slowly_gets_408,
        hardening.test_ready_after_warm_up_health_is_liveness,  # 4
        hardening.test_every_error_is_json_and_every_request_is_counted,  # 5
        hardening.test_every_route_but_liveness_needs_a_key,  # 6
        hardening.test_cors_only_for_the_allowed_origin_and_docs_only_with_the_flag,
        hardening.test_forwarded_headers_are_trusted_only_from_the_allowed_ips,
        hardening.test_a_kept_alive_connection_left_idle_is_closed,
        hardening.test_moderations_through_the_openai_client,  # 7
        hardening.test_moderations_without_a_policy_say_how_to_get_one):
    globals()[_test.__name__] = on_ray(_test)


@pytest.mark.slow
def test_sigterm_does_not_wait_for_a_client_still_sending(served_model):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'hm3[ray]')")
    # shutting Serve and the local Ray instance down takes about 10 s of its own here
    assert hardening.stop_while_a_client_sends(served_model, *RAY) < 40  # not the 60 s drain

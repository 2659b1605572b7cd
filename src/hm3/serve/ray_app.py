"""The same server on Ray Serve: N replicas of `hm3.serve.app` with Ray's own request batching.

Every replica loads the model once and serves the very app `hm3 serve` runs (`create_app`: the
same routes, schema, limits, errors, policy and metrics) as its FastAPI ingress; the only part
swapped is the batcher: `RayBatcher` hands every text to a `@serve.batch` method, so Ray Serve
gathers texts from concurrent requests (`max_batch_size`, `batch_wait_timeout_s`) and the
replica runs each batch in one worker thread. Ray's proxy spreads requests over the replicas.

Two ways to run it (needs the `ray` extra: `pip install 'hm3[ray]'`):
  hm3 serve MODEL --ray --replicas 2            # a local one-node Ray instance, until Ctrl-C
  serve run hm3.serve.ray_app:app_builder model=/abs/MODEL replicas=2   # Ray's CLI / config files
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import ray
from ray import serve

from hm3.errors import Hm3Error
from hm3.serve.app import create_app
from hm3.serve.batching import check_batching, gather_texts, run_isolated
from hm3.serve.options import ServeOptions
from hm3.serve.policy import load_policy
from hm3.serve.server import load_checked

APP_NAME = "hm3"
ONGOING_HEADROOM = 64  # requests a replica takes beyond --max-queued-texts: refused, or being read


class RayBatcher:
    """`MicroBatcher`'s interface (start / stop / submit) over Ray Serve's `@serve.batch`.

    Parameters are MicroBatcher's: `run` classifies a list of texts (in one worker thread, so
    the replica's event loop keeps taking requests), `on_batch(size, seconds)` records metrics.
    """

    def __init__(self, run: Callable[[list[str]], list], max_batch_size: int = 32,
                 max_wait_ms: float = 0.0, on_batch: Callable[[int, float], None] | None = None):
        check_batching(max_batch_size, max_wait_ms)
        self.run = run
        self.on_batch = on_batch
        self._classify.set_max_batch_size(max_batch_size)
        self._classify.set_batch_wait_timeout_s(max_wait_ms / 1000.0)
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hm3-model")

    async def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, texts: Sequence[str]) -> list:
        return await gather_texts([self._classify(text) for text in texts])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify(self, texts: list[str]) -> list:
        start = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(
            self._executor, run_isolated, self.run, list(texts))
        if self.on_batch is not None:
            self.on_batch(len(texts), time.perf_counter() - start)
        return results


@serve.deployment(name=APP_NAME)
@serve.ingress()
class Hm3Deployment:
    """One replica: the model loaded and checked once, `create_app` as its ingress (built in the
    replica) with the very `ServeOptions` of `hm3 serve`."""

    def __init__(self, model: str, options: ServeOptions = ServeOptions(),
                 device: str | None = None, max_length: int | None = None,
                 precision: str | None = None):
        self.options = options.check()
        self.classifier = load_checked(model, options.backend, device, max_length, precision)
        self.rules = load_policy(options.policy, self.classifier.groups) if options.policy else None
        self.name = Path(model.rstrip("/")).name or model

    def __serve_build_asgi_app__(self):
        return create_app(self.classifier, self.options, name=self.name,
                          backend=getattr(self.classifier.model, "backend", "torch"),
                          precision=getattr(self.classifier.model, "precision", "f32"),
                          policy=self.rules, batcher=RayBatcher)


def build(model: str, options: ServeOptions = ServeOptions(), device: str | None = None,
          max_length: int | None = None, precision: str | None = None):
    """The Ray Serve application: `options.replicas` copies of `Hm3Deployment`, each reserving
    `options.replica_cpus` CPUs (its torch threads follow Ray's OMP_NUM_THREADS)."""
    options = dataclasses.replace(options, ray=True).check()
    local = Path(model)
    if local.exists():  # a replica's working directory is not ours: pass absolute paths
        model = str(local.resolve())
    if options.policy:
        options = dataclasses.replace(options, policy=str(Path(options.policy).resolve()))
    return Hm3Deployment.options(
        num_replicas=options.replicas,
        # the app's own queue bound (--max-queued-texts, 503 with Retry-After) decides, not
        # Ray's: a replica takes every request the app could queue, and a little more to refuse
        max_ongoing_requests=options.max_queued_texts + ONGOING_HEADROOM,
        # and what waits in front of full replicas is bounded too (Ray's 503 with Retry-After)
        max_queued_requests=options.max_queued_texts,
        graceful_shutdown_timeout_s=options.drain_seconds,
        ray_actor_options={"num_cpus": options.replica_cpus}).bind(model, options, device,
                                                                   max_length, precision)


def app_builder(args: dict):
    """For Ray's own CLI and config files: `serve run hm3.serve.ray_app:app_builder model=PATH
    replicas=2 max_batch_size=32 ...` (values arrive as strings; the names are `ServeOptions`'
    fields, plus model, device, max_length and precision; lists such as api_keys are
    comma-separated)."""
    args = dict(args)
    if "model" not in args:
        raise Hm3Error("app_builder needs model=PATH (a model folder every Ray node can read)")
    known = {f.name: f for f in dataclasses.fields(ServeOptions)}
    unknown = set(args) - set(known) - {"model", "device", "max_length", "precision"}
    if unknown:
        raise Hm3Error(f"app_builder: unknown argument(s) {', '.join(sorted(unknown))}; known: "
                       f"model, device, max_length, precision, {', '.join(known)}")
    values = {name: _typed(known[name], value) for name, value in args.items() if name in known}
    max_length = int(args["max_length"]) if args.get("max_length") else None
    return build(args["model"], ServeOptions(**values), args.get("device"), max_length,
                 args.get("precision"))


def _typed(field: dataclasses.Field, value: str):
    """A string from Ray's CLI as the type of the option."""
    default = field.default
    if default is None:
        return int(value) if field.type.startswith("int") else value
    if isinstance(default, bool):
        return str(value).lower() not in ("0", "false", "no")
    if isinstance(default, tuple):  # a YAML list, or comma-separated on Ray's command line
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return tuple(str(v).strip() for v in items if str(v).strip())
    if isinstance(default, (int, float)):
        return type(default)(value)
    return value


def serve_on_ray(model: str, options: ServeOptions = ServeOptions(), device: str | None = None,
                 max_length: int | None = None, precision: str | None = None) -> None:
    """Deploy on Ray Serve. With no `options.ray_address`, check the model here first (one
    line and exit 2 for what cannot serve, before Ray starts), start a local one-node Ray
    instance, serve until SIGINT / SIGTERM, then shut it down; with one (`auto`, `ray://...`),
    deploy on that cluster and return (the application keeps running there: `serve status`,
    `serve shutdown`).

    The HTTP server is Ray's proxy, so what belongs to it is set where Ray allows:
    --forwarded-allow-ips through the environment of the local instance (uvicorn's
    FORWARDED_ALLOW_IPS; Ray's own default trusts 127.0.0.1), --header-timeout as the idle time
    of a kept-alive connection. A fresh connection that sends nothing, malformed HTTP (Ray's
    plain-text 400) and a client still sending at SIGTERM are the proxy's own (docs/serving.md).
    """
    application = build(model, options, device, max_length, precision)
    host, port = options.host, options.port
    replicas, address = options.replicas, options.ray_address
    stop = threading.Event()
    if address is None:
        classifier = load_checked(model, options.backend, device, max_length, precision)
        if options.policy:
            load_policy(options.policy, classifier.groups)
        del classifier  # the replicas load their own
        # Ray Serve gives its HTTP proxy 5 s to report ready and kills it after three misses; on
        # a small, busy machine starting Python workers takes longer (the environment wins)
        for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S",
                     "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
            os.environ.setdefault(name, "60")
        # the proxy's uvicorn reads it (an empty list trusts no one, as `hm3 serve` does)
        os.environ["FORWARDED_ALLOW_IPS"] = ",".join(options.forwarded_allow_ips)
        ray.init(include_dashboard=False, configure_logging=False)
        # ray.init installs a SIGTERM handler that exits at once (status 15); from here on
        # SIGTERM asks for the clean stop below, also while the deployment is still starting
        # (Ray's proxy may answer before serve.run returns); a second one stops at once
        signal.signal(signal.SIGTERM, lambda *_: _stop_or_interrupt(stop))
    else:
        ray.init(address=address)
    try:
        serve.start(http_options={"host": host, "port": port,
                                  "keep_alive_timeout_s": math.ceil(options.header_timeout)})
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica failed to start: say why, briefly
            lines = [line for line in str(exc).splitlines() if "Hm3Error" in line]
            raise Hm3Error(lines[-1].split("Hm3Error:", 1)[-1].strip() if lines
                           else f"the Ray Serve deployment failed: {exc}") from None
        print(f"hm3 on Ray Serve: {replicas} replica(s) at http://{host}:{port}/", flush=True)
        if address is not None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: _stop_or_interrupt(stop))
        while not stop.wait(0.5):
            pass
        serve.shutdown()  # replicas finish in-flight requests first (--drain-seconds)
    finally:
        if address is None:
            ray.shutdown()


def _stop_or_interrupt(stop: threading.Event) -> None:
    """A signal handler: the first signal asks for a clean stop, a second one interrupts."""
    if stop.is_set():
        raise KeyboardInterrupt
    stop.set()

"""The HTTP API (FastAPI): POST /v1/classify, GET /v1/tasks, /health, /metrics, and the page at /.

Thin over `hm3.model`: every text gets `MultiTaskClassifier.predict`'s per-task result (a softmax
per single-label task, sigmoids for a multi-label one), computed in dynamic batches shared by all
clients (`hm3.serve.batching`). The app holds no per-client state, so N replicas behind a load
balancer serve like one.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from hm3.serve.batching import MicroBatcher
from hm3.serve.buckets import predict_by_length
from hm3.serve.page import playground_html
from hm3.serve.policy import TaskRule


@dataclass(frozen=True)
class Limits:
    """What one request may hold; larger requests get 413."""

    max_texts: int = 256
    max_chars: int = 200_000  # all texts of a request together

    @property
    def max_body_bytes(self) -> int:
        # a character is at most 6 bytes of JSON (\\uXXXX), plus quotes, commas and the tasks list
        return 6 * self.max_chars + 8 * self.max_texts + 64 * 1024


class ClassifyRequest(BaseModel):
    texts: list[str] = Field(min_length=1, description="the texts to classify")
    tasks: list[str] | None = Field(default=None, min_length=1,
                                    description="answer only these tasks (default: all)")

    model_config = {"extra": "forbid"}


class Metrics:
    """Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("hm3_requests", "classify requests by HTTP status", ["status"],
                                registry=self.registry)
        self.texts = Counter("hm3_texts", "texts classified", registry=self.registry)
        self.batch_size = Histogram("hm3_batch_size", "texts per collected batch (run as "
                                    "length-sorted sub-batches unless --no-length-split)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                    registry=self.registry)
        self.batch_seconds = Histogram("hm3_batch_seconds", "seconds per collected batch "
                                       "(tokenisation included)", registry=self.registry)
        self.latency = Histogram("hm3_request_seconds", "classify request latency",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)

    def record_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.texts.inc(size)


class BodyLimit:
    """Refuses a request to `path` whose declared body is over `limit` bytes, before it is read.

    A plain ASGI middleware: Starlette's `@app.middleware("http")` runs every request through a
    task group and memory streams, a cost each one-text request pays."""

    def __init__(self, app, path: str, limit: int, reject: Callable[[int], Response]):
        self.app, self.path, self.limit, self.reject = app, path, limit, reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                await self.reject(int(length))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(classifier, name: str = "model", backend: str = "torch",
               max_batch_size: int = 32, max_wait_ms: float = 0.0, limits: Limits = Limits(),
               policy: dict[str, TaskRule] | None = None, length_split: bool = True,
               batcher: Callable = MicroBatcher) -> FastAPI:
    """The ASGI app serving `classifier` (an `hm3.model.MultiTaskClassifier`).

    Parameters
    ----------
    name, backend : reported by /health and /v1/tasks.
    max_batch_size, max_wait_ms : dynamic batching (see `MicroBatcher`).
    limits : per-request limits (413 beyond them).
    policy : per-task rules; when given, every answer says which tasks fired (`flagged`).
    length_split : run each collected batch in length-sorted sub-batches
        (`hm3.serve.buckets`) rather than padded to its longest text.
    batcher : what gathers texts into batches: called as (run, max_batch_size, max_wait_ms,
        on_batch), it has `start`, `stop` and `submit(texts)` (`MicroBatcher`; the Ray Serve
        deployment passes one over `@serve.batch`).
    """
    policy = policy or {}
    metrics = Metrics()
    groups = {g.name: g for g in classifier.groups}
    if length_split:
        def run(texts):
            return predict_by_length(classifier, texts)
    else:
        def run(texts):
            return classifier.predict(texts, batch_size=max_batch_size)
    batcher = batcher(run, max_batch_size, max_wait_ms, metrics.record_batch)

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()  # the server has drained its connections; finish what is queued

    app = FastAPI(title="hm3", lifespan=lifespan,
                  description="One merged multi-task classifier: every task's verdict per text, "
                  "from one forward pass.")

    def error(status: int, message: str, **extra) -> JSONResponse:
        metrics.requests.labels(str(status)).inc()
        return JSONResponse({"error": message, **extra}, status_code=status)

    def too_large(length: int) -> JSONResponse:
        return error(413, f"request body of {length} bytes is over the limit of "
                     f"{limits.max_body_bytes}; send fewer or shorter texts per request")

    app.add_middleware(BodyLimit, path="/v1/classify", limit=limits.max_body_bytes,
                       reject=too_large)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        problems = []
        for item in exc.errors():
            loc = [str(part) for part in item.get("loc", ()) if part != "body"]
            if item.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({item.get('ctx', {}).get('error', '')}"
                                f"); send {{\"texts\": [\"...\"]}}")
            else:
                problems.append(f"{'.'.join(loc) or 'body'}: {item.get('msg')}")
        return error(422, "; ".join(problems), detail=[{k: v for k, v in item.items()
                                                       if k in ("loc", "msg", "type")}
                                                      for item in exc.errors()])

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return playground_html()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "backend": backend}

    @app.get("/v1/tasks")
    async def tasks():
        return {"model": name, "backend": backend, "max_length": classifier.max_length,
                "max_batch_size": max_batch_size,
                "limits": {"max_texts": limits.max_texts, "max_chars": limits.max_chars},
                "tasks": [{**g.to_dict(), **({"policy": policy[g.name].to_dict()}
                                             if g.name in policy else {})}
                          for g in classifier.groups]}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        start = time.perf_counter()
        if len(body.texts) > limits.max_texts:
            return error(413, f"too many texts: {len(body.texts)} in one request, the limit is "
                         f"{limits.max_texts}; split the request")
        chars = sum(map(len, body.texts))
        if chars > limits.max_chars:
            return error(413, f"too many characters: {chars} in one request, the limit is "
                         f"{limits.max_chars}; split the request")
        wanted = body.tasks or list(groups)
        unknown = [t for t in wanted if t not in groups]
        if unknown:
            return error(422, f"tasks: unknown task(s) {', '.join(map(repr, unknown))}; this "
                         f"model's tasks are {', '.join(groups)}", known_tasks=list(groups))
        predictions = await batcher.submit(body.texts)
        results, flagged = [], []
        for prediction in predictions:
            result = {task: prediction[task] for task in wanted}
            fired = [task for task in wanted if task in policy
                     and policy[task].fires(prediction[task]["probabilities"])]
            for task in wanted:
                if task in policy:
                    result[task] = {**result[task], "flagged": task in fired}
            results.append(result)
            flagged.append(fired)
        metrics.requests.labels("200").inc()
        metrics.latency.observe(time.perf_counter() - start)
        answer = {"model": name, "results": results}
        if policy:
            answer["flagged"] = flagged
        return answer

    return app

"""The HTTP API (FastAPI): POST /v1/classify, POST /v1/moderations (OpenAI's moderation API over
the policy), GET /v1/tasks, /health (liveness), /ready (readiness), /metrics, and the page at /.

Thin over `hm3.model`: every text gets `MultiTaskClassifier.predict`'s per-task result (a softmax
per single-label task, sigmoids for a multi-label one), computed in dynamic batches shared by all
clients (`hm3.serve.batching`). The app holds no per-client state, so N replicas behind a load
balancer serve like one. What guards it (limits, key, metrics of every request) is in
`hm3.serve.guard`; its settings are `hm3.serve.options.ServeOptions`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from hm3.serve.batching import MicroBatcher, TextFailed
from hm3.serve.buckets import predict_by_length
from hm3.serve.guard import Observe, ReadBody, RequireKey, wait_for_disconnect
from hm3.serve.options import ServeOptions
from hm3.serve.page import playground_html
from hm3.serve.policy import TaskRule

WARM_UP_TEXT = "hello"
ROUTES = frozenset({"/", "/health", "/ready", "/v1/tasks", "/v1/classify", "/v1/moderations",
                    "/metrics", "/openapi.json", "/docs", "/redoc"})
PARSE_OFF_LOOP_BYTES = 64 * 1024  # larger bodies are parsed in a thread: the loop keeps serving
BODIES_HELD = 32  # request bodies in memory at once, at the size limit (more: 503)


class ClassifyRequest(BaseModel):
    texts: list[str] = Field(min_length=1, description="the texts to classify")
    tasks: list[str] | None = Field(default=None, min_length=1,
                                    description="answer only these tasks (default: all; "
                                    "repeats are answered once)")

    model_config = {"extra": "forbid"}


class ModerationRequest(BaseModel):
    """OpenAI's moderation request; `model` is accepted and ignored (this server has one)."""

    input: str | list[str] = Field(description="a text or a list of texts")
    model: str | None = None


class Metrics:
    """Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("hm3_requests_total", "HTTP requests by route and status (every "
                                "request, refusals included; 499: the client left first)",
                                ["route", "status"], registry=self.registry)
        self.texts = Counter("hm3_texts_total", "texts classified", registry=self.registry)
        self.queued = Gauge("hm3_queued_texts", "texts accepted and not yet answered",
                            registry=self.registry)
        self.batch_size = Histogram("hm3_batch_size", "texts per collected batch (run as "
                                    "length-sorted sub-batches unless --no-length-split)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                    registry=self.registry)
        self.batch_seconds = Histogram("hm3_batch_seconds", "seconds per collected batch "
                                       "(tokenisation included)", registry=self.registry)
        self.latency = Histogram("hm3_request_seconds", "latency of every HTTP request",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)

    def record_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.texts.inc(size)

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.observe(seconds)


class Refused(Exception):
    """A request answered with an error: `status`, the message, extra JSON fields and headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def create_app(classifier, options: ServeOptions = ServeOptions(), name: str = "model",
               backend: str = "torch", precision: str = "f32",
               policy: dict[str, TaskRule] | None = None,
               batcher: Callable = MicroBatcher) -> FastAPI:
    """The ASGI app serving `classifier` (an `hm3.model.MultiTaskClassifier`).

    - `options`: the server's settings (batching, limits, timeouts, access; see `ServeOptions`).
    `name`, `backend`, `precision` (what the model computes at: "f32", or "bf16" for an OpenVINO
    export run so): reported by /health, /ready and /v1/tasks.
    - `policy`: per-task rules; when given, every answer says which tasks fired (`flagged`), and
    POST /v1/moderations answers with them.
    - `batcher`: what gathers texts into batches: called as (run, max_batch_size, max_wait_ms,
    on_batch), it has `start`, `stop` and `submit(texts)` (`MicroBatcher`; the Ray Serve
    deployment passes one over `@serve.batch`).
    """
    options.check()
    policy = policy or {}
    metrics = Metrics()
    groups = {g.name: g for g in classifier.groups}
    if options.length_split:
        def run(texts):
            return predict_by_length(classifier, texts)
    else:
        def run(texts):
            return classifier.predict(texts, batch_size=options.max_batch_size)
    batcher = batcher(run, options.max_batch_size, options.max_wait_ms, metrics.record_batch)
    state = {"ready": False, "queued": 0}

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        await batcher.submit([WARM_UP_TEXT])  # ready means one text went through the model
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()  # the server has drained its connections; finish what is queued

    docs = options.docs
    app = FastAPI(title="hm3", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None,
                  description="One merged multi-task classifier: every task's verdict per text, "
                  "from one forward pass.")
    app.state.metrics = metrics

    def error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    # outermost first: observe everything, answer CORS preflights, check the key, read the body
    app.add_middleware(ReadBody, limit=options.body_limit, timeout=options.body_timeout,
                       budget=BODIES_HELD * options.body_limit)
    if options.api_keys:
        app.add_middleware(RequireKey, keys=options.api_keys)
    if options.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_allow_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Observe, record=metrics.record_request, routes=ROUTES)

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused):
        return error(exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        message, detail = _problems(exc.errors())
        return error(422, message, detail=detail)

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception):
        return error(500, f"internal error ({type(exc).__name__}); the server goes on: retry, "
                     "and report it if it persists")

    async def read(request: Request, schema: type[BaseModel]) -> BaseModel:
        """The body parsed and checked against `schema` (415 if not sent as JSON, 422 naming the
        field otherwise)."""
        example = '{"texts": ["..."]}' if schema is ClassifyRequest else '{"input": "..."}'
        if not _is_json(request.headers.get("content-type", "")):
            # curl -d sends a JSON body as a form unless told otherwise
            raise Refused(415, f"the body must be JSON sent with the header `Content-Type: "
                          f"application/json` (got {request.headers.get('content-type') or 'none'})"
                          f"; send {example}")
        body = await request.body()
        try:
            if len(body) > PARSE_OFF_LOOP_BYTES:
                data = await asyncio.to_thread(json.loads, body)
            else:
                data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise Refused(422, f"the body is not valid JSON ({exc}); send {example}") from None
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            message, detail = _problems(exc.errors(include_url=False, include_input=False))
            raise Refused(422, message, detail=detail) from None

    def check_texts(texts: list[str], field: str) -> None:
        if len(texts) > options.max_texts:
            raise Refused(413, f"too many texts: {len(texts)} in one request, the limit is "
                          f"{options.max_texts}; split the request")
        chars = sum(map(len, texts))
        if chars > options.max_chars:
            raise Refused(413, f"too many characters: {chars} in one request, the limit is "
                          f"{options.max_chars}; split the request")
        for index, text in enumerate(texts):
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise Refused(422, f"{field}{index}: not valid Unicode (a lone surrogate "
                                  "such as \\ud800); send UTF-8 text", index=index) from None

    async def predict(request: Request, texts: list[str], field: str) -> list[dict]:
        """Each text's prediction, through the shared batcher, within the queue bound and the
        request timeout; the texts are dropped from the queue if the client leaves first."""
        if state["queued"] + len(texts) > options.max_queued_texts:
            raise Refused(503, f"the server is busy ({state['queued']} texts queued, the limit "
                          f"is {options.max_queued_texts}); retry shortly",
                          headers={"Retry-After": "1"})
        state["queued"] += len(texts)
        metrics.queued.set(state["queued"])
        work = asyncio.ensure_future(batcher.submit(texts))
        gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=options.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            state["queued"] -= len(texts)
            metrics.queued.set(state["queued"])
        if work in done:
            try:
                return work.result()
            except TextFailed as exc:
                message = str(exc).replace("texts.", field, 1)
                raise Refused(422, message, index=exc.index) from None
        work.cancel()  # its texts still queued are dropped before they reach the model
        if gone in done:
            raise Refused(499, "the client closed the connection")
        raise Refused(504, f"no answer within --request-timeout {options.request_timeout:g} s; "
                      "the server is overloaded: retry later or send fewer texts")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return playground_html()

    @app.get("/health")
    async def health():
        """Liveness: the process answers (no key needed). Readiness is /ready."""
        return {"status": "ok", "model": name, "backend": backend, "precision": precision}

    @app.get("/ready")
    async def ready():
        """Readiness: a warm-up text has gone through the model and the server is not stopping."""
        if not state["ready"]:
            raise Refused(503, "not ready: warming up or shutting down",
                          headers={"Retry-After": "1"})
        return {"status": "ready", "model": name, "backend": backend, "precision": precision}

    @app.get("/v1/tasks")
    async def tasks():
        return {"model": name, "backend": backend, "precision": precision,
                "max_length": classifier.max_length,
                "max_batch_size": options.max_batch_size,
                "limits": {"max_texts": options.max_texts, "max_chars": options.max_chars,
                           "max_body_bytes": options.body_limit},
                "tasks": [{**g.to_dict(), **({"policy": policy[g.name].to_dict()}
                                             if g.name in policy else {})}
                          for g in classifier.groups]}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/classify", openapi_extra=_body_schema(ClassifyRequest))
    async def classify(request: Request):
        body = await read(request, ClassifyRequest)
        check_texts(body.texts, "texts.")
        wanted = list(dict.fromkeys(body.tasks or groups))  # repeats answered once
        unknown = [t for t in wanted if t not in groups]
        if unknown:
            raise Refused(422, f"tasks: unknown task(s) {', '.join(map(repr, unknown[:10]))}; "
                          f"this model's tasks are {', '.join(groups)}", known_tasks=list(groups))
        predictions = await predict(request, body.texts, "texts.")
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
        answer = {"model": name, "results": results}
        if policy:
            answer["flagged"] = flagged
        return answer

    @app.post("/v1/moderations", openapi_extra=_body_schema(ModerationRequest))
    async def moderations(request: Request):
        """OpenAI's moderation API: one result per input text; the categories are the policy's
        flagged labels, named `task/label`, each true when its probability reaches the task's
        threshold; `flagged` when any is."""
        if not policy:
            raise Refused(501, "moderation needs a policy: start the server with --policy FILE "
                          "(which labels of which tasks flag a text)")
        body = await read(request, ModerationRequest)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise Refused(422, "input: give a text or a non-empty list of texts")
        check_texts(texts, "input.")
        predictions = await predict(request, texts, "input.")
        results = []
        for prediction in predictions:
            categories, scores = {}, {}
            for task, rule in policy.items():
                probabilities = prediction[task]["probabilities"]
                for label in rule.flag:
                    scores[f"{task}/{label}"] = probabilities[label]
                    categories[f"{task}/{label}"] = probabilities[label] >= rule.threshold
            results.append({"flagged": any(categories.values()), "categories": categories,
                            "category_scores": scores})
        return {"id": f"modr-{uuid.uuid4().hex}", "model": name, "results": results}

    return app


def _is_json(content_type: str) -> bool:
    """application/json, or a JSON type such as application/merge-patch+json (any charset)."""
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


def _problems(errors: list[dict]) -> tuple[str, list[dict]]:
    """A one-line message and the short detail of pydantic validation errors. (A body that is
    not JSON never gets here: `read` parses every body itself and says so.)"""
    problems = []
    for item in errors:
        loc = [str(part) for part in item.get("loc", ()) if part != "body"]
        problems.append(f"{'.'.join(loc) or 'body'}: {item.get('msg')}")
    detail = [{k: v for k, v in item.items() if k in ("loc", "msg", "type")} for item in errors]
    return "; ".join(problems[:10]), detail[:10]


def _body_schema(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its body itself (`read`)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}

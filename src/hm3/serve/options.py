"""The server's options, declared once: the `ServeOptions` the CLI, `server`, `ray_app` and `app`
share, its checks, and the `hm3 serve` flags that fill it (`add_serve_arguments`).

Model-loading options (`--device`, `--max-length`) are not here: they belong to loading a model,
which every command does the same way. This module imports nothing of the `serve` extra, so the
CLI can declare the flags without FastAPI installed.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields

from hm3.errors import Hm3Error

API_KEYS_ENV = "HM3_API_KEYS"  # comma-separated keys: they stay off the command line
BACKENDS = ("torch", "onnx", "openvino")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_BODY_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    """How `hm3 serve` runs. Every limit is on what is actually read or queued.

    - `host`, `port`: where to listen.
    - `backend`: check the model folder is of this kind (torch, onnx, openvino; None: any).
    - `max_batch_size`, `max_wait_ms`: dynamic batching (`hm3.serve.batching.MicroBatcher`).
    - `max_texts`, `max_chars`: per request (413 beyond).
    - `max_body_bytes`: bytes of request body read at most (413 as soon as more arrive); None:
    2 MB, or more when `max_chars` needs it (`body_limit`).
    - `max_queued_texts`: texts accepted but not yet answered, all clients together; a request
    that would go over gets 503 with Retry-After.
    - `request_timeout`: seconds a request may wait for its answer (504 after).
    - `header_timeout`: seconds a connection may take to send a request's headers (then closed).
    - `body_timeout`: seconds a request may take to send its body (408 after).
    - `policy`: path of the guard-rail policy file (`hm3.serve.policy`).
    - `drain_seconds`: on SIGTERM, how long in-flight requests may take to finish.
    - `log_level`: uvicorn's.
    - `length_split`: run batches in length-sorted sub-batches (`hm3.serve.buckets`).
    - `api_keys`: bearer keys; when any, every route but /health needs one (401).
    - `cors_allow_origins`: origins allowed to call from a browser (none: CORS off).
    - `forwarded_allow_ips`: peers whose X-Forwarded-For / -Proto are trusted (none: no one).
    - `docs`: serve /docs (Swagger UI, which loads its assets from a CDN) and /redoc.
    - `ray`, `replicas`, `replica_cpus`, `ray_address`: Ray Serve (`hm3.serve.ray_app`).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_texts: int = 256
    max_chars: int = 200_000
    max_body_bytes: int | None = None
    max_queued_texts: int = 4096
    request_timeout: float = 60.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    policy: str | None = None
    drain_seconds: float = 30.0
    log_level: str = "info"
    length_split: bool = True
    api_keys: tuple[str, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    forwarded_allow_ips: tuple[str, ...] = ()
    docs: bool = False
    ray: bool = False
    replicas: int = 1
    replica_cpus: float = 1.0
    ray_address: str | None = None

    def check(self) -> "ServeOptions":
        """Refuse settings that cannot work, naming the flag; returns self."""
        for name in ("max_batch_size", "max_texts", "max_chars", "max_body_bytes",
                     "max_queued_texts", "replicas"):
            value = getattr(self, name)
            if value is None and name == "max_body_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Hm3Error(f"--{_flag(name)} must be a whole number of at least 1, "
                               f"got {value!r}")
        if not 0 <= self.port <= 65535:
            raise Hm3Error(f"--port must be in [0, 65535], got {self.port}")
        for name, least in (("max_wait_ms", 0.0), ("drain_seconds", 0.0), ("request_timeout", None),
                            ("header_timeout", None), ("body_timeout", None),
                            ("replica_cpus", None)):
            value = getattr(self, name)
            if not math.isfinite(value) or (value < least if least is not None else value <= 0):
                need = "0 or more" if least is not None else "more than 0"
                raise Hm3Error(f"--{_flag(name)} must be a finite number, {need}, got {value}")
        if self.max_queued_texts < self.max_texts:
            raise Hm3Error(f"--max-queued-texts ({self.max_queued_texts}) must be at least "
                           f"--max-texts ({self.max_texts}), or no full request could be taken")
        if self.backend is not None and self.backend not in BACKENDS:
            raise Hm3Error(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.log_level not in LOG_LEVELS:
            raise Hm3Error(f"--log-level must be one of {', '.join(LOG_LEVELS)}, "
                           f"got {self.log_level!r}")
        if any(not key or any(c.isspace() for c in key) for key in self.api_keys):
            raise Hm3Error("an API key must be non-empty and hold no spaces (from --api-key or "
                           f"${API_KEYS_ENV})")
        if not self.ray and (self.replicas != 1 or self.ray_address):
            raise Hm3Error("--replicas and --ray-address are for Ray Serve: add --ray")
        return self

    @property
    def body_limit(self) -> int:
        """The request body bytes read at most: `max_body_bytes`, or by default 2 MB or what
        `max_chars` characters take as JSON if more: 12 bytes a character, an emoji sent
        \\u-escaped (a surrogate pair), plus a little per text and for the rest of the body."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return max(DEFAULT_BODY_BYTES, 12 * self.max_chars + 16 * self.max_texts + 64 * 1024)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ=os.environ) -> "ServeOptions":
        """The options of parsed `hm3 serve` flags (see `add_serve_arguments`), checked; API keys
        from --api-key and the HM3_API_KEYS environment variable together."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        keys = [*(args.api_keys or ()),
                *(k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip())]
        values["api_keys"] = tuple(dict.fromkeys(keys))
        for name in ("cors_allow_origins", "forwarded_allow_ips"):
            values[name] = tuple(getattr(args, name) or ())
        return cls(**values).check()


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `hm3 serve`'s server flags on `parser` (defaults from `ServeOptions`)."""
    d = ServeOptions()
    add = parser.add_argument
    add("--host", default=d.host, help=f"default {d.host}")
    add("--port", type=int, default=d.port, help=f"default {d.port}")
    add("--backend", choices=BACKENDS, help="check the folder is of this kind (default: whatever "
        "it is)")
    add("--max-batch-size", type=int, default=d.max_batch_size, help="texts per forward pass "
        f"(default {d.max_batch_size})")
    add("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long the first text of a "
        "batch waits for others once the model is free (default 0: the batch is every text that "
        "queued while the model ran)")
    add("--max-texts", type=int, default=d.max_texts, help=f"texts per request (default "
        f"{d.max_texts}; more: 413)")
    add("--max-chars", type=int, default=d.max_chars, help="characters per request, all texts "
        f"together (default {d.max_chars}; more: 413)")
    add("--max-body-bytes", type=int, help="request body bytes read at most, chunked bodies "
        "included (more: 413 at once; default 2 MB, or 12 bytes per --max-chars character if "
        "more)")
    add("--max-queued-texts", type=int, default=d.max_queued_texts, help="texts accepted and not "
        f"yet answered, all clients together (default {d.max_queued_texts}; more: 503 with "
        "Retry-After)")
    add("--request-timeout", type=float, default=d.request_timeout, help="seconds a request may "
        f"wait for its answer (default {d.request_timeout:g}; then 504)")
    add("--header-timeout", type=float, default=d.header_timeout, help="seconds a client may take "
        f"to send a request's headers (default {d.header_timeout:g}; then the connection is "
        "closed)")
    add("--body-timeout", type=float, default=d.body_timeout, help="seconds a client may take to "
        f"send a request's body (default {d.body_timeout:g}; then 408)")
    add("--policy", help="YAML/JSON: per task, the labels and threshold that flag a text (also "
        "what POST /v1/moderations answers)")
    add("--drain-seconds", type=float, default=d.drain_seconds, help="on SIGTERM, how long "
        f"in-flight requests may take to finish (default {d.drain_seconds:g})")
    add("--log-level", default=d.log_level, choices=LOG_LEVELS)
    add("--no-length-split", dest="length_split", action="store_false",
        help="run each batch padded to its longest text, not in length-sorted sub-batches")
    add("--api-key", dest="api_keys", action="append", metavar="KEY", help="require "
        "`Authorization: Bearer KEY` on every route but /health (repeatable; or set "
        f"${API_KEYS_ENV}=KEY1,KEY2 to keep keys off the command line)")
    add("--cors-allow-origin", dest="cors_allow_origins", action="append", metavar="ORIGIN",
        help="let browsers on ORIGIN call the API (repeatable; `*` for any; default: CORS off)")
    add("--forwarded-allow-ips", dest="forwarded_allow_ips", action="append", metavar="IP",
        help="trust X-Forwarded-For/-Proto from this proxy address (repeatable; default: from "
        "no one)")
    add("--docs", action="store_true", help="serve the OpenAPI pages /docs and /redoc (they load "
        "their scripts from a CDN; /openapi.json is always served)")
    add("--ray", action="store_true", help="serve on Ray Serve (needs the ray extra): replicas of "
        "the same app, Ray's request batching")
    add("--replicas", type=int, default=d.replicas, help="with --ray: model replicas (default 1)")
    add("--replica-cpus", type=float, default=d.replica_cpus, help="with --ray: CPUs each replica "
        "reserves (default 1)")
    add("--ray-address", help="with --ray: deploy on this running Ray cluster (`auto`, "
        "ray://HOST:PORT) and return; default: start a local one-node instance and serve until "
        "Ctrl-C")

"""The `hm3 serve` process: load and check the model once, then run the app under uvicorn.

Everything that can be found wrong before serving is (`load_checked`): the folder loads, has its
tokenizer, its task layout fits the logits, a text of `max_length` tokens runs and gives finite
scores; otherwise one line and exit 2. uvicorn handles SIGTERM / SIGINT: it stops accepting
connections, lets in-flight requests finish (up to `drain_seconds`), then the app's shutdown
finishes what the batcher still holds. Its HTTP protocol is uvicorn's h11 one with three changes
(`guarded_protocol`): a connection must send its headers within `header_timeout`, a client still
sending its body at SIGTERM is not waited for, and malformed HTTP gets the app's JSON error.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from hm3.errors import Hm3Error
from hm3.model import load
from hm3.onnx_model import describe_precision
from hm3.serve.app import WARM_UP_TEXT, create_app
from hm3.serve.options import BACKENDS, ServeOptions
from hm3.serve.policy import load_policy

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def load_backend(model: str, backend: str | None = None, device: str | None = None,
                 max_length: int | None = None, precision: str | None = None):
    """`hm3.load(model)`, checking that the folder is of the backend asked for."""
    if backend is not None and backend not in BACKENDS:
        raise Hm3Error(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    try:
        classifier = load(model, device=device, max_length=max_length, precision=precision)
    except Hm3Error:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files raise anything; say it in one line
        raise Hm3Error(f"cannot load {model}: {type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    found = getattr(classifier.model, "backend", "torch")
    if backend is not None and backend != found:
        if found == "torch":
            raise Hm3Error(f"{model} is a PyTorch model; export it first with `hm3 export {model} "
                           f"-o MODEL-{backend} --format {backend}`, then serve that folder")
        raise Hm3Error(f"{model} is an {classifier.model.kind} export; serve it with --backend "
                       f"{found}, or serve the PyTorch model it was exported from")
    return classifier


def load_checked(model: str, backend: str | None = None, device: str | None = None,
                 max_length: int | None = None, precision: str | None = None):
    """`load_backend`, then `check_model`: a model that would fail its first request fails here."""
    classifier = load_backend(model, backend, device, max_length, precision)
    check_model(classifier, model)
    return classifier


def check_model(classifier, model: str) -> None:
    """Refuse a model that cannot serve: no tokenizer of its own, a tokenizer larger than the
    embeddings, a task layout that does not tile the logits, `max_length` over the model's
    positions, or non-finite scores on a warm-up text of `max_length` tokens."""
    folder = Path(model)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise Hm3Error(f"{model} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                       "copy the tokenizer of the model it was trained from into the folder")
    config = classifier.model.config
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(classifier.tokenizer) > vocab:
        raise Hm3Error(f"{model}: the tokenizer has {len(classifier.tokenizer)} tokens but the "
                       f"model embeds {vocab}: it is not this model's tokenizer")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and classifier.max_length > positions:
        raise Hm3Error(f"--max-length {classifier.max_length} is over the {positions} positions "
                       f"{model} has; lower it")
    offset = 0
    for group in classifier.groups:
        if group.offset != offset or group.stop <= group.offset:
            raise Hm3Error(f"{model}: the task layout is broken at task {group.name!r} (logits "
                           f"{group.offset}..{group.stop}, expected to start at {offset}); "
                           "re-merge or fix the `hm3` block of config.json")
        offset = group.stop
    warm_up = " ".join([WARM_UP_TEXT] * (2 * classifier.max_length))  # truncated to max_length
    try:
        logits = classifier.logits([warm_up, WARM_UP_TEXT], batch_size=2)
    except Exception as exc:  # noqa: BLE001 - whatever fails here would fail every request
        raise Hm3Error(f"{model} fails on a text of {classifier.max_length} tokens "
                       f"({type(exc).__name__}: {str(exc).strip()[:200]}); if the model has "
                       "fewer positions, lower --max-length") from None
    if logits.shape[1] != offset:
        raise Hm3Error(f"{model}: the task layout covers {offset} logits but the model gives "
                       f"{logits.shape[1]}; re-merge or fix the `hm3` block of config.json")
    if not all(math.isfinite(v) for v in logits.ravel().tolist()):
        raise Hm3Error(f"{model} gives non-finite scores on a warm-up text: its weights are "
                       "corrupt")


def guarded_protocol(header_timeout: float, on_reject=None) -> type:
    """uvicorn's h11 protocol, with a deadline on headers, no wait at shutdown for clients still
    sending a body, and JSON for malformed HTTP. `on_reject(status)` counts what it refuses."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:  # a new request's headers
                self._arm_header_timer()
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm_header_timer()  # the headers are in; ReadBody times the body

        def shutdown(self) -> None:
            if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
                # still sending its body: the request has not started; do not wait for it
                self.transport.close()
                return
            super().shutdown()

        def send_400_response(self, msg: str) -> None:
            if on_reject is not None:
                on_reject(400)
            body = json.dumps({"error": f"{msg} (malformed HTTP, or headers over the size "
                                        "limit)"}).encode()
            self._send_raw(400, body)

        def _send_raw(self, status: int, body: bytes) -> None:
            import h11

            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            try:
                for event in (h11.Response(status_code=status, headers=headers),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:
                pass
            self.transport.close()

        def _arm_header_timer(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                if on_reject is not None:
                    on_reject(408)
                self.transport.close()

    return GuardedH11Protocol


def serve(model: str, options: ServeOptions = ServeOptions(), device: str | None = None,
          max_length: int | None = None, precision: str | None = None) -> None:
    """Serve `model` until SIGTERM / SIGINT (see `hm3.serve.app.create_app` for the API).
    `precision`: an OpenVINO export's inference precision (`hm3.load`'s)."""
    options.check()
    classifier = load_checked(model, options.backend, device, max_length, precision)
    rules = load_policy(options.policy, classifier.groups) if options.policy else None
    name = Path(model.rstrip("/")).name or model
    backend = getattr(classifier.model, "backend", "torch")
    print(f"hm3 serve: {name} on {backend} at {describe_precision(classifier.model)} precision",
          file=sys.stderr, flush=True)
    app = create_app(classifier, options, name=name, backend=backend,
                     precision=getattr(classifier.model, "precision", "f32"), policy=rules)
    metrics = app.state.metrics
    protocol = guarded_protocol(options.header_timeout,
                                lambda status: metrics.record_request("other", status, 0.0))
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            http=protocol, timeout_graceful_shutdown=options.drain_seconds,
                            proxy_headers=bool(options.forwarded_allow_ips),
                            forwarded_allow_ips=list(options.forwarded_allow_ips) or None,
                            server_header=False)
    uvicorn.Server(config).run()

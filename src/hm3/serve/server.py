"""The `hm3 serve` process: load the model once, then run the app under uvicorn.

uvicorn handles SIGTERM / SIGINT: it stops accepting connections, lets in-flight requests finish
(up to `drain_seconds`), then the app's shutdown finishes what the batcher still holds.
"""

from __future__ import annotations

from pathlib import Path

import uvicorn

from hm3.errors import Hm3Error
from hm3.model import load
from hm3.serve.app import Limits, create_app
from hm3.serve.policy import load_policy

BACKENDS = ("torch", "onnx", "openvino")


def load_backend(model: str, backend: str | None = None, device: str | None = None,
                 max_length: int | None = None):
    """`hm3.load(model)`, checking that the folder is of the backend asked for."""
    if backend is not None and backend not in BACKENDS:
        raise Hm3Error(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    classifier = load(model, device=device, max_length=max_length)
    found = getattr(classifier.model, "backend", "torch")
    if backend is not None and backend != found:
        if found == "torch":
            raise Hm3Error(f"{model} is a PyTorch model; export it first with `hm3 export {model} "
                           f"-o MODEL-{backend} --format {backend}`, then serve that folder")
        raise Hm3Error(f"{model} is an {classifier.model.kind} export; serve it with --backend {found}, or serve "
                       "the PyTorch model it was exported from")
    return classifier


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, backend: str | None = None,
          max_batch_size: int = 32, max_wait_ms: float = 0.0, limits: Limits = Limits(),
          policy: str | Path | None = None, device: str | None = None,
          max_length: int | None = None, drain_seconds: float = 30.0,
          log_level: str = "info", length_split: bool = True) -> None:
    """Serve `model` until SIGTERM / SIGINT (see `hm3.serve.app.create_app` for the API)."""
    if limits.max_texts < 1 or limits.max_chars < 1:
        raise Hm3Error(f"request limits must be positive, got {limits.max_texts} texts and "
                       f"{limits.max_chars} characters")
    classifier = load_backend(model, backend, device, max_length)
    rules = load_policy(policy, classifier.groups) if policy else None
    name = Path(model.rstrip("/")).name or model
    app = create_app(classifier, name=name, backend=getattr(classifier.model, "backend", "torch"),
                     max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, limits=limits,
                     policy=rules, length_split=length_split)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_seconds)
    uvicorn.Server(config).run()

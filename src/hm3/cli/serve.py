"""`hm3 serve MODEL`: serve a model over HTTP (or on Ray Serve with --ray).

The server's own options (address, batching, limits, policy, Ray) are added by `add_arguments`
in one place, and `run` hands them to the server; how the model is loaded comes from the shared
model options."""

from __future__ import annotations

import argparse

from hm3.cli.options import ModelOptions, add_model_options

HELP = ("serve a model over HTTP: POST /v1/classify, a playground page at /, /metrics (needs the "
        "serve extra)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (merged, single expert, ONNX or OpenVINO "
                        "export)")
    add_server_arguments(parser)
    add_model_options(parser, batch_size=None)  # --max-batch-size: the server batches requests


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the server itself, all of them."""
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--backend", choices=["torch", "onnx", "openvino"],
                        help="check the folder is of this kind (default: whatever it is)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="texts per forward pass "
                        "(default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="how long the first text "
                        "of a batch waits for others once the model is free (default 0: the "
                        "batch is every text that queued while the model ran)")
    parser.add_argument("--max-texts", type=int, default=256, help="texts per request (default "
                        "256; more: 413)")
    parser.add_argument("--max-chars", type=int, default=200_000, help="characters per request, "
                        "all texts together (default 200000; more: 413)")
    parser.add_argument("--policy", help="YAML/JSON: per task, the labels and threshold that "
                        "flag a text")
    parser.add_argument("--drain-seconds", type=float, default=30.0, help="on SIGTERM, how long "
                        "in-flight requests may take to finish (default 30)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--no-length-split", dest="length_split", action="store_false",
                        help="run each batch padded to its longest text, not in length-sorted "
                        "sub-batches")
    parser.add_argument("--ray", action="store_true", help="serve on Ray Serve (needs the ray "
                        "extra): replicas of the same app, Ray's request batching")
    parser.add_argument("--replicas", type=int, default=1, help="with --ray: model replicas "
                        "(default 1)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs each "
                        "replica reserves (default 1)")
    parser.add_argument("--ray-address", help="with --ray: deploy on this running Ray cluster "
                        "(`auto`, ray://HOST:PORT) and return; default: start a local one-node "
                        "instance and serve until Ctrl-C")


def run(args: argparse.Namespace) -> int:
    from hm3.errors import Hm3Error

    model = ModelOptions.from_args(args)
    if model.allow_pickle:
        # hm3.serve loads safetensors only: its serve functions take no allow_pickle yet
        raise Hm3Error("hm3 serve does not load pickle (.bin) weights yet; convert the model to "
                       "safetensors (hm3 merge writes them) and serve that folder")
    if args.ray:
        try:
            from hm3.serve.ray_app import serve_on_ray
        except ImportError as exc:
            raise Hm3Error(f"--ray needs Ray Serve ({exc}); install it with "
                           "pip install 'hm3[ray]'") from None
        serve_on_ray(args.model, host=args.host, port=args.port, replicas=args.replicas,
                     replica_cpus=args.replica_cpus, address=args.ray_address,
                     backend=args.backend, device=model.device, max_length=model.max_length,
                     policy=args.policy, max_batch_size=args.max_batch_size,
                     max_wait_ms=args.max_wait_ms, max_texts=args.max_texts,
                     max_chars=args.max_chars, length_split=args.length_split)
        return 0
    if args.replicas != 1 or args.ray_address:
        raise Hm3Error("--replicas and --ray-address are for Ray Serve: add --ray")
    from hm3.serve.app import Limits
    from hm3.serve.server import serve

    serve(args.model, host=args.host, port=args.port, backend=args.backend,
          max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
          limits=Limits(max_texts=args.max_texts, max_chars=args.max_chars), policy=args.policy,
          device=model.device, max_length=model.max_length, drain_seconds=args.drain_seconds,
          log_level=args.log_level, length_split=args.length_split)
    return 0

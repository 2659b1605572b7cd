"""`hm3 serve MODEL`: serve a model over HTTP (or on Ray Serve with --ray).

The server's own options (address, batching, limits, access, policy, Ray) are declared once in
`hm3.serve.options` (the `ServeOptions` the server and the Ray app take); how the model is
loaded comes from the shared model options."""

from __future__ import annotations

import argparse

from hm3.cli.options import ModelOptions, add_model_options, add_precision
from hm3.serve.options import ServeOptions, add_serve_arguments

HELP = ("serve a model over HTTP: POST /v1/classify, a playground page at /, /metrics (needs the "
        "serve extra)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (merged, single expert, ONNX or OpenVINO "
                        "export)")
    add_serve_arguments(parser)
    add_model_options(parser, batch_size=None)  # --max-batch-size: the server batches requests
    add_precision(parser)


def run(args: argparse.Namespace) -> int:
    from hm3.errors import Hm3Error

    model = ModelOptions.from_args(args)
    if model.allow_pickle:
        # hm3.serve loads safetensors only: its serve functions take no allow_pickle yet
        raise Hm3Error("hm3 serve does not load pickle (.bin) weights yet; convert the model to "
                       "safetensors (hm3 merge writes them) and serve that folder")
    options = ServeOptions.from_args(args)
    if options.ray:
        try:
            from hm3.serve.ray_app import serve_on_ray
        except ImportError as exc:
            raise Hm3Error(f"--ray needs Ray Serve ({exc}); install it with "
                           "pip install 'hm3[ray]'") from None
        serve_on_ray(args.model, options, device=model.device, max_length=model.max_length,
                     precision=model.precision)
        return 0
    from hm3.serve.server import serve

    serve(args.model, options, device=model.device, max_length=model.max_length,
          precision=model.precision)
    return 0

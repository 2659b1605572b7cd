"""`hm3 export MODEL -o FOLDER`: export a model to ONNX or OpenVINO, per-task probabilities in
the graph."""

from __future__ import annotations

import argparse

from hm3.cli.options import add_model_options, add_overwrite, add_precision, add_text_column

HELP = ("export a model to ONNX or OpenVINO, per-task probabilities in the graph (needs the "
        "onnx / openvino extra)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or hub id")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                        help="onnx (ONNX Runtime, default) or openvino (the OpenVINO runtime)")
    parser.add_argument("--quantize", choices=["int8"], help="int8: with onnx, dynamic int8 "
                        "weights; with openvino, weights and activations (needs --calibration)")
    parser.add_argument("--calibration", help="with --format openvino --quantize int8: "
                        "unlabelled texts like your traffic (.txt one per line, .jsonl, or a "
                        "table's --text-column); a few hundred are enough")
    add_text_column(parser, help="the column of --calibration's table (default: text)")
    add_precision(parser, "with --format openvino: the inference precision the folder runs at, "
                  "recorded in it (hm3 serve --precision overrides): auto (default: bf16 with the "
                  "head kept f32 where the serving CPU has bf16 units, else f32; resolved at "
                  "load), f32 (PyTorch's scores; the default with --quantize int8) or bf16")
    add_overwrite(parser)
    # the export is traced and checked on the CPU, a whole batch at once
    add_model_options(parser, batch_size=None, device=None, max_length="cut texts to this many "
                      "tokens, at calibration and when the export runs (default: the "
                      "tokenizer's maximum); calibrate at the length you serve at")


def run(args: argparse.Namespace) -> int:
    from hm3.data import read_texts
    from hm3.errors import Hm3Error
    from hm3.export import export_onnx, export_openvino, recorded_precision

    options = {"overwrite": args.overwrite, "max_length": args.max_length,
               "allow_pickle": args.allow_pickle}
    if args.format == "onnx":
        if args.calibration:
            raise Hm3Error("--calibration is for --format openvino --quantize int8 (ONNX "
                           "Runtime's int8 quantises activations on the fly, without texts)")
        if args.precision:
            raise Hm3Error("--precision is for --format openvino (ONNX Runtime computes in f32)")
        report = export_onnx(args.model, args.output, quantize=args.quantize, **options)
    else:
        texts = read_texts(args.calibration, args.text_column) if args.calibration else None
        report = export_openvino(args.model, args.output, quantize=args.quantize,
                                 calibration=texts, precision=args.precision, **options)
    print(f"exported {args.model} -> {report['path']} ({report['file']}, "
          f"{report['megabytes']:.1f} MB{', int8' if args.quantize else ''}); "
          f"largest difference from PyTorch on sample texts: {report['max_abs_diff']:.2g}")
    if args.format == "openvino":
        again = ("; auto is resolved again where it is loaded"
                 if recorded_precision(args.precision, args.quantize) == "auto" else "")
        print(f"runs at {report['precision']} precision here{again}")
    return 0

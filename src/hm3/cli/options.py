"""The options several commands share, each declared once: how models are loaded, where texts
come from, progress bars and reports. A command adds the groups it needs to its parser and
reads them back from the parsed arguments; nothing here imports torch or transformers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DEVICE_HELP = "cpu, cuda, ... (default: CUDA when available)"
MAX_LENGTH_HELP = "truncate texts to this many tokens (default: the tokenizer's maximum)"
ALLOW_PICKLE_HELP = "allow pickle .bin checkpoints (they can run arbitrary code)"
STDIO = "-"  # as --input: standard input; as predict's --output: standard output
PRECISION_HELP = ("an OpenVINO export's inference precision: auto (bf16, the head kept f32, where "
                  "OpenVINO lists BF16 for this CPU, else f32), f32 (PyTorch's scores) or bf16; "
                  "default: what `hm3 export --precision` recorded, else auto")
MERGED_PRECISION_HELP = ("the merged model's, if it is an OpenVINO export (the experts run as "
                         "they are): auto, f32 or bf16; default: what `hm3 export --precision` "
                         "recorded, else auto")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a command loads its models: `--device`, `--max-length`, `--batch-size`,
    `--allow-pickle` and `--precision` (a command without one of them reads the default here)."""

    device: str | None = None
    max_length: int | None = None
    batch_size: int = 32
    allow_pickle: bool = False
    precision: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        return cls(**{f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(cls)})

    def load_options(self) -> dict:
        """The keyword arguments of `hm3.model.load` these options set (`precision` apart: it is
        for the model a command runs, not for experts it compares it with)."""
        return {"device": self.device, "max_length": self.max_length,
                "allow_pickle": self.allow_pickle}


def add_model_options(parser: argparse.ArgumentParser, *, batch_size: int | None = 32,
                      max_length: str | None = MAX_LENGTH_HELP,
                      device: str | None = DEVICE_HELP) -> None:
    """Add the model-loading options. `batch_size`: its default, None for a command without
    one; `max_length` / `device`: the help, where the command says more, None for without."""
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size,
                            help=f"texts per forward pass (default {batch_size})")
    if max_length is not None:
        parser.add_argument("--max-length", type=int, help=max_length)
    if device is not None:
        parser.add_argument("--device", help=device)
    parser.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)


def add_precision(parser: argparse.ArgumentParser, help: str = "") -> None:
    """`--precision {auto,f32,bf16}`: an OpenVINO export's inference precision (`help`: what
    the command says of it; default `PRECISION_HELP`)."""
    parser.add_argument("--precision", choices=["auto", "f32", "bf16"],
                        help=help or PRECISION_HELP)


def add_text_column(parser: argparse.ArgumentParser,
                    help: str = "column/field holding the text (default: text)") -> None:
    parser.add_argument("--text-column", default="text", help=help)


def add_label_column(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-column", default="label",
                        help="column/field holding the label (default: label)")


def add_input(parser: argparse.ArgumentParser, help: str) -> None:
    """`--input FILE` (texts read as `hm3.data.read_texts` reads them) and `--text-column`."""
    parser.add_argument("--input", help=help)
    add_text_column(parser)


def add_limit(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--limit", type=int, help=help)


def add_progress(parser: argparse.ArgumentParser, help: str = "hide the progress bar") -> None:
    parser.add_argument("--no-progress", action="store_true", help=help)


def add_json_report(parser: argparse.ArgumentParser, what: str = "report") -> None:
    parser.add_argument("--json", dest="json_out", metavar="FILE",
                        help=f"also write the {what} as JSON here")


def write_json_report(path: str | None, report: dict) -> None:
    """Write `report` where `--json` asked (nothing without it)."""
    if path:
        write_output(path, json.dumps(report, indent=2) + "\n", "the report")


def write_output(path: str, text: str, what: str) -> None:
    """Write a command's output file (its missing folders created, as `merge -o` does) and say
    on stderr what went where: stdout stays the command's own output."""
    from hm3.checkpoint import write_text_atomic
    from hm3.errors import Hm3Error

    try:
        write_text_atomic(Path(path), text)
    except OSError as exc:
        raise Hm3Error(f"cannot write {what} to {path}: {exc.strerror or exc}") from None
    print(f"hm3: wrote {what} to {path}", file=sys.stderr)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")

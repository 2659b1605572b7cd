"""The ONNX Runtime backend: an exported model folder (`hm3 export`) run by onnxruntime.

`OnnxSequenceClassifier` answers the call a transformers classifier answers
(`model(**tokenizer(texts, return_tensors="pt")).logits`), so `hm3.model.MultiTaskClassifier`,
and with it predict / eval / bench / serve, uses an export unchanged. The graph's own per-task
probability outputs are for other ONNX Runtime consumers; hm3 reads its logits and applies the
same group softmax / sigmoid as for a PyTorch model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from hm3.errors import Hm3Error

ONNX_FILE = "model.onnx"
LAYOUT_FILE = "hm3_onnx.json"  # inputs, outputs, tasks and how the graph was made


def is_onnx_folder(folder: Path) -> bool:
    return (Path(folder) / ONNX_FILE).is_file() and (Path(folder) / LAYOUT_FILE).is_file()


class OnnxSequenceClassifier:
    """An ONNX Runtime session with the call interface of a transformers sequence classifier.

    Parameters
    ----------
    folder : an `hm3 export` folder (model.onnx, hm3_onnx.json, config.json, tokenizer files).
    threads : intra-op threads (default: $HM3_ONNX_THREADS, else ONNX Runtime's own choice).
    """

    backend = "onnx"

    def __init__(self, folder: str | Path, threads: int | None = None):
        # Imported here, not at the top: only ONNX folders pay onnxruntime's import time.
        import onnxruntime as ort

        folder = Path(folder)
        self.layout = json.loads((folder / LAYOUT_FILE).read_text())
        self.config = SimpleNamespace(**json.loads((folder / "config.json").read_text()))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = threads or int(os.environ.get("HM3_ONNX_THREADS", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(folder / ONNX_FILE), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise Hm3Error(f"cannot load {folder / ONNX_FILE} with ONNX Runtime: {exc}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.device = torch.device("cpu")

    def eval(self) -> "OnnxSequenceClassifier":
        return self

    def to(self, _device) -> "OnnxSequenceClassifier":
        return self  # the session runs on ONNX Runtime's CPU provider, whatever the device

    def run(self, **batch) -> dict[str, np.ndarray]:
        """Every output of the graph (logits and each task's probabilities), by name."""
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise Hm3Error(f"the ONNX model needs inputs {', '.join(missing)}")
        feed = {name: _numpy(batch[name]) for name in self.input_names}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def __call__(self, **batch) -> SimpleNamespace:
        feed = {name: _numpy(batch[name]) for name in self.input_names}
        (logits,) = self.session.run(["logits"], feed)
        return SimpleNamespace(logits=torch.from_numpy(logits))


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.cpu().numpy()
    return np.asarray(value, dtype=np.int64)

"""Reading each task's unlabelled calibration texts: deduplicated, held-out texts removed, with
where they came from."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hm3.data.blocks import CalibrationSpec
from hm3.data.tables import FILE_TYPES, hub_texts, read_texts
from hm3.errors import Hm3Error, Hm3Warning


@dataclass
class Calibration:
    """Each task's unlabelled texts, and where they came from (for the merged model's report)."""

    texts: dict[str, list[str]]
    provenance: dict[str, dict]


def source_texts(source: dict) -> list[str]:
    """The texts of one calibration source: a local file, or a split of a Hugging Face dataset
    (`subset`, `split`, default "train"); labels are ignored either way."""
    path = Path(source["path"]).expanduser()
    if path.suffix.lower() in (".txt", *FILE_TYPES) or path.exists():
        if source.get("subset") or source.get("split"):
            raise Hm3Error(f"calibration {source['path']}: subset and split apply to Hugging Face "
                           "datasets only")
        return read_texts(path, source["text_column"])
    return hub_texts(source["path"], source.get("subset"), source.get("split") or "train",
                     source["text_column"])


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def load_calibration(spec: CalibrationSpec, tasks: Sequence[str],
                     held_out: dict[str, Sequence[str]] | None = None) -> Calibration:
    """Read every task's calibration texts: deduplicated, texts found in the held-out
    (validation / test) data removed, then the first `spec.limit` kept."""
    held = {_key(t) for texts in (held_out or {}).values() for t in texts}
    out, provenance = {}, {}
    for task in tasks:
        source = spec.sources[task]
        seen, kept, dropped = set(), [], 0
        for text in source_texts(source):
            text = text.strip()
            key = _key(text)
            if not key or key in seen:
                continue
            seen.add(key)
            if key in held:
                dropped += 1
                continue
            kept.append(text)
            if len(kept) == spec.limit:
                break
        if not kept:
            raise Hm3Error(f"calibration.texts.{task}: {source['path']} gave no usable texts")
        if dropped:
            warnings.warn(f"calibration texts of {task}: {dropped} also appear in the held-out "
                          "(validation or test) data and were left out", Hm3Warning, stacklevel=2)
        out[task] = kept
        digest = hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]
        provenance[task] = {"path": source["path"], "texts": len(kept),
                            "held_out_removed": dropped, "sha256_16": digest}
    return Calibration(out, provenance)

"""Reading each task's unlabelled calibration texts: deduplicated, held-out texts removed, with
where they came from."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hm3.data.blocks import CalibrationSpec
from hm3.data.tables import FILE_TYPES, hub_texts, looks_like_path, read_texts
from hm3.errors import Hm3Error, Hm3Warning

# Under this many calibration texts a task is warned about: on the MPNet zoo the label-free merge
# lost 4.5-5.9 points with 64 texts per task against 2.1-2.4 with 171-640 (benchmarks/RESULTS.md
# section 10), and the docs ask for several hundred per task.
FEW_TEXTS = 128


@dataclass
class Calibration:
    """Each task's unlabelled texts, and where they came from (for the merged model's report)."""

    texts: dict[str, list[str]]
    provenance: dict[str, dict]


def source_texts(source: dict) -> list[str]:
    """The texts of one calibration source: a local file, or a split of a Hugging Face dataset
    (`subset`, `split`, default "train"); labels are ignored either way."""
    path = Path(source["path"]).expanduser()
    if (path.suffix.lower() in (".txt", *FILE_TYPES) or path.exists()
            or looks_like_path(source["path"])):
        if source.get("subset") or source.get("split"):
            raise Hm3Error(f"calibration {source['path']}: subset and split apply to Hugging Face "
                           "datasets only")
        return read_texts(path, source["text_column"])
    return hub_texts(source["path"], source.get("subset"), source.get("split") or "train",
                     source["text_column"])


def text_key(text: str) -> str:
    """The form two texts must share to count as the same text (case and spacing ignored)."""
    return " ".join(text.split()).casefold()


def text_hash(text: str) -> str:
    """A short hash of a text's key: what a merged model records of its calibration texts, so
    that a check can tell whether it is given those texts again (without storing them)."""
    return hashlib.sha256(text_key(text).encode()).hexdigest()[:16]


def load_calibration(spec: CalibrationSpec, tasks: Sequence[str],
                     held_out: dict[str, Sequence[str]] | None = None) -> Calibration:
    """Read every task's calibration texts: its own source first, then the shared one (each
    source is read once), deduplicated, texts found in any held-out (validation / test) data
    removed, then the first `spec.limit` kept."""
    held = {text_key(t) for texts in (held_out or {}).values() for t in texts}
    cache: dict[str, list[str]] = {}

    def read(source: dict) -> list[str]:
        name = repr(sorted(source.items()))
        if name not in cache:
            cache[name] = source_texts(source)
        return cache[name]

    out, provenance = {}, {}
    for task in tasks:
        seen, kept, dropped, used = set(), [], 0, []
        for source in spec.sources_of(task):
            count = 0
            for text in read(source):
                if len(kept) == spec.limit:
                    break
                text = text.strip()
                key = text_key(text)
                if not key or key in seen:
                    continue
                seen.add(key)
                if key in held:
                    dropped += 1
                    continue
                kept.append(text)
                count += 1
            used.append({"path": source["path"], "shared": source is spec.shared,
                         "texts": count})
        if not kept:
            paths = " and ".join(s["path"] for s in spec.sources_of(task))
            raise Hm3Error(f"calibration texts of {task}: {paths} gave no usable texts "
                           "(empty, or every text is also in the held-out data)")
        if dropped:
            warnings.warn(f"calibration texts of {task}: {dropped} also appear in the held-out "
                          "(validation or test) data and were left out", Hm3Warning, stacklevel=2)
        if len(kept) < FEW_TEXTS:
            warnings.warn(f"calibration texts of {task}: only {len(kept)}; label-free steps fitted "
                          f"to fewer than {FEW_TEXTS} texts lose points (at base size give 500 or "
                          "more of the task's own domain; see docs/calibration.md)", Hm3Warning,
                          stacklevel=2)
        out[task] = kept
        digest = hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]
        provenance[task] = {"path": " + ".join(u["path"] for u in used if u["texts"]),
                            "sources": used, "texts": len(kept), "held_out_removed": dropped,
                            "sha256_16": digest}
    return Calibration(out, provenance)

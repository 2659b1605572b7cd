"""Lazy tensor access to Hugging Face checkpoints, and the atomic, streaming safetensors writer."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open

from hm3.data.tables import looks_like_path
from hm3.errors import Hm3Error, Hm3Warning

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
                   "spm.model")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]

_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class Checkpoint:
    """A model directory (local, or downloaded from the hub) whose tensors are read one at a
    time."""

    def __init__(self, reference: str, revision: str | None = None, allow_pickle: bool = False):
        self.reference = reference
        self.path = resolve(reference, revision, allow_pickle)
        self.config = read_config(self.path)
        self._files: dict[str, Path] = {}  # tensor name -> file holding it
        self._handles: dict[Path, object] = {}
        self._readers: dict[Path, SafetensorsReader] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._memory: dict[str, torch.Tensor] | None = None  # filled by `preload`
        self._index(allow_pickle)

    def _index(self, allow_pickle: bool) -> None:
        if (self.path / SAFE_INDEX).is_file():
            self._files = self._read_index(SAFE_INDEX)
        elif (self.path / SAFE_SINGLE).is_file():
            names = self._open(self.path / SAFE_SINGLE).keys()
            self._files = {name: self.path / SAFE_SINGLE for name in names}
        elif (self.path / PICKLE_INDEX).is_file() or (self.path / PICKLE_SINGLE).is_file():
            if not allow_pickle:
                raise pickle_refused(self.reference, "recipe: allow_pickle: true")
            if (self.path / PICKLE_INDEX).is_file():
                self._files = self._read_index(PICKLE_INDEX)
            else:
                names = self._load_pickle(self.path / PICKLE_SINGLE)
                self._files = {name: self.path / PICKLE_SINGLE for name in names}
        else:
            raise Hm3Error(f"{self.reference}: no model.safetensors (or index) in {self.path}")

    def _read_index(self, name: str) -> dict[str, Path]:
        try:
            weight_map = json.loads((self.path / name).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise Hm3Error(f"{self.path / name} is not a valid shard index: {exc}") from None
        files = {tensor: self.path / shard for tensor, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.is_file():
                raise Hm3Error(f"{self.reference}: shard {shard.name} named in {name} is missing")
            if shard.suffix == ".safetensors":
                self._open(shard)
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise Hm3Error(f"cannot read {file}: it is truncated or not a safetensors "
                               f"file ({exc}); download it again") from None
        return self._handles[file]

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            try:
                self._pickled[file] = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise Hm3Error(f"cannot read {file}: {exc}") from None
        return self._pickled[file]

    def keys(self) -> list[str]:
        return sorted(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._files[name]
        if file.suffix == ".safetensors":
            return tuple(self._open(file).get_slice(name).get_shape())
        return tuple(self._load_pickle(file)[name].shape)

    def dtype(self, name: str) -> str:
        """The stored dtype code, e.g. F32 or BF16."""
        file = self._files[name]
        if file.suffix == ".safetensors":
            return self._open(file).get_slice(name).get_dtype()
        return _DTYPE_CODES[self._load_pickle(file)[name].dtype]

    def preload(self) -> None:
        """Keep every tensor in memory from now on: for many merges of the same inputs (search)."""
        if self._memory is None:
            self._memory = {name: self.tensor(name) for name in self.keys()}

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (from disk unless preloaded), in memory of its own unless preloaded;
        NaN or Inf is an error."""
        if self._memory is not None:
            return self._memory[name]
        if self._files[name].suffix != ".safetensors":
            return self._checked(name, self._load_pickle(self._files[name])[name])
        shape, dtype = self.shape(name), TORCH_DTYPES.get(self.dtype(name))
        if dtype is None:  # a dtype outside TORCH_DTYPES (e.g. float8): safetensors reads it
            return self._checked(name, self._stored(name))
        value = torch.empty(shape, dtype=dtype)
        self.read_into(name, value.view(-1))
        return value

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Fill `out` (one dimension, contiguous) with entries start, start + 1, ... of the
        flattened tensor `name`, converted to out's dtype, and return it: a merge streams a
        tensor in parts through buffers it reuses, never allocating one per read. Read with
        plain file reads (`SafetensorsReader`); NaN or Inf is an error."""
        stop = start + out.numel()
        if self._memory is not None:
            return out.copy_(self._memory[name].reshape(-1)[start:stop])
        file = self._files[name]
        try:
            if file.suffix != ".safetensors":
                stored = self._load_pickle(file)[name].reshape(-1)
                return self._checked(name, out.copy_(stored[start:stop]))
            self._open(file)  # validates the file once
            if file not in self._readers:
                self._readers[file] = SafetensorsReader(file)
            reader = self._readers[file]
            stored = TORCH_DTYPES.get(reader.header[name]["dtype"])
            if stored is None:
                return self._checked(name, out.copy_(self._stored(name).reshape(-1)[start:stop]))
            target = out if stored == out.dtype else torch.empty(out.numel(), dtype=stored)
            reader.read(name, target, start)
            if target is not out:
                out.copy_(target)
        except (SafetensorError, OSError) as exc:
            raise Hm3Error(f"cannot read tensor {name} from {file}: {exc}") from None
        return self._checked(name, out)

    def _stored(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._files[name]).get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise Hm3Error(f"cannot read tensor {name} from {self._files[name]}: {exc}") from None

    def _checked(self, name: str, value: torch.Tensor) -> torch.Tensor:
        # A sum is finite only if every entry is (cheap); the elementwise check only to confirm.
        if value.is_floating_point() and not math.isfinite(value.sum()) \
                and not torch.isfinite(value).all():
            raise Hm3Error(f"{self.reference}: tensor {name} contains NaN or Inf; "
                           "this checkpoint is broken, re-export or re-download it")
        return value


class SafetensorsReader:
    """A safetensors file whose tensors are read with plain file reads into memory the caller
    owns (safetensors format: an 8-byte little-endian header size, a JSON header of dtype /
    shape / data_offsets, then the data).

    Not through a memory map: a mapped file's pages count in the process's resident memory for
    as long as the mapping lives, so a merge reading eight base-size experts that way grows by a
    whole checkpoint per expert (RESULTS.md §7), where reading holds only what it reads into."""

    def __init__(self, file: Path):
        self.file = file
        self._fd = os.open(file, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)  # closed with the reader
        size = bytearray(8)
        self._pread(size, 0, "the header")
        header = bytearray(struct.unpack("<Q", size)[0])
        self._pread(header, 8, "the header")
        self.header = json.loads(header)
        self._data_start = 8 + len(header)

    def read(self, name: str, out: torch.Tensor, start: int = 0) -> None:
        """Fill `out` (one dimension, contiguous, the stored dtype) with entries start, start + 1,
        ... of tensor `name` as stored."""
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        size = out.element_size()
        count = math.prod(entry["shape"])
        if (end - begin) != count * size:
            raise OSError(f"tensor {name}: {end - begin} bytes stored for shape {entry['shape']}")
        if start + out.numel() > count:
            raise ValueError(f"tensor {name} has {count} entries, asked for {start} to "
                             f"{start + out.numel()}")
        if out.numel():
            self._pread(out.view(torch.uint8).numpy(), self._data_start + begin + start * size,
                        f"tensor {name}")

    def _pread(self, buffer, offset: int, what: str) -> None:
        # One read returns at most about 2 GiB on Linux: large tensors take several.
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if not got:
                raise OSError(f"the file ends inside {what}")
            done += got


def pickle_refused(reference: str, option: str) -> Hm3Error:
    """The one refusal of pickle-only weights; `option` names how the caller allows them."""
    return Hm3Error(f"{reference} has only pickle (.bin) weights, which can run arbitrary code "
                    "when loaded; convert it to safetensors, or pass --allow-pickle "
                    f"({option}) if you trust it")


def resolve(reference: str, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local directory for a path or hub id (the hub files are downloaded, weights included)."""
    local = Path(reference).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise Hm3Error(f"{reference} is a file; pass the model's directory")
    if looks_like_path(reference):
        raise Hm3Error(f"model directory {reference} does not exist")
    from huggingface_hub import snapshot_download  # lazy: only hub ids need the hub client

    patterns = _HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(reference, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types: offline, 404, auth
        raise Hm3Error(f"cannot find {reference!r} locally or download it from the Hugging Face "
                       f"hub ({type(exc).__name__}: {exc}); check the id or pass a local "
                       "directory") from None


def read_config(path: Path) -> dict:
    file = path / "config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Hm3Error(f"{path} has no config.json; is it a Hugging Face model "
                       "directory?") from None
    except ValueError as exc:
        raise Hm3Error(f"{file} is not valid JSON: {exc}") from None


def load_tokenizer(roots: Sequence[Path], missing: str):
    """The tokenizer of the first folder in `roots` that has tokenizer files (experts usually
    ship the base's), with a pad token for batching; an error saying `missing` if none has."""
    from transformers import AutoTokenizer  # lazy: slow to import, and a merge never needs it

    for root in roots:
        if any((Path(root) / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(root)
            if tokenizer.pad_token is None:  # decoder classifiers often have none
                tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
    raise Hm3Error(missing)


def check_destination(destination: str | Path, overwrite: bool) -> Path:
    """The output folder, resolved; an error if it exists and may not be replaced."""
    destination = Path(destination).resolve()
    if destination.exists() and not overwrite:
        raise Hm3Error(f"{destination} already exists; choose another output, or replace it "
                       "(--overwrite on the command line, overwrite=True in Python)")
    return destination


@contextmanager
def atomic_directory(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes `destination` only if the block succeeds.

    The folder is hidden, `.NAME.pid<PID>.<random>.partial`; a process killed outright (kill -9,
    power cut) cannot remove it, so the next `atomic_directory` for the same destination does
    (see `remove_leftovers`).
    """
    destination = check_destination(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(destination)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.pid{os.getpid()}.",
                                    suffix=".partial", dir=destination.parent))
    try:
        # mkdtemp makes the folder private (700); the output gets the mode of any new folder
        staging.chmod(0o777 & ~_umask())
        yield staging
        if destination.exists():
            retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.replace(destination, retired)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask

def remove_leftovers(destination: Path) -> list[Path]:
    """Remove the staging folders that writes into `destination` left when they were killed:
    only this destination's (`.NAME.pid<PID>.<random>.partial`, or `.NAME.<random>.partial`
    from hm3 versions before the process id was in the name), and only when that process is
    no longer running, so a concurrent write to the same destination keeps its own. Warns,
    naming what was removed."""
    pattern = re.compile(rf"\.{re.escape(destination.name)}\.(?:pid(\d+)\.)?\w+\.partial")
    removed = []
    for folder in sorted(destination.parent.glob(f".{glob.escape(destination.name)}.*.partial")):
        match = pattern.fullmatch(folder.name)
        if not match or not folder.is_dir() or folder.is_symlink():
            continue
        if match.group(1) and _running(int(match.group(1))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        warnings.warn(f"removed {len(removed)} unfinished folder(s) left beside {destination} by "
                      f"an interrupted write: {', '.join(f.name for f in removed)}",
                      Hm3Warning, stacklevel=4)
    return removed


def _running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temporary sibling, then rename it over `path`. The temporary name carries
    the process id, so workers writing the same file never share one. Missing parent folders
    are created, as for a model folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class ShardedWriter:
    """Streams tensors into safetensors shards whose layout is planned before any data is written.

    The plan (names, shapes, dtypes) is known up front, so each shard's header is written first
    and tensors follow one by one: memory holds one tensor, never a whole shard.
    """

    def __init__(self, folder: Path, plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_size: int, metadata: dict[str, str] | None = None):
        self.folder = folder
        self.shards = _plan_shards(plan, max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._plan = plan
        self._shard_of = {name: i for i, names in enumerate(self.shards) for name in names}
        self._next = [0] * len(self.shards)
        self._files: list = [None] * len(self.shards)

    def shard_name(self, index: int) -> str:
        if len(self.shards) == 1:
            return SAFE_SINGLE
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; tensors must come in plan order within each shard."""
        shape, dtype = self._plan[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: planned {shape} {dtype}, got {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        shard = self._shard_of[name]
        expected = self.shards[shard][self._next[shard]]
        if name != expected:
            raise ValueError(f"tensors out of order: expected {expected}, got {name}")
        handle = self._files[shard] or self._open_shard(shard)
        if tensor.numel():  # a view of the tensor's bytes: no copy on the way to the file
            handle.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
        self._next[shard] += 1
        if self._next[shard] == len(self.shards[shard]):
            handle.close()

    def _open_shard(self, shard: int):
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name in self.shards[shard]:
            shape, dtype = self._plan[name]
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format wants 8-byte aligned data
        handle = open(self.folder / self.shard_name(shard), "wb")
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        self._files[shard] = handle
        return handle

    def close(self) -> None:
        """Check every planned tensor was written and write the shard index when there are
        shards."""
        missing = [names[n] for names, n in zip(self.shards, self._next) if n < len(names)]
        for handle in self._files:
            if handle is not None and not handle.closed:
                handle.close()
        if missing:
            raise ValueError(f"tensors never written: {', '.join(missing[:5])}")
        if len(self.shards) > 1:
            total = sum(_nbytes(*spec) for spec in self._plan.values())
            weight_map = {name: self.shard_name(i) for name, i in sorted(self._shard_of.items())}
            write_json_atomic(self.folder / SAFE_INDEX,
                              {"metadata": {"total_size": total}, "weight_map": weight_map})


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def _plan_shards(plan: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in plan.items():
        nbytes = _nbytes(*spec)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards

"""A GGUF file's metadata and tensor table, with the tensors memory-mapped, opened in milliseconds
after the first time.

`gguf.GGUFReader` turns every metadata element into numpy views when it opens a file. The
tokenizer's vocabulary and merges (about 100K strings for SmolLM2, 400K for Llama 3) take seconds,
although loading reads none of them: the tokenizer comes from its own converted cache. So the first
open of a file goes through GGUFReader and saves what loading needs (the scalar metadata and small
arrays, and each tensor's type, shape, offset and element layout) in the edgespec cache, keyed by
the file's path, size, modification time and the bytes at both ends. Later opens read that index
and memory-map the tensors at the recorded offsets. An index that is missing, unreadable or does
not fit the file is ignored; a cache that cannot be written only costs the speed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX_VERSION = 1
MAX_INDEXED_ARRAY = 1024  # longer metadata arrays (the tokenizer's) stay out of the index
_EDGE_BYTES = 1 << 16     # hashed at both ends of the file, with its size and mtime, for the key


@dataclass(frozen=True)
class GGUFTensor:
    """The parts of a gguf.ReaderTensor that loading reads, with the same meanings."""

    name: str
    tensor_type: Any        # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    data: np.ndarray        # read-only view of the file: elements, or uint8 [rows, block bytes]


@dataclass(frozen=True)
class Unreadable:
    """A metadata field GGUFReader could not decode, or a long array the index leaves out: an error
    only for a caller that reads it."""

    reason: str


@dataclass
class GGUFHeader:
    fields: dict[str, Any]  # metadata key -> value (str, int, float, bool, list) or Unreadable
    tensors: list[GGUFTensor]


def read_header(path: str | Path) -> GGUFHeader:
    """The header of the GGUF file at `path`, from its index when one fits the file, else through
    gguf.GGUFReader (whose exceptions for unreadable files pass through), then indexed."""
    import gguf  # noqa: PLC0415 - only needed for GGUF input

    path = Path(path)
    index_path = _index_path(path)
    if index_path is not None:
        header = _from_index(path, index_path, gguf)
        if header is not None:
            return header
    reader = gguf.GGUFReader(str(path))
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > MAX_INDEXED_ARRAY:
            fields[key] = Unreadable(f"an array of {len(field.data)} elements, which the header index leaves out")
            continue
        try:
            fields[key] = field.contents()
        except Exception as exc:  # gguf raises plain Exceptions for malformed fields
            fields[key] = Unreadable(str(exc))
    tensors = [GGUFTensor(t.name, t.tensor_type, tuple(int(s) for s in t.shape), t.data) for t in reader.tensors]
    if index_path is not None:
        _save_index(index_path, fields, reader.tensors)
    return GGUFHeader(fields, tensors)


def _index_path(path: Path) -> Path | None:
    from .demo import cache_dir  # noqa: PLC0415

    try:
        st = path.stat()
        with open(path, "rb") as f:
            head = f.read(_EDGE_BYTES)
            f.seek(max(0, st.st_size - _EDGE_BYTES))
            tail = f.read(_EDGE_BYTES)
    except OSError:
        return None
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
    h.update(head)
    h.update(tail)
    return cache_dir() / "gguf-index" / f"{h.hexdigest()[:32]}.json"


def _save_index(index_path: Path, fields: dict[str, Any], tensors: list[Any]) -> None:
    index = {
        "version": INDEX_VERSION,
        "fields": {k: ({"unreadable": v.reason} if isinstance(v, Unreadable) else v) for k, v in fields.items()},
        "tensors": [{"name": t.name, "type": int(t.tensor_type), "shape": [int(s) for s in t.shape],
                     "offset": int(t.data_offset), "dtype": t.data.dtype.str, "array_shape": list(t.data.shape)}
                    for t in tensors],
    }
    tmp = index_path.with_name(index_path.name + f".tmp{os.getpid()}")
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(index))
        tmp.replace(index_path)
    except (OSError, TypeError, ValueError):  # a read-only cache, or a value JSON cannot hold
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _from_index(path: Path, index_path: Path, gguf: Any) -> GGUFHeader | None:
    try:
        index = json.loads(index_path.read_text())
        if index.get("version") != INDEX_VERSION:
            return None
        data = np.memmap(path, mode="r")
        tensors = []
        for t in index["tensors"]:
            dtype = np.dtype(t["dtype"])
            count = int(np.prod(t["array_shape"], dtype=np.int64))
            start, end = int(t["offset"]), int(t["offset"]) + count * dtype.itemsize
            if start < 0 or end > data.size:
                return None
            view = data[start:end].view(dtype).reshape(t["array_shape"])
            tensors.append(GGUFTensor(t["name"], gguf.GGMLQuantizationType(t["type"]), tuple(t["shape"]), view))
        fields = {k: (Unreadable(v["unreadable"]) if isinstance(v, dict) else v) for k, v in index["fields"].items()}
        return GGUFHeader(fields, tensors)
    except (OSError, ValueError, KeyError, TypeError):  # no index, or one this version cannot use
        return None

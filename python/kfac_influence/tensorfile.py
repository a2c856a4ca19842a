"""Safetensors files written and read one tensor at a time, for results larger than memory (a big model's curvature).

``write_streamed(path, layout, produce, header)`` writes the standard safetensors format (8-byte little-endian
header size, JSON header with dtype / shape / data offsets and the library's ``kfac_influence`` metadata entry, then
the tensors' bytes) from ``layout`` (key -> (dtype, shape)) known up front, asking ``produce(key)`` for one tensor
at a time: the peak is one tensor, not the file. The write is atomic like ``storage.save_tensors`` (temporary file,
fsync, rename). ``TensorFile`` reads keys one at a time (safetensors' own reader: memory-mapped, a copy per
tensor). Files written here are ordinary safetensors files: ``storage.load_tensors`` and ``safetensors`` read them.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from safetensors import safe_open

from .storage import FORMAT_VERSION, META_KEY

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}

Layout = Mapping[str, Tuple[torch.dtype, Sequence[int]]]


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_streamed(path: os.PathLike, layout: Layout, produce: Callable[[str], torch.Tensor], header: dict) -> None:
    """Write ``{key: produce(key)}`` for the keys of ``layout`` (in its order) with the library header ``header``.

    Each produced tensor must have the dtype and shape its layout entry promised (checked: a mismatch raises and
    leaves no file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries, offset = {}, 0
    for key, (dtype, shape) in layout.items():
        if dtype not in _DTYPES:
            raise TypeError(f"{key}: dtype {dtype} cannot be stored")
        size = _nbytes(dtype, shape)
        entries[key] = {"dtype": _DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset,
                                                                                                   offset + size]}
        offset += size
    meta = {"__metadata__": {META_KEY: json.dumps({"format": FORMAT_VERSION, **header}, sort_keys=True)}}
    head = json.dumps({**meta, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for key, (dtype, shape) in layout.items():
                t = produce(key)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{key}: produced {t.dtype} {tuple(t.shape)}, the layout said {dtype} "
                                     f"{tuple(shape)}")
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class TensorFile:
    """Read access to one file written by this library, a tensor at a time: ``keys``, ``header``, ``get(key)``."""

    def __init__(self, path: os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: {self.path}")
        with safe_open(str(self.path), framework="pt") as f:
            self.keys: List[str] = list(f.keys())
        # the header through the library's checks (format version, kind); the tensors are not read here
        self.header = _read_header(self.path)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def get_many(self, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}


def _read_header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise ValueError(f"{path} was not written by kfac_influence (no '{META_KEY}' header)")
    header = json.loads(meta[META_KEY])
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {header.get('format')}, this library reads {FORMAT_VERSION}")
    return header

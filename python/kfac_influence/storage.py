"""Atomic files (bytes, text, JSON, safetensors with a JSON header) and model fingerprints: the one storage module
of the library, the application and the report.

Header: ``{"format": FORMAT_VERSION, "kind": ..., ...}`` stored as the safetensors metadata entry "kfac_influence".
Every write goes to a temporary file in the target folder, is fsynced, then renamed over the target.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Sequence, Tuple

import torch
from safetensors.torch import load_file
from safetensors import safe_open

FORMAT_VERSION = 1
META_KEY = "kfac_influence"


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: os.PathLike, tensors: Dict[str, torch.Tensor], header: dict) -> None:
    """Write ``tensors`` and ``header`` atomically, one tensor at a time (``write_streamed``: the bytes go from
    the tensors to the file, never through a second in-memory copy of the whole state)."""
    write_streamed(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, tensors.__getitem__, header)


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}

Layout = Mapping[str, Tuple[torch.dtype, Sequence[int]]]


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_tensor_bytes(f, t: torch.Tensor) -> None:
    """Write one tensor's bytes to the open binary file ``f`` from a contiguous CPU view (no copy of the bytes:
    a checkpoint never holds its state twice)."""
    t = t.detach().cpu().contiguous()
    if t.numel():
        f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def write_streamed(path: os.PathLike, layout: Layout, produce: Callable[[str], torch.Tensor], header: dict) -> None:
    """Write ``{key: produce(key)}`` for the keys of ``layout`` (key -> (dtype, shape), in its order) with the
    library header ``header``, in the standard safetensors format (8-byte little-endian header size, JSON header
    with dtype / shape / data offsets and the ``kfac_influence`` metadata entry, then the bytes), asking
    ``produce`` for one tensor at a time: the peak is one tensor, not the file. Atomic (temporary file, fsync,
    rename). Each produced tensor must have the dtype and shape its layout entry promised (checked: a mismatch
    raises and leaves no file)."""
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
                write_tensor_bytes(f, t)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def short_message(exc: BaseException, limit: int = 160) -> str:
    """``exc``'s message on one line, at most ``limit`` characters (a corrupt file's error may quote kilobytes of
    its header): what an error message built from a library exception should quote."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_tensors(path: os.PathLike) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a file written by ``save_tensors``: (tensors, header). Missing, truncated, corrupt or foreign files
    raise ``FileNotFoundError`` / ``ValueError`` with a one-line message of bounded length naming the file (never
    a quote of the whole header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files (SafetensorError, OSError, ...)
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt: "
                         f"{type(e).__name__}: {short_message(e)})") from None
    if META_KEY not in meta and "json" in meta:  # the application's files before storage.py was its only writer
        raise ValueError(f"{path} was written by an earlier version of kfac-influence (metadata key 'json')")
    if META_KEY not in meta:
        raise ValueError(f"{path} was not written by kfac_influence (no '{META_KEY}' header)")
    try:
        header = json.loads(meta[META_KEY])
    except ValueError as e:
        raise ValueError(f"{path} has a corrupt header ({short_message(e, 80)})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt header (not a JSON object)")
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {header.get('format')}, this library reads {FORMAT_VERSION}")
    return tensors, header


def model_fingerprint(named_params: Iterable[Tuple[str, torch.Tensor]]) -> Dict[str, str]:
    """Hashes of tracked parameters: ``structure`` (names and shapes) and ``values`` (names, shapes, bytes)."""
    structure = hashlib.sha256()
    values = hashlib.sha256()
    for name, p in named_params:
        line = f"{name}:{tuple(p.shape)};".encode()
        structure.update(line)
        values.update(line)
        values.update(p.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
    return {"structure": structure.hexdigest()[:16], "values": values.hexdigest()[:16]}

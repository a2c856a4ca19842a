"""Atomic files (bytes, text, JSON, safetensors with a JSON header) and model fingerprints: the one storage module
of the library, the application and the report.

Header: ``{"format": FORMAT_VERSION, "kind": ..., ...}`` stored as the safetensors metadata entry "kfac_influence".
Every write goes to a temporary file in the target folder, is fsynced, then renamed over the target.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Tuple

import torch
from safetensors.torch import load_file, save_file
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
    """Write ``tensors`` (contiguous CPU copies) and ``header`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {META_KEY: json.dumps({"format": FORMAT_VERSION, **header}, sort_keys=True)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        with open(tmp, "rb") as f:
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

"""Safetensors files read one tensor at a time, for results larger than memory (a big model's curvature).

``TensorFile`` reads keys one at a time (safetensors' own reader: memory-mapped, a copy per tensor) and checks
the library's header without reading any tensor. Files are written by ``storage.write_streamed`` (one tensor at a
time from a layout known up front) or ``storage.save_tensors``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from safetensors import safe_open

from .storage import FORMAT_VERSION, META_KEY

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

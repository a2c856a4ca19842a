"""Atomic file writes (temp file in the same folder, fsync, then ``os.replace``) for JSON, text and safetensors."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_save_tensors", "load_tensors"]


def _tmp(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Save contiguous CPU tensors as safetensors; ``metadata`` is stored as JSON under the key ``"json"``."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp(path)
    meta = None if metadata is None else {"json": json.dumps(metadata, sort_keys=True, default=str)}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_tensors(path: str):
    """``(tensors, metadata)`` from a file written by :func:`atomic_save_tensors`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta["json"]) if "json" in meta else {}

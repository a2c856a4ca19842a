"""Content fingerprints of the inputs a stored result was computed from (data, queries, tensors), so that a
checkpoint or stage made from other inputs is never resumed.

``data_fingerprint``: a tensor, a tuple / list of tensors, or a map-style Dataset. Tensors are hashed by dtype,
shape and bytes. A Dataset that defines ``fingerprint() -> str`` is trusted to describe itself (cheap for big
image folders; a Dataset over tensors ``x`` may return ``tensors_fingerprint([x])``, which equals the fingerprint
of ``x`` itself); any other Dataset is read once, item by item, and its items hashed the same way.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Mapping

import torch

from .data_iter import num_examples


def _update(h, obj: Any) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(f"{k!s}=".encode())
            _update(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (tuple, list)):
        h.update(b"(")
        for x in obj:
            _update(h, x)
        h.update(b")")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def tensors_fingerprint(tensors: Iterable[Any]) -> str:
    """sha256 (16 hex digits) of tensors (or nested tuples / dicts of them), in order."""
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
        del t  # before a generator makes the next item (a streamed curvature's layers: one in memory at a time)
    return h.hexdigest()[:16]


def data_fingerprint(data: Any) -> str:
    """Fingerprint of a data set as the passes read it (see the module docstring)."""
    if torch.is_tensor(data) or (isinstance(data, (tuple, list)) and all(torch.is_tensor(t) for t in data)):
        return tensors_fingerprint([data])
    own = getattr(data, "fingerprint", None)
    if callable(own):
        return str(own())
    n = num_examples(data)
    return tensors_fingerprint([n, *(data[i] for i in range(n))])


def _settings_value(v: Any) -> Any:
    """A stable stand-in for an attribute of a task: tensors as they are, plain values as they are, objects with
    a (diffusers-style) ``config`` by it, anything else by its type (never a repr holding a memory address)."""
    if torch.is_tensor(v) or v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return [_settings_value(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted(map(repr, v))
    if isinstance(v, Mapping):
        return {str(k): _settings_value(x) for k, x in v.items()}
    config = getattr(v, "config", None)
    if isinstance(config, Mapping):
        # diffusers' private entries (e.g. _use_default_values, a list made from a set: its order changes from
        # one process to the next) are bookkeeping, not settings
        return {"type": type(v).__name__,
                "config": _settings_value({k: x for k, x in config.items() if not str(k).startswith("_")})}
    return f"<{type(v).__name__}>"


def settings_fingerprint(obj: Any, exclude: Iterable[str] = ()) -> str:
    """Fingerprint of an object's type and instance attributes (but ``exclude``), each as ``_settings_value``."""
    skip = set(exclude)
    return tensors_fingerprint([type(obj).__name__,
                                _settings_value({k: v for k, v in vars(obj).items() if k not in skip})])


def task_fingerprint(task: Any) -> str:
    """Fingerprint of a task's settings (its draws, measurement, schedule): ``task.fingerprint()`` when it
    defines one (e.g. to leave out attributes that do not change results), else ``settings_fingerprint``."""
    own = getattr(task, "fingerprint", None)
    if callable(own):
        return f"{type(task).__name__}:{own()}"
    return settings_fingerprint(task)


def path_fingerprint(path: str) -> str:
    """sha256 (16 hex digits) of a file's content, or of a folder's files (relative names and contents; hidden
    files skipped)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(dp, f) for dp, dns, fs in os.walk(path) for f in fs if not f.startswith("."))
    for p in files:
        h.update(os.path.relpath(p, path).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]

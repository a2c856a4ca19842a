"""Batching of user data: a tensor (N, ...), a tuple/list of tensors sharing N, or a map-style Dataset."""
from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

import torch
from torch.utils.data import Dataset, default_collate


def num_examples(data: Any) -> int:
    if torch.is_tensor(data):
        return int(data.shape[0])
    if isinstance(data, (tuple, list)) and data and all(torch.is_tensor(t) for t in data):
        sizes = {int(t.shape[0]) for t in data}
        if len(sizes) != 1:
            raise ValueError(f"tensors in the data tuple have different numbers of examples: {sorted(sizes)}")
        return sizes.pop()
    if isinstance(data, Dataset) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return len(data)
    raise TypeError(f"data must be a tensor, a tuple of tensors or a Dataset, got {type(data).__name__}")


def get_batch(data: Any, idx: torch.Tensor):
    if torch.is_tensor(data):
        return data[idx]
    if isinstance(data, (tuple, list)) and all(torch.is_tensor(t) for t in data):
        return tuple(t[idx] for t in data)
    return default_collate([data[int(i)] for i in idx])


def iter_batches(data: Any, batch_size: int, start: int = 0,
                 stop: Optional[int] = None) -> Iterator[Tuple[int, torch.Tensor, Any]]:
    """Yield ``(batch_number, indices, batch)`` over consecutive examples, batch numbers ``start`` to ``stop``
    (default: the last); batches outside are never read."""
    n = num_examples(data)
    if n == 0:
        raise ValueError("the data set is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for b, s in enumerate(range(0, n, batch_size)):
        if stop is not None and b >= stop:
            break
        if b < start:
            continue
        idx = torch.arange(s, min(n, s + batch_size))
        yield b, idx, get_batch(data, idx)


def num_batches(data: Any, batch_size: int) -> int:
    return -(-num_examples(data) // batch_size)

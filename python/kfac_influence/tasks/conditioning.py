"""Conditions of a conditional diffusion model: how a batch carries them and how they reach the model.

Two kinds (``Conditioning.kind``), each passed to the model with every draw as the keyword diffusers uses:

  "class"  integer labels ``(B,)`` -> ``model(x_t, t, class_labels=y)`` (``UNet2DModel(num_class_embeds=K)``, or
           a ``UNet2DConditionModel`` with class embeddings). Labels lie in ``[0, K)``.
  "text"   token embeddings ``(B, L, E)`` -> ``model(x_t, t, encoder_hidden_states=emb)``, with an optional mask
           ``(B, L)`` (bool, or 0/1; 1 = attend) -> ``encoder_attention_mask=mask``
           (``UNet2DConditionModel``: cross-attention ``to_k`` / ``to_v`` take the L tokens as input positions).

Batches (what ``kfac_influence.data_iter`` hands a task for B examples):

  tuple / list  ``(images, labels)``, ``(images, embeddings)`` or ``(images, embeddings, mask)``
  dict          ``{"image": ..., "class_label": ...}`` (also "class_labels" or "label"), or
                ``{"image": ..., "encoder_hidden_states": ..., "encoder_attention_mask": ...}`` (mask optional):
                what ``default_collate`` makes of a map-style Dataset returning such dicts.

``images`` is whatever the task expects as examples (images ``(B, C, H, W)``, latents, or recorded sampling
trajectories ``(B, S+1, C, H, W)``). Classifier-free guidance needs no kind of its own: the null condition is one
more condition value (a reserved label, e.g. ``K - 1`` of a model built with ``num_class_embeds=K``, or the
embedding of the empty prompt / an all-zero embedding), so a training example or query that carries it is scored
under it like any other; see docs/conditional.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

__all__ = ["CONDITION_KINDS", "CONDITION_KEYS", "Conditioning", "split_batch", "check_model_condition"]

CONDITION_KINDS = ("class", "text")
#: the model keywords a condition is passed as, also the keys of ``Draws.data`` that hold them
CONDITION_KEYS = ("class_labels", "encoder_hidden_states", "encoder_attention_mask")
IMAGE_KEY = "image"
LABEL_KEYS = ("class_label", "class_labels", "label")
EMBEDDING_KEY = "encoder_hidden_states"
MASK_KEY = "encoder_attention_mask"


@dataclass(frozen=True)
class Conditioning:
    """What condition every example carries.

    Args:
        kind: "class" (integer labels) or "text" (token embeddings ``(L, E)`` per example, optional mask).
        num_classes: "class" only: labels must lie in ``[0, num_classes)`` (checked on every batch). None: taken
            from the model's ``config.num_class_embeds`` when it has one (checked at the forward pass).
        embed_dim: "text" only: the embedding width E (checked on every batch). None: the model's
            ``config.encoder_hid_dim`` or else ``config.cross_attention_dim`` when it has one.
    """
    kind: str
    num_classes: Optional[int] = None
    embed_dim: Optional[int] = None

    def __post_init__(self):
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"condition must be one of {CONDITION_KINDS} or None, got {self.kind!r}")
        for name in ("num_classes", "embed_dim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        if self.kind == "class" and self.embed_dim is not None:
            raise ValueError("embed_dim is for condition='text'; class conditions take num_classes")
        if self.kind == "text" and self.num_classes is not None:
            raise ValueError("num_classes is for condition='class'; text conditions take embed_dim")

    @classmethod
    def of(cls, value: Union[None, str, "Conditioning"]) -> Optional["Conditioning"]:
        """None, a kind ("class" / "text") or a ``Conditioning``."""
        if value is None or isinstance(value, Conditioning):
            return value
        if isinstance(value, str):
            return cls(value)
        raise TypeError(f"condition must be None, 'class', 'text' or a Conditioning, got {type(value).__name__}")

    @property
    def config(self) -> Dict[str, Any]:
        """Plain values (what a task's fingerprint records)."""
        return asdict(self)

    def split(self, batch: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
        """``batch`` -> ``(examples, {model keyword: tensor with leading dim B})``, validated."""
        if isinstance(batch, Mapping):
            if IMAGE_KEY not in batch:
                raise ValueError(f"a dict batch needs the key {IMAGE_KEY!r}; it has {sorted(batch)}")
            x = batch[IMAGE_KEY]
            if self.kind == "class":
                key = next((k for k in LABEL_KEYS if k in batch), None)
                if key is None:
                    raise ValueError(f"condition='class' needs one of the keys {LABEL_KEYS} in a dict batch; it "
                                     f"has {sorted(batch)}")
                cond = {"class_labels": batch[key]}
            else:
                if EMBEDDING_KEY not in batch:
                    raise ValueError(f"condition='text' needs the key {EMBEDDING_KEY!r} in a dict batch; it has "
                                     f"{sorted(batch)}")
                cond = {"encoder_hidden_states": batch[EMBEDDING_KEY]}
                if batch.get(MASK_KEY) is not None:
                    cond["encoder_attention_mask"] = batch[MASK_KEY]
        elif isinstance(batch, (tuple, list)):
            sizes = (2,) if self.kind == "class" else (2, 3)
            if len(batch) not in sizes:
                want = "(images, labels)" if self.kind == "class" else \
                    "(images, embeddings) or (images, embeddings, mask)"
                raise ValueError(f"condition={self.kind!r} needs batches {want}; got a tuple of {len(batch)}")
            x = batch[0]
            if self.kind == "class":
                cond = {"class_labels": batch[1]}
            else:
                cond = {"encoder_hidden_states": batch[1]}
                if len(batch) == 3:
                    cond["encoder_attention_mask"] = batch[2]
        else:
            want = "(images, labels) or dicts with 'image' and 'class_label'" if self.kind == "class" else \
                "(images, embeddings[, mask]) or dicts with 'image' and 'encoder_hidden_states'"
            raise ValueError(f"condition={self.kind!r} needs batches {want}; got a {type(batch).__name__} "
                             "(unconditional data?)")
        self._check_batch(x, cond)
        return x, cond

    def _check_batch(self, x: Any, cond: Dict[str, torch.Tensor]) -> None:
        b = x.shape[0] if torch.is_tensor(x) else None
        for k, v in cond.items():
            if not torch.is_tensor(v):
                raise ValueError(f"{k} must be a tensor, got {type(v).__name__}")
            if b is not None and v.shape[0] != b:
                raise ValueError(f"{k} has {v.shape[0]} rows for {b} examples")
        if self.kind == "class":
            y = cond["class_labels"]
            if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"class labels must be integers of shape (B,), got {y.dtype} {tuple(y.shape)}")
            if self.num_classes is not None and y.numel():
                check_labels(y, self.num_classes, "num_classes")
            return
        e = cond["encoder_hidden_states"]
        if e.dim() != 3 or not e.is_floating_point():
            raise ValueError(f"encoder_hidden_states must be float token embeddings (B, L, E), got {e.dtype} "
                             f"{tuple(e.shape)}")
        if self.embed_dim is not None and e.shape[-1] != self.embed_dim:
            raise ValueError(f"encoder_hidden_states have width {e.shape[-1]}, the task's embed_dim is "
                             f"{self.embed_dim}")
        mask = cond.get("encoder_attention_mask")
        if mask is not None:
            if tuple(mask.shape) != tuple(e.shape[:2]):
                raise ValueError(f"encoder_attention_mask must have shape (B, L) = {tuple(e.shape[:2])}, got "
                                 f"{tuple(mask.shape)}")
            if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("encoder_attention_mask must be bool or hold only 0 and 1 (1: attend)")


def check_labels(y: torch.Tensor, n: int, source: str) -> None:
    lo, hi = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
    if lo < 0 or hi >= n:
        raise ValueError(f"class labels must lie in [0, {n}) ({source}), got labels from {lo} to {hi}")


def split_batch(batch: Any, conditioning: Optional[Conditioning]) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Examples and model keywords of a batch. Unconditional: the batch itself, the first item of a tuple (later
    items, e.g. labels, are ignored) or a dict's "image"; no keywords."""
    if conditioning is not None:
        return conditioning.split(batch)
    if isinstance(batch, Mapping):
        if IMAGE_KEY not in batch:
            raise ValueError(f"a dict batch needs the key {IMAGE_KEY!r}; it has {sorted(batch)}")
        return batch[IMAGE_KEY], {}
    return (batch[0] if isinstance(batch, (tuple, list)) else batch), {}


def _model_config(model) -> Any:
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None and hasattr(cfg, "get") else None


def check_model_condition(model, conditioning: Optional[Conditioning], cond: Dict[str, torch.Tensor]) -> None:
    """Compare a (diffusers) model's configuration with the conditions about to be passed to it; models without
    a diffusers ``config`` are not checked here (they raise on their own)."""
    cfg = _model_config(model)
    if cfg is None:
        return
    has_class = cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None
    cross = cfg.get("cross_attention_dim")
    if conditioning is None:
        if has_class:
            raise ValueError("the model is class-conditional (num_class_embeds / class_embed_type is set): pass "
                             "DiffusionTask(..., condition='class') and data (images, labels)")
        if cross is not None:
            raise ValueError("the model takes encoder_hidden_states (cross_attention_dim is set): pass "
                             "DiffusionTask(..., condition='text') and data (images, embeddings[, mask])")
        return
    if conditioning.kind == "class":
        if not has_class:
            raise ValueError("condition='class' but the model has no class embedding (build it with "
                             "num_class_embeds=K)")
        k = cfg.get("num_class_embeds")
        if k is not None and cfg.get("class_embed_type") is None:
            if conditioning.num_classes is not None and conditioning.num_classes != k:
                raise ValueError(f"the task's num_classes={conditioning.num_classes} differs from the model's "
                                 f"num_class_embeds={k}")
            labels = cond["class_labels"]
            if conditioning.num_classes is None and labels.numel() and labels.device.type != "meta":
                check_labels(labels, int(k), "the model's num_class_embeds")
        return
    if cross is None:
        raise ValueError("condition='text' but the model has no cross-attention (cross_attention_dim is not set; "
                         "use a UNet2DConditionModel)")
    want = cfg.get("encoder_hid_dim") or cross
    width = cond["encoder_hidden_states"].shape[-1]
    if isinstance(want, int) and width != want:
        what = "encoder_hid_dim" if cfg.get("encoder_hid_dim") else "cross_attention_dim"
        raise ValueError(f"encoder_hidden_states have width {width}, the model's {what} is {want}")

"""Captions and their token embeddings: the conditions of a text-conditional run (a ``UNet2DConditionModel``).

**Captions** come from an image folder's ``metadata.jsonl`` (the Hugging Face ``imagefolder`` convention): one JSON
object per line with ``file_name`` (the image's path relative to the folder holding that ``metadata.jsonl``; one
may sit in any sub-folder) and ``text`` (its caption); other keys are ignored. Every image of the folder needs
exactly one non-blank caption, and every line must name an image of the folder (:func:`read_captions`; one-line
``TextError`` naming the file and line otherwise).

**Token embeddings** ``(L, E)`` per text come from one of two sources, computed once and held fixed (like a VAE,
the text encoder is not tracked: no curvature, no gradient):

* a precomputed embeddings file (:class:`EmbeddingsFile`, ``--embeddings``): a safetensors file holding

  ==============  =========================================================================================
  ``embeddings``  ``(R, L, E)`` float (F16, BF16, F32 or F64; used as float32): row r embeds one text
  ``mask``        optional ``(R, L)`` bool or 0/1 integers (1: attend), passed as ``encoder_attention_mask``
  ==============  =========================================================================================

  and, in its safetensors metadata (``__metadata__``, string values),

  ==============  =========================================================================================
  ``texts``       required: a JSON list of R strings, the text row r embeds (``""``: the empty prompt, the
                  null condition of condition dropout and classifier-free guidance)
  ``file_names``  optional: a JSON list of R entries, the training image row r belongs to (its path relative
                  to the data folder, as ``metadata.jsonl`` names it) or null
  ==============  =========================================================================================

  e.g. ``safetensors.torch.save_file({"embeddings": e, "mask": m}, path, metadata={"texts": json.dumps(texts),
  "file_names": json.dumps(names)})``. A training image takes the row naming its file when the file has
  ``file_names`` (that row's text must equal the image's caption: a stale file is refused), else the row whose
  text is its caption (the texts must then be unique). Query prompts and the empty prompt are matched by text.
  Extra rows are allowed (the images a ``--limit`` leaves out, prompts of other runs).
* a local text encoder folder (:class:`ClipTextEncoder`, ``--text-encoder``, or the ``text_encoder/`` and
  ``tokenizer/`` of a ``--model`` pipeline folder): transformers' ``CLIPTextModel`` and ``CLIPTokenizer``, loaded
  with ``local_files_only=True`` (never a download; transformers must be installed). Each text is tokenized and
  padded to ``max_length`` tokens (truncated beyond; default the tokenizer's ``model_max_length``, at most the
  encoder's ``max_position_embeddings``) and its embedding is the encoder's ``last_hidden_state`` ``(L,
  hidden_size)`` in float32 (eval mode, no gradient), with no mask: Stable Diffusion's convention (its UNet attends
  to the padding tokens, as it was trained).

Every stage that uses embeddings records their identity (:meth:`TextConditions.identity`): for a file, the
content of the rows it uses; for an encoder, the content of its folders and ``max_length``.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..identity import path_fingerprint, tensors_fingerprint
from .data import IMAGE_EXTENSIONS, DataError, ImageDataset

__all__ = ["TextError", "TextConfig", "METADATA_FILE", "read_captions", "with_captions", "Embedded",
           "EmbeddingsFile", "ClipTextEncoder", "encoder_folders", "query_prompts", "TextConditions",
           "text_source"]

METADATA_FILE = "metadata.jsonl"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TextError(DataError):
    """Unusable captions, embeddings or text encoder; the one-line message names the file."""


def _short(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[:n - 3] + "...")


@dataclass(frozen=True)
class TextConfig:
    """The text conditions of a run.

    captions: the run is text-conditional (``True``: each training image is conditioned on its caption from the
        folder's ``metadata.jsonl``); ``None`` ("auto"): when the model has cross-attention (a
        ``UNet2DConditionModel``, ``cross_attention_dim`` set); ``False``: never.
    embeddings: a precomputed embeddings file (``EmbeddingsFile``), or None.
    encoder: a local text encoder folder (``ClipTextEncoder``: a folder with ``text_encoder/`` and ``tokenizer/``,
        or one holding both), or None. With neither, a ``--model`` pipeline folder's ``text_encoder/`` and
        ``tokenizer/`` are used.
    max_length: tokens per text with an encoder (None: the tokenizer's ``model_max_length``); a file's L is its own.
    prompts: the prompts queries are generated for (query k: prompt ``k mod P``); empty: the distinct training
        captions in file-name order.
    """

    captions: Optional[bool] = None
    embeddings: Optional[str] = None
    encoder: Optional[str] = None
    max_length: Optional[int] = None
    prompts: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.captions not in (None, True, False):
            raise TextError(f"captions must be true, false or none (auto), got {self.captions!r}")
        for name in ("embeddings", "encoder"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise TextError(f"text {name} must be a path or none, got {v!r}")
        if self.embeddings and self.encoder:
            raise TextError("give --embeddings (precomputed token embeddings) or --text-encoder, not both")
        m = self.max_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise TextError(f"max_length must be a whole number >= 1 (or none: the tokenizer's), got {m!r}")
        if m is not None and self.embeddings:
            raise TextError("--max-length is for a text encoder; an embeddings file's L is its own (pass "
                            "--max-length none)")
        prompts = self.prompts
        if isinstance(prompts, str) or not isinstance(prompts, (tuple, list)):
            raise TextError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        for p in prompts:
            if not isinstance(p, str):
                raise TextError(f"prompts must be strings, got {type(p).__name__}")
            if not p.strip():
                raise TextError("a prompt is blank (the empty prompt is the null condition: generate with "
                                "--guidance-scale instead)")
        object.__setattr__(self, "prompts", tuple(prompts))


# -- captions ----------------------------------------------------------------------------------------------------

def _all_images(root: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found)


def _metadata_files(root: str) -> List[str]:
    return sorted(os.path.join(dp, METADATA_FILE) for dp, _, fs in os.walk(root) if METADATA_FILE in fs)


def read_captions(root: str, paths: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """The caption of each image ``paths`` names (relative paths in ``root``; None: every image of the folder,
    sorted), from the ``metadata.jsonl`` files under ``root``. Checks every line (valid JSON object, a
    ``file_name`` string naming an image of the folder once, a non-blank ``text`` string) and that every image of
    the folder has a caption; raises a one-line ``TextError`` naming the file and line."""
    if not os.path.isdir(root):
        raise TextError(f"{root}: captions need an image folder with a {METADATA_FILE} (not 'digits' or an .npz)")
    metas = _metadata_files(root)
    if not metas:
        raise TextError(f"{root}: no {METADATA_FILE}; captions need one JSON line per image, "
                        f'{{"file_name": "a.png", "text": "its caption"}} (the Hugging Face imagefolder convention)')
    images = _all_images(root)
    known = set(images)
    captions: Dict[str, str] = {}
    where: Dict[str, str] = {}
    for meta in metas:
        base = os.path.relpath(os.path.dirname(meta), root).replace(os.sep, "/")
        try:
            with open(meta, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise TextError(f"{meta}: cannot read ({type(exc).__name__}: {exc})".splitlines()[0]) from None
        for lineno, line in enumerate(lines, 1):
            at = f"{meta} line {lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise TextError(f"{at}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(obj, dict):
                raise TextError(f"{at}: not a JSON object (expected {{\"file_name\": ..., \"text\": ...}})")
            name = obj.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise TextError(f"{at}: needs a 'file_name' string (the image's path relative to {METADATA_FILE})")
            if "text" not in obj:
                raise TextError(f"{at}: no 'text' (the caption of {name!r})")
            text = obj["text"]
            if not isinstance(text, str):
                raise TextError(f"{at}: 'text' of {name!r} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise TextError(f"{at}: the caption of {name!r} is empty")
            rel = posixpath.normpath(posixpath.join(base, name.replace("\\", "/")))
            if posixpath.isabs(name) or rel == ".." or rel.startswith("../"):
                raise TextError(f"{at}: file_name {name!r} is outside the folder")
            if rel not in known:
                raise TextError(f"{at}: file_name {name!r} is not an image of the folder (no PNG/JPEG {rel!r} "
                                f"under {root})")
            if rel in captions:
                raise TextError(f"{at}: a second caption for {rel!r} (the first: {where[rel]})")
            captions[rel] = text
            where[rel] = at
    missing = [p for p in images if p not in captions]
    if missing:
        raise TextError(f"{root}: {len(missing)} image(s) have no caption in {METADATA_FILE}, e.g. {missing[0]!r}")
    wanted = images if paths is None else [p.replace(os.sep, "/") for p in paths]
    absent = [p for p in wanted if p not in captions]
    if absent:
        raise TextError(f"{root}: no caption for {absent[0]!r}")
    return tuple(captions[p] for p in wanted)


def with_captions(data: ImageDataset) -> ImageDataset:
    """``data`` (an image folder's) with its ``captions`` read from the folder's ``metadata.jsonl``."""
    if data.paths is None or not os.path.isdir(data.source):
        raise TextError(f"{data.source or 'data'}: captions need an image folder with a {METADATA_FILE} (not "
                        f"'digits' or an .npz)")
    return replace(data, captions=read_captions(data.source, data.paths))


# -- embeddings ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Embedded:
    """Token embeddings of n texts: ``embeddings`` ``(n, L, E)`` float32 and ``mask`` ``(n, L)`` bool or None."""

    embeddings: torch.Tensor
    mask: Optional[torch.Tensor] = None

    def as_condition(self) -> Dict[str, torch.Tensor]:
        """The model keywords: ``{"encoder_hidden_states": (n, L, E)[, "encoder_attention_mask": (n, L)]}``."""
        out = {"encoder_hidden_states": self.embeddings}
        if self.mask is not None:
            out["encoder_attention_mask"] = self.mask
        return out

    def as_data(self, images: torch.Tensor) -> tuple:
        """What ``DiffusionTask(condition="text")`` takes: ``(images, embeddings[, mask])``."""
        return (images, self.embeddings) if self.mask is None else (images, self.embeddings, self.mask)


def _json_list(meta: dict, key: str, rows: int, path: str, allow_null: bool) -> Optional[list]:
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except ValueError as exc:
        raise TextError(f"{path}: metadata {key!r} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    ok = (lambda v: isinstance(v, str) or (allow_null and v is None))
    if not isinstance(value, list) or not all(ok(v) for v in value):
        what = "strings or nulls" if allow_null else "strings"
        raise TextError(f"{path}: metadata {key!r} must be a JSON list of {what}")
    if len(value) != rows:
        raise TextError(f"{path}: metadata {key!r} has {len(value)} entries for {rows} embedding rows")
    return value


class EmbeddingsFile:
    """A precomputed embeddings file (layout: the module docstring), read and checked whole on construction:
    ``embeddings`` ``(R, L, E)`` float32 (finite), ``mask`` ``(R, L)`` bool or None, ``texts`` (R), ``file_names``
    (R entries, or None). Raises a one-line ``TextError`` naming the file."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        if not os.path.isfile(path):
            raise TextError(f"{path}: no such embeddings file")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if "embeddings" not in keys:
                    raise TextError(f"{path}: no 'embeddings' tensor (R, L, E) (found: "
                                    f"{', '.join(sorted(keys)) or 'none'})")
                emb = f.get_tensor("embeddings")
                mask = f.get_tensor("mask") if "mask" in keys else None
        except TextError:
            raise
        except Exception as exc:  # SafetensorError, OSError, ... for a truncated or foreign file
            raise TextError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
        if emb.dim() != 3 or emb.dtype not in _FLOAT_DTYPES or 0 in emb.shape:
            raise TextError(f"{path}: 'embeddings' must be float (R, L, E) with no empty side, got {emb.dtype} "
                            f"{tuple(emb.shape)}")
        emb = emb.float()
        bad = ~torch.isfinite(emb).flatten(1).all(1)
        rows = emb.shape[0]
        texts = _json_list(meta, "texts", rows, path, allow_null=False)
        if texts is None:
            raise TextError(f"{path}: no 'texts' metadata (a JSON list of the {rows} texts the rows embed)")
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            raise TextError(f"{path}: embedding row {r} ({_short(texts[r])}) has NaN or infinite values")
        if mask is not None:
            if tuple(mask.shape) != tuple(emb.shape[:2]):
                raise TextError(f"{path}: 'mask' must be (R, L) = {tuple(emb.shape[:2])}, got {tuple(mask.shape)}")
            if mask.dtype != torch.bool:
                if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                    raise TextError(f"{path}: 'mask' must be bool or hold only the integers 0 and 1 (1: attend)")
                mask = mask.bool()
            empty = ~mask.any(1)
            if bool(empty.any()):
                r = int(empty.nonzero()[0])
                raise TextError(f"{path}: mask row {r} ({_short(texts[r])}) attends to no token")
        names = _json_list(meta, "file_names", rows, path, allow_null=True)
        self.embeddings, self.mask, self.texts = emb, mask, tuple(texts)
        self.file_names = None if names is None else tuple(
            None if n is None else posixpath.normpath(n.replace("\\", "/")) for n in names)
        self._by_text: Dict[str, List[int]] = {}
        for r, t in enumerate(self.texts):
            self._by_text.setdefault(t, []).append(r)

    @property
    def width(self) -> int:
        """E, the embedding width."""
        return int(self.embeddings.shape[2])

    def text_row(self, text: str, what: str) -> int:
        """The row embedding ``text``; ``what`` names it in the error when there is none."""
        rows = self._by_text.get(text)
        if not rows:
            raise TextError(f"{self.path}: no row embeds {what} {_short(text)} (add a row with that text)")
        if len(rows) > 1 and len({self._row_key(r) for r in rows}) > 1:
            raise TextError(f"{self.path}: rows {rows[0]} and {rows[1]} embed the same text {_short(text)} "
                            f"differently; which one {what} takes is ambiguous")
        return rows[0]

    def _row_key(self, r: int) -> str:
        return tensors_fingerprint([self.embeddings[r], None if self.mask is None else self.mask[r]])

    def null_row(self) -> Optional[int]:
        """The row of the empty prompt (text ""), or None."""
        return self.text_row("", "the empty prompt") if "" in self._by_text else None

    def rows_for(self, file_names: Sequence[str], captions: Sequence[str]) -> torch.Tensor:
        """Row of each training image ``(N,)`` int64: by ``file_names`` when the file has them (the row's text
        must equal the caption), else by caption text."""
        out = []
        if self.file_names is not None:
            index: Dict[str, int] = {}
            for r, n in enumerate(self.file_names):
                if n is None:
                    continue
                if n in index:
                    raise TextError(f"{self.path}: rows {index[n]} and {r} both belong to file {n!r}")
                index[n] = r
            for name, caption in zip(file_names, captions):
                name = name.replace(os.sep, "/")
                r = index.get(name)
                if r is None:
                    raise TextError(f"{self.path}: no row belongs to training image {name!r} (file_names)")
                if self.texts[r] != caption:
                    raise TextError(f"{self.path}: row {r} of {name!r} embeds {_short(self.texts[r])} but its "
                                    f"caption is {_short(caption)} (a stale embeddings file?)")
                out.append(r)
        else:
            out = [self.text_row(c, f"the caption of {name!r},") for name, c in zip(file_names, captions)]
        return torch.tensor(out, dtype=torch.long)

    def take(self, rows: torch.Tensor) -> Embedded:
        """The embeddings (and mask) of ``rows`` ``(n,)``."""
        return Embedded(self.embeddings[rows].contiguous(), None if self.mask is None else self.mask[rows].clone())


def encoder_folders(path: str) -> Tuple[str, str]:
    """``(text encoder folder, tokenizer folder)`` of a text encoder spec: a folder with ``text_encoder/`` and
    ``tokenizer/`` (a diffusers pipeline folder), or one folder holding the encoder's ``config.json`` and the
    tokenizer's files."""
    if not os.path.isdir(path):
        raise TextError(f"{path}: no such text encoder folder")
    enc, tok = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    if os.path.isdir(enc) or os.path.isdir(tok):
        for d in (enc, tok):
            if not os.path.isdir(d):
                raise TextError(f"{path}: has {'tokenizer' if d == enc else 'text_encoder'}/ but no "
                                f"{os.path.basename(d)}/")
    else:
        enc = tok = path
    if not os.path.isfile(os.path.join(enc, "config.json")):
        raise TextError(f"{enc}: not a text encoder folder (no config.json; expected a CLIPTextModel saved with "
                        f"save_pretrained)")
    if not any(os.path.isfile(os.path.join(tok, f)) for f in ("vocab.json", "tokenizer.json")):
        raise TextError(f"{tok}: not a CLIP tokenizer folder (no vocab.json / tokenizer.json)")
    return enc, tok


class ClipTextEncoder:
    """transformers' ``CLIPTextModel`` + ``CLIPTokenizer`` from a local folder (``encoder_folders``), loaded on
    first use with ``local_files_only=True``; ``encode(texts)`` gives ``last_hidden_state`` ``(n, L, E)`` float32,
    ``L = max_length`` (padded, truncated), no mask. ``width`` and ``identity`` read no weights into a model."""

    def __init__(self, path: str, max_length: Optional[int] = None):
        self.path = path
        self.encoder_dir, self.tokenizer_dir = encoder_folders(path)
        try:
            with open(os.path.join(self.encoder_dir, "config.json")) as f:
                self.config = json.load(f)
        except (OSError, ValueError) as exc:
            raise TextError(f"{self.encoder_dir}/config.json: cannot read ({exc})".splitlines()[0]) from None
        if not isinstance(self.config, dict) or not isinstance(self.config.get("hidden_size"), int):
            raise TextError(f"{self.encoder_dir}/config.json: not a CLIPTextModel config (no hidden_size)")
        self.max_length = max_length
        self._model = self._tokenizer = None
        self._identity: Optional[str] = None

    @property
    def width(self) -> int:
        """E: the encoder's ``hidden_size``."""
        return int(self.config["hidden_size"])

    def identity(self) -> str:
        """Content of the encoder and tokenizer folders, and ``max_length``."""
        if self._identity is None:
            folders = list(dict.fromkeys([self.encoder_dir, self.tokenizer_dir]))
            self._identity = tensors_fingerprint([{"max_length": self.max_length},
                                                  [path_fingerprint(f) for f in folders]])
        return self._identity

    def _load(self):
        if self._model is not None:
            return
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise TextError(f"--text-encoder {self.path} needs the transformers package (pip install "
                            f"transformers), or pass precomputed --embeddings") from None
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            try:
                tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
            except Exception as exc:
                raise TextError(f"{self.tokenizer_dir}: cannot load a CLIPTokenizer ({type(exc).__name__}: "
                                f"{exc})".splitlines()[0][:300]) from None
            try:
                model = CLIPTextModel.from_pretrained(self.encoder_dir, local_files_only=True)
            except Exception as exc:
                raise TextError(f"{self.encoder_dir}: cannot load a CLIPTextModel ({type(exc).__name__}: "
                                f"{exc})".splitlines()[0][:300]) from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TextError(f"{self.encoder_dir}: weight {name!r} has NaN or infinite values")
        self._model, self._tokenizer = model.float().eval().requires_grad_(False), tokenizer

    @property
    def length(self) -> int:
        """L: tokens per text."""
        self._load()
        limit = int(self._model.config.max_position_embeddings)
        want = self.max_length or int(getattr(self._tokenizer, "model_max_length", limit) or limit)
        if self.max_length is not None and self.max_length > limit:
            raise TextError(f"--max-length {self.max_length}: the text encoder {self.encoder_dir} takes at most "
                            f"{limit} tokens")
        return min(want, limit)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Embedded:
        """``last_hidden_state`` of each text: ``(n, L, E)`` float32 on the CPU (no mask)."""
        self._load()
        length = self.length
        out = []
        for s in range(0, len(texts), batch_size):
            ids = self._tokenizer(list(texts[s:s + batch_size]), padding="max_length", max_length=length,
                                  truncation=True, return_tensors="pt").input_ids
            out.append(self._model(input_ids=ids).last_hidden_state.float())
        emb = torch.cat(out) if out else torch.zeros(0, length, self.width)
        if not bool(torch.isfinite(emb).all()):
            raise TextError(f"{self.encoder_dir}: the text encoder produced NaN or infinite embeddings")
        return Embedded(emb.contiguous())


def text_source(config: TextConfig, model_spec: Optional[str] = None) -> Union[EmbeddingsFile, ClipTextEncoder]:
    """The embeddings source of ``config``: its file, its encoder, or else the ``text_encoder/`` + ``tokenizer/``
    of a ``model_spec`` pipeline folder; a one-line ``TextError`` when there is none."""
    if config.embeddings:
        return EmbeddingsFile(config.embeddings)
    if config.encoder:
        return ClipTextEncoder(config.encoder, config.max_length)
    if model_spec and os.path.isdir(os.path.join(model_spec, "text_encoder")):
        return ClipTextEncoder(model_spec, config.max_length)
    raise TextError("a text-conditional run needs token embeddings: --embeddings FILE (precomputed) or "
                    "--text-encoder FOLDER (a local CLIPTextModel + CLIPTokenizer)")


def query_prompts(prompts: Sequence[str], captions: Sequence[str], num_queries: int) -> Tuple[str, ...]:
    """The prompt of each query: query k gets ``prompts[k mod P]``, or with no prompts the distinct training
    captions in file-name order (``captions[k mod D]`` of the distinct ones)."""
    pool = list(prompts) or list(dict.fromkeys(captions))
    if not pool:
        raise TextError("no prompts to generate queries for (no --prompt and no training captions)")
    return tuple(pool[k % len(pool)] for k in range(num_queries))


class TextConditions:
    """The token embeddings of one run: of each training caption ``(N, L, E)``, of each query's prompt ``(Q, L,
    E)`` and of the empty prompt ``(1, L, E)`` (the null condition; None for a file without an empty-prompt row).

    source: an ``EmbeddingsFile`` or ``ClipTextEncoder``; file_names / captions: the training images' relative
    paths and captions (N each); prompts: the queries' prompts (Q). A file's rows are matched (and checked) here;
    an encoder runs on first use, once per distinct text."""

    def __init__(self, source: Union[EmbeddingsFile, ClipTextEncoder], file_names: Sequence[str],
                 captions: Sequence[str], prompts: Sequence[str]):
        if len(file_names) != len(captions):
            raise ValueError(f"{len(file_names)} file names for {len(captions)} captions")
        self.source, self.captions, self.prompts = source, tuple(captions), tuple(prompts)
        self._cache: Dict[str, Embedded] = {}
        if isinstance(source, EmbeddingsFile):
            self._rows = {"train": source.rows_for(file_names, captions),
                          "queries": torch.tensor([source.text_row(p, "the prompt") for p in self.prompts],
                                                  dtype=torch.long)}
            null = source.null_row()
            if null is not None:
                self._rows["null"] = torch.tensor([null], dtype=torch.long)

    @property
    def kind(self) -> str:
        """"embeddings" (a file) or "encoder"."""
        return "embeddings" if isinstance(self.source, EmbeddingsFile) else "encoder"

    @property
    def width(self) -> int:
        return self.source.width

    @property
    def has_null(self) -> bool:
        """Whether the empty prompt's embedding exists (always with an encoder)."""
        return not isinstance(self.source, EmbeddingsFile) or "null" in self._rows

    def identity(self, *parts: str) -> str:
        """Identity of the embeddings of ``parts`` ("train", "queries", "null"): a file's rows by content, an
        encoder by its folders and ``max_length``."""
        if not isinstance(self.source, EmbeddingsFile):
            return f"encoder {self.source.identity()}"
        rows = [self._rows[p] if p in self._rows else None for p in parts]
        return tensors_fingerprint([[p, None if r is None else self.source.take(r).as_condition()]
                                    for p, r in zip(parts, rows)])

    def _get(self, part: str) -> Optional[Embedded]:
        if part not in self._cache:
            if isinstance(self.source, EmbeddingsFile):
                if part not in self._rows:
                    return None
                self._cache[part] = self.source.take(self._rows[part])
            else:
                texts = {"train": self.captions, "queries": self.prompts, "null": ("",)}
                distinct = list(dict.fromkeys(t for p in ("train", "queries", "null") for t in texts[p]))
                emb = self.source.encode(distinct).embeddings
                where = {t: i for i, t in enumerate(distinct)}
                for p, ts in texts.items():
                    self._cache[p] = Embedded(emb[torch.tensor([where[t] for t in ts], dtype=torch.long)]
                                              .reshape(len(ts), *emb.shape[1:]).contiguous())
        return self._cache[part]

    def train(self) -> Embedded:
        """Each training caption's embeddings ``(N, L, E)`` (and mask)."""
        return self._get("train")

    def queries(self) -> Embedded:
        """Each query prompt's embeddings ``(Q, L, E)`` (and mask)."""
        return self._get("queries")

    def null(self) -> Optional[Embedded]:
        """The empty prompt's embeddings ``(1, L, E)`` (and mask), or None."""
        return self._get("null")

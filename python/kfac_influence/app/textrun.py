"""The text-conditional side of a run (``--captions``): its token embeddings, the checks before anything is
written, and the identities the stages record (``kfac_influence.diffusion.text`` holds the formats).

A text-conditional run trains each image under its caption's token embeddings (condition dropout replaces them by
the empty prompt's with probability ``--condition-dropout``), generates query k for prompt ``k mod P`` (``--prompt``
/ ``--prompts``, else the distinct training captions in file-name order) with ``--guidance-scale``, fits the
curvature on ``(images, embeddings[, mask])`` and scores each query under its own prompt.
"""
from __future__ import annotations

import os
from typing import Dict

from ..diffusion.models import PRESETS, ModelError, is_text_conditional, model_config, text_width
from ..diffusion.text import EmbeddingsFile, TextConditions, query_prompts, text_source
from .layout import StageError

__all__ = ["load_text", "check_text", "text_inputs", "TEXT_PARTS"]

#: The embeddings each stage reads: training captions, query prompts, the empty prompt (null condition).
TEXT_PARTS = {"train": ("train", "null"), "sample": ("queries", "null"), "fit": ("train",),
              "score": ("train", "queries")}


def load_text(ctx) -> TextConditions:
    """The run's ``TextConditions``: its source (``--embeddings``, ``--text-encoder`` or the ``--model``
    folder's encoder), the training images' captions and the queries' prompts."""
    data = ctx.data()
    config = ctx.config
    prompts = query_prompts(config.text.prompts, data.captions, config.sample.num_queries)
    spec = config.model.spec
    source = text_source(config.text, spec if os.path.isdir(spec) else None)
    return TextConditions(source, data.paths, data.captions, prompts)


def check_text(ctx) -> bool:
    """Whether the run is text-conditional, after checking it: a one-line StageError unless its data,
    embeddings, model and settings agree: not also class-conditional; a ``UNet2DConditionModel``; every caption and
    prompt embedded (a file's rows are checked here, an encoder's folder is found); the embeddings' width E equal to
    the model's ``cross_attention_dim`` (a preset's follows E); an empty-prompt embedding when condition dropout or
    guidance needs one. A run without text refuses a ``UNet2DConditionModel`` (it cannot run without embeddings)."""
    config = ctx.config
    spec = config.model.spec
    if not ctx.text_conditional:
        try:
            text_model = is_text_conditional(model_config(spec))
        except ModelError:
            return False  # the stage that builds the model says why
        if text_model:
            raise StageError(f"--model {spec} is text-conditional (a UNet2DConditionModel, which takes token "
                             f"embeddings) but --captions is off; use --captions true (or auto)")
        return False
    if ctx.conditional:
        raise StageError("a run is class- or text-conditional, not both: pass --labels false or --captions false")
    cfg = model_config(spec)
    if not is_text_conditional(cfg):
        raise StageError(f"--captions needs a text-conditional model (a UNet2DConditionModel, which takes token "
                         f"embeddings), e.g. --model text-tiny; --model {spec} is not one")
    text = ctx.text()
    want = text_width(cfg)
    if spec not in PRESETS and want != text.width:
        raise StageError(f"the token embeddings have width {text.width} but --model {spec} takes {want} "
                         f"(cross_attention_dim); use embeddings of the model's text encoder")
    if not text.has_null:
        where = text.source.path if isinstance(text.source, EmbeddingsFile) else "the embeddings"
        if config.sample.guidance_scale != 1.0:
            raise StageError(f"{where}: no row for the empty prompt (text \"\"), the null condition that "
                             f"--guidance-scale needs; add one, or use --guidance-scale 1")
        if config.train.steps > 0 and config.train.condition_dropout > 0:
            raise StageError(f"{where}: no row for the empty prompt (text \"\"), the null condition that "
                             f"--condition-dropout needs; add one, or use --condition-dropout 0")
    return True


def text_inputs(ctx, stage: str) -> Dict[str, str]:
    """``{"text": identity}`` of the embeddings ``stage`` reads (``TEXT_PARTS``), ``{}`` for a run without text
    (or a stage that reads none)."""
    if not ctx.text_conditional or stage not in TEXT_PARTS:
        return {}
    return {"text": ctx.text().identity(*TEXT_PARTS[stage])}
